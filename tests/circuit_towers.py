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
PATH_EDGES = ["input->a0.h0<k>", "input->a0.h0<v>", "a0.h0->a2.h1<v>", "a2.h1->output", "a2.h1->m2", "m2->output"]
TWO_HEAD_EDGE = "a0.h0->a2.h1<v>"
GAIN = 0.7  # small enough that the norms stay close to linear
KEY = 5.0   # the copy head's query-key product on "no": a saturated softmax


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


def planted_blank(seed: int) -> HookedTextTower:
    """The blank both planted towers start from: a 3-layer, 32-wide text tower with small random
    weights; every token embedding zero except constant features (+3 / -3 on dims 0 / 1) and random
    ones (dims 9..); positions scaled down; no block writing into the planted dims 2..8."""
    cfg = TextConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=77, d_embed=32,
                     d_vocab=49408, eot_token_id=49407)
    tower = HookedTextTower(cfg, Tokenizer.default())
    gen = small_random_weights_(tower, seed=seed)
    with torch.no_grad():
        embed = tower.embed.W_E
        embed.zero_()
        embed[:, 9:] = torch.randn(cfg.d_vocab, cfg.d_model - 9, generator=gen)
        embed[:, 0], embed[:, 1] = 3.0, -3.0
        tower.W_pos.mul_(0.1)
        for block in tower.blocks:
            for weight in (block.attn.out_weight, block.mlp.out_weight, block.attn.out_bias, block.mlp.out_bias):
                weight[2:9] = 0.0
    return tower


def isolate_head(attn, head: int, d: int, dh: int) -> tuple[slice, slice, slice]:
    """Zero a head's query, key and value rows and its output columns; returns the q, k, v row
    slices of the fused qkv weight, for the planted entries."""
    rows = tuple(slice(i * d + head * dh, i * d + (head + 1) * dh) for i in range(3))
    for r in rows:
        attn.qkv_weight[r] = 0.0
        attn.qkv_bias[r] = 0.0
    attn.out_weight[:, head * dh : (head + 1) * dh] = 0.0
    return rows


def two_head_path_tower(mlp_share: float = 0.05) -> HookedTextTower:
    """A 3-layer text tower with small random weights and one planted path for "no":

    - every token carries constant features (+3 / -3 on dims 0 / 1) and random ones (dims 9..);
      "no" carries the negation feature (+6 / -6 on dims 2 / 3), which its replacements "a" and
      "some" hold along the other diagonal (+6 / +6: the same norm, no negation); every other token
      carries an "ordinary word" feature (dim 8);
    - head a0.h0 finds "no" through its key (a constant query against the negation feature: a
      saturated softmax) and copies it forward through its value into dims 4 / 5 of every later
      position; ordinary words' values write the opposite sign, so with the key corrupted the head
      averages them in, and with the value corrupted it copies nothing: the two input edges of the
      head each carry part of the change, and its edge to a2.h1 carries all of it;
    - head a2.h1 attends uniformly and its value reads dims 4 / 5 into the output feature dims 6 / 7;
    - MLP m2 repeats `mlp_share` of a2.h1's write, a second, small route to the output;
    - the projection is the identity, and `linear_metric` reads dims 6 - 7.

    Corrupting a0.h0 -> a2.h1<v> alone removes more of the metric than corrupting any other single
    edge, and nothing off the path carries the difference."""
    tower = planted_blank(seed=0)
    tokenizer, d, dh = tower.tokenizer, tower.cfg.d_model, tower.cfg.d_head
    with torch.no_grad():
        embed = tower.embed.W_E
        embed[:, 8] = 3.0
        for word, (x2, x3) in (("no", (6.0, -6.0)), ("a", (6.0, 6.0)), ("some", (6.0, 6.0))):
            token = int(tokenizer([word])[0, 1])
            embed[token, 2], embed[token, 3], embed[token, 8] = x2, x3, 0.0
        # (layer, head), the dims its value reads, the dims it writes, value gain, output gain: the
        # copy head writes small (so the norms downstream stay close to linear), the reader reads large
        for (layer, head), read, write, value_gain, out_gain in (((0, 0), 2, 4, GAIN, GAIN / 4),
                                                                 ((2, 1), 4, 6, GAIN * 4, GAIN)):
            attn = tower.blocks[layer].attn
            _, _, v_rows = isolate_head(attn, head, d, dh)
            attn.qkv_weight[v_rows.start, read], attn.qkv_weight[v_rows.start, read + 1] = value_gain, -value_gain
            attn.out_weight[write, head * dh], attn.out_weight[write + 1, head * dh] = out_gain, -out_gain
        copy = tower.blocks[0].attn
        copy.qkv_weight[0, 0], copy.qkv_weight[0, 1] = KEY / 2, -KEY / 2            # a constant query
        copy.qkv_weight[d, 2], copy.qkv_weight[d, 3] = KEY / 2, -KEY / 2            # "no" as the key
        copy.qkv_weight[2 * d + 1, 8] = -GAIN                                        # ordinary words' value
        copy.out_weight[4, 1], copy.out_weight[5, 1] = GAIN / 4, -GAIN / 4
        mlp = tower.blocks[2].mlp
        mlp.in_weight[0] = 0.0
        mlp.in_weight[0, 6], mlp.in_weight[0, 7], mlp.in_bias[0] = 1.0, -1.0, 3.0
        mlp.out_weight[:, 0] = 0.0
        mlp.out_weight[6, 0], mlp.out_weight[7, 0] = mlp_share, -mlp_share
        mlp.out_bias[6], mlp.out_bias[7] = -3.0 * mlp_share, 3.0 * mlp_share
        tower.proj.W.copy_(torch.eye(d))
    return tower.eval()



