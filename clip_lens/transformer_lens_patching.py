"""Keeping TransformerLens's activation-patching functions off the vision tower's pixels.

`transformer_lens.patching` (`get_act_patch_resid_pre`, `get_act_patch_block_every`,
`generic_activation_patch`, ...) counts positions as the last axis of its input,
`corrupted_tokens.shape[-1]`. For pixels [batch, 3, H, W] that is the W pixel columns, not the
tower's 1 + n_patches positions: the grid comes back silently short (the tiny CLIP's 64 columns for
its 65 positions) or fails half-way (ViT-B-32: 224 columns for 50 positions). The vision tower takes
patch tokens instead (`HookedVisionTower.to_patch_tokens`), whose last axis is the positions, and
refuses pixels in a run that TransformerLens's patching makes (`refuse_pixels`).

A run is TransformerLens's patching when one of its hooks is defined in `transformer_lens.patching`
(TransformerLens hands the tower `functools.partial(patching_hook, ...)`), or when the tower's
`run_with_hooks` was called from code in that module (its unhooked baseline run has no hooks).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable, Optional

TL_PATCHING = "transformer_lens.patching"
OWN_PACKAGE = __name__.split(".")[0]  # "clip_lens": frames of our own wrappers are skipped


def defining_module(fn: Callable) -> str:
    """The module a hook function was defined in, through `functools.partial` and decorators
    (`__wrapped__`); "" when it has none."""
    seen = 0
    while seen < 100:  # a cycle of wrappers cannot hang us
        seen += 1
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        else:
            break
    return getattr(fn, "__module__", None) or ""


def _in_tl_patching(module: str) -> bool:
    return module == TL_PATCHING or module.startswith(TL_PATCHING + ".")


def hooks_from_tl_patching(fwd_hooks: Iterable) -> bool:
    """Whether any (name, hook) of `fwd_hooks` has a hook defined in `transformer_lens.patching`."""
    for entry in fwd_hooks or ():
        hook = entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else entry
        if _in_tl_patching(defining_module(hook)):
            return True
    return False


def called_from_tl_patching() -> bool:
    """Whether the first caller outside clip_lens (the tower's own methods and any clip_lens
    wrapper are skipped) is code of `transformer_lens.patching`."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "") or ""
        if module != OWN_PACKAGE and not module.startswith(OWN_PACKAGE + "."):
            return _in_tl_patching(module)
        frame = frame.f_back
    return False


def pixels_refusal(n_ctx: int, n_patches: int, d_patch: int, width: int) -> str:
    """The error for pixels given to TransformerLens's patching on a vision tower."""
    return (
        f"TransformerLens's patching functions count positions along the last axis of their input; for pixels "
        f"[batch, 3, H, W] that is the {width} pixel columns, not the vision tower's {n_ctx} positions (class token + "
        f"{n_patches} patches), so the grid would be wrong. Pass the patch tokens instead, whose last axis is the "
        f"positions and which give the same run: model.vision.to_patch_tokens(pixels) -> [batch, {d_patch}, {n_ctx}], "
        "e.g. patching.get_act_patch_resid_pre(model.vision, model.vision.to_patch_tokens(corrupted), "
        "clean_cache, metric); or use clip_lens.patch(model, target=corrupted_pixels, source=clean_pixels, "
        'text=text, hook="resid", positions="all")'
    )


def first_input(model_args: tuple, model_kwargs: dict, name: str = "pixels") -> Optional[Any]:
    """The input of a tower's run: its first positional argument or the keyword `name`."""
    return model_args[0] if model_args else model_kwargs.get(name)
