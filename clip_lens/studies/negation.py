"""The negation studies end to end, as the CLI runs them: compute, write tables and one HTML report.

    from clip_lens.studies import negation as negation_study
    negation_study.valse_existence(model, "ViT-B-32 openai", "existence.json", "images/", "out/")
    negation_study.cannot_negator_attention(model, "ViT-B-32 openai", "cannot-sources/", "out-cannot/")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd

from clip_lens.checkpoints import claim_resumable_output, weights_fingerprint
from clip_lens.data import load_cannot, no_determiner_pairs
from clip_lens.model import HookedCLIP
from clip_lens.report import Report, write_study
from clip_lens.studies.analyses import causal_tracing, existence, image_ablation, negator_attention, preliminary

TEXT_STUDIES = ("causal-tracing", "negator-attention", "preliminary")
VALSE_STUDIES = TEXT_STUDIES + ("image-ablation",)
PathLike = Union[str, Path]


def _accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Instances, accuracy (d > 0) and segment counts per negation placement and overall."""
    rows = []
    for where, part in [("all", frame)] + list(frame.groupby("negation_in", sort=False)):
        counts = part["segment"].value_counts()
        rows.append(dict(negation_in=where, instances=len(part), accuracy=float((part["d"] > 0).mean()),
                         correct=int(counts.get("correct", 0)), ambiguous=int(counts.get("ambiguous", 0)),
                         incorrect=int(counts.get("incorrect", 0)), mean_d=float(part["d"].mean())))
    return pd.DataFrame(rows)