def attention_only_tower() -> HookedTextTower:
    """`two_head_path_tower` with every MLP zero (weights and biases): "no" reaches the output only
    through attention (a0.h0 copies it forward, a2.h1 reads it into the output dims 6 / 7), and every
    MLP writes 0 in every run, so nothing flows through the MLPs."""
    tower = two_head_path_tower(mlp_share=0.0)
    with torch.no_grad():
        for block in tower.blocks:
            for param in block.mlp.parameters():
                param.zero_()
    return tower

COUNT_HEAD = (1, 2)  # (layer, head)
COUNTS_CORRECT, COUNTS_CHANGED = ("two", "four", "six"), ("three", "five", "seven")


def count_pairs(n_nouns: int = 8) -> tuple[list[str], list[str]]:
    """Caption / foil pairs that differ in one count word: "There are two dogs." / "There are three dogs."."""
    nouns = ["dogs", "cats", "cars", "birds", "chairs", "boats", "apples", "trees"][:n_nouns]
    captions, foils = [], []
    for noun in nouns:
        for right, changed in zip(COUNTS_CORRECT, COUNTS_CHANGED):
            captions.append(f"There are {right} {noun}.")
            foils.append(f"There are {changed} {noun}.")
    return captions, foils


def count_head_tower() -> HookedTextTower:
    """A 3-layer text tower with small random weights in which head a1.h2 attends to a count word
    only in the foils ("three", "five", "seven" carry its key feature, +6 / -6 on dims 2 / 3;
    "two", "four", "six" hold +6 / +6 there, the same norm) and writes it into the output dims
    6 / 7 through its value. So the captions and foils differ in the embedding only through that
    head; `count_image` points away from what it writes."""
    tower = planted_blank(seed=1)
    tokenizer, d, dh = tower.tokenizer, tower.cfg.d_model, tower.cfg.d_head
    with torch.no_grad():
        embed = tower.embed.W_E
        for words, (x2, x3) in ((COUNTS_CORRECT, (6.0, 6.0)), (COUNTS_CHANGED, (6.0, -6.0))):
            for word in words:
                token = int(tokenizer([word])[0, 1])
                embed[token, 2], embed[token, 3] = x2, x3
        layer, head = COUNT_HEAD
        attn = tower.blocks[layer].attn
        q_rows, k_rows, v_rows = isolate_head(attn, head, d, dh)
        attn.qkv_weight[q_rows.start, 0], attn.qkv_weight[q_rows.start, 1] = KEY / 2, -KEY / 2
        attn.qkv_weight[k_rows.start, 2], attn.qkv_weight[k_rows.start, 3] = KEY / 2, -KEY / 2
        attn.qkv_weight[v_rows.start, 2], attn.qkv_weight[v_rows.start, 3] = GAIN, -GAIN
        attn.out_weight[6, head * dh], attn.out_weight[7, head * dh] = GAIN, -GAIN
        tower.proj.W.copy_(torch.eye(d))
    return tower.eval()


