"""Circuits (docs/circuits.md): the graph, the circuit forward pass against the towers' own runs,
exact edge patching against the circuit forward, EAP against exact patching where the metric is
linear, a planted two-head path, pruning, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from circuit_towers import NEGATED, NON_NEGATED, PATH_EDGES, TWO_HEAD_EDGE, linear_metric, two_head_path_tower

import clip_lens
from clip_lens import circuits as C
from clip_lens.config import TextConfig
from clip_lens.data import shapes
from clip_lens.towers import HookedTextTower


@pytest.fixture(scope="module")
def tiny_task(tiny_model):
    """Negated (clean) against non-negated (corrupted) captions of held-out scenes, scored against
    each scene's image by S."""
    examples = list(shapes.examples(12, seed=30_000))
    negated = [e.foil if e.negation_in == "foil" else e.caption for e in examples]
    plain = [e.caption if e.negation_in == "foil" else e.foil for e in examples]
    images = tiny_model.to_pixels([shapes.image_of(e) for e in examples])
    return C.make_task(tiny_model, clean=negated, corrupt=plain, image=images)


@pytest.fixture(scope="module")
def planted():
    tower = two_head_path_tower()
    return C.make_task(tower, clean=NEGATED, corrupt=NON_NEGATED, metric=linear_metric)


# the graph ---------------------------------------------------------------------------------------
def test_graph_of_the_vit_b32_text_tower():
    graph = C.Graph(12, 8)
    assert (graph.n_senders, graph.n_receivers) == (1 + 12 * 9, 12 * 25 + 1)
    # edges: the input feeds all 301 receivers; a head of block l feeds block l's MLP and every
    # receiver of blocks l+1.. plus the output; an MLP of block l every receiver of blocks l+1.. and the output
    expected = 301 + sum(8 * (1 + 25 * (11 - layer) + 1) + (25 * (11 - layer) + 1) for layer in range(12))
    assert graph.n_edges == expected == 15_355
    for name in ("input", "a3.h5", "m11"):
        assert graph.senders[graph.sender(name)] == name
    for name in ("a0.h0<q>", "a3.h5<k>", "a11.h7<v>", "m4", "output"):
        assert graph.receivers[graph.receiver(name)] == name
    assert graph.edge("a0.h1->a2.h3<q>") == (graph.head_sender(0, 1), graph.head_receiver(2, 3, "q"))
    assert graph.edge("a4.h0->m4") == (graph.head_sender(4, 0), graph.mlp_receiver(4))   # same block: attention then MLP


@pytest.mark.parametrize("edge, message", [
    ("a12.h0->output", "unknown sender 'a12.h0'"),
    ("a0.h9->output", "unknown sender 'a0.h9'"),
    ("a0.h1->a2.h3", "unknown receiver 'a2.h3'.*query, key or value"),
    ("input->m99", "unknown receiver 'm99'"),
    ("a3.h1->a2.h0<v>", "receiver 'a2.h0<v>' reads the residual stream before sender 'a3.h1'"),
    ("m2->a2.h0<q>", "before sender 'm2'"),
    ("a2.h0->a2.h1<k>", "before sender 'a2.h0'"),
    ("a0.h0 a1.h0<q>", "write an edge as 'sender->receiver'"),
])
def test_bad_edges_are_named(edge, message):
    with pytest.raises(ValueError, match=message):
        C.Graph(12, 8).edge(edge)


def test_bad_arguments_are_named(planted):
    with pytest.raises(ValueError, match="steps=0: EAP-IG needs m >= 1"):
        C.edge_attribution(planted, method="eap-ig", steps=0, progress=False)
    with pytest.raises(ValueError, match="steps=-2"):
        C.edge_attribution(planted, method="eap-ig", steps=-2, progress=False)
    with pytest.raises(ValueError, match="method='acdc'"):
        C.edge_attribution(planted, method="acdc", progress=False)
    with pytest.raises(ValueError, match="steps=3: EAP takes no integration path"):
        C.edge_attribution(planted, method="eap", steps=3, progress=False)
    with pytest.raises(ValueError, match="path='activations': EAP takes no integration path"):
        C.edge_attribution(planted, method="eap", path="activations", progress=False)
    with pytest.raises(ValueError, match="unknown sender 'a7.h0'"):
        C.path_patch(planted, ["a7.h0->output"], progress=False)
    with pytest.raises(ValueError, match="reads the residual stream before sender 'a2.h1'"):
        C.path_patch(planted, ["a2.h1->a1.h0<q>"], progress=False)
    with pytest.raises(ValueError, match="pair 1: the clean text has 10 tokens and the corrupted one 5"):
        C.make_task(planted.tower, clean=NEGATED[:2], corrupt=[NON_NEGATED[0], "no cat."], metric=linear_metric)


