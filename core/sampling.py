"""A request's sampling settings, normalised once: what the local engine and a server are both asked for.

``Sampling.from_request`` reads a :class:`~core.api.GenerationRequest`; each backend builds its own form from it
(``engine.generation.Generator.sampling_kwargs``: transformers' ``generate`` arguments;
``backends.streams.sampling_fields``: the OpenAI chat body), so the two cannot drift apart. The clamps are
the ones a server would otherwise refuse the request for (vLLM: top_p in (0, 1], a repetition penalty above
0, min_tokens at most max_tokens), so both backends answer the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import GenerationRequest

SEED_MODULUS = 2**63  # torch.manual_seed and an OpenAI body's "seed" both take a signed 64-bit integer
MIN_TOP_P = 1e-6
MIN_REPETITION_PENALTY = 1e-3


@dataclass(frozen=True)
class Sampling:
    greedy: bool
    temperature: float  # 0.0 when greedy
    top_p: float  # in [MIN_TOP_P, 1]
    top_k: int  # 0: no top-k cut
    repetition_penalty: float | None  # None: no penalty (unset or 1.0)
    min_new_tokens: int  # in [0, max_new_tokens]
    max_new_tokens: int
    seed: int  # in [0, 2**63)

    @classmethod
    def from_request(cls, req: GenerationRequest, max_new_tokens: int | None = None) -> Sampling:
        """``max_new_tokens``: the cap actually used (the local engine shortens it to fit the context); the
        request's own when None."""
        max_new = int(req.max_new_tokens if max_new_tokens is None else max_new_tokens)
        temperature = float(req.temperature)
        greedy = not (bool(req.do_sample) and temperature > 0)
        penalty = float(req.repetition_penalty) if req.repetition_penalty else 1.0
        return cls(
            greedy=greedy,
            temperature=0.0 if greedy else temperature,
            top_p=min(max(float(req.top_p), MIN_TOP_P), 1.0),
            top_k=max(int(req.top_k), 0),
            repetition_penalty=None if penalty == 1.0 else max(penalty, MIN_REPETITION_PENALTY),
            min_new_tokens=max(0, min(int(req.min_new_tokens), max_new)),
            max_new_tokens=max_new,
            seed=int(req.seed) % SEED_MODULUS,
        )

    @property
    def fixed_length(self) -> bool:
        """The request asks for exactly ``max_new_tokens`` tokens (benchmarks): an end-of-answer must not stop it."""
        return 0 < self.min_new_tokens == self.max_new_tokens
