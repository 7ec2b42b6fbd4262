"""The pack's error types: every message says what the user can do about it."""

from __future__ import annotations


class QwenVLError(RuntimeError):
    """An error a user can act on: the message says what to do."""

class ModelNotFoundError(QwenVLError):
    pass

class GenerationInterrupted(QwenVLError):
    pass