# the circuit forward pass --------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["text", "vision"])
def test_keeping_every_edge_is_the_clean_run_and_none_the_corrupted_run(tiny_model, tiny_task, modality):
    if modality == "text":
        task = tiny_task
    else:
        images = [shapes.image_of(e) for e in shapes.examples(4, seed=30_001)]
        task = C.make_task(tiny_model, clean=images, text=["There is a red circle."])
    graph = C.Graph.of(task.tower)
    with torch.no_grad():
        clean_emb = task.tower(task.clean)
        corrupt_emb = task.tower(task.corrupt)
    corrupt = C.sender_outputs(task.tower, task.corrupt)[1]
    kept_all = C.run_circuit(task.tower, task.clean, corrupt, torch.zeros_like(graph.valid))
    kept_none = C.run_circuit(task.tower, task.clean, corrupt, graph.valid)
    torch.testing.assert_close(kept_all, clean_emb, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(kept_none, corrupt_emb, atol=2e-5, rtol=1e-5)
    assert (clean_emb - corrupt_emb).abs().max() > 0.1  # the two runs differ: the check has teeth


def test_exact_edge_patching_equals_the_circuit_forward_with_one_edge_removed(tiny_task):
    task = tiny_task
    graph = C.Graph.of(task.tower)
    # several edges into one receiver, in batches smaller than a chunk: runs of shorter texts than
    # the chunk's longest share a forward pass
    edges = ["input->a0.h1<q>", "input->a0.h2<k>", "a0.h3->a1.h0<v>", "a0.h0->m0", "m0->a2.h3<k>", "a1.h2->m2",
             "m2->output", "input->output", "a2.h0->output", "input->a1.h0<q>", "a0.h1->a1.h0<q>", "m0->a1.h0<q>",
             "input->m1", "a1.h3->m1", "a0.h2->m1"]
    result = C.path_patch(task, edges, batch_size=7, pair_chunk=5, progress=False)
    corrupt = C.sender_outputs(task.tower, task.corrupt)[1]
    with torch.no_grad():
        clean = task.metric(task.tower(task.clean))
    for i, edge in enumerate(edges):
        removed = torch.zeros_like(graph.valid)
        removed[graph.edge(edge)] = True
        with torch.no_grad():
            one = task.metric(C.run_circuit(task.tower, task.clean, corrupt, removed)) - clean
        torch.testing.assert_close(result.effects[:, i], one, atol=2e-5, rtol=1e-4)
    assert result.effects.abs().max() > 0.05


def test_layer_norm_backward_equals_autograd(tiny_model):
    norm = tiny_model.text.blocks[1].ln2
    x = torch.randn(3, 5, norm.w.shape[0], requires_grad=True)
    grad_out = torch.randn(3, 5, norm.w.shape[0])
    norm(x).backward(grad_out)
    torch.testing.assert_close(C.layer_norm_backward(norm, x.detach(), grad_out), x.grad, atol=1e-6, rtol=1e-5)


# EAP against exact patching ------------------------------------------------------------------------
def linearised_tower() -> HookedTextTower:
    """A random 2-layer text tower made linear from the last block's value inputs to the metric:
    that block's first norm and the final norm have a huge epsilon (so they divide by a constant,
    and a gain of 1e4 undoes the scale), its MLP writes nothing, the projection is the identity."""
    cfg = TextConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=77, d_embed=16,
                     d_vocab=49408, eot_token_id=49407)
    tower = HookedTextTower(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tower.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        last = tower.blocks[-1]
        for norm in (last.ln1, tower.ln_final):
            norm.eps, norm.b[:] = 1e8, 0.0
            norm.w[:] = 1e4
        last.mlp.out_weight.zero_()
        last.mlp.out_bias.zero_()
        tower.proj.W.copy_(torch.eye(16))
    return tower.eval()


def test_eap_equals_exact_edge_patching_where_the_metric_is_linear_in_the_receiver():
    tower = linearised_tower()
    task = C.make_task(tower, clean=NEGATED[:4], corrupt=NON_NEGATED[:4], metric=lambda emb, other: emb[:, 0] - emb[:, 3])
    graph = C.Graph.of(tower)
    eap = C.edge_attribution(task, method="eap", pair_chunk=3, progress=False)
    linear = [r for r in range(graph.n_receivers)
              if graph.receivers[r] == "output" or (graph.receivers[r].startswith("a1.") and "<v>" in graph.receivers[r])]
    edges = [(s, r) for r in linear for s in graph.valid[:, r].nonzero().flatten().tolist()]
    exact = C.path_patch(task, edges, progress=False).effects.mean(0)
    estimate = torch.stack([eap.scores[s, r] for s, r in edges])
    assert exact.abs().max() > 0.05
    torch.testing.assert_close(estimate, exact, rtol=1e-3, atol=1e-5)
    # through block 0's norms, softmax and GELU the metric is not linear: EAP is only an estimate
    queries = [graph.edge(name) for name in ("input->m0", "input->a0.h0<k>", "input->a0.h1<v>")]
    exact_q = C.path_patch(task, queries, progress=False).effects.mean(0)
    estimate_q = torch.stack([eap.scores[s, r] for s, r in queries])
    assert (estimate_q - exact_q).abs().max() > 1e-3


# a planted two-head path ---------------------------------------------------------------------------
def test_a_planted_two_head_path_is_found(planted):
    graph = C.Graph.of(planted.tower)
    path = [graph.edge(name) for name in PATH_EDGES]
    two_head = graph.edge(TWO_HEAD_EDGE)
    exact = C.path_patch(planted, path, progress=False).effects.mean(0)
    # the edge between the two heads carries more than any other edge of the path alone
    assert exact[path.index(two_head)] < -2.0
    assert exact[path.index(two_head)] < min(e for i, e in enumerate(exact) if path[i] != two_head) - 0.15
    eap = C.edge_attribution(planted, method="eap", progress=False)
    ig = C.edge_attribution(planted, method="eap-ig", steps=10, progress=False)
    assert eap.top(1) == [two_head] and ig.top(1) == [two_head]
    # the copy head finds "no" through its key, a saturated softmax: EAP's gradient there is 0, so it
    # misses an edge that carries most of the change alone; EAP-IG's path through the softmax sees it
    key = graph.edge("input->a0.h0<k>")
    assert exact[path.index(key)] < -2.0 and abs(float(eap.scores[key])) < 1e-3 and float(ig.scores[key]) < -0.5
    for signed in (False, True):
        curve = C.faithfulness_curve(planted, ig, [5], n_random=5, signed=signed, progress=False)
        circuit = curve[curve["kind"] == "circuit"].iloc[0]
        random = curve[curve["kind"] == "random"]
        assert circuit["edges"] <= 5 and circuit["faithfulness"] >= 0.9, curve
        assert random["faithfulness"].abs().max() < 0.1
    assert set(C.path_edges(ig, 5).edge_names()) == {"input->a0.h0<k>", "input->a0.h0<v>", TWO_HEAD_EDGE, "a2.h1->output"}
    eap_curve = C.faithfulness_curve(planted, eap, [5], n_random=0, progress=False)
    assert eap_curve["faithfulness"].iloc[0] < 0.5  # without the key edge, the circuit carries little


def test_pruning_keeps_faithfulness_and_empties_a_disconnected_circuit(tiny_task):
    graph = C.Graph.of(tiny_task.tower)
    scores = C.edge_attribution(tiny_task, method="eap", progress=False)
    circuit = C.top_edges(scores, 60)
    pruned = circuit.pruned()
    assert 0 < pruned.n_edges < circuit.n_edges
    result = C.evaluate(tiny_task, [circuit, pruned], progress=False)
    np.testing.assert_allclose(result.faithfulness[0], result.faithfulness[1], atol=1e-5)
    # edges that reach the output from nodes no kept edge feeds are pruned away entirely
    lonely = C.Circuit.from_edges(graph, ["m1->output", "a2.h0->output"])
    assert lonely.pruned().n_edges == 0
    assert set(C.Circuit.from_edges(graph, ["input->m0", "m0->output"]).pruned().edge_names()) == {"input->m0", "m0->output"}


def test_strongest_paths_are_nested_and_the_curve_cuts_one_sequence(tiny_task):
    scores = C.edge_attribution(tiny_task, method="eap", progress=False)
    small, large = C.path_edges(scores, 20), C.path_edges(scores, 60)
    assert 0 < small.n_edges <= 20 and small.n_edges < large.n_edges <= 60
    assert bool((small.edges <= large.edges).all())                       # nested
    assert small.pruned().n_edges == small.n_edges                         # every edge on an input-output path
    curve = C.faithfulness_curve(tiny_task, scores, [20, 60], n_random=0, prune=False, progress=False)
    assert curve["edges"].tolist() == [small.n_edges, large.n_edges]
    signed = scores.top(scores.graph.n_edges, signed=True)
    assert 0 < len(signed) < scores.graph.n_edges and all(float(scores.importance(True)[e]) > 0 for e in signed)


def test_selections_and_random_controls(planted):
    scores = C.edge_attribution(planted, method="eap", progress=False)
    graph = scores.graph
    assert C.top_edges(scores, 3).n_edges == 3
    threshold = float(scores.importance()[scores.top(4)[-1]])
    assert C.threshold_edges(scores, threshold).n_edges == 4
    greedy = C.greedy_edges(scores, 4)
    assert greedy.n_edges == 4 and "output" in greedy.nodes()
    paths = C.path_edges(scores, 5, signed=True)
    assert paths.pruned().n_edges == paths.n_edges  # every edge lies on an input-to-output path
    a, b = C.random_circuit(graph, 10, seed=1), C.random_circuit(graph, 10, seed=1)
    assert torch.equal(a.edges, b.edges) and not torch.equal(a.edges, C.random_circuit(graph, 10, seed=2).edges)
    with pytest.raises(ValueError, match="a circuit of -1 edges"):
        C.top_edges(scores, -1)
    with pytest.raises(ValueError, match="n=-3: give an integer >= 0"):
        scores.top(-3)
    with pytest.raises(ValueError, match="pair_chunk=0"):
        C.edge_attribution(planted, pair_chunk=0, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        C.path_patch(planted, ["m2->output"], batch_size=0, progress=False)
    assert C.Circuit.from_edges(graph, []).n_edges == 0
    with pytest.raises(ValueError, match="selection='best'"):
        C.faithfulness_curve(planted, scores, [2], selection="best", progress=False)


def test_per_pair_scores_average_to_the_scores(tiny_task):
    scores = C.edge_attribution(tiny_task, method="eap-ig", steps=2, per_pair=True, pair_chunk=5, progress=False)
    torch.testing.assert_close(scores.per_pair.mean(0), scores.scores, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert scores.per_pair.shape == (tiny_task.n_pairs, scores.graph.n_senders, scores.graph.n_receivers)


def test_a_vision_circuit_runs_end_to_end(tiny_model):
    images = [shapes.image_of(e) for e in shapes.examples(6, seed=30_002)]
    task = C.make_task(tiny_model, clean=images, text=["There is a red circle."])  # against mean-colour images
    scores = C.edge_attribution(task, method="eap-ig", steps=3, path="activations", progress=False)
    graph = scores.graph
    assert graph.n_edges == int(torch.isfinite(scores.scores).sum())
    exact = C.path_patch(task, scores.top(5), progress=False)
    assert exact.effects.shape == (6, 5) and torch.isfinite(exact.effects).all()
    curve = C.faithfulness_curve(task, scores, [5, 20, graph.n_edges], n_random=2, progress=False)
    full = curve[(curve["kind"] == "circuit") & (curve["size"] == graph.n_edges)]["faithfulness"].iloc[0]
    assert full == pytest.approx(1.0, abs=1e-4)


def test_eap_ig_is_complete(tiny_model, tiny_task):
    """EAP-IG's scores of a sender group add up to the exact effect of corrupting that group's
    outputs (as m grows): along the input, the input's edges give m(corrupted) - m(clean); along
    the activations, block 1's heads give the effect of patching block 1's attention output."""
    task = tiny_task
    # the token swap through block 0's norm is a sharply curved path: m in the hundreds
    # (-1.326 at m = 64, -1.541 at 128, -1.518 at 256, -1.5316 at 512, against -1.5318)
    inputs = C.edge_attribution(task, method="eap-ig", steps=512, progress=False)
    total = float((inputs.corrupted - inputs.baseline).mean())
    assert abs(total) > 0.5
    assert float(inputs.scores[0].nansum()) == pytest.approx(total, rel=1e-3)
    coarse = C.edge_attribution(task, method="eap-ig", steps=4, progress=False)
    assert abs(float(coarse.scores[0].nansum()) - total) > abs(float(inputs.scores[0].nansum()) - total)

    acts = C.edge_attribution(task, method="eap-ig", steps=64, path="activations", progress=False)
    graph = acts.graph
    first = graph.head_sender(1, 0)
    heads = float(acts.scores[first : first + graph.n_heads].nansum())
    exact = clip_lens.patch(tiny_model, target=task.clean, source=task.corrupt, image=task.other, hook="attn_out",
                            layers=[1], positions="sequence", progress=False)
    assert heads == pytest.approx(float((exact.effects[:, 0] - exact.baseline).mean()), rel=2e-3)
