"""The negation studies by name (the registry's module for "valse-existence", "cannot" and
"image-ablation"): `clip_lens.studies.valse_existence` and `clip_lens.studies.cannot`.

    from clip_lens.studies import Target, negation, run_study
    study = negation.STUDIES["valse-existence"]
    run_study(study, model, negation.ValseExistence("existence.json", "images/"), study.Options(limit=50),
              Target("out/"), model_label="ViT-B-32 openai")
"""

from __future__ import annotations

from clip_lens.studies import cannot, valse_existence
from clip_lens.studies.valse_existence import TEXT_STUDIES, VALSE_STUDIES, ValseExistence

STUDIES = {"valse-existence": valse_existence.STUDY, "cannot": cannot.STUDY,
           "image-ablation": valse_existence.IMAGE_ABLATION}

__all__ = ["STUDIES", "TEXT_STUDIES", "VALSE_STUDIES", "ValseExistence"]
