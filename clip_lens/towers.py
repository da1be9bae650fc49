"""CLIP's text and vision towers as TransformerLens hooked root modules.

Each tower works on its own (`run_with_cache`, `run_with_hooks`, TransformerLens's patching
functions) and inside `HookedCLIP`, which reaches the same hook points with a `text.` / `vision.`
prefix.

Both forward passes can start from a residual stream at layer l and stop at layer l'
(`start_at_layer`, `stop_at_layer`, as in TransformerLens), which is what lets the patching engine
resume a run from a cached layer instead of from the input.

Layer numbering follows docs/methods.md#layer-numbering: layer 0 is the input of block 0 (the embeddings, after `ln_pre`
in the vision tower), layer l is the residual after block l - 1, layer L the output of the last block.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Optional, Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from clip_lens.checks import is_integer
from clip_lens.components import LayerNorm, PatchEmbed, Projection, TokenEmbed, TransformerBlock
from clip_lens.config import TextConfig, TowerConfig, VisionConfig
from clip_lens.hooks import HookedModule, act_name
from clip_lens.tokenization import Tokenizer
from clip_lens.transformer_lens_patching import (
    called_from_tl_patching,
    first_input,
    hooks_from_tl_patching,
    pixels_refusal,
)

# Normalised pixels ((x - mean) / std of [0, 1] values) stay within about +-3; 0-255 values do not.
PIXEL_LIMIT = 10.0


class HookedTower(HookedModule):
    """What both towers share: config, blocks, layer-range checks, per-head results, and the facts
    about a tower that code outside it asks (its modality, causal attention, class-token pooling,
    sequence lengths)."""

    cfg: TowerConfig
    modality: str  # "text" or "vision"

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])

    # Keep cfg.device in step with the weights (TransformerLens reads model.cfg.device).
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        some_param = next(self.parameters(), None)
        if some_param is not None and str(some_param.device) != self.cfg.device:
            self.cfg = replace(self.cfg, device=str(some_param.device))
        return out

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output separately and fire `blocks.{l}.attn.hook_result`
        ([batch, pos, head, d_model]). Off by default: it costs memory and time."""
        for block in self.blocks:
            block.attn.use_attn_result = use_attn_result

    @property
    def use_attn_result(self) -> bool:
        return bool(self.blocks[0].attn.use_attn_result) if len(self.blocks) else False

    def check_layer(self, layer: int, *, name: str = "layer") -> int:
        """`layer` as a non-negative index in 0..n_layers, or a ValueError naming it."""
        n = self.cfg.n_layers
        if not is_integer(layer) or not -n - 1 <= layer <= n:
            raise ValueError(f"{name}={layer!r} is out of range: this tower has layers 0..{n}")
        return layer % (n + 1)

    def run_blocks(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start_at_layer: int = 0,
        stop_at_layer: Optional[int] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Residual stream at layer `stop_at_layer` (default n_layers) from the one at `start_at_layer`."""
        start = self.check_layer(start_at_layer, name="start_at_layer")
        stop = self.cfg.n_layers if stop_at_layer is None else self.check_layer(stop_at_layer, name="stop_at_layer")
        for block in self.blocks[start:stop]:
            resid = block(resid)
        return resid

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """The biases the blocks before `layer` add to the residual stream (each attention output's,
        and each MLP output's with `include_mlp_biases`; with `mlp_input`, block `layer`'s attention
        too), as TransformerLens's residual decompositions read them."""
        if self.cfg.layer_scale:
            raise ValueError("this tower scales its branch outputs (LayerScale), which TransformerLens's per-head "
                             "decomposition leaves out; decompose with decompose_resid instead")
        total = torch.zeros(self.cfg.d_model, device=self.W_pos.device, dtype=self.W_pos.dtype)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O + (block.mlp.b_out if include_mlp_biases else 0)
        if mlp_input and layer < self.cfg.n_layers:
            total = total + self.blocks[layer].attn.b_O
        return total

    # facts about the tower -------------------------------------------------------------------
    @property
    def attends_causally(self) -> bool:
        """Position q reads positions <= q only, so a change at q cannot reach earlier positions."""
        return False

    @property
    def pools_class_token(self) -> bool:
        """The embedding reads the class token (position 0) only, through non-causal attention."""
        return False

    def n_positions(self, inputs: Tensor) -> int:
        """Positions of the residual stream for `inputs` (tokens [batch, pos] or pixels)."""
        raise NotImplementedError

    def sequence_lengths(self, inputs: Tensor) -> Int[Tensor, " batch"]:
        """Each input's own positions: tokens up to and including EOT, or every image position."""
        raise NotImplementedError

    def check_input(self, inputs: Tensor) -> Tensor:
        """`inputs` checked for this tower (tokens trimmed to the longest EOT), or a ValueError."""
        raise NotImplementedError

    def pooled_positions(self, inputs: Tensor) -> Int[Tensor, " batch"]:
        """The position each input's embedding is read from (EOT for CLIP text, the class token)."""
        raise NotImplementedError

    def pool_residual(self, resid: Float[Tensor, "batch pos d_model"], inputs: Tensor) -> Float[Tensor, "batch d_embed"]:
        """The embedding from the residual stream at layer L of `inputs`' run."""
        raise NotImplementedError

    def pool_rows(self, rows: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_embed"]:
        """The embedding from the layer-L residual at the pooled position only."""
        raise NotImplementedError

    @property
    def final_norm(self) -> LayerNorm:
        """The norm between the last block and the projection (ln_final, ln_post)."""
        raise NotImplementedError



class HookedTextTower(HookedTower):
    """CLIP's text transformer.

    Hooks: hook_embed, hook_pos_embed [batch, pos, d_model]; the block hooks;
    ln_final.hook_scale/hook_normalized; hook_pooled [batch, d_model] (the final-normed residual at
    the pooled position, EOT for CLIP); hook_embedding [batch, d_embed] (what `encode_text` returns).

    Inputs are trimmed to the longest EOT of the batch before anything runs: under the causal mask
    the padding cannot change the pooled position, so this is exact and saves most of the work.
    """

    cfg: TextConfig
    modality = "text"

    def __init__(self, cfg: TextConfig, tokenizer: Optional[Tokenizer] = None):
        super().__init__(cfg)
        self.embed = TokenEmbed(cfg.d_vocab, cfg.d_model)
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_pooled = HookPoint()
        self.proj = Projection(cfg.d_model, cfg.d_embed, cfg.proj_bias) if cfg.d_embed else None
        self.hook_embedding = HookPoint()
        self._tokenizer = tokenizer
        self.setup()

    # tokens ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.default(self.cfg.n_ctx)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def to_tokens(self, texts: Union[str, Sequence[str]], trim: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize; with `trim`, drop the padding after the longest EOT of the batch. A text that
        fills the whole context (and may have been cut to fit) is named in a warning."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts is empty: give at least one text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__} ({text!r}), not a string")
        tokens = self.tokenizer(texts).to(self.cfg.device)
        if self.can_trim:
            full = (self.pooled_positions(tokens) >= tokens.shape[1] - 1).nonzero().flatten().tolist()
            for i in full[:3]:
                warnings.warn(f"text {i} ({texts[i][:60]!r}{'...' if len(texts[i]) > 60 else ''}) fills all "
                              f"{self.cfg.n_ctx} token slots and may have been cut to fit", stacklevel=3)
        return self.trim(tokens) if trim else tokens

    def to_str_tokens(self, text: Union[str, Tensor]) -> list[str]:
        """The tokens of one text (or one row of tokens) as strings, up to and including EOT."""
        tokens = self.to_tokens(text)[0] if isinstance(text, str) else text.reshape(-1)
        end = int(self.pooled_positions(tokens[None])[0]) + 1 if self.can_trim else len(tokens)
        return [self.tokenizer.decode_token(int(t)) for t in tokens[:end]]

    @property
    def can_trim(self) -> bool:
        return self.cfg.causal and self.cfg.pooling in ("argmax", "eos")

    def pooled_positions(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        """Position each sequence is pooled at (its EOT token for CLIP)."""
        pooling = self.cfg.pooling
        if pooling == "argmax":
            return tokens.argmax(dim=-1)
        if pooling == "eos":
            return (tokens == self.cfg.eot_token_id).int().argmax(dim=-1)
        if pooling == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if pooling == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
        raise ValueError(f"Unsupported text pooling {pooling!r}")

    def trim(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos_trimmed"]:
        """`tokens` cut after the longest EOT in the batch (unchanged when trimming is not exact)."""
        if not self.can_trim or tokens.shape[1] == 0:
            return tokens
        return tokens[:, : int(self.pooled_positions(tokens).max()) + 1]

    def check_tokens(self, tokens: Tensor) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(
                "text must be integer tokens of shape [batch, pos] (use model.to_tokens(texts)); "
                f"got {type(tokens).__name__} {getattr(tokens, 'shape', '')}"
            )
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} are empty")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; the tower takes at most {self.cfg.n_ctx}")
        bad = ((tokens < 0) | (tokens >= self.cfg.d_vocab)).nonzero()
        if len(bad):
            row, pos = (int(i) for i in bad[0])
            raise ValueError(f"token id {int(tokens[row, pos])} at row {row}, position {pos} is outside the vocabulary "
                             f"(0..{self.cfg.d_vocab - 1})")
        return tokens

    @property
    def attends_causally(self) -> bool:
        return self.cfg.causal

    def n_positions(self, inputs: Int[Tensor, "batch pos"]) -> int:
        return inputs.shape[1]

    def sequence_lengths(self, inputs: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
        if self.can_trim:
            return self.pooled_positions(inputs) + 1
        return torch.full((inputs.shape[0],), inputs.shape[1], device=inputs.device)

    def check_input(self, inputs: Tensor) -> Int[Tensor, "batch pos"]:
        return self.trim(self.check_tokens(inputs))

    # forward ---------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """Residual stream at layer 0: token plus positional embedding."""
        embed = self.hook_embed(self.embed(tokens))
        pos_embed = self.hook_pos_embed(self.W_pos[: tokens.shape[1]].expand(tokens.shape[0], -1, -1).clone())
        return embed + pos_embed

    def pool(self, resid: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_embed"]:
        """Final norm, pooling at EOT and projection: the residual at layer L to the embedding."""
        normed = self.ln_final(resid)
        positions = self.pooled_positions(tokens)
        pooled = self.hook_pooled(normed[torch.arange(normed.shape[0], device=normed.device), positions])
        return self.hook_embedding(self.proj(pooled) if self.proj is not None else pooled)

    def pool_residual(self, resid: Float[Tensor, "batch pos d_model"], inputs: Tensor) -> Float[Tensor, "batch d_embed"]:
        return self.pool(resid, inputs)

    @property
    def final_norm(self) -> LayerNorm:
        return self.ln_final

    def pool_rows(self, rows: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_embed"]:
        """The embedding from the layer-L residual at the pooled position only (per-token norm, so
        equal to `pool`; used by the patching engine, which computes no other position)."""
        pooled = self.hook_pooled(self.ln_final(rows))
        return self.hook_embedding(self.proj(pooled) if self.proj is not None else pooled)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        *,
        residual: Optional[Float[Tensor, "batch pos d_model"]] = None,
        start_at_layer: int = 0,
        stop_at_layer: Optional[int] = None,
    ) -> Tensor:
        """Text embeddings [batch, d_embed], as open_clip's `encode_text` (unnormalised).

        Args:
            tokens: [batch, pos]; always needed, since they locate the pooled (EOT) position.
            residual: the residual stream at `start_at_layer` to resume from, instead of the
                embeddings (positions as in the trimmed tokens).
            stop_at_layer: return the residual stream at this layer instead of the embedding.
        """
        tokens = self.trim(self.check_tokens(tokens))
        if residual is None:
            if start_at_layer != 0:
                raise ValueError("start_at_layer > 0 needs the residual stream to start from (residual=...)")
            residual = self.embed_tokens(tokens)
        elif residual.shape[:2] != tokens.shape:
            residual = residual[:, : tokens.shape[1]]
        resid = self.run_blocks(residual, start_at_layer, stop_at_layer)
        if stop_at_layer is not None:
            return resid
        return self.pool(resid, tokens)


def _as_slice(value) -> Slice:
    return value if isinstance(value, Slice) else Slice(value)


class VisionActivationCache(ActivationCache):
    """A vision tower's cache for TransformerLens's residual tools. The vision residual at layer 0
    is ln_pre's output, not the sum of the embedding hooks, so decompositions start from that
    residual (labelled "embed"), and the final norm is `ln_post`."""

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


class HookedVisionTower(HookedTower):
    """CLIP's vision transformer (ViT).

    Hooks: hook_patch_embed [batch, n_patches, d_model]; hook_class_embed [batch, 1, d_model];
    hook_pos_embed [batch, 1 + n_patches, d_model]; ln_pre.hook_scale/hook_normalized (its output
    is layer 0, `blocks.0.hook_resid_pre`); the block hooks; ln_post.hook_*; hook_pooled
    [batch, d_model]; hook_embedding [batch, d_embed] (what `encode_image` returns).
    Position 0 is the class token, positions 1.. the patches in row-major order.

    Inputs: pixels [batch, 3, H, W], or the same pixels as patch tokens [batch, d_patch, n_ctx]
    (`to_patch_tokens`), whose last axis is the positions: TransformerLens's patching functions
    count positions along the last axis of their input, so they take patch tokens, and refuse pixels
    with an error (`run_with_hooks`).
    """

    cfg: VisionConfig
    modality = "vision"
    cache_class = VisionActivationCache

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg.d_model, cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.empty(cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_patch_embed = HookPoint()
        self.hook_class_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.ln_pre = LayerNorm(cfg.d_model, cfg.eps) if cfg.ln_pre else None
        self.ln_post = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_pooled = HookPoint()
        self.proj = Projection(cfg.d_model, cfg.d_embed, cfg.proj_bias) if cfg.d_embed else None
        self.hook_embedding = HookPoint()
        self.setup()

    def check_pixels(self, pixels: Tensor) -> Float[Tensor, "batch 3 height width"]:
        """`pixels` as the tower takes them: normalised floats [batch, 3, H, W], finite, batch > 0."""
        expected = (3, *self.cfg.image_size)
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"image must be a pixel tensor of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(use model.to_pixels(images)); got {type(pixels).__name__} {tuple(getattr(pixels, 'shape', ()))}"
            )
        return self._check_pixel_values(pixels)

    def _check_pixel_values(self, pixels: Tensor) -> Tensor:
        """`pixels` (or patch tokens) with a batch > 0 of finite, normalised floats."""
        if pixels.shape[0] == 0:
            raise ValueError("pixels hold no image (batch of 0)")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels are {pixels.dtype}: the tower takes normalised floats; pass raw images through "
                             "model.to_pixels, which resizes and normalises them")
        finite = torch.isfinite(pixels).flatten(1).all(1)
        if not bool(finite.all()):
            raise ValueError(f"image {int((~finite).nonzero()[0])} of the batch has NaN or infinite pixel values")
        largest = float(pixels.abs().max())
        if largest > PIXEL_LIMIT:
            raise ValueError(f"pixel values reach {largest:.1f}: normalised pixels lie within a few units of 0 (0-255 "
                             "values?); pass raw images through model.to_pixels")
        return pixels

    @property
    def pools_class_token(self) -> bool:
        return self.cfg.pooling == "tok" and not self.cfg.causal

    def n_positions(self, inputs: Tensor) -> int:
        return self.cfg.n_ctx

    def sequence_lengths(self, inputs: Tensor) -> Int[Tensor, " batch"]:
        return torch.full((inputs.shape[0],), self.cfg.n_ctx, device=inputs.device)

    def check_input(self, inputs: Tensor) -> Float[Tensor, "batch 3 height width"]:
        return self.check_pixels(inputs)

    def embed_pixels(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch pos d_model"]:
        """Residual stream at layer 0: class token and patches, plus positions, through ln_pre."""
        return self._embed_patches(self.patch_embed(pixels.to(self.W_pos.dtype)))

    def embed_patch_tokens(self, tokens: Float[Tensor, "batch d_patch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """`embed_pixels` from the patch tokens of the same pixels (`to_patch_tokens`): bit-identical,
        the patch embedding being the same matrix product over the same patch vectors."""
        flat = tokens[:, :, 1:].transpose(1, 2).to(self.W_pos.dtype).contiguous()
        return self._embed_patches(self.patch_embed.embed_flat(flat))

    def _embed_patches(self, patches: Float[Tensor, "batch n_patches d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """Layer 0 from the embedded patches: class token prepended, positions added, ln_pre."""
        batch = patches.shape[0]
        patches = self.hook_patch_embed(patches)
        cls = self.hook_class_embed(self.class_embedding.view(1, 1, -1).expand(batch, -1, -1).clone())
        pos_embed = self.hook_pos_embed(self.W_pos.expand(batch, -1, -1).clone())
        x = torch.cat([cls, patches], dim=1) + pos_embed
        return self.ln_pre(x) if self.ln_pre is not None else x

    def embed_image(self, image: Tensor) -> Float[Tensor, "batch pos d_model"]:
        """Residual stream at layer 0 of pixels [batch, 3, H, W] or patch tokens [batch, d_patch, pos]
        (a 3-d tensor), each checked."""
        if isinstance(image, Tensor) and image.ndim == 3:
            return self.embed_patch_tokens(self.check_patch_tokens(image))
        return self.embed_pixels(self.check_pixels(image))

    # patch tokens: the input layout whose last axis is the positions -----------------------------
    @property
    def d_patch(self) -> int:
        """Values of one flattened patch: 3 * patch height * patch width."""
        ph, pw = self.cfg.patch_size
        return 3 * ph * pw

    def to_patch_tokens(self, pixels: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch d_patch pos"]:
        """The pixels as patch tokens, an input layout whose last axis is the tower's positions, for
        TransformerLens's patching functions (which count positions as `input.shape[-1]`).

        Layout: [batch, d_patch, n_ctx], d_patch = 3 * ph * pw, n_ctx = 1 + n_patches. Column 0 is
        the class token's slot and holds zeros (the class token is a learnt embedding, not pixels);
        column 1 + p is patch p of the grid in row-major order (as position 1 + p of the residual
        stream), its values in (channel, row within the patch, column within the patch) order, the
        order in which the patch embedding reads them. The tower (forward, run_with_hooks,
        run_with_cache) takes patch tokens wherever it takes pixels, with the same result bit for
        bit; `from_patch_tokens` gives the pixels back."""
        flat = self.patch_embed.flatten(self.check_pixels(pixels))  # [batch, n_patches, d_patch]
        slot = flat.new_zeros(flat.shape[0], 1, flat.shape[2])
        return torch.cat([slot, flat], dim=1).transpose(1, 2).contiguous()

    def from_patch_tokens(self, tokens: Float[Tensor, "batch d_patch pos"]) -> Float[Tensor, "batch 3 height width"]:
        """The pixels [batch, 3, gh * ph, gw * pw] of patch tokens (`to_patch_tokens`' inverse)."""
        tokens = self.check_patch_tokens(tokens)
        (ph, pw), (gh, gw) = self.cfg.patch_size, self.cfg.grid_size
        return einops.rearrange(tokens[:, :, 1:], "batch (c ph pw) (gh gw) -> batch c (gh ph) (gw pw)",
                                c=3, ph=ph, pw=pw, gh=gh, gw=gw)

    def check_patch_tokens(self, tokens: Tensor) -> Float[Tensor, "batch d_patch pos"]:
        """`tokens` as the tower takes patch tokens: [batch, d_patch, n_ctx] normalised floats,
        finite, with a zero class-token slot (column 0), or a ValueError."""
        expected = (self.d_patch, self.cfg.n_ctx)
        if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
            h, w = self.cfg.image_size
            raise ValueError(
                f"patch tokens must be a tensor of shape [batch, {expected[0]}, {expected[1]}] ([batch, 3 * ph * pw, "
                f"1 + n_patches]; use model.vision.to_patch_tokens(pixels)); got {type(tokens).__name__} "
                f"{tuple(getattr(tokens, 'shape', ()))} (one image's pixels? give a batch: [1, 3, {h}, {w}])"
            )
        tokens = self._check_pixel_values(tokens)
        nonzero = (tokens[:, :, 0] != 0).any(dim=1)
        if bool(nonzero.any()):
            raise ValueError(f"patch tokens of image {int(nonzero.nonzero()[0])}: column 0 is the class token's slot and "
                             "must hold zeros (the class token is not made from pixels; patches are columns 1..)")
        return tokens

    # TransformerLens's patching functions ------------------------------------------------------
    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        """As TransformerLens's; refuses pixels in a run made by TransformerLens's patching functions
        (`clip_lens.transformer_lens_patching`), whose position grid must come from patch tokens."""
        image = first_input(model_args, model_kwargs)
        if isinstance(image, Tensor) and image.ndim == 4 and (hooks_from_tl_patching(fwd_hooks) or called_from_tl_patching()):
            raise ValueError(pixels_refusal(self.cfg.n_ctx, self.cfg.n_patches, self.d_patch, image.shape[-1]))
        return super().run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks),
                                      reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs)

    def pool(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_embed"]:
        """ln_post, pooling (class token or mean of patches) and projection, in open_clip's order."""
        def reduce(x: Tensor) -> Tensor:
            return x[:, 0] if self.cfg.pooling == "tok" else x[:, 1:].mean(dim=1)

        if self.cfg.final_ln_after_pool:
            pooled = self.ln_post(reduce(resid))
        else:
            pooled = reduce(self.ln_post(resid))
        pooled = self.hook_pooled(pooled)
        return self.hook_embedding(self.proj(pooled) if self.proj is not None else pooled)

    def pool_residual(self, resid: Float[Tensor, "batch pos d_model"], inputs: Tensor) -> Float[Tensor, "batch d_embed"]:
        return self.pool(resid)

    @property
    def final_norm(self) -> LayerNorm:
        return self.ln_post

    @property
    def ln_final(self) -> LayerNorm:
        """TransformerLens's name for the final norm (its residual tools apply it by this name)."""
        return self.ln_post

    def pooled_positions(self, inputs: Tensor) -> Int[Tensor, " batch"]:
        if self.cfg.pooling != "tok":
            raise ValueError(f"a vision tower pooled by {self.cfg.pooling!r} reads no single position (only class-token "
                             "pooling, 'tok', does)")
        return torch.zeros(inputs.shape[0], dtype=torch.long, device=inputs.device)

    def pool_rows(self, rows: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_embed"]:
        if self.cfg.pooling != "tok":
            raise ValueError(f"a vision tower pooled by {self.cfg.pooling!r} has no single pooled row")
        return self.pool(rows[:, None])

    def forward(
        self,
        pixels: Optional[Union[Float[Tensor, "batch 3 height width"], Float[Tensor, "batch d_patch pos"]]] = None,
        *,
        residual: Optional[Float[Tensor, "batch pos d_model"]] = None,
        start_at_layer: int = 0,
        stop_at_layer: Optional[int] = None,
    ) -> Tensor:
        """Image embeddings [batch, d_embed], as open_clip's `encode_image` (unnormalised).

        Args:
            pixels: preprocessed images [batch, 3, H, W] (see `HookedCLIP.to_pixels`), or their
                patch tokens [batch, d_patch, n_ctx] (`to_patch_tokens`), with the same result.
            residual: the residual stream at `start_at_layer` to resume from instead of pixels.
            stop_at_layer: return the residual stream at this layer instead of the embedding.
        """
        if residual is None:
            if start_at_layer != 0:
                raise ValueError("start_at_layer > 0 needs the residual stream to start from (residual=...)")
            if pixels is None:
                raise ValueError("HookedVisionTower needs pixels or a residual stream")
            residual = self.embed_image(pixels)
        resid = self.run_blocks(residual, start_at_layer, stop_at_layer)
        if stop_at_layer is not None:
            return resid
        return self.pool(resid)
