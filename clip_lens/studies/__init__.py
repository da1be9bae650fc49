"""Studies: each one contract (docs/studies.md) over the analyses in `clip_lens.studies.analyses`.

- a frozen, keyword-only `Options` dataclass, checked when it is made;
- `compute(model, data, options) -> {name: DataFrame}`, writing no file;
- `report(tables, options) -> Report`.

`run_study(study, model, data, options, Target(out))` runs any of them: it claims the output
folder, resumes a killed run, and writes the tables, the report and the manifest atomically. The
command line, sweeps and the demo are front ends over it.

    from clip_lens import studies
    study = studies.get("covariates")
    tables = studies.run_study(study, model, None, study.Options(n_per_cell=20), studies.Target("runs/cov"),
                               model_label="tiny")
"""

from __future__ import annotations

import importlib

from clip_lens.studies.options import OptionError, StudyOptions, option
from clip_lens.studies.runner import Study, Target, run_study

# study name -> the module that defines it (as `STUDY`, or `STUDIES[name]` for modules with several)
MODULES = {
    "valse-existence": "valse_existence",
    "cannot": "cannot",
    "attention-cancellation": "attention_cancellation",
    "attribution": "attribution",
    "circuit": "circuit",
    "pairs": "pairs",
    "compare-tasks": "compare_tasks",
    "covariates": "covariates",
    "negation-followups": "negation_followups",
    "sentence-sae": "sentence_sae",
    "accuracy": "pair_tasks",
    "causal-tracing": "pair_tasks",
    "selective-heads": "pair_tasks",
    "head-ablation": "pair_tasks",
    "image-ablation": "valse_existence",
}
NAMES = tuple(MODULES)


def get(name: str) -> Study:
    """The study called `name` (one of `NAMES`)."""
    if name not in MODULES:
        raise ValueError(f"no study called {name!r}; the studies are {', '.join(NAMES)}")
    module = importlib.import_module(f"clip_lens.studies.{MODULES[name]}")
    single = getattr(module, "STUDY", None)
    return single if single is not None and single.name == name else module.STUDIES[name]


__all__ = ["get", "NAMES", "Study", "Target", "run_study", "OptionError", "StudyOptions", "option"]
