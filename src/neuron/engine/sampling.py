"""Next-token choice from logits: penalties, temperature, top-k, top-p, seeded draws."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from cortex.protocol.messages import ModelSpec, SamplingParams


@dataclass(frozen=True)
class SamplingDefaults:
    """What a job that leaves temperature or top_p unset gets for this model."""

    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def for_model(cls, spec: ModelSpec, generation_config: Any) -> SamplingDefaults:
        sampled = bool(getattr(generation_config, "do_sample", False))
        temperature = spec.temperature
        if temperature is None:
            temperature = getattr(generation_config, "temperature", None) if sampled else None
        top_p = spec.top_p
        if top_p is None:
            top_p = getattr(generation_config, "top_p", None) if sampled else None
        return cls(temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p)


class BadLogitBias(ValueError):
    pass


class Sampler:
    def __init__(
        self, params: SamplingParams, defaults: SamplingDefaults, device: torch.device, vocab_size: int | None = None
    ) -> None:
        self._p = params
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            outside = [i for i in params.logit_bias if i < 0 or (vocab_size is not None and i >= vocab_size)]
            if outside:
                raise BadLogitBias(
                    f"`logit_bias` names token id {outside[0]}, outside this model's vocabulary (0..{vocab_size})"
                )
            ids = torch.tensor(list(params.logit_bias), device=device)
            self._bias = (ids, torch.tensor(list(params.logit_bias.values()), device=device, dtype=torch.float32))
        self._temperature = params.temperature if params.temperature is not None else defaults.temperature
        self._top_p = params.top_p if params.top_p is not None else defaults.top_p
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self._counts: dict[int, int] = {}

    def __call__(self, logits: torch.Tensor) -> int:
        p = self._p
        logits = logits.float()
        if self._bias is not None:
            logits = logits.clone()
            logits[self._bias[0]] += self._bias[1]
        if self._counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self._counts), device=logits.device)
            counts = torch.tensor(list(self._counts.values()), device=logits.device, dtype=logits.dtype)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        # Below ~1e-6 the scaled logits overflow float32 anyway: that is greedy.
        if self._temperature < 1e-6:
            token = int(torch.argmax(logits))
        else:
            token = self._draw(logits / self._temperature)
        self.seen(token)
        return token

    def seen(self, token: int) -> None:
        """`token` was generated (sampled here, or resumed from an earlier try): it counts for the penalties."""
        self._counts[token] = self._counts.get(token, 0) + 1

    def _draw(self, logits: torch.Tensor) -> int:
        p = self._p
        if p.top_k is not None and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self._top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Drop a token when the tokens before it already cover top_p; the first always stays.
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= self._top_p
            drop[0] = False  # also when top_p rounds to 0 in float32
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self._gen)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self._gen))
