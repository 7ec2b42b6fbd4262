"""The pack's error types: every message says what the user can do about it."""

from __future__ import annotations


class QwenVLError(RuntimeError):
    """An error a user can act on: the message says what to do."""

class ModelNotFoundError(QwenVLError):
    pass

class GenerationInterrupted(QwenVLError):
    pass


def first_line(exc: BaseException) -> str:
    """An exception in one line for a log or a status (Dynamo's "backend='x' raised:" line gets the next one,
    which says what)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if not lines[0].endswith(":") or len(lines) < 2 else f"{lines[0]} {lines[1]}"
    return f"{type(exc).__name__}: {text[:200]}"
