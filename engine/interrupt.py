"""The caller's Cancel: checked between steps (before an encode, before a prefill) and polled once per token."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.api import GenerationRequest
from ..core.errors import GenerationInterrupted
from ..perf_monitor import RunRecord


def check_stop(req: GenerationRequest, rec: RunRecord) -> None:
    """Raise ``GenerationInterrupted`` (and mark the record) when the caller asked to stop."""
    if req.should_stop is not None and req.should_stop():
        rec.interrupted = True
        raise GenerationInterrupted("Generation was interrupted.")


class StopFlag:
    """A stopping criterion that polls the caller's interrupt flag once per generated token."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        stop = bool(self.should_stop and self.should_stop())
        self.stopped = self.stopped or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
