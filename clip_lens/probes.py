"""Linear probes on a text tower's activations, per layer and position (docs/methods.md#linear-probes).

`probe_grid(model, texts, labels)` answers, for each (layer, position) cell of one hook point: can a
linear read-out of the activation there tell the two classes of a binary label apart (negated or
not, or any other label of the texts), on texts it was not fitted on? Each cell gets a held-out
test accuracy, the L2 strength chosen for it, and the test accuracy of a control task (the same
probe fitted to shuffled labels), which says how much a probe of that size learns from nothing.

    >>> table = probe_grid(model, texts, labels, hook="resid", positions="aligned")
    >>> table.pivot(index="layer", columns="position", values="test_accuracy")

Protocol, per cell (the split is the same for every cell):

- a stratified split of the texts into training and test rows (`test_fraction`, `seed`);
- features standardised with the statistics of the rows a probe is fitted on (the training split;
  inside cross-validation, each fold's fitting rows);
- the L2 strength chosen from `l2_grid` by stratified k-fold cross-validation inside the training
  split (the highest mean validation accuracy; ties go to the stronger penalty);
- one probe refitted on the whole training split with that strength, scored once on the test split.

Solver: L2-regularised logistic regression written in torch and fitted by L-BFGS. scikit-learn is
not a dependency of clip_lens (neither core nor test extras) and would be one only for this; the
problem is small (texts x features of one cell), torch is already here, and one batched L-BFGS run
fits every (task, fold, strength) of a cell at once: the problems share the features and are
independent, so the sum of their losses is minimised where each one's is. Computed in float64.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.data.valse import ALIGNED_SLOTS, FURTHER_SLOT, NEGATOR_POSITION
from clip_lens.hooks import act_name

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# hook points whose activations carry a position axis right after the batch axis
PROBE_HOOKS = ("resid", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v", "z", "result",
               "pre", "post")
PositionsArg = Union[str, int, Sequence[int], Mapping, np.ndarray, pd.DataFrame]


# labels and splits -------------------------------------------------------------------------------
def check_labels(labels, n_texts: int) -> Int[np.ndarray, " n"]:
    """`labels` as a 0/1 int array of `n_texts` entries, both classes present; a ValueError naming
    `labels` (and the offending entry) otherwise."""
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != n_texts:
        raise ValueError(f"labels has shape {values.shape}; give one label per text ({n_texts} texts)")
    for i, value in enumerate(values.tolist()):
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            continue
        raise ValueError(f"labels[{i}] is {value!r}: labels must be binary (0 / 1 or False / True)")
    values = values.astype(int)
    if len(set(values.tolist())) < 2:
        raise ValueError(f"labels are all {values[0]}: both classes (0 and 1) are needed")
    return values


def split_indices(labels: Int[np.ndarray, " n"], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, sorted: a stratified split with `round(test_fraction * n_c)` test
    rows of each class c, drawn with `seed`. Both classes must land in both parts."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: give a share strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(rows)))
        if n_test == 0 or n_test == len(rows):
            part = "test" if n_test == 0 else "training"
            raise ValueError(f"labels: class {c} has {len(rows)} texts, and test_fraction={test_fraction} leaves none "
                             f"of them in the {part} split; give more texts of class {c} or another test_fraction")
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fold_masks(labels: Int[np.ndarray, " n"], folds: int, seed: int) -> torch.Tensor:
    """[folds, n] bool: True for the rows each cross-validation fold is fitted on (the rest are its
    validation rows); stratified, so every fold fits and validates on both classes."""
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds={folds!r}: cross-validation needs an integer >= 2")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    for c in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) < folds:
            raise ValueError(f"labels: class {c} has {len(rows)} texts in the training split, fewer than folds={folds}; "
                             "give more texts of that class or fewer folds")
        fold_of[rows] = np.arange(len(rows)) % folds
    return torch.as_tensor(fold_of[None, :] != np.arange(folds)[:, None])


def shuffled_within(labels: Int[np.ndarray, " n"], parts: Sequence[np.ndarray], seed: int) -> Int[np.ndarray, " n"]:
    """The control task's labels: `labels` permuted within each part (the training and the test
    split apart), so each part keeps its class counts and loses any link to the texts."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for rows in parts:
        out[rows] = labels[rng.permutation(rows)]
    return out


