"""Head interventions with accuracy as the outcome (clip_lens.studies.analyses.head_interventions): a
hand-built tower whose one head attends to a count word only where it changed; its selectivity
finds it, and ablating it (zero, mean, resample) sends accuracy to chance while random heads
leave it; scaling it sweeps the accuracy."""

import numpy as np
import pandas as pd
import pytest
from circuit_towers import COUNT_HEAD, count_head_tower, count_image, count_pairs

from clip_lens.data import check_pairs
from clip_lens.studies.analyses import head_interventions as H
from clip_lens.studies.analyses import minimal_pairs


@pytest.fixture(scope="module")
def counting():
    tower = count_head_tower()
    captions, foils = count_pairs()
    rows = pd.DataFrame({"id": range(len(captions)), "a": captions, "b": foils, "correct": "a", "image": None})
    pairs = check_pairs("counts", rows, lambda texts: tower.to_tokens(texts, trim=False))
    assert len(pairs) == 24 and pairs.excluded.empty
    return tower, pairs, count_image(len(pairs))


def test_selectivity_finds_the_count_head(counting):
    tower, pairs, _ = counting
    selective = minimal_pairs.selective_heads(tower, pairs, progress=False)  # attention to the span, b minus a
    a_n = selective.a_n
    assert np.unravel_index(a_n.argmax(), a_n.shape) == COUNT_HEAD
    assert a_n[COUNT_HEAD] > 0.5 and np.delete(a_n.ravel(), COUNT_HEAD[0] * 4 + COUNT_HEAD[1]).max() < 0.05


@pytest.mark.parametrize("intervention", ["zero", "mean", "resample"])
def test_ablating_the_head_sends_accuracy_to_chance_and_random_heads_do_not(counting, intervention):
    tower, pairs, image = counting
    head = "a{}.h{}".format(*COUNT_HEAD)
    table = H.intervention_study(tower, pairs, image, [head], intervention=intervention, random_seeds=range(5))
    none = table[table["condition"] == "none"].iloc[0]
    chosen = table[table["condition"] == "chosen"].iloc[0]
    random = table[table["condition"] == "random"]
    assert none["accuracy"] == 1.0 and none["mean_d"] > 0.3
    assert abs(chosen["mean_d"]) < 0.2 * none["mean_d"] and 0.25 <= chosen["accuracy"] <= 0.75
    assert (random["accuracy"] == 1.0).all() and (random["mean_d"] > 0.9 * none["mean_d"]).all()
    assert head not in set(random["heads"])


def test_scaling_the_head_sweeps_accuracy(counting):
    tower, pairs, image = counting
    table = H.intervention_study(tower, pairs, image, [COUNT_HEAD], intervention="scale", alphas=[1.0, 0.5, 0.0, -1.0],
                                 random_seeds=[0])
    chosen = table[table["condition"] == "chosen"].set_index("alpha")
    assert chosen.loc[1.0, "mean_d"] == pytest.approx(table.iloc[0]["mean_d"], abs=1e-6)   # alpha 1 is no change
    assert chosen.loc[0.5, "mean_d"] == pytest.approx(0.5 * chosen.loc[1.0, "mean_d"], rel=0.05)
    assert chosen.loc[-1.0, "accuracy"] == 0.0                                            # the head reversed


def test_bad_heads_are_named():
    with pytest.raises(ValueError, match="head 'a9.h0' is outside the tower"):
        H.parse_heads(["a9.h0"], 3, 4)
    with pytest.raises(ValueError, match="head 'L1H2': write a head as 'a<layer>.h<head>'"):
        H.parse_heads(["L1H2"], 3, 4)
    with pytest.raises(ValueError, match="intervention='ablate'"):
        H.head_hooks(count_head_tower(), [(0, 0)], "ablate")


