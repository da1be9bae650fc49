"""Activation caches: one per tower, and the joint cache of `HookedCLIP` with a view per tower.

A tower's cache is TransformerLens's `ActivationCache` with what CLIP needs on top:

- `cache.pooled_slice`: a `pos_slice` that reads each input's own pooled position (each text's
  EOT, which differs between texts of unequal length; the class token for images), accepted by
  every residual tool (`accumulated_resid`, `decompose_resid`, `stack_head_results`,
  `apply_ln_to_stack`, `logit_attrs`, ...);
- a text cache refuses an integer `pos_slice` that would read padding for a shorter text;
- `logit_attrs(stack, target)` attributes the score of each cached input with `target` (an
  embedding of the other tower, or, in a cache of `HookedCLIP`, texts or images) to the stack's
  components (docs/methods.md#residual-directions-in-the-joint-space), and
  `score_remainder(target)` gives the terms the residual stream leaves out, so that the two add up
  to the score.

The joint cache (`HookedCLIP.run_with_cache`) is keyed by prefixed names ("text.blocks.0...");
`cache.text` and `cache.vision` are the per-tower caches over the same tensors.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from clip_lens.hooks import TOWER_PREFIXES, act_name


class RowPositions(Slice):
    """A `pos_slice` with one position per batch row: row b reads position `positions[b]`.

    TransformerLens's `Slice` selects the same positions in every row; CLIP's text embedding is read
    at each text's own EOT, which differs between texts of unequal length. Applied along a
    position axis `dim`, the batch axis is the one just before it (as in every cached activation
    and every stacked residual), and the position axis is removed."""

    def __init__(self, positions: Int[Tensor, " batch"]):
        self.positions = positions.long()
        self.slice = self.positions
        self.mode = "rows"

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        dim = dim % tensor.ndim
        if dim == 0 or tensor.shape[dim - 1] != len(self.positions):
            raise ValueError(f"per-row positions for a batch of {len(self.positions)} need a batch axis of that size "
                             f"just before the position axis; got a tensor of shape {tuple(tensor.shape)} "
                             f"(position axis {dim})")
        index_shape = [1] * tensor.ndim
        index_shape[dim - 1] = len(self.positions)
        index = self.positions.to(tensor.device).view(index_shape)
        index = index.expand(*[1 if axis == dim else size for axis, size in enumerate(tensor.shape)])
        return tensor.gather(dim, index).squeeze(dim)

    def indices(self, max_ctx: Optional[int] = None):
        raise ValueError("per-row positions have no single list of indices")

    def __repr__(self) -> str:
        return f"RowPositions({self.positions.tolist()})"


def _selected_positions(pos_slice: Any, n_positions: int) -> Optional[list[int]]:
    """The non-negative positions an integer or array `pos_slice` reads (None for other kinds)."""
    if isinstance(pos_slice, RowPositions) or pos_slice is None:
        return None
    value = pos_slice.slice if isinstance(pos_slice, Slice) else pos_slice
    mode = pos_slice.mode if isinstance(pos_slice, Slice) else Slice(pos_slice).mode
    if mode == "int":
        return [int(value) % n_positions]
    if mode == "array":
        return [int(p) % n_positions for p in torch.as_tensor(value).flatten().tolist()]
    return None


class TowerActivationCache(ActivationCache):
    """A tower's cache. `inputs` are the run's tokens (text) or None; `clip` is the `HookedCLIP`
    the run belonged to, when it did (it supplies the logit scale and encodes targets)."""

    inputs: Optional[Tensor] = None
    clip: Any = None

    @property
    def pooled_slice(self) -> Slice:
        """The `pos_slice` of each input's pooled position (see `RowPositions`)."""
        raise NotImplementedError

    def check_pos_slice(self, pos_slice: Any) -> None:
        """Refuse a `pos_slice` that reads no real position for some input (the default: none)."""

    # scores -------------------------------------------------------------------------------
    @property
    def score_scale(self) -> Tensor:
        """exp(logit_scale) of the HookedCLIP the run belonged to; 1 for a tower run alone (the
        attributions are then of the cosine)."""
        if self.clip is None:
            return torch.tensor(1.0)
        return self.clip.logit_scale.detach().exp()

    def own_embeddings(self) -> Float[Tensor, "batch d_embed"]:
        """The cached inputs' embeddings (`hook_embedding`), in float32."""
        if "hook_embedding" not in self.cache_dict:
            raise KeyError("attributing a score needs the inputs' own embeddings: cache 'hook_embedding' "
                           "(leave it in names_filter)")
        emb = self["hook_embedding"].float()
        return emb if self.has_batch_dim else emb[None]

    def target_embeddings(self, target: Any) -> Float[Tensor, "*n d_embed"]:
        """`target` as joint-space embeddings of the other tower: embeddings [d_embed] or
        [n, d_embed] as given; texts, tokens, images or pixels encoded by the cache's HookedCLIP."""
        d_embed = self.model.cfg.d_embed
        if isinstance(target, Tensor) and target.is_floating_point() and target.ndim in (1, 2) \
                and target.shape[-1] == d_embed:
            if not bool(torch.isfinite(target).all()):
                raise ValueError("target embeddings hold NaN or infinite values")
            return target.detach().float()
        if self.clip is None:
            raise ValueError(f"target: a tower's own cache takes the other tower's embeddings, [{d_embed}] or "
                             f"[n, {d_embed}]; texts and images need a HookedCLIP run (cache.text / cache.vision)")
        tower, inputs = self.clip.tower_input(target, name="target")
        if tower is self.model:
            raise ValueError(f"target: the {self.model.modality} tower's score is with the other tower's inputs; "
                             f"got {self.model.modality} inputs")
        with torch.no_grad():
            return tower(inputs).float()

    def residual_directions(self, target: Any) -> Float[Tensor, "batch d_model"]:
        """Each cached input's residual direction for its score with `target` (one target, or one
        per input): the final-normed (centred, scaled) residual at the pooled position dotted with
        it gives the score less `score_remainder` (docs/methods.md#residual-directions-in-the-joint-space)."""
        return self.model.tokens_to_residual_directions(self.target_embeddings(target), self.own_embeddings(),
                                                        scale=self.score_scale)

    def score(self, target: Any) -> Float[Tensor, " batch"]:
        """Each cached input's score S with `target`: score_scale * cos(embedding, target)
        (docs/methods.md#the-score-s: a model's logit bias is not part of S)."""
        own, other = self.own_embeddings(), self.target_embeddings(target)
        cos = (F.normalize(own, dim=-1) * F.normalize(other, dim=-1).to(own.device)).sum(-1)
        return self.score_scale.to(own.device) * cos

    def score_remainder(self, target: Any) -> Float[Tensor, " batch"]:
        """What the residual stream leaves out of each input's score S: the final norm's bias and
        the projection's bias, carried into the joint space (`joint_offset`)."""
        own, other = self.own_embeddings(), self.target_embeddings(target)
        offset = self.model.joint_offset()  # [d_embed]: ln bias through the projection, plus its bias
        unit = F.normalize(other, dim=-1).to(own.device)
        per_norm = self.score_scale.to(own.device) / own.norm(dim=-1)
        return per_norm * (unit * offset.to(own.device)).sum(-1)

    def logit_attrs(self, residual_stack: Float[Tensor, "num_components ... d_model"], tokens: Any,
                    incorrect_tokens: Any = None, pos_slice: Any = None, batch_slice: Any = None,
                    has_batch_dim: bool = True) -> Float[Tensor, "num_components ..."]:
        """As TransformerLens's, with the score of each cached input with `tokens` (the target:
        see `target_embeddings`) in place of a vocabulary logit: each component's final-normed
        contribution dotted with the input's residual direction. Over the decomposed residual at
        the pooled position (`pos_slice=cache.pooled_slice`) the attributions plus
        `score_remainder(tokens)` sum to the score."""
        self.check_pos_slice(pos_slice)
        if batch_slice is not None:
            raise ValueError("logit_attrs over a batch slice: slice the residual stack and the targets yourself")
        directions = self.residual_directions(tokens)
        if incorrect_tokens is not None:
            directions = directions - self.residual_directions(incorrect_tokens)
        if not has_batch_dim or not self.has_batch_dim:
            if directions.shape[0] != 1:
                raise ValueError(f"a residual stack without a batch dimension takes one input and one target; this "
                                 f"gives {directions.shape[0]} directions (inputs x targets): keep the batch dimension")
            directions = directions[0]
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, has_batch_dim=has_batch_dim)
        if directions.ndim == 2 and scaled.ndim == 4:  # [component, batch, pos, d_model]: one direction per input, every position
            directions = directions[:, None]
        return (scaled * directions.to(scaled)).sum(-1)


