"""Vectorized sampling: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from engine.request import Request


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with ``-inf``.

    ``top_k [B]`` (0 = off) and ``top_p [B]`` (1 = off). One descending sort serves
    both filters; the most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # drop a token once the mass strictly before it already reaches top_p
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Picks one token per row of ``logits [B, V]`` (float32) for ``requests``.

    Random rows use the exponential-race trick (``argmax(p / E)`` with
    ``E ~ Exp(1)`` is a sample from ``p``). A seeded request draws its ``E`` from its
    own generator, one vector per sampled token, so its samples do not depend on
    which other requests share the batch.
    """

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        params = [r.params for r in requests]
        greedy_tokens = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_tokens.tolist()
        device = logits.device
        temps = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], device=device
        )
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([max(p.top_k, 0) for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_()
        for i, r in enumerate(requests):
            if r.generator is not None and not r.params.greedy:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy_tokens, sampled).tolist()
