"""Circuit discovery in one tower, end to end (docs/circuits.md): every edge scored by EAP and
EAP-IG, the top edges checked against exact edge patching, the faithfulness curve of the circuits
found next to random circuits, and the smallest faithful circuit drawn.

Tasks:
- text, negation: the negated sentence is the clean run, its non-negated twin the corrupted one,
  each scored by S against its image (held-out synthetic scenes by default, or VALSE existence);
- vision: each image against its mean-colour image, scored by S against its caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from clip_lens import circuits as C
from clip_lens.circuits.figures import circuit_figure, estimate_figure, faithfulness_figure
from clip_lens.data import read_pairs_file, shapes
from clip_lens.model import HookedCLIP
from clip_lens.report import Report, claim_output, write_study

FAITHFUL = 0.8  # the circuit drawn is the smallest whose faithfulness reaches this


@dataclass
class CircuitTask:
    """A task with what the report says about it."""

    task: C.Task
    pairs: pd.DataFrame   # one row per pair: what is clean and what corrupted
    description: str
    excluded: Optional[pd.DataFrame] = None  # pairs left out, with the reason


def negation_scenes(model: HookedCLIP, n: int = 64, seed: int = 20_000) -> CircuitTask:
    """Held-out synthetic scenes (`clip_lens.data.shapes`): the negated sentence of each existence
    pair against its non-negated twin, scored by S against the scene's image."""
    examples = list(shapes.examples(n, seed=seed))
    negated = [e.foil if e.negation_in == "foil" else e.caption for e in examples]
    plain = [e.caption if e.negation_in == "foil" else e.foil for e in examples]
    images = model.to_pixels([shapes.image_of(e) for e in examples])
    task = C.make_task(model, clean=negated, corrupt=plain, image=images)
    pairs = pd.DataFrame({"clean": negated, "corrupt": plain, "negation_in": [e.negation_in for e in examples]})
    return CircuitTask(task, pairs, f"{n} held-out synthetic scenes (seed {seed}): the negated sentence (clean) against "
                                    "its non-negated twin (corrupted), S against the scene's image")


def negation_valse(model: HookedCLIP, valse: Union[str, Path], images: Union[str, Path], *,
                   limit: Optional[int] = None, progress: bool = True) -> CircuitTask:
    """VALSE existence (rephrased as in the negation study): negated against non-negated sentence,
    S against the instance's image."""
    from clip_lens.studies.analyses.existence import prepare

    instances = prepare(model, valse, images, limit=limit, progress=progress)
    frame = instances.frame
    task = C.make_task(model, clean=list(frame["negated"]), corrupt=list(frame["non_negated"]), image=instances.image_emb)
    pairs = frame[["id", "negated", "non_negated", "negation_in"]].rename(columns={"negated": "clean", "non_negated": "corrupt"})
    return CircuitTask(task, pairs, f"VALSE existence ({len(frame)} instances from {valse}): the negated sentence "
                                    "(clean) against the non-negated one (corrupted), S against the image")


def text_pairs_from_file(model: HookedCLIP, path: Union[str, Path], images: Optional[Union[str, Path]] = None,
                         limit: Optional[int] = None) -> CircuitTask:
    """A user's minimal pairs (`clip_lens.data.read_pairs_file`: columns caption, foil, image): the
    caption is the clean run, the foil the corrupted one, S against the image. Pairs the tokenizer
    excludes (unequal lengths, more than one differing span) are listed in the task's `excluded`."""
    pairs = read_pairs_file(path, lambda texts: model.to_tokens(texts, trim=False), images=images)
    if pairs.pairs["image"].isna().any():
        raise ValueError(f"{path} has no image column: a circuit's metric is S against each pair's image")
    kept = pairs.pairs.head(limit) if limit else pairs.pairs
    if kept.empty:
        raise ValueError(f"no pair of {path} is usable: {pairs.summary().to_dict('records')}")
    task = C.make_task(model, clean=list(kept["a"]), corrupt=list(kept["b"]),
                       image=model.to_pixels(list(kept["image"])))
    table = kept.rename(columns={"a": "clean", "b": "corrupt"})[["id", "clean", "corrupt", "image"]]
    return CircuitTask(task, table, f"{len(kept)} minimal pairs from {path}: the caption (clean) against the foil "
                                    "(corrupted), S against the image", excluded=pairs.excluded)


