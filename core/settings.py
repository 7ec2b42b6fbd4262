"""Numbers from ``QWENVL_FAST_*`` environment variables, each read the same way: a value that is not a number (or
is below its minimum) is an error that names the variable and what it takes, never a raw ``ValueError`` and never
a silent default (a typo must not quietly change a limit)."""

from __future__ import annotations

import math
import os

from .errors import QwenVLError


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip()


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    """``$name`` as a whole number (``_`` allowed as a digit separator), ``default`` when unset or empty."""
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QwenVLError(f"${name} must be a whole number (it is '{raw[:40]}'); unset it for the default "
                          f"{default}.") from None
    return _at_least(name, value, minimum)


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    """``$name`` as a finite number, ``default`` when unset or empty."""
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise QwenVLError(f"${name} must be a number (it is '{raw[:40]}'); unset it for the default "
                          f"{default:g}.") from None
    return _at_least(name, value, minimum)


def _at_least(name: str, value: float, minimum: float | None):
    if minimum is not None and value < minimum:
        raise QwenVLError(f"${name} must be at least {minimum:g} (it is {value:g}).")
    return value


def env_mib(name: str, default_mib: int) -> int:
    """A size in MiB (fractions allowed, 0 allowed), as bytes."""
    return int(env_float(name, default_mib, 0.0) * (1 << 20))
