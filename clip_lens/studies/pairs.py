"""`clip-lens pairs`: the text studies on a user's minimal pairs (docs/pairs.md): selective heads,
causal tracing around the differing span, and ablation of the most selective heads (zero, and
their output scaled by each alpha) against random heads. Tables and one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import plotly.express as px

from clip_lens.data import read_pairs_file
from clip_lens.model import HookedCLIP
from clip_lens.plot import DIVERGING, head_heatmap, style
from clip_lens.report import Report, claim_output, write_study
from clip_lens.scores import encode_images
from clip_lens.studies.analyses import head_interventions, minimal_pairs

STUDIES = ("causal-tracing", "heads", "ablate-heads")


def pairs_study(model: HookedCLIP, model_label: str, out: Union[str, Path], files: Sequence[Union[str, Path]], *,
                studies: str = "all", images: Optional[Union[str, Path]] = None, top_k: int = 3,
                choose: str = "selectivity",
                alphas: Sequence[float] = (1.0, 0.5, 0.0, -1.0), limit: Optional[int] = None,
                overwrite: bool = False, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run `studies` ("causal-tracing", "heads", "ablate-heads" or "all") on each pairs file (the
    foil marked); causal tracing and ablation need every pair's image."""
    if choose not in ("selectivity", "attribution"):
        raise ValueError(f"choose={choose!r}: heads are chosen by 'selectivity' or 'attribution'")
    chosen = STUDIES if studies == "all" else (studies,)
    if any(study not in STUDIES for study in chosen):
        raise ValueError(f"study {studies!r}: use one of {STUDIES} or 'all'")
    out = claim_output(out, overwrite=overwrite)
    report = Report(f"Minimal pairs on {model_label}")
    parts: dict[str, list] = {"pairs": [], "excluded": [], "heads": [], "causal_tracing": [], "ablation": []}
    for path in files:
        pairs = read_pairs_file(path, lambda texts: model.to_tokens(texts, trim=False), images=images)
        if limit:
            pairs.pairs = pairs.pairs.head(limit).reset_index(drop=True)
        name = pairs.name
        parts["pairs"].append(pairs.pairs.assign(task=name))
        parts["excluded"].append(pairs.excluded.assign(task=name))
        report.section(name).text(f"{len(pairs)} pairs kept from {path}, {len(pairs.excluded)} excluded "
                                  "(excluded.csv says why).")
        if len(pairs) == 0:
            continue
        needs_images = {"causal-tracing", "ablate-heads"} & set(chosen)
        if needs_images and pairs.pairs["image"].isna().any():
            raise ValueError(f"{path} has no image column: {', '.join(sorted(needs_images))} score each pair "
                             "against its image")
        image_emb = encode_images(model, list(pairs.pairs["image"]), progress=False) if needs_images else None
        heads = minimal_pairs.selective_heads(model, pairs, progress=False)
        table = heads.head_table()
        if "heads" in chosen:
            parts["heads"].append(table.assign(task=name))
            report.figure(head_heatmap(table, f"{name}: selectivity for the differing tokens (foil minus caption)"))
        if "causal-tracing" in chosen:
            traced = minimal_pairs.trace(model, pairs, image_emb, progress=False).frame()
            parts["causal_tracing"].append(traced.assign(task=name))
            grid = traced.pivot(index="layer", columns="position", values="cte").reindex(columns=list(minimal_pairs.RELATIVE))
            fig = px.imshow(grid, color_continuous_scale=DIVERGING, zmin=-1, zmax=1, aspect="auto",
                            labels=dict(x="position (from the differing span)", y="layer", color="CTE"))
            report.figure(style(fig, f"{name}: causal tracing around the differing span", height=460))
        if "ablate-heads" in chosen:
            if choose == "attribution":
                top = head_interventions.top_heads_by_attribution(model, pairs, image_emb, top_k)
            else:
                top = [(int(r.layer), int(r.head)) for r in table.head(top_k).itertuples()]
            zero = head_interventions.intervention_study(model, pairs, image_emb, top, intervention="zero")
            scaled = head_interventions.intervention_study(model, pairs, image_emb, top, intervention="scale",
                                                           alphas=alphas, random_seeds=(0,))
            ablation = pd.concat([zero.assign(intervention="zero"), scaled.assign(intervention="scale")],
                                 ignore_index=True).assign(task=name)
            parts["ablation"].append(ablation)
            sweep = scaled[scaled["condition"] != "none"]
            fig = px.line(sweep, x="alpha", y="accuracy", color="condition", markers=True,
                          labels=dict(alpha="alpha (the heads' output times alpha)"))
            report.figure(style(fig, f"{name}: accuracy as the top {top_k} heads by {choose} are scaled", height=400))
            report.table(zero, caption="Zero ablation of the chosen heads and of random heads")
    tables = {key: pd.concat(value, ignore_index=True) for key, value in parts.items() if value}
    write_study(out, tables, report, manifest={"study": f"pairs ({studies})", "model": model_label,
                                               "files": [str(f) for f in files]})
    return tables
