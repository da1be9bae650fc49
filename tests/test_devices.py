"""Every path keeps its tensors on the model's device (issue: GPUs and half precision).

The machines the suite runs on have no GPU, so a second real device is not available. Instead the
representative calls below run with torch's default device set to "meta" while the model stays
on the CPU, and a `TorchFunctionMode` checks the output of every torch call: a tensor that lands on
"meta" was created without `device=` (or from one that was), which on a GPU would be a CPU tensor
meeting CUDA ones. The check raises at the call that created it, with its traceback.

The check on outputs is needed, not just the meta device: a meta tensor carries no data, and some
mixed operations do not fail on it. Indexing a CPU tensor with a meta index tensor returns zeros,
silently (tried with torch 2.14), exactly the wrong result this test exists to catch.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import clip_lens
from clip_lens import zoo
from clip_lens.data.shapes import export_valse
from clip_lens.patching import KINDS
from clip_lens.sae import TopKSAE, cache_activations, train_sae
from clip_lens.studies.analyses import causal_tracing, existence, image_ablation, negator_attention, preliminary
from clip_lens.studies.analyses import component_attribution as attribution

# Functions that build on the meta device on purpose, to read shapes without allocating (a file's
# metadata checked against the weights it implies): their meta tensors never meet data.
DELIBERATE_META = {("clip_lens.captioning.prefix", "_weight_shapes")}


def _inside_deliberate_meta() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in DELIBERATE_META:
            return True
        frame = frame.f_back
    return False


class _NoTensorOnDefaultDevice(TorchFunctionMode):
    """Raise at any torch call whose output is on the meta device (outside `DELIBERATE_META`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.is_meta and not _inside_deliberate_meta():
                raise AssertionError(f"{getattr(func, '__name__', func)} made a tensor on the default device "
                                     f"(meta here) instead of the model's")
        return out


@contextlib.contextmanager
def default_device_is_not_the_models():
    with torch.device("meta"), _NoTensorOnDefaultDevice():
        yield


def test_the_guard_catches_a_stray_tensor():
    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="default device"):
        with default_device_is_not_the_models():
            x[torch.arange(2)]
    with default_device_is_not_the_models():  # and lets explicit devices through
        assert x[torch.arange(2, device=x.device)].shape == (2, 3)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the same calls run on the CPU under the guard")])]


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tiny_model, tmp_path_factory):
    """(model, instances, guard): the tiny CLIP on the CPU with the default device elsewhere, or
    on a real GPU (where a stray CPU tensor fails by itself)."""
    model = tiny_model if request.param == "cpu" else clip_lens.HookedCLIP.from_pretrained(zoo.NAME, device="cuda")
    guard = default_device_is_not_the_models if request.param == "cpu" else contextlib.nullcontext
    folder = tmp_path_factory.mktemp("scenes")
    scenes = export_valse(folder, 6, seed=3)
    with guard():
        return model, existence.prepare(model, scenes, folder / "images", progress=False), guard


def test_forward_and_cache(setup):
    model, instances, guard = setup
    with guard():
        pixels = model.to_pixels([str(p) for p in instances.frame["image_path"][:2]])
        tokens = model.to_tokens(list(instances.frame["caption"][:2]))
        logits, cache = model.run_with_cache(text=tokens, image=pixels)
        cache.accumulated_resid  # noqa: B018
        assert logits.shape == (2, 2)


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("intervention", ["patch", "zero", "mean", "resample"])
def test_patch_of_each_kind(setup, tower, intervention):
    model, instances, guard = setup
    frame = instances.frame.head(3)
    if tower == "text":
        target, source = list(frame["non_negated"]), list(frame["negated"])
        if intervention == "resample":  # resampled texts need one token length
            target, source = target[:1] * 3, [source[0], target[0], source[0]]
        other = dict(image=instances.image_emb[:3])
    else:
        target = model.to_pixels([str(p) for p in frame["image_path"]])
        source, other = target.flip(0), dict(text=instances.caption_emb[:3])
    hooks = [kind for kind in KINDS if kind != "pattern"]
    with guard():
        for hook in hooks:
            units = {"z": dict(heads="all"), "mlp_post": dict(neurons=[0, 3])}.get(hook, {})
            result = clip_lens.patch(model, target=target, source=None if intervention == "zero" else source,
                                     hook=hook, intervention=intervention, progress=False, **units, **other)
            assert result.effects.device.type == "cpu" and result.effects.dtype == torch.float32
        if intervention == "patch":  # the hook-function runner, and attribution patching
            clip_lens.patch(model, target=target, hook="pattern", intervention="value_only", progress=False, **other)
            clip_lens.patch(model, target=target, hook="z", intervention=lambda z, hook: z * 0.5, layers=[(0, 1)],
                            progress=False, **other)
            approx = clip_lens.patch(model, target=target, source=source, method="attribution", progress=False,
                                     **other)
            assert not approx.effects.isnan().all()