def _checking_pos_slice(method):
    """`method` of ActivationCache with its `pos_slice` argument checked by `check_pos_slice` first."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        self.check_pos_slice(bound.arguments.get("pos_slice"))
        return method(self, *args, **kwargs)

    return checked


for _name, _method in inspect.getmembers(ActivationCache, inspect.isfunction):
    if not _name.startswith("_") and "pos_slice" in inspect.signature(_method).parameters \
            and _name not in vars(TowerActivationCache):
        setattr(TowerActivationCache, _name, _checking_pos_slice(_method))


class TextActivationCache(TowerActivationCache):
    """A text tower's cache; `inputs` are the run's tokens [batch, pos] (trimmed)."""

    @property
    def pooled_slice(self) -> RowPositions:
        """Each text's EOT position."""
        return RowPositions(self.model.pooled_positions(self._tokens()))

    def _tokens(self) -> Int[Tensor, "batch pos"]:
        if self.inputs is None:
            raise ValueError("this cache does not know its texts' tokens (it was built by hand); make it with "
                             "run_with_cache")
        return self.inputs if self.has_batch_dim else self.inputs[:1]

    def check_pos_slice(self, pos_slice: Any) -> None:
        """An integer or array `pos_slice` reading padding for a shorter text is refused: the
        texts of a batch end at different positions."""
        if self.inputs is None:
            return
        tokens = self._tokens()
        positions = _selected_positions(pos_slice, tokens.shape[1])
        if not positions:
            return
        lengths = self.model.sequence_lengths(tokens).tolist()
        short = [row for row, length in enumerate(lengths) if max(positions) >= length]
        if short:
            raise ValueError(
                f"pos_slice={pos_slice!r} reads position {max(positions)}, which is padding for text(s) {short[:5]} "
                f"(their EOT is at {[lengths[r] - 1 for r in short[:5]]}): the texts of this batch have unequal "
                "lengths. Use pos_slice=cache.pooled_slice for each text's own EOT")


