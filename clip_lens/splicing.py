"""SAEs spliced into a HookedCLIP: the activation at a hook point replaced by the SAE's
reconstruction (or kept, with the error term), and the SAE's latents made hook points.

    model.add_sae(sae)                         # at sae.hook, e.g. "vision.blocks.2.hook_resid_post"
    _, cache = model.run_with_cache(image=pixels)
    cache["vision.blocks.2.hook_resid_post.hook_sae_acts_post"]      # [batch, pos, n_latents]
    model.remove_saes()

The spliced module takes the hook point's place and name, so a hook on the original name sees what
flows on (the spliced output). Its own hook points, under the original name:

- hook_sae_input [..., d_in]: the activation as it arrives;
- hook_sae_acts_pre [..., n_latents]: the pre-activations;
- hook_sae_acts_post [..., n_latents]: the latents;
- hook_sae_recons [..., d_in]: the reconstruction from (possibly edited) latents;
- hook_sae_error [..., d_in]: with the error term, the activation less its clean reconstruction;
- hook_sae_output [..., d_in]: what flows on.

Without the error term the output is the reconstruction. With it, the output is the input plus
whatever the hooks changed in the reconstruction, x + (x_hat' - x_hat): exactly the input when no
latent is edited, and x_hat' + (x - x_hat) (SAELens's error term) otherwise.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from clip_lens.components import hooks_attached
from clip_lens.hooks import split_tower_prefix

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")


class SplicedSAE(HookPoint):
    """A hook point that runs an SAE (see the module's docstring)."""

    always_runs = True  # a computation, not an identity: fused paths must not skip it (`hooks_attached`)

    def __init__(self, sae: Any, original: HookPoint, use_error_term: bool):
        super().__init__()
        self.sae, self.use_error_term = sae, use_error_term
        object.__setattr__(self, "original", original)  # restored by remove_saes; not a submodule
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())

    def forward(self, x: Tensor) -> Tensor:
        x_in = self.hook_sae_input(x)
        pre = self.hook_sae_acts_pre(self.sae.pre_activations(x_in))
        latents = self.hook_sae_acts_post(self.sae.activate(pre))
        recons = self.hook_sae_recons(self.sae.decode(latents)).to(x.dtype)
        if not self.use_error_term:
            return self.hook_sae_output(recons)
        edited = hooks_attached(self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        clean = self.sae.decode(self.sae.encode(x_in)).to(x.dtype) if edited else recons
        error = x_in - clean
        hooked_error = self.hook_sae_error(error.clone()) if hooks_attached(self.hook_sae_error) else error
        # x + (x_hat' - x_hat) + (e' - e): exactly x when nothing is edited (each difference is 0), and
        # x_hat' + e' otherwise
        return self.hook_sae_output(x_in + (recons - clean) + (hooked_error - error))


def add_sae(model: Any, sae: Any, *, hook: str = None, use_error_term: bool = False) -> SplicedSAE:
    """Splice `sae` into `model` (a HookedCLIP) at `hook` (default: `sae.hook`), a d_in-wide hook
    point with its tower prefix. Returns the spliced module."""
    hook = hook or getattr(sae, "hook", None)
    if hook is None:
        raise ValueError("the SAE does not say which hook it reads (sae.hook is None); pass hook='vision.blocks.L...'")
    tower_name, local = split_tower_prefix(hook)
    if tower_name is None:
        raise ValueError(f"hook {hook!r}: give the tower prefix, e.g. 'vision.{hook}'")
    tower = getattr(model, tower_name)
    point = tower.check_hook_name(local)
    if isinstance(point, SplicedSAE) or any(local.startswith(f"{name}.") for name in _spliced(tower)):
        raise ValueError(f"{hook} already has an SAE spliced in; remove it first (model.remove_saes({hook!r}))")
    _check_width(tower, hook, local, sae)
    parent_name, _, attribute = local.rpartition(".")
    parent = tower.get_submodule(parent_name) if parent_name else tower
    spliced = SplicedSAE(sae, point, use_error_term).to(device=tower.device)
    setattr(parent, attribute, spliced)
    _setup(model)
    return spliced


def remove_saes(model: Any, hook: str = None) -> None:
    """Remove the SAE spliced at `hook` (a prefixed hook name), or every spliced SAE; the original
    hook points (and any hooks a user left on them) come back."""
    removed = False
    for tower_name in ("text", "vision"):
        tower = getattr(model, tower_name)
        for local, spliced in _spliced(tower).items():
            if hook is None or hook == f"{tower_name}.{local}":
                parent_name, _, attribute = local.rpartition(".")
                setattr(tower.get_submodule(parent_name) if parent_name else tower, attribute, spliced.original)
                removed = True
    if hook is not None and not removed:
        raise ValueError(f"no SAE is spliced at {hook!r}; spliced: {spliced_hooks(model) or 'none'}")
    _setup(model)


def spliced_hooks(model: Any) -> list[str]:
    """The prefixed hook names at which SAEs are spliced."""
    return [f"{name}.{local}" for name in ("text", "vision") for local in _spliced(getattr(model, name))]


def _spliced(tower: Any) -> dict[str, SplicedSAE]:
    return {name: module for name, module in tower.named_modules() if isinstance(module, SplicedSAE)}


def _setup(model: Any) -> None:
    """Rebuild the hook dicts of both towers and of the model (names of the new hook points)."""
    for tower in (model.text, model.vision):
        tower.setup()
    model.setup()


def _check_width(tower: Any, hook: str, local: str, sae: Any) -> None:
    """The SAE's d_in against the hook's last axis: d_mlp for the MLP's neurons, d_model for the
    residual-space hooks; per-head hooks (a head axis before the last) are refused."""
    leaf = local.rpartition(".")[2]
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_attn_scores", "hook_pattern"):
        raise ValueError(f"{hook} holds one vector per head (or an attention pattern); an SAE here splices "
                         "d_model- or d_mlp-wide activations")
    width = tower.cfg.d_mlp if local.endswith(("mlp.hook_pre", "mlp.hook_post")) else tower.cfg.d_model
    if sae.d_in != width:
        raise ValueError(f"the SAE reads {sae.d_in}-dimensional activations; {hook} is {width} wide")

