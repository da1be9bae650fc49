"""Weight processing as TransformerLens offers it on loading, for CLIP's towers: `fold_ln`,
`center_writing_weights`, `fold_value_biases`.

Each transform rewrites a tower's weights in place so that its embedding (and so CLIP's logits)
is unchanged up to float rounding; what the hooks in between hold may change (see each function).
They are applied in TransformerLens's order (fold_ln, centring, value biases), computed in float32
(or wider) and written back in the weights' own dtype; the loaders process before converting to a
half-precision dtype, so each weight is rounded once. Shape names: d_model (the residual width),
d_out (the width of a map that reads the residual stream), d_embed (the joint space).

Why each is exact rests on two facts about a LayerNorm, LN(x) = w * (x - mean(x)) / scale(x) + b:
  - its output is affine in x_hat = (x - mean(x)) / scale(x), a vector whose mean over d_model is 0;
  - x and x + c * ones (c any number per position) give the same x_hat and the same scale.

Not processed, and why:
  - the vision tower's `ln_pre`: its output IS the residual stream at layer 0 (every block adds
    to it), not the input of one linear map, so its gain and bias have nowhere to fold into;
    `center_writing_weights` centres its bias only (its gain times x_hat has a mean over d_model
    that depends on the input, which no gain vector can remove), so the vision residual stream
    keeps a per-position mean of mean(w_ln_pre * x_hat).
  - a tower without a projection (d_embed None): its final norm has no reader to fold into, so
    `fold_ln` refuses it rather than fold all norms but one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

from clip_lens.components import LayerNorm, TransformerBlock

FLAGS = ("fold_ln", "center_writing_weights", "fold_value_biases")

# TransformerLens loading options that have no counterpart in CLIP, with the reason given to a user
# who passes one to `from_pretrained` (rather than letting open_clip fail on an unknown keyword).
NOT_APPLICABLE = {
    "center_unembed": "CLIP has no unembedding: its logits are cosine similarities between the two towers' "
                      "embeddings, which centring would change",
    "refactor_factored_attn_matrices": "not implemented by clip_lens",
    "fold_layer_norm": "clip_lens's option is called fold_ln",
}


def _working(t: Tensor) -> Tensor:
    """A detached copy of `t` in the precision the transforms compute in (float32, or t's own if wider)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def fold_norm_into_reader_(norm: LayerNorm, weight: Float[Tensor, "d_out d_model"], bias: Float[Tensor, " d_out"]) -> None:
    """Fold `norm`'s gain and bias into the one linear map that reads its output, in place, and
    leave the norm with w = 1, b = 0.

    weight @ (w * x_hat + b) + bias = (weight * w) @ x_hat + (weight @ b + bias), so the reader's
    output is unchanged. The folded weight is then centred over d_model (its mean over the input
    axis removed), which changes nothing because x_hat has mean 0, as TransformerLens's fold_ln does.
    `weight` may be a view of a parameter (the projection's W.T): it is written through."""
    w, b, old = _working(norm.w), _working(norm.b), _working(weight)
    new_weight = old * w
    new_bias = _working(bias) + old @ b
    with torch.no_grad():
        weight.copy_(new_weight - new_weight.mean(-1, keepdim=True))
        bias.copy_(new_bias)
        norm.w.fill_(1.0)
        norm.b.zero_()


def projection_bias(tower: nn.Module) -> nn.Parameter:
    """The tower's projection bias [d_embed], made (zeros, and `cfg.proj_bias` set) when the
    projection has none, so that a final norm's bias can fold into it."""
    proj = tower.proj
    if proj.b is None:
        proj.b = nn.Parameter(torch.zeros(proj.W.shape[1], device=proj.W.device, dtype=proj.W.dtype),
                              requires_grad=proj.W.requires_grad)
        tower.cfg = replace(tower.cfg, proj_bias=True)
    return proj.b


def check_can_fold_ln(tower: nn.Module) -> None:
    """A ValueError when `tower` has no projection for its final norm to fold into."""
    if tower.proj is None:
        raise ValueError(f"fold_ln: the {tower.modality} tower has no projection (d_embed None), so its final norm "
                         f"({'ln_final' if tower.modality == 'text' else 'ln_post'}) has no linear map to fold into; "
                         "load it with fold_ln=False")


def fold_ln_(tower: nn.Module) -> None:
    """fold_ln: every LayerNorm's gain and bias folded into the map that reads it (ln1 -> the
    q/k/v projection, ln2 -> the MLP's input, the final norm -> the projection into the joint
    space); each norm is left with w = 1, b = 0 and still centres and scales. Exact by
    `fold_norm_into_reader_`; with mean pooling or `final_ln_after_pool` too, since pooling is an
    average (weights summing to 1), which commutes with an affine map. The vision `ln_pre` is not
    folded (module docstring).

    Hooks: every `hook_normalized` and `hook_pooled` then hold x_hat (no gain, no bias); q, k, v,
    scores, patterns, MLP activations, `hook_scale` and the embedding are unchanged."""
    check_can_fold_ln(tower)
    for block in tower.blocks:
        fold_norm_into_reader_(block.ln1, block.attn.qkv_weight, block.attn.qkv_bias)
        fold_norm_into_reader_(block.ln2, block.mlp.in_weight, block.mlp.in_bias)
    bias = projection_bias(tower)
    fold_norm_into_reader_(tower.final_norm, tower.proj.W.T, bias)


def center_(param: Tensor, dim: int = -1) -> None:
    """`param` minus its mean along `dim` (the d_model axis), in place."""
    value = _working(param)
    with torch.no_grad():
        param.copy_(value - value.mean(dim, keepdim=True))


def fold_layer_scale_(block: TransformerBlock) -> None:
    """A block's LayerScale vectors (ls1, ls2) folded into the output weights and biases of its
    attention and MLP, leaving them at 1: (W z + b) * ls = (ls[:, None] * W) z + ls * b. Exact.
    `hook_attn_out` / `hook_mlp_out` are unchanged; `hook_result` then includes the scale, so the
    heads' results plus b_O sum to `hook_attn_out`."""
    if block.ls1 is None:
        return
    for scale, out in ((block.ls1, block.attn), (block.ls2, block.mlp)):
        s = _working(scale)
        with torch.no_grad():
            out.out_weight.copy_(_working(out.out_weight) * s[:, None])
            out.out_bias.copy_(_working(out.out_bias) * s)
            scale.fill_(1.0)


def center_writing_weights_(tower: nn.Module) -> None:
    """center_writing_weights: every weight and bias that writes into the residual stream has its
    mean over d_model removed: each block's attention and MLP output weights ([d_model, in], centred
    over rows) and biases, and the embeddings (text: W_E, W_pos; vision: class_embedding, W_pos,
    the patch weights, and ln_pre's bias). LayerScale is folded first (`fold_layer_scale_`), since
    a scaled output is not centred.

    Exact because every reader of the residual stream and of the embeddings is a LayerNorm (ln1, ln2,
    the final norm, the vision ln_pre; pooling by average keeps the shift along ones), and removing
    a multiple of ones at each position leaves a LayerNorm's output and scale unchanged.

    Hooks: the residual stream, `hook_attn_out`, `hook_mlp_out` and the embedding hooks change (each
    vector loses its mean over d_model); in the text tower the stream becomes mean-zero, in a vision
    tower with ln_pre it keeps the part mean(w_ln_pre * x_hat) (module docstring). Every other hook
    is unchanged."""
    for block in tower.blocks:
        fold_layer_scale_(block)
        for out in (block.attn, block.mlp):
            center_(out.out_weight, dim=0)
            center_(out.out_bias)
    center_(tower.W_pos)
    if tower.modality == "text":
        center_(tower.embed.W_E)
        return
    center_(tower.class_embedding)
    center_(tower.patch_embed.weight, dim=0)
    if tower.ln_pre is not None:
        center_(tower.ln_pre.b)


def fold_value_biases_(tower: nn.Module) -> None:
    """fold_value_biases: each block's value bias b_V [head, d_head] moved into the output bias:
    b_O += sum over heads of b_V[h] @ W_O[h], b_V = 0. Exact because each row of an attention
    pattern sums to 1 (the causal mask included), so the value bias reaches z unchanged whatever
    the pattern: z = pattern @ (v + b_V) = pattern @ v + b_V.

    Hooks: `hook_v`, `hook_z` and `hook_result` lose the value bias (each head's result no longer
    carries its share b_V[h] @ W_O[h], which b_O now holds); `hook_attn_out` is unchanged."""
    for block in tower.blocks:
        attn = block.attn
        values = slice(2 * attn.n_heads * attn.d_head, None)
        b_v = _working(attn.qkv_bias[values])
        with torch.no_grad():
            attn.out_bias.copy_(_working(attn.out_bias) + _working(attn.out_weight) @ b_v)
            attn.qkv_bias[values] = 0.0


def check_flags(**flags: object) -> None:
    """A TypeError naming the first flag that is not a bool (a string "False" would read as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r}: expected True or False")


def process_tower_(tower: nn.Module, fold_ln: bool = False, center_writing_weights: bool = False,
                   fold_value_biases: bool = False) -> None:
    """Apply the chosen transforms to one tower, in place, in TransformerLens's order. Every check
    is made before any weight changes."""
    check_flags(fold_ln=fold_ln, center_writing_weights=center_writing_weights, fold_value_biases=fold_value_biases)
    if fold_ln:
        fold_ln_(tower)
    if center_writing_weights:
        center_writing_weights_(tower)
    if fold_value_biases:
        fold_value_biases_(tower)


def process_towers_(towers: tuple, fold_ln: bool = False, center_writing_weights: bool = False,
                    fold_value_biases: bool = False) -> None:
    """`process_tower_` on each tower, after checking all of them (no tower is left half done)."""
    check_flags(fold_ln=fold_ln, center_writing_weights=center_writing_weights, fold_value_biases=fold_value_biases)
    if fold_ln:
        for tower in towers:
            check_can_fold_ln(tower)
    for tower in towers:
        process_tower_(tower, fold_ln, center_writing_weights, fold_value_biases)


def check_loading_kwargs(kwargs: dict, where: Optional[str] = None) -> None:
    """A ValueError for a TransformerLens loading option that CLIP has no counterpart for, before
    it reaches open_clip (which would fail on an unknown keyword far from the cause)."""
    for name, reason in NOT_APPLICABLE.items():
        if name in kwargs:
            raise ValueError(f"{where or 'from_pretrained'}: {name} is a TransformerLens option that clip_lens does not "
                             f"take ({reason}); clip_lens takes {', '.join(FLAGS)}")
