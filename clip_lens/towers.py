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
from typing import Callable, Optional, Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from clip_lens.caches import TextActivationCache, VisionActivationCache
from clip_lens.checks import is_integer
from clip_lens.components import LayerNorm, PatchEmbed, Projection, TokenEmbed, TransformerBlock, hooks_attached
from clip_lens.config import TextConfig, TowerConfig, VisionConfig
from clip_lens.hooks import HookedModule
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

    # Keep cfg.device and cfg.dtype in step with the weights (TransformerLens reads both).
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        some_param = next(self.parameters(), None)
        if some_param is not None and (str(some_param.device), some_param.dtype) != (self.cfg.device, self.cfg.dtype):
            self.cfg = replace(self.cfg, device=str(some_param.device), dtype=some_param.dtype)
        return out

    # optional hook points, as TransformerLens's setters (each off by default: they cost time) ----
    def _set_flag(self, flag: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False; got {value!r}")
        self.cfg = replace(self.cfg, **{flag: value})
        for block in self.blocks:
            block.set_flags(self.cfg)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output separately and fire `blocks.{l}.attn.hook_result`
        ([batch, pos, head, d_model])."""
        self._set_flag("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the residual for its queries, keys and values, and fire
        `blocks.{l}.hook_q_input` / `hook_k_input` / `hook_v_input` ([batch, pos, head, d_model],
        before ln1)."""
        self._set_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own copy of the residual and fire `blocks.{l}.hook_attn_in`
        ([batch, pos, head, d_model], before ln1)."""
        self._set_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire `blocks.{l}.hook_mlp_in` ([batch, pos, d_model], the MLP's input before ln2)."""
        self._set_flag("use_hook_mlp_in", use_hook_mlp_in)

    def process_weights_(self, fold_ln: bool = False, center_writing_weights: bool = False,
                         fold_value_biases: bool = False) -> "HookedTower":
        """TransformerLens's weight processing on this tower, in place (returns the tower); its
        embedding is unchanged up to float rounding. See `HookedCLIP.process_weights_` and
        `clip_lens.weight_processing`."""
        from clip_lens.weight_processing import process_tower_

        process_tower_(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                       fold_value_biases=fold_value_biases)
        return self

    @property
    def use_attn_result(self) -> bool:
        return self.cfg.use_attn_result

    # weights stacked over layers, as TransformerLens exposes them -----------------------------
    def _stack(self, get) -> Tensor:
        return torch.stack([get(block) for block in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per layer and head, [n_layers, n_heads, d_model, d_model], factored."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per layer and head, [n_layers, n_heads, d_model, d_model], factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def __getattr__(self, name: str):
        if name in ("W_U", "b_U", "unembed"):
            raise AttributeError(f"a CLIP tower has no unembedding ({name}): its output is an embedding in the joint "
                                 "space. tokens_to_residual_directions(embeddings) gives the residual direction of a "
                                 "score with the other tower's embeddings (docs/transformer_lens.md)")
        return super().__getattr__(name)

    # the joint space, read back into the residual stream ---------------------------------------
    def _check_linear_readout(self) -> None:
        if self.proj is None:
            raise ValueError("this tower has no projection into a joint space")
        if self.modality == "vision" and (not self.pools_class_token or self.cfg.final_ln_after_pool):
            raise ValueError("residual directions need the embedding read at one position through a per-position "
                             f"final norm; this vision tower pools by {self.cfg.pooling!r}"
                             f"{' and normalises after pooling' if self.cfg.final_ln_after_pool else ''}")

    def tokens_to_residual_directions(
        self,
        target: Float[Tensor, "*n d_embed"],
        own_embeddings: Optional[Float[Tensor, "batch d_embed"]] = None,
        scale: Union[float, Tensor] = 1.0,
    ) -> Float[Tensor, "*batch d_model"]:
        """The residual direction of a score with `target` (embeddings of the other tower, one or
        one per input), defined in docs/methods.md#residual-directions-in-the-joint-space:
        scale * w_final ⊙ (W_proj @ target / |target|), divided by each input's own embedding
        norm when `own_embeddings` are given. The final-normed (centred, scaled) residual at the
        pooled position dotted with it is the score scale * cos(embedding, target), less what
        `joint_offset` carries. Without `own_embeddings`: [d_model] or [n, d_model]; with them:
        [batch, d_model]."""
        self._check_linear_readout()
        target = target.to(device=self.proj.W.device, dtype=torch.float32)
        unit = target / target.norm(dim=-1, keepdim=True)
        direction = torch.as_tensor(scale).float() * self.final_norm.w.float() * (unit @ self.proj.W.float().T)
        if own_embeddings is None:
            return direction
        if direction.ndim == 2 and own_embeddings.shape[0] != 1 and direction.shape[0] not in (1, own_embeddings.shape[0]):
            raise ValueError(f"{direction.shape[0]} targets for {own_embeddings.shape[0]} inputs: give one target, "
                             "or one per input")
        return direction / own_embeddings.float().norm(dim=-1, keepdim=True).to(direction.device)

    def joint_offset(self) -> Float[Tensor, " d_embed"]:
        """What the embedding holds whatever the residual: the final norm's bias through the
        projection, plus the projection's bias."""
        self._check_linear_readout()
        offset = self.final_norm.b.float() @ self.proj.W.float()
        return offset + self.proj.b.float() if self.proj.b is not None else offset

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

    def pooled_embedding(self, inputs: Tensor) -> Float[Tensor, "batch d_embed"]:
        """The embedding of `inputs` (tokens or pixels) as `forward` gives it, with the last block
        computed at the pooled row only (`TransformerBlock.at_rows`) when the embedding reads one
        row (a class token, or a causal tower's EOT) and no hook is attached anywhere in the tower;
        otherwise `forward` itself. Same values to float rounding, about 1/L less work: for callers
        that want embeddings alone (`clip_lens.scores.encode_images`, `encode_texts`). `forward`
        always runs every position, so a run with an identity hook equals it bitwise."""
        return self.pooled_embedding_with_hooks(inputs, ())

    def pooled_embedding_with_hooks(self, inputs: Tensor, fwd_hooks: Sequence[tuple[str, Callable]], *,
                                    residual: Optional[Float[Tensor, "batch pos d_model"]] = None,
                                    start_at_layer: int = 0) -> Float[Tensor, "batch d_embed"]:
        """The embedding `run_with_hooks(inputs, fwd_hooks=..., residual=..., start_at_layer=...)`
        gives, with the last block computed at the pooled row only (`TransformerBlock.at_rows`)
        when every hook lies in an earlier block, no other hook is attached, and the embedding
        reads one row; otherwise `run_with_hooks` itself. The hooks fire over every position of
        their blocks, as in `forward`. Same values to float rounding, 1/(L - start_at_layer) of the
        blocks' work less: for runs that intervene early and want embeddings alone (the head
        interventions of the negation studies).

        Args:
            inputs: tokens [batch, pos] or pixels; with `residual`, they give the pooled positions.
            fwd_hooks: (hook name, function) pairs, named by string.
            residual: the residual stream at `start_at_layer` to resume from.
        """
        last = self.cfg.n_layers - 1
        early = all(isinstance(name, str) and name.startswith("blocks.") and int(name.split(".")[1]) < last
                    for name, _ in fwd_hooks)
        reads_one_row = self.pools_class_token or self.attends_causally
        if not early or start_at_layer >= last or not reads_one_row or hooks_attached(*self._hook_points()):
            return self.run_with_hooks(inputs, residual=residual, start_at_layer=start_at_layer,
                                       fwd_hooks=list(fwd_hooks))
        with self.hooks(fwd_hooks=list(fwd_hooks)):
            if residual is None:
                resid, rows = self._to_last_block(inputs)
            else:
                resid = self.run_blocks(residual, start_at_layer, last)
                rows = self.pooled_positions(self.check_input(inputs))
        return self.pool_rows(self.blocks[-1].at_rows(resid, rows))

    def _to_last_block(self, inputs: Tensor) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, " batch"]]:
        """(the residual stream at the last block's input, each input's pooled position)."""
        raise NotImplementedError

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
    cache_class = TextActivationCache

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

    def to_str_tokens(self, input: Union[str, Sequence[str], Tensor]) -> Union[list[str], list[list[str]]]:
        """Tokens as strings, as TransformerLens's: a text, or tokens [pos] / [1, pos], give one
        list; a list of texts, or tokens [batch, pos] with batch > 1, give one list per text. Each
        list runs up to and including the text's EOT (the padding after it is not part of it)."""
        if isinstance(input, str):
            return self._str_tokens_of_row(self.to_tokens(input)[0])
        if isinstance(input, (list, tuple)):
            return [self._str_tokens_of_row(row) for row in self.to_tokens(list(input))]
        tokens = self._as_token_rows(input, "input")
        rows = [self._str_tokens_of_row(row) for row in tokens]
        return rows[0] if input.ndim == 1 or len(rows) == 1 else rows

    def to_string(self, tokens: Union[Sequence[int], Tensor]) -> Union[str, list[str]]:
        """The text of tokens, special tokens included, up to each row's EOT: one string for
        [pos], one per row for [batch, pos] (TransformerLens's `to_string`)."""
        rows = self._as_token_rows(torch.as_tensor(tokens), "tokens")
        texts = [self.tokenizer.decode(row[: self._row_length(row)]) for row in rows]
        return texts[0] if torch.as_tensor(tokens).ndim == 1 else texts

    def to_single_token(self, string: str) -> int:
        """The id of `string`, which must be exactly one token (no start or end token)."""
        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string; got {type(string).__name__}")
        ids = self.tokenizer.encode_plain(string)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode_token(i) for i in ids]
            raise ValueError(f"{string!r} is {len(ids)} tokens ({pieces}), not one")
        return int(ids[0])

    def get_token_position(self, single_token: Union[str, int], input: Union[str, Tensor],
                           mode: str = "first") -> int:
        """The position of `single_token` (a string of one token, or an id) in `input` (a text, or
        tokens [pos] / [1, pos]); `mode` "first" or "last" when it occurs more than once."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r}: use 'first' or 'last'")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        row = self.to_tokens(input)[0] if isinstance(input, str) else self._as_token_rows(input, "input")
        if row.ndim == 2:
            if row.shape[0] != 1:
                raise ValueError(f"get_token_position takes one text; input has {row.shape[0]} rows")
            row = row[0]
        found = (row[: self._row_length(row)] == token).nonzero().flatten().tolist()
        if not found:
            raise ValueError(f"token {token} ({self.tokenizer.decode_token(token)!r}) is not in the input "
                             f"{self.to_str_tokens(row)}")
        return found[0] if mode == "first" else found[-1]

    def _as_token_rows(self, tokens: Tensor, name: str) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor) or tokens.ndim not in (1, 2) or tokens.is_floating_point():
            raise ValueError(f"{name}: expected a text, texts, or integer tokens [pos] or [batch, pos]; got "
                             f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
        return tokens.reshape(1, -1) if tokens.ndim == 1 else tokens

    def _row_length(self, row: Int[Tensor, " pos"]) -> int:
        """Positions of one row up to and including its EOT (all of them without EOT pooling)."""
        return int(self.sequence_lengths(row[None])[0]) if self.can_trim else len(row)

    def _str_tokens_of_row(self, row: Int[Tensor, " pos"]) -> list[str]:
        return [self.tokenizer.decode_token(int(t)) for t in row[: self._row_length(row)]]

    def input_tokens(self, inputs: Union[str, Sequence[str], Tensor]) -> Int[Tensor, "batch pos"]:
        """Texts tokenized, or tokens checked, ready for the tower (trimmed to the longest EOT)."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                      and all(isinstance(t, str) for t in inputs)):
            return self.to_tokens(inputs)
        return self.trim(self.check_tokens(inputs))

    def make_cache(self, cache_dict: dict, model_args: tuple, kwargs: dict) -> TextActivationCache:
        cache = super().make_cache(cache_dict, model_args, kwargs)
        tokens = model_args[0] if model_args else kwargs.get("tokens")
        cache.inputs = None if tokens is None else self.input_tokens(tokens)
        return cache

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
        self._check_eot(tokens)
        return tokens

    @property
    def eot_token_id(self) -> Optional[int]:
        """The id the embedding is pooled at: the config's for "eos" pooling; for "argmax" pooling
        the end-of-text id of the tower's tokenizer (CLIP's EOT is its largest id); None otherwise,
        and for a tower built without a tokenizer."""
        if self.cfg.pooling == "eos":
            return self.cfg.eot_token_id
        if self.cfg.pooling == "argmax" and self._tokenizer is not None:
            eot = self._tokenizer.eot_token_id
            return eot if eot is not None and eot < self.cfg.d_vocab else None
        return None

    def _check_eot(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Each row must hold the EOT token: without it the embedding would be read elsewhere
        (argmax pooling picks the largest other id, SOT for CLIP) without a word."""
        eot = self.eot_token_id
        if eot is None:
            return
        missing = (tokens[torch.arange(tokens.shape[0], device=tokens.device), self.pooled_positions(tokens)] != eot)
        if bool(missing.any()):
            rows = missing.nonzero().flatten().tolist()
            raise ValueError(f"token row(s) {rows[:5]} hold no end-of-text token (id {eot}), where the text embedding "
                             "is read; tokenize with model.to_tokens(texts)")

    @property
    def attends_causally(self) -> bool:
        return self.cfg.causal

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding."""
        return self.embed.W_E

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

    def _to_last_block(self, tokens: Int[Tensor, "batch pos"]) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, " batch"]]:
        tokens = self.input_tokens(tokens)
        return self.run_blocks(self.embed_tokens(tokens), 0, self.cfg.n_layers - 1), self.pooled_positions(tokens)

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
            tokens: [batch, pos], or texts (tokenized with `to_tokens`); always needed, since they
                locate the pooled (EOT) position.
            residual: the residual stream at `start_at_layer` to resume from, instead of the
                embeddings (positions as in the trimmed tokens).
            stop_at_layer: return the residual stream at this layer instead of the embedding.
        """
        tokens = self.input_tokens(tokens)
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

    def _to_last_block(self, pixels: Tensor) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, " batch"]]:
        resid = self.run_blocks(self.embed_image(pixels), 0, self.cfg.n_layers - 1)
        return resid, torch.zeros(resid.shape[0], dtype=torch.long, device=resid.device)  # the class token

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

    @property
    def W_E(self) -> Float[Tensor, "d_patch d_model"]:
        """The patch embedding as a matrix: a flattened patch (3 * ph * pw values, channel-major
        then row-major within the patch, as `PatchEmbed` reads them) times W_E is its embedding."""
        return self.patch_embed.weight.reshape(self.cfg.d_model, -1).T

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
