"""Studies composed from clip_lens hooks; each returns tidy DataFrames and plotly figures.

- `existence`: VALSE existence instances, scored and segmented (shared by the studies below).
- `causal_tracing`: where the text encoder restores the caption-foil difference (CTE).
- `negator_attention`: heads that attend to the negator only when it negates (VALSE, CANNOT).
- `preliminary`: sequence length, caption-foil similarity, subject size against d.
- `image_ablation`, `attention_cancellation`, `attention_maps`: the vision-tower studies.
- `attribution`: attributions to heads, neurons, positions and SAE latents; latent alignment and
  unexpected reliance; the faithfulness of Logit Lens (deletion curves).
- `negation_study`, `vision_study`, `attribution_study`: what the `clip-lens` commands run.
"""