def test_ablating_the_tiny_clips_negator_heads_lowers_held_out_negation_accuracy(tiny_model):
    import torch

    from clip_lens.data import shapes

    model = tiny_model
    scenes = list(shapes.examples(200, seed=20_000))
    rows = pd.DataFrame({"id": range(len(scenes)), "a": [e.caption for e in scenes], "b": [e.foil for e in scenes],
                         "correct": "a", "image": None})
    pairs = check_pairs("scenes", rows, lambda texts: model.to_tokens(texts, trim=False))
    assert len(pairs) == 200
    with torch.no_grad():
        image = model.encode_image(model.to_pixels([shapes.image_of(e) for e in scenes]))
    negated_is_a = np.array([e.negation_in == "caption" for e in scenes])
    heads = minimal_pairs.selective_heads(model, pairs, negated_is_a, progress=False).head_table()
    top = [(int(r.layer), int(r.head)) for r in heads.head(2).itertuples()]
    assert set(top) == {(0, 0), (0, 1)}                      # the negator heads: block 0, heads 0 and 1
    table = H.intervention_study(model, pairs, image, top, intervention="zero", random_seeds=range(5))
    none, chosen = table.iloc[0], table[table["condition"] == "chosen"].iloc[0]
    random = table[table["condition"] == "random"]
    assert chosen["accuracy"] < random["accuracy"].min() - 0.1 and chosen["accuracy"] < none["accuracy"] - 0.1


def test_heads_by_attribution_on_the_tiny_clip(tiny_model):
    import torch

    from clip_lens.data import shapes

    scenes = list(shapes.examples(60, seed=20_000))
    rows = pd.DataFrame({"id": range(60), "a": [e.caption for e in scenes], "b": [e.foil for e in scenes],
                         "correct": "a", "image": None})
    pairs = check_pairs("scenes", rows, lambda texts: tiny_model.to_tokens(texts, trim=False))
    with torch.no_grad():
        image = tiny_model.encode_image(tiny_model.to_pixels([shapes.image_of(e) for e in scenes]))
    negated_is_a = np.array([e.negation_in == "caption" for e in scenes])
    top = H.top_heads_by_attribution(tiny_model, pairs, image, 3, negated_is_a)
    assert len(set(top)) == 3 and all(0 <= layer < 3 and 0 <= head < 4 for layer, head in top)
    assert (0, 1) in top  # the strongest negator head matters by attribution too
    with pytest.raises(ValueError, match="need the CLIP model"):
        H.top_heads_by_attribution(count_head_tower(), pairs, image, 2)


@pytest.mark.parametrize("bad, message", [
    (dict(intervention="scale"), "intervention='scale': give one of 'zero', 'mean', 'resample'"),
    (dict(random_seeds=()), r"random_seeds=\[\]: give a list of at least 1 values"),
    (dict(top_k=0), "top_k=0: give an integer >= 1"),
])
def test_head_ablation_options_refuse_a_bad_value_by_name(bad, message):
    from clip_lens.studies import OptionError, get

    with pytest.raises(OptionError, match=message):
        get("head-ablation").Options(**bad)
    assert get("head-ablation").Options().random_seeds == (0, 1, 2)


def test_the_pair_studies_refuse_a_task_without_images():
    from clip_lens.studies import pair_tasks

    task = pair_tasks.TaskInput("text-only", pairs=None, image_emb=None)
    for name in ("accuracy", "causal-tracing", "head-ablation"):
        study = pair_tasks.STUDIES[name]
        with pytest.raises(ValueError, match=f"study '{name}' scores each pair against its image, and dataset 'text-only'"):
            study.compute(None, task, study.Options(), progress=False)


def mixed_length_pairs(model, n: int = 12):
    """Scene pairs whose texts alternate between short and long (7 to 16 tokens), and their images."""
    import torch

    from clip_lens.data import shapes

    scenes = list(shapes.examples(n, seed=20_100))
    tails = ["", " next to a red square.", "", " above a small yellow star."]
    longer = lambda text, i: text.rstrip(".") + tails[i % 4] if tails[i % 4] else text  # noqa: E731
    rows = pd.DataFrame({"id": range(n), "a": [longer(e.caption, i) for i, e in enumerate(scenes)],
                         "b": [longer(e.foil, i) for i, e in enumerate(scenes)], "correct": "a", "image": None})
    pairs = check_pairs("mixed", rows, lambda texts: model.to_tokens(texts, trim=False))
    with torch.no_grad():
        image = model.encode_image(model.to_pixels([shapes.image_of(e) for e in scenes]))
    lengths = model.text.sequence_lengths(model.to_tokens(list(rows["a"]), trim=False))
    assert int(lengths.max()) - int(lengths.min()) >= 5
    return pairs, image