# the solver --------------------------------------------------------------------------------------
def standardise(x: Float[Tensor, "... n d"], fit_rows: torch.Tensor) -> Float[Tensor, "... n d"]:
    """`x` minus the mean and over the standard deviation of the rows marked in `fit_rows` [..., n]
    (features constant on those rows are only centred)."""
    weights = fit_rows.to(x.dtype).unsqueeze(-1)
    count = weights.sum(dim=-2, keepdim=True)
    mean = (x * weights).sum(dim=-2, keepdim=True) / count
    std = (((x - mean) ** 2 * weights).sum(dim=-2, keepdim=True) / count).sqrt()
    return (x - mean) / torch.where(std > 1e-12, std, torch.ones_like(std))


def fit_logistic(x: Float[Tensor, "f n d"], y: Float[Tensor, "t n"], fit_rows: torch.Tensor,
                 l2: Float[Tensor, "t f g"], max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regressions, all fitted in one L-BFGS run: for every task t (labels
    y[t]), fold f (features x[f], fitted on the rows fit_rows[f]) and strength l2[t, f, g], minimise
    mean cross-entropy over the fitted rows + l2 / 2 * |w|^2 (the bias is not penalised). Returns
    (w [t, f, g, d], b [t, f, g])."""
    t, f, g = l2.shape
    w = torch.zeros(t, f, g, x.shape[-1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(t, f, g, dtype=x.dtype, requires_grad=True)
    weights = fit_rows.to(x.dtype)[None, :, None, :] / fit_rows.sum(dim=-1).to(x.dtype)[None, :, None, None]
    targets = y[:, None, None, :].expand(t, f, g, y.shape[-1])
    optimiser = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        logits = torch.einsum("fnd,tfgd->tfgn", x, w) + b[..., None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        total = (loss * weights).sum() + (l2 / 2 * (w**2).sum(dim=-1)).sum()
        total.backward()
        return total

    with torch.enable_grad(), few_threads(x.numel() * t * g):
        optimiser.step(closure)
    return w.detach(), b.detach()


SMALL_WORK = 2**22  # multiply-adds per loss evaluation below which one thread is faster (overhead-bound)


@contextmanager
def few_threads(work: int) -> Iterator[None]:
    """One torch thread for a small fit (hundreds of tiny evaluations, where threads only add
    overhead, and much of it on a shared machine), the setting restored afterwards."""
    before = torch.get_num_threads()
    if work < SMALL_WORK and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predictions(x: Float[Tensor, "f n d"], w: Tensor, b: Tensor) -> Tensor:
    """[t, f, g, n] bool: class 1 where the probe's logit is positive."""
    return (torch.einsum("fnd,tfgd->tfgn", x, w) + b[..., None]) > 0


def choose_l2(x_train: Float[Tensor, "n d"], y_train: Int[np.ndarray, "t n"], *, folds: int,
              l2_grid: Sequence[float], seed: int) -> np.ndarray:
    """For each task (row of `y_train`), the strength of `l2_grid` with the highest mean validation
    accuracy in stratified `folds`-fold cross-validation over these (training) rows only; ties go
    to the stronger penalty. Folds are stratified on the first task's labels."""
    masks = fold_masks(y_train[0], folds, seed)
    x = standardise(x_train.expand(folds, *x_train.shape), masks)
    grid = torch.tensor(sorted(l2_grid), dtype=x.dtype)
    l2 = grid.expand(len(y_train), folds, len(grid))
    y = torch.as_tensor(y_train, dtype=x.dtype)
    w, b = fit_logistic(x, y, masks, l2)
    correct = predictions(x, w, b) == y[:, None, None, :].bool()                  # [t, f, g, n]
    held_out = ~masks[None, :, None, :]
    accuracy = ((correct & held_out).sum(-1) / held_out.sum(-1)).mean(dim=1)      # [t, g]
    best = accuracy >= accuracy.max(dim=-1, keepdim=True).values - 1e-12
    strongest = len(grid) - 1 - best.flip(-1).int().argmax(dim=-1)
    return grid[strongest].numpy()


def probe_features(features: Float[Tensor, "n d"], labels, *, test_fraction: float = 0.3, folds: int = 5,
                   l2_grid: Sequence[float] = L2_GRID, seed: int = 0, control: bool = True) -> dict:
    """One cell's probe: `features` [n, d] (one row per text) against binary `labels` [n].

    Returns train_accuracy, test_accuracy, l2 (the chosen strength), control_accuracy (test
    accuracy of the same protocol on shuffled labels; NaN without `control`), chance (the test
    accuracy of always answering the training split's majority class), n_train and n_test."""
    labels = check_labels(labels, len(features))
    train, test = split_indices(labels, test_fraction, seed)
    tasks = [labels]
    if control:
        tasks.append(shuffled_within(labels, (train, test), seed + 1))
    y = np.stack(tasks)
    x = torch.as_tensor(features, dtype=torch.float64).reshape(len(labels), -1)
    l2 = choose_l2(x[train], y[:, train], folds=folds, l2_grid=l2_grid, seed=seed)
    fit_rows = torch.zeros(1, len(labels), dtype=torch.bool)
    fit_rows[0, train] = True
    xs = standardise(x[None], fit_rows)
    w, b = fit_logistic(xs[:, train], torch.as_tensor(y[:, train], dtype=xs.dtype), fit_rows[:, train],
                        torch.as_tensor(l2, dtype=xs.dtype)[:, None, None])
    correct = (predictions(xs, w, b)[:, 0, 0] == torch.as_tensor(y).bool()).double()   # [t, n]
    majority = int(labels[train].mean() > 0.5)
    return {"train_accuracy": float(correct[0, train].mean()), "test_accuracy": float(correct[0, test].mean()),
            "l2": float(l2[0]), "control_accuracy": float(correct[1, test].mean()) if control else float("nan"),
            "chance": float((labels[test] == majority).mean()), "n_train": len(train), "n_test": len(test)}


# activations -------------------------------------------------------------------------------------
def text_tower(model_or_tower):
    """The text tower of a HookedCLIP, or a HookedTextTower itself."""
    from clip_lens.towers import HookedTextTower

    tower = getattr(model_or_tower, "text", model_or_tower)
    if not isinstance(tower, HookedTextTower):
        raise TypeError(f"model_or_tower: expected a HookedCLIP or a HookedTextTower, got {type(model_or_tower).__name__}")
    return tower


def hook_names(hook: str, layers, n_layers: int) -> dict[int, str]:
    """layer -> hook name. "resid" runs over the residual layers 0..L (docs/methods.md#layer-numbering:
    resid_pre of block l, resid_post of the last block for l = L); the other hooks over blocks 0..L-1."""
    if hook not in PROBE_HOOKS:
        raise ValueError(f"hook={hook!r}: probes read hook points with a position axis: {', '.join(PROBE_HOOKS)}")
    top = n_layers + 1 if hook == "resid" else n_layers
    chosen = list(range(top)) if isinstance(layers, str) and layers == "all" else layers
    if isinstance(chosen, str) or not isinstance(chosen, Sequence) or not chosen:
        raise ValueError(f"layers={layers!r}: give 'all' or a non-empty list of layer indices")
    names = {}
    for layer in chosen:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < top:
            raise ValueError(f"layers: {layer!r} is not a layer of hook {hook!r} (0..{top - 1})")
        if hook == "resid":
            names[int(layer)] = act_name("resid_post", n_layers - 1) if layer == n_layers else act_name("resid_pre", layer)
        else:
            names[int(layer)] = act_name(hook, layer)
    return names


def aligned_slot_positions(eot: Int[np.ndarray, " n"]) -> dict[str, np.ndarray]:
    """The aligned slots of existence sentences (docs/methods.md#aligned-positions) that are one
    token each, as per-text positions: SOT, There, is/are, negator, subject, '.' (EOT - 1), EOT.
    The further-subject slot (a mean over a varying number of tokens) is left out."""
    eot = np.asarray(eot, dtype=int)
    too_early = np.flatnonzero(eot < NEGATOR_POSITION + 3)
    if len(too_early):
        i = int(too_early[0])
        raise ValueError(f"positions='aligned': texts[{i}] ends (EOT) at position {eot[i]}, too early for "
                         "'There is/are <negator> <subject> .'")
    slots = {name: np.full(len(eot), s) for s, name in enumerate(ALIGNED_SLOTS[:FURTHER_SLOT])}
    slots.update({ALIGNED_SLOTS[-2]: eot - 1, ALIGNED_SLOTS[-1]: eot})
    return slots


def resolve_positions(positions: PositionsArg, eot: Int[np.ndarray, " n"]) -> tuple[list, np.ndarray]:
    """(slot names, per-text positions [n, slots]) from `positions`: "all" (0 through the shortest
    text's EOT, positions every text has), "eot", "aligned", one position or a list of them (the same
    for every text), a mapping or DataFrame {slot name: a position or one per text}, or an int array
    [n_texts, n_slots]. Every position must lie within its text (0..its EOT)."""
    n = len(eot)
    if isinstance(positions, str):
        if positions == "all":
            return list(range(int(eot.min()) + 1)), np.tile(np.arange(int(eot.min()) + 1), (n, 1))
        if positions in ("eot", "aligned"):
            slots = {"EOT": eot} if positions == "eot" else aligned_slot_positions(eot)
            return resolve_positions(slots, eot)
        raise ValueError(f"positions={positions!r}: give 'all', 'eot', 'aligned', token positions, or per-text positions")
    if isinstance(positions, pd.DataFrame):
        positions = {name: positions[name].to_numpy() for name in positions.columns}
    if isinstance(positions, Mapping):
        names = list(positions)
        columns = [np.broadcast_to(np.asarray(positions[name]), (n,)) if np.ndim(positions[name]) <= 1 else None
                   for name in names]
        if any(c is None for c in columns) or not names:
            raise ValueError("positions: a mapping needs, for each slot name, one position or one per text")
        array = np.stack(columns, axis=1)
    else:
        array = np.asarray(positions)
        names = list(range(array.shape[-1])) if array.ndim == 2 else np.atleast_1d(array).tolist()
        array = np.broadcast_to(np.atleast_1d(array), (n, len(names))) if array.ndim <= 1 else array
    return names, check_positions(array, eot)


def check_positions(array: np.ndarray, eot: Int[np.ndarray, " n"]) -> Int[np.ndarray, "n slots"]:
    """`array` [n_texts, n_slots] of positions, each an integer in 0..its text's EOT; a ValueError
    naming the text and the slot otherwise."""
    n = len(eot)
    if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
        raise ValueError(f"positions has shape {array.shape}; per-text positions are [n_texts={n}, n_slots]")
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        raise ValueError(f"positions must be integer token positions, not {array.dtype}")
    bad = np.argwhere((array < 0) | (array > eot[:, None]))
    if len(bad):
        i, s = (int(v) for v in bad[0])
        raise ValueError(f"positions: slot {s} of texts[{i}] is position {array[i, s]}, outside the text (0..{eot[i]}, "
                         "its EOT)")
    return array.astype(int)


def collect(tower, tokens: Int[Tensor, "n pos"], names: Sequence[str], positions: Int[np.ndarray, "n slots"],
            batch_size: int) -> dict[str, Tensor]:
    """name -> activations at each text's positions [n, slots, features] (float64, on the CPU),
    from one cached forward pass per batch of texts (no gradients)."""
    wanted = set(names)
    parts: dict[str, list] = {name: [] for name in names}
    index = torch.as_tensor(positions, device=tokens.device)
    with torch.no_grad():
        for lo in range(0, len(tokens), batch_size):
            _, cache = tower.run_with_cache(tokens[lo : lo + batch_size], names_filter=lambda name: name in wanted)
            rows = torch.arange(min(batch_size, len(tokens) - lo), device=tokens.device)[:, None]
            for name in names:
                if name not in cache:
                    raise ValueError(f"hook point {name} recorded nothing in this tower (an optional hook point "
                                     "that is switched off?)")
                parts[name].append(cache[name][rows, index[lo : lo + batch_size]].flatten(2).double().cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def probe_grid(model_or_tower, texts: Sequence[str], labels, *, hook: str = "resid", layers="all",
               positions: PositionsArg = "all", test_fraction: float = 0.3, folds: int = 5,
               l2_grid: Sequence[float] = L2_GRID, seed: int = 0, control: bool = True,
               batch_size: int = 64) -> pd.DataFrame:
    """Linear probes of `labels` (binary, one per text) on the text tower's `hook` activations at
    every chosen layer and position: one row per (layer, position) with the `probe_features`
    columns (train / test accuracy, chosen l2, control accuracy, chance, sizes) and the hook name.

    Args:
        model_or_tower: a HookedCLIP (its text tower is probed) or a HookedTextTower.
        hook: a short hook name (`PROBE_HOOKS`); "resid" is the residual stream at layers 0..L as
            causal tracing numbers them, the others are per block (0..L-1).
        layers: "all" or a list of layer indices.
        positions: see `resolve_positions` ("aligned" gives the VALSE existence slots).
        test_fraction, folds, l2_grid, seed, control: see `probe_features`; the same split for every cell.
        batch_size: texts per forward pass.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts: give a list of texts, not {type(texts).__name__}")
    tower = text_tower(model_or_tower)
    labels = check_labels(labels, len(texts))
    names = hook_names(hook, layers, tower.cfg.n_layers)
    tokens = tower.to_tokens(list(texts))
    eot = (tower.sequence_lengths(tokens) - 1).cpu().numpy()
    slot_names, slots = resolve_positions(positions, eot)
    activations = collect(tower, tokens, list(dict.fromkeys(names.values())), slots, batch_size)
    rows = []
    for layer, name in names.items():
        for s, slot in enumerate(slot_names):
            result = probe_features(activations[name][:, s], labels, test_fraction=test_fraction, folds=folds,
                                    l2_grid=l2_grid, seed=seed, control=control)
            rows.append({"layer": layer, "position": slot, "hook": name, **result})
    return pd.DataFrame(rows)
