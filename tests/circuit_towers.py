"""Hand-built towers with planted circuits, shared by the circuit tests and the docs' checks."""

from __future__ import annotations

import torch

from clip_lens.config import TextConfig
from clip_lens.tokenization import Tokenizer
from clip_lens.towers import HookedTextTower

NEGATED = ["There is no dog.", "There are no people in the picture.", "There is no red car parked here.",
           "There are no animals.", "no cat.", "There is no tree on the hill."]
NON_NEGATED = ["There is a dog.", "There are some people in the picture.", "There is some red car parked here.",
               "There are some animals.", "a cat.", "There is a tree on the hill."]
COPY_HEAD, READ_HEAD = (0, 0), (2, 1)   # (layer, head)
PATH_EDGES = ["input->a0.h0<v>", "a0.h0->a2.h1<v>", "a2.h1->output", "a2.h1->m2", "m2->output"]
TWO_HEAD_EDGE = "a0.h0->a2.h1<v>"
GAIN = 0.7  # small enough that the final norm stays close to linear


def small_random_weights_(tower: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.Generator:
    """Every weight N(0, scale) and every layer norm the identity: the blank a hand-built tower's
    planted weights are written on. Returns the generator, to draw more from it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tower.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
        for module in tower.modules():
            if type(module).__name__ == "LayerNorm":
                module.w.fill_(1.0)
                module.b.zero_()
    return gen


def linear_metric(emb: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The planted output feature: dims 6 - 7 of the embedding (the projection is the identity)."""
    return emb[:, 6] - emb[:, 7]


def two_head_path_tower(mlp_share: float = 0.2) -> HookedTextTower:
    """A 3-layer text tower with small random weights and one planted path for "no":

    - every token carries constant features (+3 / -3 on dims 0 / 1) and random ones (dims 8..);
      only "no" carries the negation feature (+6 / -6 on dims 2 / 3), which "a" and "some", its
      replacements, hold along the other diagonal (+6 / +6: the same norm, no negation);
    - head a0.h0 attends uniformly (zero query and key weights) and its value copies the
      negation feature forward into dims 4 / 5 of every later position, EOT included;
    - head a2.h1 attends uniformly and its value reads dims 4 / 5 into the output feature dims 6 / 7;
    - MLP m2 reads dims 6 / 7 and writes them again (`mlp_share` of the head's write), a second
      route from a2.h1 to the output;
    - the projection is the identity, and `linear_metric` reads dims 6 - 7.

    So the path input -> a0.h0<v> -> a2.h1<v> -> (output, and m2 -> output) carries the
    difference between "no" and its replacement, and nothing else does."""
    cfg = TextConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=77, d_embed=32,
                     d_vocab=49408, eot_token_id=49407)
    tokenizer = Tokenizer.default()
    tower = HookedTextTower(cfg, tokenizer)
    gen = small_random_weights_(tower, seed=0)
    d, dh = cfg.d_model, cfg.d_head
    with torch.no_grad():
        tower.embed.W_E.zero_()
        tower.embed.W_E[:, 8:] = torch.randn(cfg.d_vocab, d - 8, generator=gen)
        tower.embed.W_E[:, 0], tower.embed.W_E[:, 1] = 3.0, -3.0
        no = int(tokenizer(["no"])[0, 1])
        tower.embed.W_E[no, 2], tower.embed.W_E[no, 3] = 6.0, -6.0
        for word in ("a", "some"):  # the replacements: as large on dims 2 / 3, along the other diagonal
            token = int(tokenizer([word])[0, 1])
            tower.embed.W_E[token, 2], tower.embed.W_E[token, 3] = 6.0, 6.0
        tower.W_pos.mul_(0.1)
        for block in tower.blocks:
            # nothing else writes into the planted feature dims 2..7
            block.attn.out_weight[2:8] = 0.0
            block.mlp.out_weight[2:8] = 0.0
            block.attn.out_bias[2:8] = 0.0
            block.mlp.out_bias[2:8] = 0.0
        for (layer, head), (read, write) in ((COPY_HEAD, (2, 4)), (READ_HEAD, (4, 6))):
            attn = tower.blocks[layer].attn
            q_rows, k_rows = slice(head * dh, (head + 1) * dh), slice(d + head * dh, d + (head + 1) * dh)
            v_rows = slice(2 * d + head * dh, 2 * d + (head + 1) * dh)
            for rows in (q_rows, k_rows, v_rows):
                attn.qkv_weight[rows] = 0.0
                attn.qkv_bias[rows] = 0.0
            attn.qkv_weight[v_rows.start, read], attn.qkv_weight[v_rows.start, read + 1] = GAIN, -GAIN
            attn.out_weight[:, head * dh : (head + 1) * dh] = 0.0
            attn.out_weight[write, head * dh], attn.out_weight[write + 1, head * dh] = GAIN, -GAIN
        mlp = tower.blocks[2].mlp
        mlp.in_weight[0] = 0.0
        mlp.in_weight[0, 6], mlp.in_weight[0, 7], mlp.in_bias[0] = 1.0, -1.0, 3.0
        mlp.out_weight[:, 0] = 0.0
        mlp.out_weight[6, 0], mlp.out_weight[7, 0] = mlp_share, -mlp_share
        mlp.out_bias[6], mlp.out_bias[7] = -3.0 * mlp_share, 3.0 * mlp_share
        tower.proj.W.copy_(torch.eye(d))
    return tower.eval()
