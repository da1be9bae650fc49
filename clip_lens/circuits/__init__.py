"""Circuits in CLIP's towers: which edges between heads, MLPs, the input and the output carry a
behaviour (docs/circuits.md).

- `make_task`: clean and corrupted runs of one tower and the metric (S by default);
- `Graph`: the tower's senders, receivers and edges, by name ("a0.h1->a2.h3<q>");
- `edge_attribution`: every edge scored by EAP or EAP-IG from gradients;
- `path_patch`: the exact effect of corrupting single edges;
- `top_edges`, `threshold_edges`, `greedy_edges`, `Circuit.pruned`: circuits from scores;
- `evaluate`, `faithfulness_curve`: how much of the behaviour a circuit carries, next to random
  circuits of its size.
"""

from clip_lens.circuits.circuit import (
    Circuit,
    Faithfulness,
    evaluate,
    faithfulness_curve,
    greedy_edges,
    path_edges,
    random_circuit,
    threshold_edges,
    top_edges,
)
from clip_lens.circuits.edge_attribution import EdgeScores, edge_attribution, layer_norm_backward
from clip_lens.circuits.forward import cached_run, run_circuit, sender_outputs
from clip_lens.circuits.graph import Graph
from clip_lens.circuits.path_patching import PathPatching, path_patch
from clip_lens.circuits.task import Task, make_task

__all__ = ["Graph", "Task", "make_task", "EdgeScores", "edge_attribution", "layer_norm_backward", "PathPatching",
           "path_patch", "Circuit", "Faithfulness", "evaluate", "faithfulness_curve", "top_edges", "threshold_edges",
           "greedy_edges", "path_edges", "random_circuit", "run_circuit", "sender_outputs", "cached_run"]
