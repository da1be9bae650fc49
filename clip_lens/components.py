"""Hooked building blocks of CLIP's towers, with TransformerLens's hook names.

Weights are stored in PyTorch's own layouts (the fused `[3 * d_model, d_model]` input projection of
`nn.MultiheadAttention`, `nn.Linear`'s `[out, in]`), so the forward pass runs the very same kernels
as open_clip and matches it to float rounding. TransformerLens's layouts (`W_Q [head, d_model,
d_head]`, `W_in [d_model, d_mlp]`, ...) are available as read-only views for weight-based analysis.

Shape names: batch, pos (query positions), key_pos, head, d_model, d_head, d_mlp.
"""

from __future__ import annotations

import math
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from clip_lens.config import TowerConfig


def activation(name: str, x: Tensor) -> Tensor:
    """The MLP non-linearity `name` applied to `x` (same formulas as open_clip / transformers)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"Unknown activation function {name!r}")


def hooks_attached(*points: HookPoint) -> bool:
    """Whether any of these hook points has a forward or backward hook (or a global module hook is
    set). Without one, a module may take a fused kernel that never materialises the hooked
    intermediate (the layer norm's scale, the attention pattern): same values to float rounding,
    fewer passes over memory.

    This reads torch's hook dicts rather than `HookPoint.has_hooks()`, which sees only hooks added
    through TransformerLens: a hook a user registers with torch's own `register_forward_hook`
    must switch the fused path off too, or it would silently never run."""
    registry = torch.nn.modules.module
    if any(getattr(p, "always_runs", False) for p in points):  # a hook point that computes (a spliced SAE)
        return True
    if registry._global_forward_hooks or registry._global_forward_pre_hooks or registry._global_backward_hooks:
        return True
    return any(p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks for p in points)


class LayerNorm(nn.Module):
    """LayerNorm with hooks on its scale and its output.

    hook_scale: [..., 1], the denominator sqrt(var + eps). Freezing it makes the norm linear.
    hook_normalized: [..., d_model], the output (after gain and bias), as in TransformerLens.
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if not hooks_attached(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)  # the same formula, fused
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class Attention(nn.Module):
    """Multi-head self-attention.

    Hooks (TransformerLens names and shapes):
        hook_q, hook_k, hook_v: [batch, pos, head, d_head]
        hook_attn_scores: [batch, head, pos, key_pos], masked entries are -inf
        hook_pattern: [batch, head, pos, key_pos]
        hook_z: [batch, pos, head, d_head]
        hook_result: [batch, pos, head, d_model], each head's output (bias excluded); fires only
            when `use_attn_result` is on, as in TransformerLens.
    """

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.n_heads, self.d_head, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.causal = cfg.causal
        self.use_attn_result = False
        self.qkv_weight = nn.Parameter(torch.empty(3 * d, d))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_weight = nn.Parameter(torch.empty(d, d))
        self.out_bias = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint()            # [batch, pos, head, d_head]
        self.hook_k = HookPoint()            # [batch, pos, head, d_head]
        self.hook_v = HookPoint()            # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()      # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()            # [batch, pos, head, d_head]
        self.hook_result = HookPoint()       # [batch, pos, head, d_model]

    # TransformerLens weight views -----------------------------------------------------------
    def _split_in(self, i: int) -> Float[Tensor, "head d_model d_head"]:
        d = self.n_heads * self.d_head
        return einops.rearrange(
            self.qkv_weight[i * d : (i + 1) * d], "(head d_head) d_model -> head d_model d_head",
            head=self.n_heads,
        )

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._split_in(0)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._split_in(1)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._split_in(2)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(
            self.out_weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads
        )

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self.qkv_bias[: self.n_heads * self.d_head].view(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        d = self.n_heads * self.d_head
        return self.qkv_bias[d : 2 * d].view(self.n_heads, self.d_head)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        d = self.n_heads * self.d_head
        return self.qkv_bias[2 * d :].view(self.n_heads, self.d_head)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self.out_bias

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head, [head, d_model, d_model], factored (as TransformerLens's)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head, [head, d_model, d_model], factored (as TransformerLens's)."""
        return FactoredMatrix(self.W_V, self.W_O)

    # forward ---------------------------------------------------------------------------------
    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output for the positions in `x`.

        `past_kv` = (keys, values), each [batch, prefix, head, d_head]: the keys and values of
        `prefix` earlier positions, so that `x` holds only the positions from `prefix` on (a
        KV cache, as in TransformerLens). The hooks then see those positions only.
        """
        batch, pos, _ = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # shape = [batch, pos, 3 * head * d_head]
        if not self.causal and past_kv is None and not self.use_attn_result \
                and not hooks_attached(self.hook_attn_scores, self.hook_pattern):
            # no one looks at the scores or the pattern: the fused kernel (as open_clip's vision tower)
            # shape = 3 x [batch, pos, head, d_head]
            q, k, v = qkv.view(batch, pos, 3, self.n_heads, self.d_head).unbind(2)
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            # shape = [batch, head, pos, d_head] -> [batch, pos, head, d_head]
            return self.project_z(self.hook_z(z.transpose(1, 2)))
        q, k, v = (  # shape = 3 x [batch, pos, head, d_head]
            t.view(batch, pos, self.n_heads, self.d_head) for t in qkv.chunk(3, dim=-1)
        )
        return self.attend(q, k, v, past_kv)

    def forward_per_head(
        self,
        q_input: Float[Tensor, "batch pos head d_model"],
        k_input: Float[Tensor, "batch pos head d_model"],
        v_input: Float[Tensor, "batch pos head d_model"],
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output when each head reads its own (normalised) copy of the residual for its
        queries, keys and values (TransformerLens's split inputs)."""
        q = torch.einsum("bphm,hmd->bphd", q_input, self.W_Q) + self.b_Q
        k = torch.einsum("bphm,hmd->bphd", k_input, self.W_K) + self.b_K
        v = torch.einsum("bphm,hmd->bphd", v_input, self.W_V) + self.b_V
        return self.attend(q, k, v, past_kv)

    def attend(
        self,
        q: Float[Tensor, "batch pos head d_head"],
        k: Float[Tensor, "batch pos head d_head"],
        v: Float[Tensor, "batch pos head d_head"],
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The attention output from queries, keys and values (the hooks from hook_q on fire)."""
        pos = q.shape[1]
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        prefix = 0
        if past_kv is not None and past_kv[0].shape[1] > 0:
            prefix = past_kv[0].shape[1]
            k, v = torch.cat([past_kv[0], k], dim=1), torch.cat([past_kv[1], v], dim=1)
        # [batch, head, pos, d_head] @ [batch, head, d_head, key_pos]
        scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) / math.sqrt(self.d_head)
        if self.causal:
            mask = torch.ones(pos, prefix + pos, dtype=torch.bool, device=q.device).triu_(prefix + 1)
            scores = scores.masked_fill(mask, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        # shape = [batch, head, pos, d_head] -> [batch, pos, head, d_head]
        z = self.hook_z(torch.matmul(pattern, v.transpose(1, 2)).transpose(1, 2))
        if self.use_attn_result:
            result = self.hook_result(
                torch.einsum("bphe,hed->bphd", z, self.W_O)
            )
            return result.sum(dim=2) + self.out_bias
        return self.project_z(z)

    def keys_values(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor]:
        """Keys and values [batch, pos, head, d_head] of (already normalised) positions, without
        their queries: the `past_kv` for a forward pass over other positions only."""
        d = self.n_heads * self.d_head
        kv = F.linear(x, self.qkv_weight[d:], self.qkv_bias[d:])
        k, v = kv.chunk(2, dim=-1)
        shape = (*x.shape[:2], self.n_heads, self.d_head)  # shape = [batch, pos, head, d_head]
        return k.reshape(shape), v.reshape(shape)

    def project_z(self, z: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... d_model"]:
        """The attention output (bias included) for per-head values z."""
        return F.linear(z.flatten(-2), self.out_weight, self.out_bias)  # shape = [..., head * d_head] -> [..., d_model]


class MLP(nn.Module):
    """Two-layer MLP. hook_pre: [batch, pos, d_mlp] before the non-linearity; hook_post: after."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.act_fn = cfg.act_fn
        self.in_weight = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.in_bias = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.out_weight = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.out_bias = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.in_weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.out_weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return self.in_bias

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        return self.out_bias

    def project_post(self, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        """The MLP's output (bias included) for neuron activations `post`."""
        return F.linear(post, self.out_weight, self.out_bias)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.in_weight, self.in_bias))
        if self.act_fn in ("gelu", "gelu_tanh") and not pre.requires_grad and not hooks_attached(self.hook_pre):
            # the same GELU written over its input: no second [batch, pos, d_mlp] buffer (6% of
            # the patching engine's time on a ViT-B); only when nothing keeps the pre-activation
            post = torch.ops.aten.gelu_(pre, approximate="tanh" if self.act_fn == "gelu_tanh" else "none")
        else:
            post = activation(self.act_fn, pre)
        return self.project_post(self.hook_post(post))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: resid_mid = resid_pre + attn(ln1(.)); resid_post = resid_mid +
    mlp(ln2(.)). With LayerScale, each branch is multiplied by its learnt vector before its
    `hook_attn_out` / `hook_mlp_out`, so those hooks always hold what is added to the stream.
    All hooks are [batch, pos, d_model]."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg)
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(cfg.d_model))
            self.ls2 = nn.Parameter(torch.ones(cfg.d_model))
        else:
            self.ls1 = self.ls2 = None
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        # optional, as in TransformerLens: they fire only when the tower's set_use_* turns them on
        self.hook_q_input = HookPoint()  # [batch, pos, head, d_model]
        self.hook_k_input = HookPoint()  # [batch, pos, head, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, head, d_model]
        self.hook_attn_in = HookPoint()  # [batch, pos, head, d_model]
        self.hook_mlp_in = HookPoint()   # [batch, pos, d_model]
        self.split_qkv_input = self.attn_in = self.mlp_in = False
        self.set_flags(cfg)

    def set_flags(self, cfg: TowerConfig) -> None:
        """Which optional hook points fire (the tower's `set_use_*` methods keep them in step with
        its cfg)."""
        self.attn.use_attn_result = cfg.use_attn_result
        self.split_qkv_input, self.attn_in, self.mlp_in = cfg.use_split_qkv_input, cfg.use_attn_in, cfg.use_hook_mlp_in

    @property
    def uses_optional_hooks(self) -> bool:
        return self.split_qkv_input or self.attn_in or self.mlp_in

    def _per_head(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos head d_model"]:
        return resid[:, :, None].expand(-1, -1, self.n_heads, -1).clone()

    def _attention(self, resid_pre: Float[Tensor, "batch pos d_model"],
                   past_kv: Optional[tuple[Tensor, Tensor]]) -> Float[Tensor, "batch pos d_model"]:
        """attn(ln1(resid_pre)), with each head's own input when split inputs are on."""
        if self.split_qkv_input:
            inputs = [hook(self._per_head(resid_pre)) for hook in (self.hook_q_input, self.hook_k_input,
                                                                   self.hook_v_input)]
            return self.attn.forward_per_head(*(self.ln1(x) for x in inputs), past_kv)
        if self.attn_in:
            normed = self.ln1(self.hook_attn_in(self._per_head(resid_pre)))
            return self.attn.forward_per_head(normed, normed, normed, past_kv)
        return self.attn(self.ln1(resid_pre), past_kv)

    def attn_half(self, resid_pre: Float[Tensor, "batch pos d_model"],
                  past_kv: Optional[tuple[Tensor, Tensor]] = None) -> Float[Tensor, "batch pos d_model"]:
        """resid_pre -> resid_mid. See `Attention.forward` for `past_kv`."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self._attention(resid_pre, past_kv)
        if self.ls1 is not None:
            attn_out = attn_out * self.ls1
        return self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))

    def mlp_half(self, resid_mid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """resid_mid -> resid_post."""
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.mlp_in else resid_mid
        mlp_out = self.mlp(self.ln2(mlp_in))
        if self.ls2 is not None:
            mlp_out = mlp_out * self.ls2
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"],
                past_kv: Optional[tuple[Tensor, Tensor]] = None) -> Float[Tensor, "batch pos d_model"]:
        return self.mlp_half(self.attn_half(resid_pre, past_kv))

    def at_rows(self, resid_pre: Float[Tensor, "batch pos d_model"],
                rows: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_model"]:
        """resid_post at one position per input (`rows`): the row's query attends to every position
        as keys and values (in a causal block, those up to the row), and only that row goes on
        through the MLP. The last block of a tower whose embedding reads one row needs no more.
        Fires no hook: for runs with none attached (`HookedTower.pooled_embedding` checks)."""
        attn = self.attn
        batch, pos, _ = resid_pre.shape
        heads, d_head = attn.n_heads, attn.d_head
        normed = self.ln1(resid_pre)
        keys, values = attn.keys_values(normed)  # shape = 2 x [batch, pos, head, d_head]
        index = torch.arange(batch, device=resid_pre.device)
        q = F.linear(normed[index, rows], attn.qkv_weight[: heads * d_head], attn.qkv_bias[: heads * d_head])
        scores = torch.matmul(q.view(batch, heads, 1, d_head), keys.permute(0, 2, 3, 1)) / math.sqrt(d_head)
        if attn.causal:  # shape = [batch, head, 1, pos]; a causal row reads the positions up to itself
            later = torch.arange(pos, device=rows.device) > rows[:, None]  # [batch, pos]
            scores = scores.masked_fill(later[:, None, None], float("-inf"))
        z = torch.matmul(scores.softmax(dim=-1), values.transpose(1, 2))  # shape = [batch, head, 1, d_head]
        attn_out = attn.project_z(z[:, :, 0])
        resid_mid = resid_pre[index, rows] + (attn_out * self.ls1 if self.ls1 is not None else attn_out)
        mlp_out = self.mlp(self.ln2(resid_mid))
        return resid_mid + (mlp_out * self.ls2 if self.ls2 is not None else mlp_out)

    # in place, for the patching engine: x is a buffer it owns --------------------------------
    def _residual_hooks_attached(self) -> bool:
        return self.uses_optional_hooks or hooks_attached(self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid, self.hook_mlp_out,
                              self.hook_resid_post)

    def attn_half_(self, x: Float[Tensor, "batch pos d_model"], past_kv: Optional[tuple[Tensor, Tensor]] = None) -> None:
        """x <- attn_half(x), written into x (saves a copy of the residual stream per half-block
        when no residual hook of this block is in use; the sub-modules' hooks still fire)."""
        if self._residual_hooks_attached():
            x.copy_(self.attn_half(x, past_kv))
            return
        out = self.attn(self.ln1(x), past_kv)
        x.add_(out * self.ls1 if self.ls1 is not None else out)

    def mlp_half_(self, x: Float[Tensor, "batch pos d_model"]) -> None:
        """x <- mlp_half(x), written into x (see `attn_half_`)."""
        if self._residual_hooks_attached():
            x.copy_(self.mlp_half(x))
            return
        out = self.mlp(self.ln2(x))
        x.add_(out * self.ls2 if self.ls2 is not None else out)


class TokenEmbed(nn.Module):
    """Token embedding. hook output (the tower's `hook_embed`) is [batch, pos, d_model]."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to d_model (CLIP's bias-free strided convolution).

    Returns [batch, n_patches, d_model], patches in row-major order of the grid. Computed as one
    matrix product rather than a convolution: cuDNN runs float32 convolutions in TF32 by default
    (about 1e-3 relative error), matrix products do not unless the user turns TF32 on.
    """

    def __init__(self, d_model: int, patch_size: tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(d_model, 3, *patch_size))

    def forward(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch n_patches d_model"]:
        return self.embed_flat(self.flatten(pixels))

    def flatten(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch n_patches d_patch"]:
        """Each patch as one vector of d_patch = 3 * ph * pw values, in (channel, row, column)
        order; patches in row-major order of the grid. A remainder of the image is dropped, as by
        the convolution."""
        ph, pw = self.patch_size
        gh, gw = pixels.shape[-2] // ph, pixels.shape[-1] // pw
        pixels = pixels[..., : gh * ph, : gw * pw]
        # shape = [batch, 3, gh * ph, gw * pw] -> [batch, gh * gw, 3 * ph * pw]
        return einops.rearrange(pixels, "batch c (gh ph) (gw pw) -> batch (gh gw) (c ph pw)", ph=ph, pw=pw)

    def embed_flat(self, patches: Float[Tensor, "batch n_patches d_patch"]) -> Float[Tensor, "batch n_patches d_model"]:
        """The embedding of patches already flattened by `flatten` (the same matrix product)."""
        # shape = [d_model, 3, ph, pw] -> [d_model, 3 * ph * pw]
        return patches @ self.weight.reshape(self.weight.shape[0], -1).T


class Projection(nn.Module):
    """Final projection into the joint embedding space: [batch, d_model] -> [batch, d_embed].

    `W` is [d_model, d_embed] (open_clip's `text_projection` / `proj` layout)."""

    def __init__(self, d_model: int, d_embed: int, bias: bool):
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_model, d_embed))
        self.b: Optional[nn.Parameter] = nn.Parameter(torch.zeros(d_embed)) if bias else None

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_embed"]:
        out = x @ self.W
        return out + self.b if self.b is not None else out