def count_image(n: int) -> torch.Tensor:
    """[n, 32]: image embeddings that the foils' extra output (dims 6 - 7) points away from."""
    image = torch.zeros(n, 32)
    image[:, 0], image[:, 1], image[:, 6], image[:, 7] = 1.0, -1.0, -1.0, 1.0
    return image


XOR_LAYER, XOR_POSITION = 1, 2   # the block that computes the planted feature, and the token position it is written at
XOR_A_WORDS = (("red", "green", "black", "white"), ("blue", "yellow", "pink", "brown"))   # bit 0, bit 1
XOR_B_WORDS = (("cat", "dog", "cow", "fox"), ("pig", "hen", "owl", "bee"))
XOR_C_WORDS = ("runs", "sits", "eats", "sleeps")


def xor_texts() -> tuple[list[str], list[int]]:
    """Every "<a> <b> <c>" text (tokens SOT, a, b, c, EOT at positions 0..4) and its label, the XOR
    of the bits of its a-word and b-word: each word alone (and so every position but b's, which
    sees a only through attention) says nothing of the label."""
    texts, labels = [], []
    for a_bit, a_words in enumerate(XOR_A_WORDS):
        for b_bit, b_words in enumerate(XOR_B_WORDS):
            for a in a_words:
                for b in b_words:
                    for c in XOR_C_WORDS:
                        texts.append(f"{a} {b} {c}")
                        labels.append(a_bit ^ b_bit)
    return texts, labels


def xor_probe_tower() -> HookedTextTower:
    """A 3-layer text tower whose blocks are all zero but two planted parts of block `XOR_LAYER`, so
    that the label of `xor_texts` (a XOR b) is linearly decodable from the residual only at
    (layer XOR_LAYER + 1 and later, position XOR_POSITION), and from the MLP output only at (block
    XOR_LAYER, position XOR_POSITION):

    - a-words carry their bit on dims 2 / 3 (+6 / -6 for bit 0, -6 / +6 for bit 1) and a marker
      (dim 4); b-words their bit on dim 5 (+6 / -6); every token the constant features (dims 0 / 1)
      and random ones (9..);
    - head h0 of block XOR_LAYER finds the a-word through its key (a constant query against the
      marker: a saturated softmax) and copies its bit (dims 2 - 3, zero for every other token, so
      nothing else is copied) into dims 6 / 7 of every later position;
    - the MLP of that block computes |x - y| from the copied bit x (dims 6 - 7) and the position's
      own b-bit y (dim 5), through two GELU units of opposite sign, into dim 8: large where the
      bits differ, small where they agree; at positions without a b-bit it is a function of the
      a-word alone.

    Before block XOR_LAYER every position holds its own token only (one word: independent of the
    label); after it, each position but XOR_POSITION holds its own token and the a-word (again
    independent of the label), and XOR_POSITION holds both bits. Block 2 is zero, so the residual
    at layer 3 (the last block's output) still holds the feature there."""
    tower = planted_blank(seed=2)
    tokenizer, d = tower.tokenizer, tower.cfg.d_model
    with torch.no_grad():
        for block in tower.blocks:
            for param in (*block.attn.parameters(), *block.mlp.parameters()):
                param.zero_()
        embed = tower.embed.W_E
        for bit, group in enumerate(XOR_A_WORDS):
            for word in group:
                token = int(tokenizer([word])[0, 1])
                embed[token, 2], embed[token, 3], embed[token, 4] = -6.0 if bit else 6.0, 6.0 if bit else -6.0, 6.0
        for bit, group in enumerate(XOR_B_WORDS):
            for word in group:
                embed[int(tokenizer([word])[0, 1]), 5] = -6.0 if bit else 6.0
        attn = tower.blocks[XOR_LAYER].attn
        q, k, v = (i * d for i in range(3))     # head 0's first query, key and value rows
        attn.qkv_weight[q, 0], attn.qkv_weight[q, 1] = 3.0, -3.0                    # a constant query
        attn.qkv_weight[k, 4] = 3.0                                                  # the a-word marker as the key
        attn.qkv_weight[v, 2], attn.qkv_weight[v, 3] = 1.0, -1.0                     # the a-bit as the value
        attn.out_weight[6, 0], attn.out_weight[7, 0] = 0.5, -0.5
        mlp = tower.blocks[XOR_LAYER].mlp
        for unit, sign in ((0, 3.0), (1, -3.0)):
            mlp.in_weight[unit, 6], mlp.in_weight[unit, 7], mlp.in_weight[unit, 5] = sign, -sign, -sign
            mlp.out_weight[8, unit] = 0.1
        tower.proj.W.copy_(torch.eye(d))
    return tower.eval()


