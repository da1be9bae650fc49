"""Study "cannot": negator-selective attention (docs/methods.md#negator-selective-attention) on
CANNOT sentences with "no" as a determiner, each against its "some" counterpart.

`data` is the frame of distinct sentences (`clip_lens.data.load_cannot(paths)`: columns sentence,
source); compute parses them with spaCy, keeps the pairs that differ at one token, and scores every
text-tower head. Negator attention saves each finished batch through `checkpoints`.

    from clip_lens.data import load_cannot
    from clip_lens.studies import Target, cannot, run_study
    run_study(cannot.STUDY, model, load_cannot("cannot-sources/"), cannot.Options(limit=100), Target("out/"),
              model_label="ViT-B-32 openai")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from clip_lens.data import no_determiner_pairs
from clip_lens.report import Report
from clip_lens.studies.analyses import negator_attention
from clip_lens.studies.options import StudyOptions, option
from clip_lens.studies.runner import Study, Tables
from clip_lens.studies.valse_existence import negator_section


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    spacy_model: str = option("en_core_web_sm", "spaCy pipeline for the dependency parse")
    limit: Optional[int] = option(None, "use the first N kept pairs only", minimum=1)
    query_layers: Optional[tuple[int, ...]] = option(None, "layers for the per-query-position view (default: the "
                                                     "layer of the top head)", minimum=0)


def compute(model, data: pd.DataFrame, options: Options, *, checkpoints=None, progress: bool = True) -> Tables:
    """instances (kept pairs: negated, non_negated, source), excluded (dropped sentences and why),
    selection (counts by outcome), negator_heads, negator_query_positions."""
    if not isinstance(data, pd.DataFrame) or "sentence" not in data:
        raise TypeError("the cannot study takes a frame of sentences (clip_lens.data.load_cannot)")
    pairs = no_determiner_pairs(data, tokenize=model.to_tokens, spacy_model=options.spacy_model,
                                context_length=model.text.cfg.n_ctx, progress=progress)
    kept = pairs.pairs.head(options.limit) if options.limit is not None else pairs.pairs
    if not len(kept):
        raise ValueError(f"no 'no'-determiner sentences found among {len(data)} sentences")
    na = negator_attention.run(model, kept["negated"], kept["non_negated"], instances=kept, layout="relative",
                               checkpoints=checkpoints, progress=progress)
    return {"instances": kept, "excluded": pairs.dropped, "selection": pairs.summary(),
            "negator_heads": na.head_table(), "negator_query_positions": na.query_table()}


def report(tables: Tables, options: Options) -> Report:
    out = Report("Negation in CLIP: negator-selective attention on CANNOT")
    selection = tables["selection"]
    kept = int(selection.loc[selection["outcome"] == "kept", "sentences"].sum())
    out.section("Selection").text(f"{int(selection['sentences'].sum())} sentences with the word 'no'; {kept} with 'no' "
                                  f"as a determiner kept ({len(tables['instances'])} used).")
    out.table(selection, caption="Selection of sentences with 'no' as a determiner")
    negator_section(out, tables, options.query_layers)
    out.section("Dropped sentences").table(tables["excluded"], max_rows=50)
    return out


STUDY = Study("cannot", Options, compute, report, data="a frame of CANNOT sentences (clip_lens.data.load_cannot)")