def plain_study(model, pairs, image, heads, intervention, alphas, seeds, batch_size):
    """Each condition as full runs with the hooks from the embedding on (each side's texts in their
    order, in batches), as intervention_study is defined: [(accuracy, mean_d)] per condition."""
    import torch

    from clip_lens.scores import score

    tower = model.text
    sides = [tower.to_tokens(list(pairs.pairs[side]), trim=False) for side in ("a", "b")]
    texts = torch.cat(sides)
    means = H.head_means(tower, texts) if intervention == "mean" else None
    runs = [([], 1.0, 0)]
    for alpha in (alphas if intervention == "scale" else [0.0]):
        runs += [(heads, alpha, 0)] + [(H.random_heads(len(heads), 3, 4, seed, heads), alpha, seed) for seed in seeds]
    out = []
    for which, alpha, seed in runs:
        pool = H.head_pool(tower, texts, which) if intervention == "resample" and which else means
        hooks = H.head_hooks(tower, which, intervention, alpha, pool, seed) if which else []
        s = []
        for tokens in sides:
            with torch.no_grad():
                s.append(torch.cat([score(model, tower.run_with_hooks(tokens[lo:lo + batch_size], fwd_hooks=hooks),
                                          image[lo:lo + batch_size]) for lo in range(0, len(tokens), batch_size)]))
        d = (s[0] - s[1]).numpy()
        out.append(((d > 0).mean(), d.mean()))
    return out


@pytest.mark.parametrize("intervention", ["zero", "mean", "resample", "scale"])
def test_the_shared_clean_run_gives_the_numbers_of_full_runs_per_condition(tiny_model, intervention):
    pairs, image = mixed_length_pairs(tiny_model)
    heads, alphas, seeds = [(1, 2), (2, 0)], [0.5, -1.0], [0, 1, 2]
    table = H.intervention_study(tiny_model, pairs, image, heads, intervention=intervention, alphas=alphas,
                                 random_seeds=seeds, batch_size=5)
    expected = plain_study(tiny_model, pairs, image, heads, intervention, alphas, seeds, batch_size=5)
    assert len(table) == len(expected) == (1 + 2 * 4 if intervention == "scale" else 1 + 4)
    assert table["accuracy"].tolist() == [accuracy for accuracy, _ in expected]
    np.testing.assert_allclose(table["mean_d"], [mean_d for _, mean_d in expected], rtol=0, atol=1e-5)
    assert table["mean_d"].nunique() > 2  # the interventions change the scores


def test_texts_run_in_batches_of_similar_length_and_share_the_clean_run(tiny_model):
    """Positions through the embedding (clean runs only) and through the last block (every run)."""
    pairs, image = mixed_length_pairs(tiny_model)
    tower = tiny_model.text
    texts = [text for side in ("a", "b") for text in pairs.pairs[side]]
    lengths = tower.sequence_lengths(tower.to_tokens(texts, trim=False)).sort().values
    least = sum(int(chunk.max()) * len(chunk) for chunk in lengths.split(4))    # length-sorted batches of 4
    seen = {"hook_embed": 0, "blocks.2.hook_resid_post": 0}

    def count(act, hook):
        seen[hook.name] += act.shape[0] * act.shape[1]

    with tower.hooks(fwd_hooks=[(name, count) for name in seen]):
        H.pair_scores(tiny_model, pairs, image, batch_size=4)
        assert seen == {"hook_embed": least, "blocks.2.hook_resid_post": least}
        seen.update({name: 0 for name in seen})
        H.intervention_study(tiny_model, pairs, image, [(1, 2)], intervention="zero", random_seeds=[0, 1], batch_size=4)
    assert seen == {"hook_embed": least, "blocks.2.hook_resid_post": 4 * least}  # none, chosen, 2 random
