"""Hook plumbing shared by the towers and HookedCLIP.

A tower's hook points carry tower-local names ("blocks.3.hook_resid_pre"), so that TransformerLens's
utilities work on `model.text` / `model.vision` alone. `HookedCLIP` reaches the same HookPoint
objects under prefixed names ("text.blocks.3.hook_resid_pre"). The classes here make both views
behave: a hook registered through a root receives a `hook` whose `.name` is the name it was
registered under (so caches are keyed by that name), unknown names fail with a clear error, and the
towers share one context-level counter with their parent so that nested `hooks()` contexts on the
parent and on a tower never remove each other's hooks.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from clip_lens.checks import is_integer

TOWER_PREFIXES = ("text", "vision")


def split_tower_prefix(name: str) -> tuple[Optional[str], str]:
    """("text" | "vision", the tower's own name) of a HookedCLIP hook name, e.g.
    "vision.blocks.3.hook_resid_pre" -> ("vision", "blocks.3.hook_resid_pre"); a name without a
    tower prefix gives (None, name)."""
    prefix, _, rest = name.partition(".")
    return (prefix, rest) if prefix in TOWER_PREFIXES and rest else (None, name)


# A hook point's short name -> its name inside block b (`blocks.{b}.<leaf>`), as TransformerLens's
# `get_act_name` spells them; "scale" and "normalized" take the layer norm ("ln1" / "ln2").
BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z", "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre", "post": "mlp.hook_post",
    "scale": "{ln}.hook_scale", "normalized": "{ln}.hook_normalized",
}
# hook points outside the blocks (text: embed, pos_embed; vision: patch_embed, class_embed, pos_embed)
TOWER_HOOKS = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "patch_embed": "hook_patch_embed",
               "class_embed": "hook_class_embed", "pooled": "hook_pooled", "embedding": "hook_embedding"}
ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "mlp_pre": "pre", "mlp_post": "post"}
FINAL_NORMS = ("ln_final", "ln_pre", "ln_post")  # text: ln_final; vision: ln_pre and ln_post


def act_name(name: str, layer: Optional[int] = None, layer_type: Optional[str] = None,
             tower: Optional[str] = None) -> str:
    """The full name of a hook point of either tower, as TransformerLens's `get_act_name` gives it:

        act_name("pattern", 3)             -> "blocks.3.attn.hook_pattern"
        act_name("scale", 3, "ln1")        -> "blocks.3.ln1.hook_scale"
        act_name("normalized", None, "ln_post") -> "ln_post.hook_normalized"   (vision; text: ln_final)
        act_name("patch_embed")            -> "hook_patch_embed"
        act_name("z", 0, tower="vision")   -> "vision.blocks.0.attn.hook_z"    (a HookedCLIP name)

    Unknown names and missing layers are refused, naming what is allowed."""
    short = ALIASES.get(name, name)
    if tower is not None and tower not in TOWER_PREFIXES:
        raise ValueError(f"tower={tower!r}: use one of {TOWER_PREFIXES}")
    prefix = f"{tower}." if tower else ""
    if short in TOWER_HOOKS:
        return prefix + TOWER_HOOKS[short]
    if short not in BLOCK_HOOKS:
        raise ValueError(f"no hook point called {name!r}; use one of {', '.join([*BLOCK_HOOKS, *TOWER_HOOKS])}")
    leaf = BLOCK_HOOKS[short]
    if "{ln}" in leaf:
        if layer is None and layer_type in FINAL_NORMS:
            return prefix + leaf.format(ln=layer_type)
        if layer_type not in ("ln1", "ln2"):
            raise ValueError(f"{name!r} needs the layer norm: layer_type 'ln1' or 'ln2' with a layer, or one of "
                             f"{FINAL_NORMS} without one")
        leaf = leaf.format(ln=layer_type)
    if not is_integer(layer) or layer < 0:
        raise ValueError(f"{name!r} is a hook point of every block: give its block index (an integer >= 0), not {layer!r}")
    return f"{prefix}blocks.{layer}.{leaf}"


class HookContext:
    """A context-level counter shared by a root module and the towers inside it."""

    def __init__(self) -> None:
        self.level = 0


class NamedHookView:
    """A HookPoint seen under another name: what a hook function receives as `hook`.

    Everything but `name` and `layer()` is delegated to the wrapped HookPoint (`ctx` included, so
    hooks that keep state across calls work as usual).
    """

    def __init__(self, name: str, target: HookPoint) -> None:
        self.name = name
        self._target = target

    def layer(self) -> int:
        """Layer index of a `...blocks.{l}...` name, whatever prefix it carries."""
        parts = self.name.split(".")
        return int(parts[parts.index("blocks") + 1])

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)

    def __repr__(self) -> str:
        return f"HookPoint(name={self.name!r})"


def _under_name(hook: Callable, name: str, hook_point: HookPoint) -> Callable:
    """Wrap `hook` so it is called with `hook=` viewing `hook_point` under `name`."""
    if hook_point.name == name:
        return hook
    view = NamedHookView(name, hook_point)
    original = hook

    def renamed(tensor: Tensor, *, hook: HookPoint) -> Any:  # noqa: ARG001 - replaced by view
        return original(tensor, hook=view)

    renamed.__name__ = getattr(hook, "__name__", repr(hook))
    return renamed


class HookedModule(HookedRootModule):
    """HookedRootModule with named hook views, clear errors and a shareable context level.

    Subclasses call `setup()` at the end of `__init__` as with any HookedRootModule.
    """

    # The level lives in a HookContext, which a parent may replace by its own (see `share_context`).
    @property
    def context_level(self) -> int:
        return self._hook_context.level

    @context_level.setter
    def context_level(self, value: int) -> None:
        if "_hook_context" not in self.__dict__:
            object.__setattr__(self, "_hook_context", HookContext())
        self._hook_context.level = value

    def share_context(self, context: HookContext) -> None:
        """Use `context` (a parent's) for hook context levels."""
        object.__setattr__(self, "_hook_context", context)

    # -- where the weights live ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the weights: every tensor a run creates is made there."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (float32, or bfloat16 / float16 after `to(dtype)`)."""
        return next(self.parameters()).dtype

    # -- name checks ---------------------------------------------------------------------------
    def check_hook_name(self, name: str) -> HookPoint:
        """The HookPoint called `name`, or a ValueError naming it and the closest valid names."""
        hook_point = self.hook_dict.get(name)
        if hook_point is None:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown hook name {name!r} for {type(self).__name__}.{hint} "
                f"List them with `model.hook_dict.keys()`."
            )
        return hook_point

    # -- clean-up that an interrupt cannot leave half done ---------------------------------------
    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """As TransformerLens's `hooks()`, with a clean-up that a KeyboardInterrupt cannot leave
        half done: the clean-up runs to its end, then the interrupt is raised. It also removes
        hooks torch holds but TransformerLens never recorded that were added inside the block (an
        interrupt between the two steps of adding a hook leaves one); a torch hook the user
        registered before the block stays.

        Nothing the block changes happens before its `try`: the level is raised inside it, and
        the clean-up sets it back to the level found on entry (whether or not the raise happened),
        so an interrupt at any step of entering leaves the level as it was."""
        outer = self.context_level
        level = outer + 1
        finished = set()
        before = self._torch_hook_keys()

        def clean_up() -> None:  # each step runs once, however often clean_up starts again
            if reset_hooks_end and "hooks" not in finished:
                self.reset_hooks(clear_contexts, including_permanent=False, level=level)
                self.remove_untracked_hooks(keep=before)
                finished.add("hooks")
            self.context_level = outer

        try:
            self.context_level = level
            for name, hook in fwd_hooks:
                self._enable_hook(name=name, hook=hook, dir="fwd")
            for name, hook in bwd_hooks:
                self._enable_hook(name=name, hook=hook, dir="bwd")
            yield self
        finally:
            _run_to_the_end(clean_up)

    def reset_hooks(self, clear_contexts: bool = True, direction="both", including_permanent: bool = False,
                    level: Optional[int] = None) -> None:
        """As TransformerLens's; a reset of every level also removes untracked hooks."""
        super().reset_hooks(clear_contexts, direction, including_permanent, level)
        if level is None:
            self.remove_untracked_hooks()

    def _hook_points(self) -> list[HookPoint]:
        return list({id(p): p for p in self.hook_dict.values()}.values())

    def _torch_hook_keys(self) -> set[tuple[int, int]]:
        """(hook point, torch handle id) of every torch hook held now."""
        return {(id(p), key) for p in self._hook_points() for store in (p._forward_hooks, p._backward_hooks)
                for key in store}

    def remove_untracked_hooks(self, keep: frozenset = frozenset()) -> None:
        """Remove the torch hooks of every hook point that TransformerLens does not track, except
        those in `keep` ((hook point id, handle id) pairs, e.g. a user's own hooks)."""
        for hook_point in self._hook_points():
            tracked = {handle.hook.id for handle in hook_point.fwd_hooks + hook_point.bwd_hooks}
            for store in (hook_point._forward_hooks, hook_point._backward_hooks):
                for key in [k for k in store if k not in tracked and (id(hook_point), k) not in keep]:
                    store.pop(key, None)
                    hook_point._forward_hooks_with_kwargs.pop(key, None)
                    hook_point._forward_hooks_always_called.pop(key, None)

    # -- registration: every path goes through the name of the hook_dict entry ------------------
    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]) -> None:
        hook_point = self.check_hook_name(name)
        hook_point.add_hook(_under_name(hook, name, hook_point), dir=dir, level=self.context_level)

    def _enable_hooks_for_points(self, hook_points, enabled: Callable, hook: Callable, dir) -> None:
        for name, hook_point in hook_points:
            if enabled(name):
                hook_point.add_hook(
                    _under_name(hook, name, hook_point), dir=dir, level=self.context_level
                )

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        names = [name] if isinstance(name, str) else [n for n in self.hook_dict if name(n)]
        for hook_name in names:
            hook_point = self.check_hook_name(hook_name)
            hook_point.add_hook(
                _under_name(hook, hook_name, hook_point),
                dir=dir,
                is_permanent=is_permanent,
                level=level,
                prepend=prepend,
            )

    def add_caching_hooks(self, names_filter=None, incl_bwd=False, device=None,
                          remove_batch_dim=False, cache: Optional[dict] = None) -> dict:
        """As TransformerLens's, with cache keys equal to the names in `hook_dict`."""
        cache = {} if cache is None else cache
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, cache=cache
        )
        for name, hook in fwd:
            self.add_hook(name, hook, dir="fwd")
        for name, hook in bwd:
            self.add_hook(name, hook, dir="bwd")
        self.is_caching = True
        return cache_dict

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for name in names_filter:
                self.check_hook_name(name)
            names_filter = list(names_filter)
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    cache_class = ActivationCache  # what `run_with_cache` returns

    def run_with_cache(self, *model_args: Any, metric: Optional[Callable[[Any], Tensor]] = None, **kwargs: Any):
        """Run the model and return `(output, ActivationCache)`; hooks are removed afterwards,
        also when the run raises.

        With `incl_bwd=True`, `metric(output) -> scalar` is backpropagated and the cache also
        holds each hook's gradient (`<name>_grad`), as in TransformerLens; a CLIP tower's output is
        an embedding, not a scalar, so the metric is needed."""
        if kwargs.get("incl_bwd"):
            return self._run_with_cache_and_grads(model_args, metric, kwargs)
        if metric is not None:
            raise ValueError("metric= is for run_with_cache(incl_bwd=True)")
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        return out, self.make_cache(cache_dict, model_args, kwargs)

    def make_cache(self, cache_dict: dict, model_args: tuple, kwargs: dict) -> ActivationCache:
        """The `cache_class` object over a run's activations (a tower adds what it knows about the
        run's inputs, e.g. the text tower its tokens)."""
        return self.cache_class(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def _run_with_cache_and_grads(self, model_args: tuple, metric, kwargs: dict):
        if metric is None:
            raise ValueError("run_with_cache(incl_bwd=True) needs metric=f(output) -> scalar: the output is an "
                             "embedding [batch, d_embed], which cannot be backpropagated by itself")
        options = {name: kwargs.pop(name) for name in ("names_filter", "device", "remove_batch_dim", "incl_bwd",
                                                       "reset_hooks_end", "clear_contexts", "pos_slice") if name in kwargs}
        cache_dict, fwd, bwd = self.get_caching_hooks(options.get("names_filter"), True, options.get("device"),
                                                      remove_batch_dim=options.get("remove_batch_dim", False),
                                                      pos_slice=options.get("pos_slice"))
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=options.get("reset_hooks_end", True),
                        clear_contexts=options.get("clear_contexts", False)):
            out = self(*model_args, **kwargs)
            value = metric(out)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"metric must return a scalar tensor; got {getattr(value, 'shape', type(value).__name__)}")
            value.backward()
        return out, self.make_cache(cache_dict, model_args, {**kwargs, **options})


def _run_to_the_end(step: Callable[[], None]) -> None:
    """Run `step` to its end even when KeyboardInterrupt arrives meanwhile (it starts again), then
    raise the interrupt. `step` must be safe to start again."""
    interrupted = None
    while True:
        try:
            step()
            break
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def stacked_activations(module: HookedRootModule, inputs: Tensor, names: list[str], batch_size: int = 64,
                        position: Optional[int] = None) -> Tensor:
    """The activations of several hooks over many inputs, batched and without gradients, stacked
    along dim 1: [n, len(names), ...] (at one `position`, for hooks with a position axis after the
    batch: [n, len(names), ...rest]). Hooks of different shapes cannot be stacked.

    Args:
        module: a tower or a HookedCLIP (its prefixed names need the matching tower's inputs: use
            the tower for one modality's hooks).
        inputs: tokens [n, pos] or pixels [n, 3, H, W].
    """
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            _, cache = module.run_with_cache(inputs[i:i + batch_size], names_filter=list(names))
            acts = [cache[name] if position is None else cache[name][:, position] for name in names]
            out.append(torch.stack(acts, dim=1))
    return torch.cat(out)