class VisionActivationCache(TowerActivationCache):
    """A vision tower's cache for TransformerLens's residual tools. The vision residual at layer 0
    is ln_pre's output, not the sum of the embedding hooks, so decompositions start from that
    residual (labelled "embed"), and the final norm is `ln_post`."""

    @property
    def pooled_slice(self) -> Slice:
        """The class token (position 0), which the embedding reads."""
        if not self.model.pools_class_token:
            raise ValueError(f"a vision tower pooled by {self.model.cfg.pooling!r} reads no single position")
        return Slice(0)

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """As TransformerLens's: the residual at `layer` split into the layer-0 residual and each
        block's attention and MLP outputs, which sum to it."""
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        parts, labels = [], []
        if incl_embeds:
            parts, labels = [_as_slice(pos_slice).apply(self[act_name("resid_pre", 0)], dim=-2)], ["embed"]
        if layer > 0 or (mlp_input and mode != "mlp"):
            rest, rest_labels = super().decompose_resid(layer, mlp_input, mode, apply_ln=False, pos_slice=pos_slice,
                                                        incl_embeds=False, return_labels=True)
            parts, labels = parts + list(rest), labels + rest_labels
        components = torch.stack(parts)
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    def get_full_resid_decomposition(self, *args, **kwargs):
        raise NotImplementedError("get_full_resid_decomposition reads the embedding hooks of a decoder; a vision "
                                  "tower's layer-0 residual comes after ln_pre: use decompose_resid, "
                                  "stack_head_results and stack_neuron_results")

    def _get_cached_ln_scale(self, layer, mlp_input, pos_slice, batch_slice=None):
        if layer is not None and layer != self.model.cfg.n_layers:
            return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        if self.model.cfg.final_ln_after_pool:
            raise ValueError("this vision tower applies ln_post to the pooled vector only, so a final norm per "
                             "position is not defined: apply the norm at an earlier layer, or apply_ln=False")
        scale = _as_slice(pos_slice).apply(self[act_name("scale", None, "ln_post")], dim=-2)
        return _as_slice(batch_slice).apply(scale) if batch_slice is not None and self.has_batch_dim else scale


