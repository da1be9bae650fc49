"""Studies "valse-existence" and "image-ablation": negation in CLIP on VALSE existence
(docs/methods.md).

"valse-existence" rephrases and scores every instance (accuracy, segments), then runs the chosen
parts: the preliminary measures, causal tracing and negator-selective attention in the text tower,
image ablation in the vision tower. With image ablation, that runs first and the instances are
scored against its own target runs' image embeddings, so each image is encoded once
(`image_ablation.run_and_score`). Its `data` is a `ValseExistence` (existence.json and the image
folder). "image-ablation" runs image ablation alone on instances already prepared
(`clip_lens.studies.analyses.existence.prepare`).

    from clip_lens.studies import Target, run_study, valse_existence as study
    run_study(study.STUDY, model, study.ValseExistence("existence.json", "images/"),
              study.Options(studies=("causal-tracing",), limit=50), Target("out/"), model_label="ViT-B-32 openai")

Causal tracing, negator attention and image ablation save each finished chunk of instances through
`checkpoints`; the runner resumes a killed run from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import pandas as pd

from clip_lens.checkpoints import Checkpoints
from clip_lens.report import Report
from clip_lens.studies.analyses import causal_tracing, existence, image_ablation, negator_attention, preliminary
from clip_lens.studies.analyses.existence import ExistenceInstances
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables

TEXT_STUDIES = ("causal-tracing", "negator-attention", "preliminary")
VALSE_STUDIES = TEXT_STUDIES + ("image-ablation",)
PathLike = Union[str, Path]


@dataclass(frozen=True)
class ValseExistence:
    """VALSE existence on disk: `valse` the existence.json (any piece in its format), `images` the
    folder with the instances' image files."""

    valse: PathLike
    images: PathLike


