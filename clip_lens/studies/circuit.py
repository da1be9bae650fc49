"""Study "circuit": circuit discovery in one tower, end to end (docs/circuits.md): every edge
scored by EAP and EAP-IG, the top edges checked against exact edge patching, the faithfulness curve
of the circuits found next to random circuits, and the smallest faithful circuit drawn.

`data` is a `CircuitTask`, built by the front end with one of the task builders below.

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
import torch

from clip_lens import circuits as C
from clip_lens.circuits.figures import circuit_figure, estimate_figure, faithfulness_figure
from clip_lens.data import read_pairs_file, shapes
from clip_lens.model import HookedCLIP
from clip_lens.report import Report
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables

FAITHFUL = 0.8  # the circuit drawn is the smallest whose faithfulness reaches this


@dataclass
class CircuitTask:
    """A task (clean and corrupted runs, the metric) with what the report says about it.

    Attributes:
        task: the runs and metric (`clip_lens.circuits.make_task`) for one model.
        pairs: one row per pair: what is clean and what corrupted.
        description: the task in words (the report's "Task" section; the table "about").
        excluded: pairs left out, with the reason (the table "excluded").
        model_label: how the summary table names the model (default: the model's own name).
    """

    task: C.Task
    pairs: pd.DataFrame
    description: str
    excluded: Optional[pd.DataFrame] = None
    model_label: Optional[str] = None


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


def marked_pairs(model: HookedCLIP, name: str, pairs, marked, image_emb) -> CircuitTask:
    """A minimal-pair set (`clip_lens.data.MinimalPairs`, which text is `marked`, image embeddings
    [pairs, d_embed]): the marked text is the clean run, the other the corrupted one, S against the
    image (the sweep's circuit study)."""
    from clip_lens.studies.analyses import minimal_pairs

    clean, corrupt = minimal_pairs.orient(pairs, marked)
    task = C.make_task(model, clean=clean, corrupt=corrupt, image=image_emb)
    table = pd.DataFrame({"id": pairs.pairs["id"].astype(str), "clean": clean, "corrupt": corrupt})
    return CircuitTask(task, table, f"{len(table)} pairs of {name}: the marked text (clean) against the other (corrupted)")


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    steps: int = option(5, "EAP-IG's interpolation steps m", minimum=1)
    path: str = option("inputs", "EAP-IG's path: along the input, or along each sender group's output",
                       choices=("inputs", "activations"))
    check: int = option(50, "top edges of each method checked against exact edge patching", minimum=1)
    sizes: Optional[tuple[int, ...]] = option(None, "circuit sizes of the faithfulness curve (default 1, 2, 5, 10, ... "
                                                    "every edge)", minimum=1, min_items=1)
    n_random: int = option(5, "random circuits per size", minimum=0, flags=("--random",))
    selection: str = option("paths", "how circuits are chosen from the scores (paths: strongest input-to-output paths)",
                            choices=("paths", "greedy", "top"))
    signed: bool = option(False, "rank edges by the part of their score that moves the metric towards the corrupted run")
    pair_chunk: int = option(32, "pairs per forward pass", minimum=1)
    seed: int = option(0, "seed of the random circuits", minimum=0)


def compute(model: HookedCLIP, data: CircuitTask, options: Options, *, checkpoints=None,
            progress: bool = True) -> Tables:
    """summary (one row), edges (every edge: EAP and EAP-IG scores and ranks), exact_check (the
    checked edges: exact effect and estimates), agreement (per method), faithfulness (the curves),
    circuit (the circuit drawn, by |EAP-IG score|), pairs, excluded (if any), about (the task in words)."""
    task = data.task
    scores = {"eap": C.edge_attribution(task, method="eap", pair_chunk=options.pair_chunk, progress=progress),
              "eap-ig": C.edge_attribution(task, method="eap-ig", steps=options.steps, path=options.path,
                                           pair_chunk=options.pair_chunk, progress=progress)}
    check_table = _exact_check(task, scores, options, progress)
    curve = _curves(task, scores, options, progress)
    size, reached = _chosen_size(curve)
    chosen = SELECTIONS[options.selection](scores["eap-ig"], size, options.signed).pruned()
    label = data.model_label or getattr(model, "name", None) or "model"
    tables = {"summary": _summary(label, task, curve, options, size, reached, chosen.n_edges),
              "edges": _edges(scores), "exact_check": check_table,
              "agreement": pd.DataFrame([_agreement(check_table, method) for method in scores]),
              "faithfulness": curve, "circuit": chosen.table(scores["eap-ig"]), "pairs": data.pairs}
    if data.excluded is not None:
        tables["excluded"] = data.excluded
    tables["about"] = pd.DataFrame({"description": [data.description]})
    return tables


SELECTIONS = {"paths": C.path_edges, "greedy": C.greedy_edges, "top": C.top_edges}


def _edges(scores: dict[str, C.EdgeScores]) -> pd.DataFrame:
    """Every edge with each method's score and rank."""
    edges = scores["eap"].table()[["edge", "sender", "receiver"]]
    for method, result in scores.items():
        edges = edges.merge(result.table()[["edge", "score", "rank"]].rename(
            columns={"score": method, "rank": f"rank_{method}"}), on="edge")
    return edges


def _exact_check(task: C.Task, scores: dict[str, C.EdgeScores], options: Options, progress: bool) -> pd.DataFrame:
    """The top `check` edges of each method patched exactly, with each method's estimate, by |exact|."""
    n_edges = C.Graph.of(task.tower).n_edges
    checked = sorted({edge for result in scores.values() for edge in result.top(min(options.check, n_edges), options.signed)})
    exact = C.path_patch(task, checked, pair_chunk=options.pair_chunk, progress=progress)
    table = exact.table().rename(columns={"effect": "exact"})
    for method, result in scores.items():
        table[method] = [float(result.scores[s, r]) for s, r in checked]
    return table.reindex(table["exact"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def _curves(task: C.Task, scores: dict[str, C.EdgeScores], options: Options, progress: bool) -> pd.DataFrame:
    """Faithfulness by size of each method's circuits, and of random ones (drawn once: they do not
    depend on the scores); attrs clean / corrupt: the mean metric of the clean and corrupted runs."""
    sizes = list(options.sizes) if options.sizes else default_sizes(C.Graph.of(task.tower).n_edges)
    curves = []
    for i, (method, result) in enumerate(scores.items()):
        part = C.faithfulness_curve(task, result, sizes, n_random=options.n_random if i else 0,
                                    selection=options.selection, signed=options.signed, seed=options.seed,
                                    pair_chunk=options.pair_chunk, progress=progress)
        curves.append(part.assign(method=np.where(part["kind"] == "circuit", method, "random")))
    curve = pd.concat(curves, ignore_index=True)
    curve.attrs.update(curves[0].attrs)
    return curve


def _chosen_size(curve: pd.DataFrame) -> tuple[int, bool]:
    """The size of the smallest EAP-IG circuit whose faithfulness reaches FAITHFUL (else the
    largest of the curve), and whether one reached it."""
    found = curve[curve["method"] == "eap-ig"].sort_values("size")
    faithful = found[found["faithfulness"] >= FAITHFUL]
    if len(faithful):
        return int(faithful["size"].iloc[0]), True
    return int(found["size"].iloc[-1]), False


def _summary(label: str, task: C.Task, curve: pd.DataFrame, options: Options, size: int, reached: bool,
             circuit_edges: int) -> pd.DataFrame:
    at_size = curve[curve["size"] == size]
    return pd.DataFrame([{
        "model": label, "tower": task.tower.modality, "pairs": task.n_pairs, "edges": C.Graph.of(task.tower).n_edges,
        "clean_metric": curve.attrs["clean"], "corrupt_metric": curve.attrs["corrupt"], "steps": options.steps,
        "path": options.path, "selection": options.selection, "circuit_size": size, "circuit_edges": circuit_edges,
        "reached_threshold": reached,
        "circuit_faithfulness": float(at_size[at_size["method"] == "eap-ig"]["faithfulness"].iloc[0]),
        "eap_faithfulness": float(at_size[at_size["method"] == "eap"]["faithfulness"].iloc[0]),
        "random_faithfulness": float(at_size[at_size["kind"] == "random"]["faithfulness"].mean()),
    }])


def _agreement(check: pd.DataFrame, method: str) -> dict:
    """Rank correlation and error of one method's estimates against exact edge patching."""
    exact, estimate = check["exact"].to_numpy(), check[method].to_numpy()
    spearman = pd.Series(exact).rank().corr(pd.Series(estimate).rank())
    return {"method": method, "edges": len(check), "spearman": float(spearman),
            "mean_abs_error": float(np.abs(estimate - exact).mean()),
            "relative_error": float(np.abs(estimate - exact).sum() / max(np.abs(exact).sum(), 1e-12))}


# --- report --------------------------------------------------------------------------------------
def report(tables: Tables, options: Options) -> Report:
    row = tables["summary"].iloc[0]
    out = Report(f"Circuits in the {row['tower']} tower")
    about = tables["about"]["description"].iloc[0] if "about" in tables else "A circuit task"
    out.section("Task").text(about + f". Mean metric: clean {row['clean_metric']:.4f}, corrupted "
                             f"{row['corrupt_metric']:.4f}. The graph has {row['edges']:,} edges.")
    _circuit_section(out, tables, row)
    out.section("Faithfulness").text(
        f"Circuits chosen from EAP's scores and from EAP-IG's, by size, next to random circuits. At {row['circuit_size']} "
        f"edges: EAP-IG {row['circuit_faithfulness']:.3f}, EAP {row['eap_faithfulness']:.3f}.")
    out.figure(faithfulness_figure(tables["faithfulness"]))
    check = tables["exact_check"]
    out.section("EAP and EAP-IG against exact edge patching").text(
        "The top edges of each method, each corrupted alone and measured exactly (docs/methods.md#path-patching).")
    out.table(tables["agreement"], caption="Agreement with exact edge patching on the checked edges")
    out.figure(estimate_figure(check[["edge", "exact", "eap", "eap-ig"]]))
    out.table(check, caption="Checked edges by |exact effect|")
    return out


def _circuit_section(out: Report, tables: Tables, row: pd.Series) -> None:
    which = (f"The smallest circuit (by EAP-IG, m = {row['steps']}, {row['selection']} selection) whose faithfulness "
             f"reaches {FAITHFUL}" if row["reached_threshold"] else
             f"No circuit of the curve reaches faithfulness {FAITHFUL}; drawn is the largest (by EAP-IG, m = "
             f"{row['steps']}, {row['selection']} selection)")
    out.section("The circuit").text(
        f"{which}: {row['circuit_edges']} edges after pruning, faithfulness {row['circuit_faithfulness']:.3f}; random "
        f"circuits of {row['circuit_size']} edges reach {row['random_faithfulness']:.3f} on average. Edges outside the "
        "circuit carry the corrupted run's values (docs/methods.md#faithfulness).")
    circuit, scores = circuit_from_tables(tables["edges"], tables["circuit"])
    out.figure(circuit_figure(circuit, scores, title="Circuit found by EAP-IG"))
    out.table(tables["circuit"], caption="The circuit's edges by |EAP-IG score|")


def circuit_from_tables(edges: pd.DataFrame, circuit: pd.DataFrame) -> tuple[C.Circuit, C.EdgeScores]:
    """The circuit drawn and the EAP-IG scores [senders, receivers], rebuilt from the tables
    "edges" (every edge of the graph, with its "eap-ig" score) and "circuit" (the circuit's edges)."""
    heads = edges["sender"].str.extract(r"^a(\d+)\.h(\d+)$").dropna().astype(int)
    graph = C.Graph(int(heads[0].max()) + 1, int(heads[1].max()) + 1)
    matrix = torch.full((graph.n_senders, graph.n_receivers), float("nan"))
    for edge, score in zip(edges["edge"], edges["eap-ig"]):
        matrix[graph.edge(edge)] = float(score)
    empty = torch.zeros(0)
    scores = C.EdgeScores(graph, matrix, "eap-ig", 0, None, baseline=empty, corrupted=empty)
    return C.Circuit.from_edges(graph, list(circuit["edge"])), scores


STUDY = Study("circuit", Options, compute, report,
              data="a CircuitTask (negation_scenes, negation_valse, text_pairs_from_file, images_against_mean_colour, "
                   "marked_pairs)")
