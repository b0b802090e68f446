"""Seeded random weights for a model that is only a config (``load_format="dummy"``),
generated in place on the model's device: no file is read and nothing crosses from
the host, so an 8B-shaped model is ready in about the time its memory takes to fill."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.llama import RMSNorm

#: HF's default ``initializer_range``, for configs that name none
DEFAULT_STD = 0.02


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int = 0, std: float = DEFAULT_STD) -> None:
    """Norm scales 1, every other parameter (matrices, embedding, biases) drawn from
    ``N(0, std)`` like HF's ``_init_weights`` with ``initializer_range = std``: activations
    keep a sane scale through any number of layers (no inf or NaN in bfloat16).

    The draw is seeded per device (``torch.Generator(device)``), in parameter-name
    order, so the same seed gives the same weights on the same kind of device."""
    if not std > 0:
        raise ValueError(f"the dummy weights' std must be positive, got {std!r}")
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    device = params[0][1].device if params else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    for _, p in params:
        if id(p) in norms:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