def images_against_mean_colour(model: HookedCLIP, images: Sequence, captions: Sequence[str],
                               corrupt_folder: Optional[Union[str, Path]] = None) -> CircuitTask:
    """Each image (clean) against its mean-colour image (corrupted), or against the image of the
    same file name in `corrupt_folder`; S against its caption."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions; give one caption per image")
    corrupt, label = None, "mean colour"
    if corrupt_folder is not None:
        corrupt_paths = [Path(corrupt_folder) / Path(str(image)).name for image in images]
        absent = [p for p in corrupt_paths if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"no corrupted image {absent[0].name!r} in {corrupt_folder} (one is needed for each "
                                    f"clean image, by file name; {len(absent)} missing)")
        corrupt, label = model.to_pixels([str(p) for p in corrupt_paths]), [str(p) for p in corrupt_paths]
    # pixels, not paths: a list of strings would be read as texts
    task = C.make_task(model, clean=model.to_pixels(list(images)), corrupt=corrupt, text=model.to_tokens(list(captions)))
    pairs = pd.DataFrame({"clean": [str(i) for i in images], "corrupt": label, "caption": list(captions)})
    against = "their mean-colour images" if corrupt_folder is None else f"the images of the same names in {corrupt_folder}"
    return CircuitTask(task, pairs, f"{len(images)} images (clean) against {against} (corrupted), S against each "
                                    "image's caption")


def default_sizes(n_edges: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to every edge of the graph."""
    sizes, base = [], 1
    while base < n_edges:
        sizes += [s for s in (base, 2 * base, 5 * base) if s < n_edges]
        base *= 10
    return sizes + [n_edges]


