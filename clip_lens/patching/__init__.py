"""`clip_lens.patch`: one engine for activation patching, ablation, attribution patching and
integrated gradients.

An intervention replaces one activation of a *target* run (at a hook kind x layer x position x
unit) and measures a metric of the target's embedding against the other modality, S by default.
The package, one job a file:

- `engine`: `patch()` itself, which picks the runner;
- `request`: the arguments checked once and frozen into a `Request` (tower, inputs, the other
  modality's embeddings, the metric, each hook kind's grid, the result's axes);
- `sites`: the table of hook kinds (hook names, layers, units, where a replacement re-enters);
- `resume`: cached runs, and runs resumed from a cached half-layer;
- `exact`: exact interventions, built, de-duplicated, batched and run;
- `attribution`: first-order estimates from one forward and one backward pass, and integrated
  gradients (the gradient averaged along the line from each layer's activation to its replacement);
- `hook_functions`: user hooks and value-only attention;
- `interactions`: a joint intervention's effect against its members' one at a time;
- `result`: `PatchResult`.

docs/patching.md says how the exact path stays cheap: cached runs, resumption at the intervened
half-layer, the unchanged prefix of a causal tower, skipped no-op replacements and batching.
"""

from __future__ import annotations

from clip_lens.patching.engine import patch
from clip_lens.patching.hook_functions import value_only_attention
from clip_lens.patching.interactions import interaction_table, interactions
from clip_lens.patching.request import EXACT_INTERVENTIONS, LARGE_GRID, Metric
from clip_lens.patching.result import PatchResult
from clip_lens.patching.sites import HOOK_KINDS, KINDS, SAE_HOOKS, UNIT_AXES, HookKind, hook_name, hook_site

__all__ = ["patch", "interaction_table", "interactions", "PatchResult", "value_only_attention", "hook_name",
           "hook_site", "HookKind", "KINDS", "HOOK_KINDS", "UNIT_AXES", "SAE_HOOKS", "EXACT_INTERVENTIONS", "LARGE_GRID",
           "Metric"]