def valse_existence(model: HookedCLIP, model_label: str, valse: PathLike, images: PathLike, out: PathLike, *,
                    studies: Sequence[str] = VALSE_STUDIES, missing: str = "raise", limit: Optional[int] = None,
                    sample: Optional[int] = None, seed: int = 0, grey: bool = False, preface: Sequence[str] = (),
                    subject_size: Optional[PathLike] = None, query_layers: Optional[Sequence[int]] = None,
                    overwrite: bool = False, batch_size: Optional[int] = None, pair_chunk: Optional[int] = None,
                    progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run the chosen VALSE existence studies and write `out/`: instances.csv, excluded.csv, one CSV
    per result table and report.html (`preface`: extra lines for its setup section). Returns the
    tables by file stem. `batch_size` / `pair_chunk` go to the patching engine of causal tracing
    and image ablation (None: each study's default; see docs/patching.md, "Memory").

    Causal tracing, negator attention and image ablation save each finished chunk of instances
    under out/.partial/; run again into the same `out` with the same settings, a killed run resumes
    from them (clip_lens.checkpoints)."""
    engine = {k: v for k, v in dict(batch_size=batch_size, pair_chunk=pair_chunk).items() if v is not None}
    unknown = set(studies) - set(VALSE_STUDIES)
    if unknown:
        raise ValueError(f"unknown studies {sorted(unknown)}; choose from {VALSE_STUDIES}")
    identity = dict(study="valse-existence", studies=list(studies), model=model_label, dtype=str(model.dtype),
                    device=str(model.device), weights=weights_fingerprint(model), valse=valse, images=images,
                    missing=missing, limit=limit, sample=sample, seed=seed, grey=grey, batch_size=batch_size,
                    pair_chunk=pair_chunk)
    checkpoints = claim_resumable_output(out, identity, overwrite=overwrite)
    out = Path(out)
    inst = existence.prepare(model, valse, images, missing=missing, limit=limit, sample=sample, seed=seed,
                             progress=progress)
    tables = {"instances": inst.instances_table(), "excluded": inst.excluded, "accuracy": _accuracy_table(inst.frame)}
    report = Report("Negation in CLIP: VALSE existence")
    report.section("Setup").text(f"Model: {model_label}. Data: {valse} ({len(inst)} instances kept, "
                                 f"{len(inst.excluded)} excluded); images from {images}.")
    for line in preface:
        report.text(line)
    report.table(tables["accuracy"], caption="Accuracy (d > 0) and segments (correct d > 1, ambiguous -1 < d <= 1, incorrect d <= -1)")

    if "preliminary" in studies:
        pre = preliminary.run(model, inst, subject_size=subject_size, progress=progress)
        tables.update(preliminary_measures=pre.frame, preliminary_correlations=pre.correlations,
                      accuracy_by_subject_size=pre.accuracy_by_subject_size)
        report.section("Preliminary analyses")
        report.table(pre.correlations, caption="Correlation of d with each measure")
        if not len(pre.accuracy_by_subject_size):
            report.text("Subject size not measured (give a CLIPSeg checkpoint with --clipseg).", note=True)
        for fig in pre.figures().values():
            report.figure(fig)
    else:
        from clip_lens import plot
        report.figure(plot.score_distribution(inst.frame))

    if "causal-tracing" in studies:
        ct = causal_tracing.run(model, inst, checkpoints=checkpoints, progress=progress, **engine)
        tables.update(causal_tracing_instances=ct.instance_frame(), causal_tracing_segment_means=ct.segment_means(),
                      causal_tracing_localisation=ct.localisation())
        report.section("Causal tracing in the text encoder")
        report.text("CTE(l, q) = d*/d: the share of the caption-foil difference restored by patching the negated "
                    "sentence's residual at layer l and aligned position q into the non-negated one. Segment means "
                    "weight the further-subject slot by its number of tokens; localisation is the standard deviation "
                    "of the mean CTE over the positions from the negator on.", note=True)
        for fig in ct.figures().values():
            report.figure(fig)
        wide = ct.localisation().pivot_table(index="layer", columns=["negation_in", "segment"], values="localisation")
        wide.columns = [f"{where}/{segment}" for where, segment in wide.columns]
        report.table(wide.reset_index(), caption="Localisation per layer (negation in / segment)", max_rows=50)

    if "negator-attention" in studies:
        na = negator_attention.run(model, inst.frame["negated"], inst.frame["non_negated"],
                                   instances=inst.instances_table(), layout="existence", checkpoints=checkpoints,
                                   progress=progress)
        tables.update(negator_heads=na.head_table(), negator_heads_by_segment=na.head_table(by=["negation_in", "segment"]),
                      negator_query_positions=na.query_table())
        _negator_section(report, na, query_layers)

    if "image-ablation" in studies:
        ia = image_ablation.run(model, inst, grey=grey, checkpoints=checkpoints, progress=progress, **engine)
        tables.update(image_ablation=ia.table(), image_ablation_segment_means=ia.segment_means(),
                      image_ablation_outcomes=ia.outcome_counts(), image_ablation_mha_vs_mlp=ia.mha_vs_mlp())
        report.section("Image ablation in the vision encoder")
        report.text(f"IAE = d - d*, where d* is d with the output of one layer's attention block (MHA) or MLP, at "
                    f"every position, taken from the {'grey' if grey else 'per-channel'} mean-colour image. "
                    "Positive: the ablation made the instance worse.", note=True)
        report.table(ia.mha_vs_mlp(), caption="Mean IAE per layer (blocks numbered from 0) and on average", max_rows=50)
        for fig in ia.figures().values():
            report.figure(fig)

    if len(inst.excluded):
        report.section("Excluded instances").table(inst.excluded, max_rows=100)
    write_study(out, tables, report, manifest={"study": f"valse-existence ({', '.join(studies)})", "model": model_label,
                                               "data": {"valse": valse, "images": images}, "sample": sample,
                                               "seed": seed, "limit": limit, "instances": checkpoints.summary()})
    checkpoints.finish()
    return tables


def _negator_section(report: Report, na: negator_attention.NegatorAttention, query_layers) -> None:
    report.section("Negator-selective attention heads")
    report.text("a^N(l, h): mean over instances of max_q (A_neg[q, k] - A_nonneg[q, k]) at the negator's key k, "
                "over queries q >= k.", note=True)
    report.table(na.head_table().head(10), caption="Top heads")
    for fig in na.figures(layers=query_layers).values():
        report.figure(fig)


def cannot_negator_attention(model: HookedCLIP, model_label: str, cannot: Union[PathLike, Sequence[PathLike]],
                             out: PathLike, *, spacy_model: str = "en_core_web_sm", limit: Optional[int] = None,
                             query_layers: Optional[Sequence[int]] = None, overwrite: bool = False,
                             progress: bool = True) -> dict[str, pd.DataFrame]:
    """Negator-selective attention on CANNOT "no"-determiner sentences and their "some" counterparts;
    writes instances.csv, excluded.csv, negator_heads.csv, negator_query_positions.csv, report.html.
    Negator attention saves each finished batch under out/.partial/, and a killed run resumes from
    them (clip_lens.checkpoints)."""
    identity = dict(study="cannot negator-attention", model=model_label, dtype=str(model.dtype),
                    device=str(model.device), weights=weights_fingerprint(model), cannot=cannot,
                    spacy_model=spacy_model, limit=limit)
    checkpoints = claim_resumable_output(out, identity, overwrite=overwrite)
    out = Path(out)
    sentences = load_cannot(cannot)
    pairs = no_determiner_pairs(sentences, tokenize=model.to_tokens, spacy_model=spacy_model,
                                context_length=model.text.cfg.n_ctx, progress=progress)
    kept = pairs.pairs.head(limit) if limit is not None else pairs.pairs
    if not len(kept):
        raise ValueError(f"no 'no'-determiner sentences found in {cannot}")
    na = negator_attention.run(model, kept["negated"], kept["non_negated"], instances=kept, layout="relative",
                               checkpoints=checkpoints, progress=progress)
    tables = {"instances": kept, "excluded": pairs.dropped, "selection": pairs.summary(),
              "negator_heads": na.head_table(), "negator_query_positions": na.query_table()}
    report = Report("Negation in CLIP: negator-selective attention on CANNOT")
    report.section("Setup").text(f"Model: {model_label}. Data: {cannot}: {len(sentences)} distinct sentences, "
                                 f"{len(pairs.pairs)} with 'no' as a determiner kept ({len(kept)} used).")
    report.table(pairs.summary(), caption="Selection of sentences with 'no' as a determiner")
    _negator_section(report, na, query_layers)
    report.section("Dropped sentences").table(pairs.dropped, max_rows=50)
    write_study(out, tables, report, manifest={"study": "cannot negator-attention", "model": model_label,
                                               "data": {"cannot": cannot, "spacy_model": spacy_model}, "limit": limit,
                                               "instances": checkpoints.summary()})
    checkpoints.finish()
    return tables