def _as_slice(value) -> Slice:
    return value if isinstance(value, Slice) else Slice(value)


# TransformerLens's tools that read one model's config and blocks: on the joint cache they are
# refused with a pointer to the per-tower caches.
PER_TOWER_TOOLS = ("accumulated_resid", "decompose_resid", "stack_head_results", "stack_neuron_results",
                   "get_full_resid_decomposition", "apply_ln_to_stack", "logit_attrs", "compute_head_results",
                   "get_neuron_results", "stack_activation", "apply_slice_to_batch_dim")


class CLIPActivationCache(ActivationCache):
    """The cache of a `HookedCLIP` run: every hook of both towers under its prefixed name
    ("text.blocks.0.attn.hook_pattern"), and `cache.text` / `cache.vision`, the per-tower caches
    over the same tensors with the tower's own names, for TransformerLens's residual tools."""

    text_inputs: Optional[Tensor] = None

    def _view(self, prefix: str) -> TowerActivationCache:
        tower = getattr(self.model, prefix)
        start = f"{prefix}."
        entries = {name[len(start):]: value for name, value in self.cache_dict.items() if name.startswith(start)}
        if not entries:
            raise KeyError(f"this run cached nothing of the {prefix} tower (give {prefix}=... to run it, and keep "
                           f"'{prefix}.' names in names_filter)")
        view = tower.cache_class(entries, tower, has_batch_dim=self.has_batch_dim)
        view.inputs = self.text_inputs if prefix == "text" else None
        view.clip = self.model
        return view

    @property
    def text(self) -> TextActivationCache:
        """The text tower's cache (unprefixed names)."""
        return self._view("text")

    @property
    def vision(self) -> VisionActivationCache:
        """The vision tower's cache (unprefixed names)."""
        return self._view("vision")

    def __getitem__(self, key: Union[str, tuple]) -> Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            name = key if isinstance(key, str) else None
            if name is None or name.partition(".")[0] not in TOWER_PREFIXES:
                raise KeyError(
                    f"{key!r}: the joint cache is keyed by prefixed names ('text.blocks.0.attn.hook_pattern', "
                    f"'vision.hook_embedding'); use cache.text[{key!r}] or cache.vision[{key!r}] for a tower's own "
                    "names and TransformerLens's (name, layer) keys") from None
            raise KeyError(f"{key!r} is not in this cache (it holds {len(self.cache_dict)} activations)") from None


def _per_tower_only(name: str):
    def refuse(self, *args, **kwargs):
        raise TypeError(f"cache.{name} works on one tower: use cache.text.{name}(...) or cache.vision.{name}(...)")

    refuse.__name__ = name
    refuse.__doc__ = f"Refused on the joint cache: see `cache.text.{name}` and `cache.vision.{name}`."
    return refuse


for _name in PER_TOWER_TOOLS:
    setattr(CLIPActivationCache, _name, _per_tower_only(_name))
