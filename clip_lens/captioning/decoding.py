"""Batched greedy and beam-search decoding over any next-token function.

A captioner supplies `next_logits(tokens, rows, parents) -> logits`: `tokens` [n_rows, t] are the
token ids so far (the start token first), `rows` [n_rows] says which item (image) each row decodes
for, and the result [n_rows, vocab] scores the next token. `parents` [n_rows] says which row of the
previous call each row extends by one token (None on the first call), so that a decoder with a
key/value cache can reorder it and feed only the last token; a decoder without one reads `tokens`
whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

NextLogits = Callable[[Int[Tensor, "rows t"], Int[Tensor, " rows"], Optional[Int[Tensor, " rows"]]], Float[Tensor, "rows vocab"]]


@dataclass(frozen=True)
class Special:
    """The decoder's special token ids: `start` begins every caption, `end` finishes one, and
    `pad` fills a finished caption's row until the batch is done."""

    start: int
    end: int
    pad: int


def check_limits(max_new_tokens: int, beams: int = 1) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(beams, int) or beams < 1:
        raise ValueError(f"beams must be a positive integer, got {beams!r}")


@torch.no_grad()
def greedy(next_logits: NextLogits, n: int, special: Special, max_new_tokens: int,
           device: torch.device | str = "cpu") -> Int[Tensor, "n length"]:
    """The most likely next token at every step, for `n` items at once.

    Returns [n, 1 + steps] token ids starting with `special.start`; a row that produced
    `special.end` is padded with `special.pad` afterwards. Decoding stops when every row has ended
    or after `max_new_tokens` steps (as transformers' `generate` with `num_beams=1`).
    """
    check_limits(max_new_tokens)
    rows = torch.arange(n, device=device)
    tokens = torch.full((n, 1), special.start, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        chosen = next_logits(tokens, rows, rows if step else None).argmax(dim=-1)
        chosen = torch.where(done, torch.full_like(chosen, special.pad), chosen)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        done |= chosen == special.end
        if bool(done.all()):
            break
    return tokens


@torch.no_grad()
def beam_search(next_logits: NextLogits, n: int, special: Special, max_new_tokens: int, beams: int,
                length_penalty: float = 1.0, device: torch.device | str = "cpu") -> Int[Tensor, "n length"]:
    """The highest-scoring caption among `beams` hypotheses kept per item at each step.

    A hypothesis scores sum(log p) / length ** length_penalty, its length counting the generated
    tokens (the end token included). A hypothesis ends when it produces `special.end` or reaches
    `max_new_tokens`. An item stops growing once it holds `beams` ended hypotheses and no live one
    can still overtake the worst of them at its current length. Returns [n, 1 + steps] token ids
    as `greedy` does; with `beams=1` the result equals greedy decoding.
    """
    check_limits(max_new_tokens, beams)
    # shape = [n * beams, t]: item i's hypotheses are rows i * beams .. i * beams + beams - 1
    rows = torch.arange(n, device=device).repeat_interleave(beams)
    tokens = torch.full((n * beams, 1), special.start, dtype=torch.long, device=device)
    # only the first hypothesis of each item is live at the start, so the first step does not pick
    # the same token `beams` times
    score = torch.full((n, beams), float("-inf"), device=device)
    score[:, 0] = 0.0
    ended: list[list[tuple[float, Tensor]]] = [[] for _ in range(n)]
    finished = [False] * n
    parents: Optional[Tensor] = None
    for step in range(1, max_new_tokens + 1):
        logp = torch.log_softmax(next_logits(tokens, rows, parents).float(), dim=-1)  # [n * beams, vocab]
        vocab = logp.shape[-1]
        total = (score.reshape(-1, 1) + logp).reshape(n, beams * vocab)
        # 2 * beams candidates, so that `beams` live ones remain after removing the ended ones
        best, index = total.topk(min(2 * beams, beams * vocab), dim=-1)
        source, token = index // vocab, index % vocab
        next_rows, next_tokens, next_score = [], [], torch.full((n, beams), float("-inf"), device=device)
        for i in range(n):
            kept = 0
            for value, src, tok in zip(best[i].tolist(), source[i].tolist(), token[i].tolist()):
                if kept == beams or value == float("-inf"):
                    break
                row = i * beams + src
                if finished[i]:
                    break
                if tok == special.end or step == max_new_tokens:
                    _keep(ended[i], value / step ** length_penalty, torch.cat([tokens[row], tokens.new_tensor([tok])]), beams)
                    if tok == special.end:
                        continue
                next_rows.append(row)
                next_tokens.append(tok)
                next_score[i, kept] = value
                kept += 1
            while kept < beams:  # an item with fewer live candidates keeps dead rows
                next_rows.append(i * beams)
                next_tokens.append(special.pad)
                kept += 1
            if len(ended[i]) == beams and not finished[i]:
                live_best = float(next_score[i].max())
                finished[i] = live_best == float("-inf") or live_best / step ** length_penalty <= min(s for s, _ in ended[i])
        parents = torch.tensor(next_rows, device=device)
        tokens = torch.cat([tokens[parents], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        score = next_score
        if all(finished):
            break
    return _padded([max(hyps, key=lambda h: h[0])[1] for hyps in ended], special.pad)


def _keep(hypotheses: list[tuple[float, Tensor]], score: float, tokens: Tensor, beams: int) -> None:
    """Add an ended hypothesis, keeping the `beams` best."""
    hypotheses.append((score, tokens))
    hypotheses.sort(key=lambda h: -h[0])
    del hypotheses[beams:]


def _padded(sequences: list[Tensor], pad: int) -> Int[Tensor, "n length"]:
    length = max(len(s) for s in sequences)
    out = sequences[0].new_full((len(sequences), length), pad)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out