@dataclass(frozen=True, kw_only=True)
class EngineOptions(StudyOptions):
    """The patching engine's memory knobs (None: each part's own default; docs/patching.md, "Memory")."""

    batch_size: Optional[int] = option(None, "interventions per forward pass (memory: batch x positions x d_model "
                                       "floats; None: each part's own)", minimum=1)
    pair_chunk: Optional[int] = option(None, "instances whose runs are cached at a time (memory: about 2L+1 residual "
                                       "streams each; None: each part's own)", minimum=1)
    checkpoint_chunk: int = option(64, "instances saved per checkpoint, from which a killed run resumes (the "
                                   "engine's knobs may change in between)", minimum=1)
    # memory and speed only: a killed run may resume with other values (fixing checkpoint_chunk keeps its chunks)
    NOT_IN_IDENTITY: ClassVar[tuple[str, ...]] = ("batch_size", "pair_chunk")

    def sized(self, checkpoints: Optional[Checkpoints]) -> Checkpoints:
        """`checkpoints` saving every `checkpoint_chunk` instances, whatever the engine's chunk."""
        return (checkpoints or Checkpoints(None)).sized(self.checkpoint_chunk)

    def engine(self) -> dict:
        """The knobs that were set, as keyword arguments of the analyses."""
        return {k: v for k, v in dict(batch_size=self.batch_size, pair_chunk=self.pair_chunk).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class ImageAblationOptions(EngineOptions):
    grey: bool = option(False, "image ablation: a grey mean colour instead of per-channel")


@dataclass(frozen=True, kw_only=True)
class Options(ImageAblationOptions):
    studies: tuple[str, ...] = option(VALSE_STUDIES, "the parts to run", choices=VALSE_STUDIES, min_items=1, flags=None)
    missing_images: str = option("raise", "stop with an error on missing images, or skip those instances and list "
                                 "them", choices=("raise", "skip"))
    limit: Optional[int] = option(None, "use the first N instances only", minimum=1)
    sample: Optional[int] = option(None, "a random sample of N instances (seeded by --seed)", minimum=1)
    seed: int = option(0, "seed of the sample", minimum=0)
    clipseg: Optional[str] = option(None, "CLIPSeg checkpoint (local path) for the subject size")
    query_layers: Optional[tuple[int, ...]] = option(None, "layers for the per-query-position view (default: the "
                                                     "layer of the top head)", minimum=0)


# --- compute -------------------------------------------------------------------------------------
def compute(model, data: ValseExistence, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """instances, excluded, accuracy; and the tables of each part in `options.studies`:
    preliminary_* , causal_tracing_*, negator_*, image_ablation_*."""
    if not isinstance(data, ValseExistence):
        raise TypeError(f"valse-existence takes a ValseExistence (existence.json and image folder), not {type(data).__name__}")
    inst, ablation = _scored_instances(model, data, options, checkpoints, progress)
    tables = {"instances": inst.instances_table(), "excluded": inst.excluded, "accuracy": accuracy_table(inst.frame)}
    if "preliminary" in options.studies:
        pre = preliminary.run(model, inst, subject_size=options.clipseg, progress=progress)
        tables.update(preliminary_measures=pre.frame, preliminary_correlations=pre.correlations,
                      accuracy_by_subject_size=pre.accuracy_by_subject_size)
    if "causal-tracing" in options.studies:
        ct = causal_tracing.run(model, inst, checkpoints=options.sized(checkpoints), progress=progress,
                                **options.engine())
        tables.update(causal_tracing_instances=ct.instance_frame(), causal_tracing_segment_means=ct.segment_means(),
                      causal_tracing_localisation=ct.localisation())
    if "negator-attention" in options.studies:
        na = negator_attention.run(model, inst.frame["negated"], inst.frame["non_negated"],
                                   instances=inst.instances_table(), layout="existence", checkpoints=checkpoints,
                                   progress=progress)
        tables.update(negator_heads=na.head_table(), negator_heads_by_segment=na.head_table(by=["negation_in", "segment"]),
                      negator_query_positions=na.query_table())
    if ablation is not None:
        tables.update(image_ablation_tables(ablation))
    return tables


def _scored_instances(model, data: ValseExistence, options: Options, checkpoints: Optional[Checkpoints],
                      progress: bool) -> tuple[ExistenceInstances, Optional[image_ablation.ImageAblation]]:
    """The scored instances, and their image ablation when `options.studies` asks for it. With
    image ablation, the instances are scored against the image embeddings of its own target runs
    (`image_ablation.run_and_score`), so each image is encoded once; it runs first."""
    pairs = existence.select(model, data.valse, data.images, missing=options.missing_images, limit=options.limit,
                             sample=options.sample, seed=options.seed)
    if "image-ablation" not in options.studies:
        return existence.score(model, pairs, existence.encode(model, pairs, progress=progress)), None
    return image_ablation.run_and_score(model, pairs, grey=options.grey, checkpoints=options.sized(checkpoints),
                                        progress=progress, **options.engine())


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Instances, accuracy (d > 0) and segment counts per negation placement and overall."""
    rows = []
    for where, part in [("all", frame)] + list(frame.groupby("negation_in", sort=False)):
        counts = part["segment"].value_counts()
        rows.append(dict(negation_in=where, instances=len(part), accuracy=float((part["d"] > 0).mean()),
                         correct=int(counts.get("correct", 0)), ambiguous=int(counts.get("ambiguous", 0)),
                         incorrect=int(counts.get("incorrect", 0)), mean_d=float(part["d"].mean())))
    return pd.DataFrame(rows)


def compute_image_ablation(model, data: ExistenceInstances, options: ImageAblationOptions, *, checkpoints=None,
                           progress: bool = True) -> Tables:
    """image_ablation (per instance x component x layer), its segment means, outcome counts and
    MHA against MLP, on prepared existence instances (from an image folder)."""
    if not isinstance(data, ExistenceInstances):
        raise TypeError(f"image-ablation takes ExistenceInstances (existence.prepare), not {type(data).__name__}")
    ia = image_ablation.run(model, data, grey=options.grey, checkpoints=options.sized(checkpoints), progress=progress,
                            **options.engine())
    return image_ablation_tables(ia)


def image_ablation_tables(ia: image_ablation.ImageAblation) -> Tables:
    """The image-ablation tables of a result: per instance x component x layer, segment means,
    outcome counts, MHA against MLP."""
    return {"image_ablation": ia.table(), "image_ablation_segment_means": ia.segment_means(),
            "image_ablation_outcomes": ia.outcome_counts(), "image_ablation_mha_vs_mlp": ia.mha_vs_mlp()}


# --- report --------------------------------------------------------------------------------------
def report(tables: Tables, options: Options) -> Report:
    out = Report("Negation in CLIP: VALSE existence")
    out.section("Instances").text(f"{len(tables['instances'])} instances kept, {len(tables['excluded'])} excluded.")
    out.table(tables["accuracy"], caption="Accuracy (d > 0) and segments (correct d > 1, ambiguous -1 < d <= 1, "
                                          "incorrect d <= -1)")
    if "preliminary" in options.studies:
        _preliminary_section(out, tables)
    else:
        from clip_lens import plot

        out.figure(plot.score_distribution(tables["instances"]))
    if "causal-tracing" in options.studies:
        _causal_tracing_section(out, tables)
    if "negator-attention" in options.studies:
        negator_section(out, tables, options.query_layers)
    if "image-ablation" in options.studies:
        _image_ablation_section(out, tables, options)
    if len(tables["excluded"]):
        out.section("Excluded instances").table(tables["excluded"], max_rows=100)
    return out


def _preliminary_section(out: Report, tables: Tables) -> None:
    pre = preliminary.Preliminary(tables["preliminary_measures"], tables["preliminary_correlations"],
                                  tables["accuracy_by_subject_size"])
    out.section("Preliminary analyses")
    out.table(pre.correlations, caption="Correlation of d with each measure")
    if not len(pre.accuracy_by_subject_size):
        out.text("Subject size not measured (give a CLIPSeg checkpoint with --clipseg).", note=True)
    for fig in pre.figures().values():
        out.figure(fig)


def _causal_tracing_section(out: Report, tables: Tables) -> None:
    loc = tables["causal_tracing_localisation"]
    out.section("Causal tracing in the text encoder")
    out.text("CTE(l, q) = d*/d: the share of the caption-foil difference restored by patching the negated "
             "sentence's residual at layer l and aligned position q into the non-negated one. Segment means "
             "weight the further-subject slot by its number of tokens; localisation is the standard deviation "
             "of the mean CTE over the five positions from the negator on: 0.4 when one position carries all of d "
             "(as at layers 0 and L by construction), 0 when the effect is spread evenly or absent.", note=True)
    for fig in causal_tracing.figures(tables["causal_tracing_segment_means"], loc).values():
        out.figure(fig)
    wide = loc.pivot_table(index="layer", columns=["negation_in", "segment"], values="localisation")
    wide.columns = [f"{where}/{segment}" for where, segment in wide.columns]
    out.table(wide.reset_index(), caption="Localisation per layer (negation in / segment)", max_rows=50)


def negator_section(out: Report, tables: Tables, query_layers) -> None:
    """The negator-selective heads: top heads, the a^N heatmap and the per-query views (also CANNOT's)."""
    out.section("Negator-selective attention heads")
    out.text("a^N(l, h): mean over instances of max_q (A_neg[q, k] - A_nonneg[q, k]) at the negator's key k, "
             "over queries q >= k.", note=True)
    out.table(tables["negator_heads"].head(10), caption="Top heads")
    for fig in negator_attention.figures(tables["negator_heads"], tables["negator_query_positions"],
                                         layers=query_layers).values():
        out.figure(fig)


def _image_ablation_section(out: Report, tables: Tables, options: ImageAblationOptions) -> None:
    out.section("Image ablation in the vision encoder")
    out.text(f"IAE = d - d*, where d* is d with the output of one layer's attention block (MHA) or MLP, at "
             f"every position, taken from the {'grey' if options.grey else 'per-channel'} mean-colour image. "
             "Positive: the ablation made the instance worse.", note=True)
    out.table(tables["image_ablation_mha_vs_mlp"], caption="Mean IAE per layer (blocks numbered from 0) and on average",
              max_rows=50)
    figures = image_ablation.figures(tables["image_ablation_segment_means"], tables["image_ablation_outcomes"],
                                     tables["image_ablation_mha_vs_mlp"])
    for fig in figures.values():
        out.figure(fig)


def report_image_ablation(tables: Tables, options: ImageAblationOptions) -> Report:
    out = Report("Negation in CLIP: image ablation")
    _image_ablation_section(out, tables, options)
    return out


STUDY = Study("valse-existence", Options, compute, report,
              data="ValseExistence: VALSE existence.json and the folder with its images")
IMAGE_ABLATION = Study("image-ablation", ImageAblationOptions, compute_image_ablation, report_image_ablation,
                       data="ExistenceInstances prepared from an image folder (existence.prepare)")
STUDIES = {"valse-existence": STUDY, "image-ablation": IMAGE_ABLATION}
