"""Activations of one hook, collected in memory for a small SAE (the activation store holds large ones)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from clip_lens.hooks import split_tower_prefix, stacked_activations


@torch.no_grad()
def cache_activations(model: Any, hook_name: str, inputs: Tensor, position: Optional[int] = None,
                      batch_size: int = 64) -> Tensor:
    """Activations of one hook over inputs, [n, ...] (at one `position` when given: [n, d]).

    `model` is a HookedCLIP (prefixed names, e.g. "vision.blocks.11.hook_resid_post") or a tower.
    """
    prefix, local_name = split_tower_prefix(hook_name)
    if prefix is not None and hasattr(model, "text"):  # a HookedCLIP: its tower runs the tower's inputs
        model, hook_name = getattr(model, prefix), local_name
    return stacked_activations(model, inputs, [hook_name], batch_size, position=position)[:, 0]