def circuit_study(model: HookedCLIP, model_label: str, out: Union[str, Path], circuit_task: CircuitTask, *,
                  steps: int = 5, path: str = "inputs", check: int = 50, sizes: Optional[Sequence[int]] = None,
                  n_random: int = 5, selection: str = "paths", signed: bool = False, pair_chunk: int = 32,
                  seed: int = 0, overwrite: bool = False, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Score, check, select and measure circuits for one task; write the tables and report.html.

    Args:
        steps, path: EAP-IG's m and path ("inputs" / "activations").
        check: the top edges of each method checked against exact edge patching.
        sizes: circuit sizes of the faithfulness curve (default: 1, 2, 5, 10, ... every edge).
        n_random: random circuits per size. selection, signed: see `clip_lens.circuits.faithfulness_curve`.
    """
    if not isinstance(check, int) or check < 1:
        raise ValueError(f"check={check!r}: give the number of top edges (>= 1) to check by exact edge patching")
    out = claim_output(out, overwrite=overwrite)
    task = circuit_task.task
    graph = C.Graph.of(task.tower)
    scores = {"eap": C.edge_attribution(task, method="eap", pair_chunk=pair_chunk, progress=progress),
              "eap-ig": C.edge_attribution(task, method="eap-ig", steps=steps, path=path, pair_chunk=pair_chunk,
                                           progress=progress)}
    edges = scores["eap"].table()[["edge", "sender", "receiver"]]
    for method, result in scores.items():
        edges = edges.merge(result.table()[["edge", "score", "rank"]].rename(
            columns={"score": method, "rank": f"rank_{method}"}), on="edge")
    checked = sorted({edge for result in scores.values() for edge in result.top(min(check, graph.n_edges), signed)})
    exact = C.path_patch(task, checked, pair_chunk=pair_chunk, progress=progress)
    check_table = exact.table().rename(columns={"effect": "exact"})
    for method, result in scores.items():
        check_table[method] = [float(result.scores[s, r]) for s, r in checked]
    check_table = check_table.reindex(check_table["exact"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    agreement = pd.DataFrame([_agreement(check_table, method) for method in scores])

    best = scores["eap-ig"]
    curves = []
    for i, (method, result) in enumerate(scores.items()):  # random circuits once: they do not depend on the scores
        part = C.faithfulness_curve(task, result, sizes or default_sizes(graph.n_edges), n_random=n_random if i else 0,
                                    selection=selection, signed=signed, seed=seed, pair_chunk=pair_chunk,
                                    progress=progress)
        curves.append(part.assign(method=np.where(part["kind"] == "circuit", method, "random")))
    curve = pd.concat(curves, ignore_index=True)
    curve.attrs.update(curves[0].attrs)
    found = curve[curve["method"] == "eap-ig"].sort_values("size")
    faithful = found[found["faithfulness"] >= FAITHFUL]
    reached = len(faithful) > 0  # otherwise the largest circuit of the curve is the one drawn
    size = int(faithful["size"].iloc[0]) if reached else int(found["size"].iloc[-1])
    chosen = {"paths": C.path_edges, "greedy": C.greedy_edges, "top": C.top_edges}[selection](best, size, signed).pruned()
    circuit_table = chosen.table(best)

    clean, corrupt = curve.attrs["clean"], curve.attrs["corrupt"]
    summary = pd.DataFrame([{
        "model": model_label, "tower": task.tower.modality, "pairs": task.n_pairs, "edges": graph.n_edges,
        "clean_metric": clean, "corrupt_metric": corrupt, "steps": steps, "path": path, "selection": selection,
        "circuit_size": size, "circuit_edges": chosen.n_edges, "reached_threshold": reached,
        "circuit_faithfulness": float(found[found["size"] == size]["faithfulness"].iloc[0]),
        "eap_faithfulness": float(curve[(curve["method"] == "eap") & (curve["size"] == size)]["faithfulness"].iloc[0]),
        "random_faithfulness": float(curve[(curve["kind"] == "random") & (curve["size"] == size)]["faithfulness"].mean()),
    }])
    tables = {"summary": summary, "edges": edges, "exact_check": check_table, "agreement": agreement,
              "faithfulness": curve, "circuit": circuit_table, "pairs": circuit_task.pairs}
    if circuit_task.excluded is not None:
        tables["excluded"] = circuit_task.excluded
    report = _report(model_label, circuit_task, summary, agreement, chosen, best, curve, check_table)
    write_study(out, tables, report, manifest={"study": f"circuits ({task.tower.modality} tower)", "model": model_label,
                                               "task": circuit_task.description, "seed": seed})
    return tables


def _agreement(check: pd.DataFrame, method: str) -> dict:
    """Rank correlation and error of one method's estimates against exact edge patching."""
    exact, estimate = check["exact"].to_numpy(), check[method].to_numpy()
    spearman = pd.Series(exact).rank().corr(pd.Series(estimate).rank())
    return {"method": method, "edges": len(check), "spearman": float(spearman),
            "mean_abs_error": float(np.abs(estimate - exact).mean()),
            "relative_error": float(np.abs(estimate - exact).sum() / max(np.abs(exact).sum(), 1e-12))}


def _report(model_label: str, circuit_task: CircuitTask, summary: pd.DataFrame, agreement: pd.DataFrame,
            circuit: C.Circuit, scores: C.EdgeScores, curve: pd.DataFrame, check: pd.DataFrame) -> Report:
    row = summary.iloc[0]
    report = Report(f"Circuits in the {row['tower']} tower of {model_label}")
    report.section("Task").text(circuit_task.description + f". Mean metric: clean {row['clean_metric']:.4f}, "
                                f"corrupted {row['corrupt_metric']:.4f}. The graph has {row['edges']:,} edges.")
    which = (f"The smallest circuit (by EAP-IG, m = {row['steps']}, {row['selection']} selection) whose faithfulness "
             f"reaches {FAITHFUL}" if row["reached_threshold"] else
             f"No circuit of the curve reaches faithfulness {FAITHFUL}; drawn is the largest (by EAP-IG, m = "
             f"{row['steps']}, {row['selection']} selection)")
    report.section("The circuit").text(
        f"{which}: {row['circuit_edges']} edges after pruning, faithfulness {row['circuit_faithfulness']:.3f}; random "
        f"circuits of {row['circuit_size']} edges reach {row['random_faithfulness']:.3f} on average. Edges outside the "
        "circuit carry the corrupted run's values (docs/methods.md#faithfulness).")
    report.figure(circuit_figure(circuit, scores, title="Circuit found by EAP-IG"))
    report.table(circuit.table(scores), caption="The circuit's edges by |EAP-IG score|")
    report.section("Faithfulness").text(
        f"Circuits chosen from EAP's scores and from EAP-IG's, by size, next to random circuits. At {row['circuit_size']} "
        f"edges: EAP-IG {row['circuit_faithfulness']:.3f}, EAP {row['eap_faithfulness']:.3f}.")
    report.figure(faithfulness_figure(curve))
    report.section("EAP and EAP-IG against exact edge patching").text(
        "The top edges of each method, each corrupted alone and measured exactly (docs/methods.md#path-patching).")
    report.table(agreement, caption="Agreement with exact edge patching on the checked edges")
    report.figure(estimate_figure(check[["edge", "exact", "eap", "eap-ig"]]))
    report.table(check, caption="Checked edges by |exact effect|")
    return report