def test_studies(setup):
    model, instances, guard = setup
    with guard():
        traced = causal_tracing.run(model, instances, progress=False)
        traced.segment_means()
        ablated = image_ablation.run(model, instances, progress=False)
        ablated.table()
        heads = negator_attention.run(model, instances.frame["negated"], instances.frame["non_negated"],
                                      instances=instances.instances_table(), layout="existence", progress=False)
        heads.head_table()
        measures = preliminary.run(model, instances, progress=False)
    assert measures.frame["n_tokens"].min() > 0 and measures.frame["caption_foil_cosine"].notna().all()


def test_attribution_and_saes(setup):
    model, instances, guard = setup
    pixels = model.to_pixels([str(p) for p in instances.frame["image_path"][:3]])
    text = instances.caption_emb[:3]
    with guard():
        attribution.faithfulness(model, pixels, text, ks=(0, 1, 2))
        attribution.neuron_attributions(model, pixels, text, layers=[0])
        hook = "vision.blocks.1.hook_resid_post"
        acts = cache_activations(model, hook, pixels, position=0, batch_size=2)
        sae, _ = train_sae(acts, n_latents=16, k=2, steps=5, progress=False)
        assert isinstance(sae, TopKSAE) and sae.W_dec.device == model.device
        attribution.latent_attributions(model, sae, "blocks.1.hook_resid_post", pixels, text)
        clip_lens.patch(model, target=pixels, source=pixels.flip(0), hook="resid", layers=[2], sae=sae,
                        latents=[0, 1], text=text, progress=False)


def test_circuits(setup):
    from clip_lens import circuits

    model, instances, guard = setup
    frame = instances.frame
    with guard():
        task = circuits.make_task(model, clean=list(frame["negated"][:4]), corrupt=list(frame["non_negated"][:4]),
                                  image=instances.image_emb[:4])
        eap = circuits.edge_attribution(task, method="eap", pair_chunk=3, progress=False)
        ig = circuits.edge_attribution(task, method="eap-ig", steps=2, per_pair=True, progress=False)
        circuits.edge_attribution(task, method="eap-ig", steps=1, path="activations", progress=False)
        exact = circuits.path_patch(task, eap.top(6) + ["m2->output", "a0.h0->m0"], batch_size=5, progress=False)
        curve = circuits.faithfulness_curve(task, ig, [3, 50], n_random=1, progress=False)
        pixels = model.to_pixels([str(p) for p in frame["image_path"][:2]])
        vision = circuits.make_task(model, clean=pixels, text=model.to_tokens(["There is a red circle."]))
        circuits.edge_attribution(vision, method="eap", progress=False)
        node_ig = clip_lens.patch(model, target=list(frame["non_negated"][:3]), source=list(frame["negated"][:3]),
                                  image=instances.image_emb[:3], hook="z", layers=[1], method="integrated_gradients",
                                  steps=2, progress=False)
    assert eap.scores.device.type == exact.effects.device.type == node_ig.effects.device.type == "cpu"
    assert torch.isfinite(exact.effects).all() and len(curve) == 4


def test_captioning(setup, tiny_model):
    """The shipped captioner and generated captions in attention cancellation, on the model's
    device: the same captions as on the CPU."""
    from clip_lens.captioning import load_captioner
    from clip_lens.data.image_sets import ImageSet
    from clip_lens.studies.analyses import attention_cancellation

    model, instances, guard = setup
    captioner = load_captioner(zoo.CAPTIONER_NAME, device=model.device)
    paths = [str(p) for p in instances.frame["image_path"][:4]]
    pixels = model.to_pixels(paths)
    with guard():
        greedy = captioner.caption(pixels, model)
        beam = captioner.caption(pixels, model, beams=3)
        images = ImageSet(instances.frame.rename(columns={"image_path": "image"})[:4],
                          ["There is a red circle.", "There are no shapes."], None, "four scenes")
        result = attention_cancellation.run(model, images, settings={"2": (1,)}, pixels=pixels, captioner=captioner,
                                            progress=False)
    on_cpu = load_captioner(zoo.CAPTIONER_NAME)
    cpu_pixels = tiny_model.to_pixels(paths)
    assert greedy == on_cpu.caption(cpu_pixels, tiny_model)
    assert beam == on_cpu.caption(cpu_pixels, tiny_model, beams=3)
    assert result.generated[0] == greedy and result.generated_cosine.shape == (2, 4)


def test_vision_study_with_captions(setup, tmp_path):
    """Attention cancellation with generated captions, attention distance and maps, and the report,
    all on the model's device (the demo's vision step)."""
    from clip_lens.data.image_sets import open_image_set
    from clip_lens.data.shapes import single_shape_set
    from clip_lens.studies import attention_cancellation as vision_study

    model, _, guard = setup
    images, captions = single_shape_set(tmp_path / "images", per_class=1)
    options = vision_study.Options(settings="1 1-3", captioner=zoo.CAPTIONER_NAME, map_images=1)
    with guard():
        tables = vision_study.compute(model, open_image_set(images, captions, None, None), options, progress=False)
    assert len(tables["captions_by_setting"]) == 3 and len(tables["attention_distance"]) == 3 * 4
    vision_study.report(tables, options)  # from the tables alone, on the host