AND_TARGET = ["a cat sees a dog", "a man has a hat", "a bird and a tree"]   # SOT, a, w, w, a, w, EOT
AND_SOURCE = ["no cat sees no dog", "no man has no hat", "no bird and no tree"]
AND_POSITIONS = (1, 4)   # the two tokens that differ: the output needs both


def and_tower() -> HookedTextTower:
    """A 3-layer text tower whose output feature (dims 6 - 7, `linear_metric`) is an AND of two
    tokens: it rises only where both AND_POSITIONS hold "no".

    - "no" carries the negation feature (+6 / -6 on dims 2 / 3); "a" holds +6 / +6 there (the same
      norm, no feature); position embeddings and every other token are zero on dims 2..8;
    - head h0 of block 0 attends uniformly (zero queries and keys) and its value reads dims 2 - 3
      into dim 4 of every later position: at EOT, dim 4 counts the "no" tokens (0, 1 or 2);
    - neuron 0 of block 1's MLP reads dim 4 at a threshold between one and two "no" tokens
      (calibrated on AND_SOURCE's first text: pre-activation -10 at one, +10 at two) and writes
      dim 6; every other weight of the blocks is zero.

    So replacing either "no" position alone moves the output by GELU(-10) (about 1e-22), the pair by
    the whole difference; after block 0 EOT already holds the count, so intervening on the two
    positions there changes nothing."""
    tower = planted_blank(seed=3)
    tokenizer, d = tower.tokenizer, tower.cfg.d_model
    with torch.no_grad():
        for block in tower.blocks:
            for param in (*block.attn.parameters(), *block.mlp.parameters()):
                param.zero_()
        tower.W_pos[:, 2:9] = 0.0
        for word, (x2, x3) in (("no", (6.0, -6.0)), ("a", (6.0, 6.0))):
            token = int(tokenizer([word])[0, 1])
            tower.embed.W_E[token, 2], tower.embed.W_E[token, 3] = x2, x3
        attn = tower.blocks[0].attn
        attn.qkv_weight[2 * d, 2], attn.qkv_weight[2 * d, 3] = 1.0, -1.0       # head 0's first value row
        attn.out_weight[4, 0] = 1.0
        mlp = tower.blocks[1].mlp
        mlp.in_weight[0, 4] = 1.0
        mlp.out_weight[6, 0] = 1.0
        tower.proj.W.copy_(torch.eye(d))
        one, two = (_neuron_input(tower, text) for text in ("no cat sees a dog", AND_SOURCE[0]))
        scale = 20.0 / (two - one)
        mlp.in_weight[0, 4], mlp.in_bias[0] = scale, -scale * (one + two) / 2
    return tower.eval()


def _neuron_input(tower: HookedTextTower, text: str) -> float:
    """Block 1's MLP neuron 0 pre-activation at EOT for `text`."""
    _, cache = tower.run_with_cache(tower.to_tokens([text]), names_filter="blocks.1.mlp.hook_pre")
    pre = cache["blocks.1.mlp.hook_pre"][0]
    return float(pre[int(tower.pooled_positions(tower.to_tokens([text]))[0]), 0])
