"""The analyses the studies compose, each returning tidy DataFrames and plotly figures:

- `existence`: VALSE existence instances, scored and segmented (shared by the negation analyses);
- `causal_tracing`: where the text encoder restores the caption-foil difference (CTE);
- `negator_attention`: heads that attend to the negator only when it negates (VALSE, CANNOT);
- `preliminary`: sequence length, caption-foil similarity, subject size against d;
- `image_ablation`, `attention_cancellation`, `attention_maps`: the vision-tower analyses;
- `component_attribution`: attributions to heads, neurons, positions and SAE latents, latent
  alignment, unexpected reliance, and the faithfulness of Logit Lens (deletion curves);
- `minimal_pairs`, `head_interventions`: the negation tools on any minimal-pair set;
- `covariates`: subject size x caption length on synthetic scenes.
"""
