"""The `clip-lens` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from clip_lens.model import DTYPES

CHECK_SENTENCES = ["There are no giraffes.", "There are some giraffes.", "a photo of a cat on a sofa"]


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="precision of the towers (scores are computed in float32 whatever it is)")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu, cuda, cuda:1")


def _load_pair(model_name: str, pretrained: Optional[str], seed: int):
    """(open_clip model, HookedCLIP) for `model_name`; random weights moved off init without `pretrained`."""
    import open_clip

    import clip_lens
    from clip_lens.model import random_model_pair

    if pretrained is None:
        return random_model_pair(model_name, seed)
    oc = open_clip.create_model(model_name, pretrained=pretrained).eval()
    return oc, clip_lens.HookedCLIP.from_open_clip(oc, tokenizer=open_clip.get_tokenizer(model_name), name=model_name)


def cmd_check(args: argparse.Namespace) -> int:
    """Build a model both ways and report how far clip_lens is from open_clip's own forward pass."""
    start = time.perf_counter()
    oc, model = _load_pair(args.model, args.pretrained, args.seed)
    size = model.vision.cfg.image_size
    pixels = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    full_tokens = model.to_tokens(CHECK_SENTENCES, trim=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = (oc.encode_text(full_tokens), oc.encode_image(pixels), oc.get_logits(pixels, full_tokens)[0])
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = model.to_tokens(CHECK_SENTENCES)
        ours = (model.encode_text(tokens), model.encode_image(pixels), model(text=tokens, image=pixels))
        t_ours = time.perf_counter() - t0
        _, cache = model.run_with_cache(text=tokens, image=pixels)
    print(f"clip_lens check: {args.model} ({'pretrained=' + args.pretrained if args.pretrained else 'random weights, perturbed'})")
    text_cfg, vision_cfg = model.text.cfg, model.vision.cfg
    print(f"  text tower:   {text_cfg.n_layers} layers x {text_cfg.n_heads} heads, d_model {text_cfg.d_model}, act {text_cfg.act_fn}")
    print(f"  vision tower: {vision_cfg.n_layers} layers x {vision_cfg.n_heads} heads, d_model {vision_cfg.d_model}, "
          f"patches {vision_cfg.n_patches}")
    worst = 0.0
    for label, a, b in zip(("text embeddings", "image embeddings", "logits"), ours, ref):
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        print(f"  max |clip_lens - open_clip| {label:<17} {diff:.2e}")
    print(f"  hook points cached: {len(cache.keys())} (text {sum(k.startswith('text.') for k in cache.keys())}, "
          f"vision {sum(k.startswith('vision.') for k in cache.keys())})")
    print(f"  forward time: open_clip {t_ref:.2f}s, clip_lens {t_ours:.2f}s (text trimmed to {tokens.shape[1]} of 77 slots)")
    ok = worst <= args.tolerance
    print(f"  parity {'OK' if ok else 'FAILED'} (tolerance {args.tolerance:g}); total {time.perf_counter() - start:.1f}s")
    return 0 if ok else 1


def load_model(model: str, pretrained: Optional[str], dtype: str = "float32", device: str = "cpu"):
    """(HookedCLIP, label) from an open_clip name (+ tag or checkpoint) or a transformers CLIP
    directory, on `device` in `dtype` (a key of DTYPES)."""
    import clip_lens
    from clip_lens import zoo

    precision = "" if dtype == "float32" else f", {dtype}"
    if Path(model).is_dir():
        hooked = clip_lens.HookedCLIP.from_huggingface(model, device=device, dtype=DTYPES[dtype])
        return hooked, f"transformers CLIP from {model}{precision}"
    hooked = clip_lens.HookedCLIP.from_pretrained(model, pretrained=pretrained, device=device, dtype=DTYPES[dtype])
    if model == zoo.NAME and pretrained is None:
        return hooked, f"{model} (the weights shipped with clip_lens{precision})"
    if pretrained is None:
        print(f"warning: {model} with random weights (no --pretrained); the results describe an untrained model",
              file=sys.stderr)
    return hooked, f"{model} ({'pretrained=' + str(pretrained) if pretrained else 'random weights'}{precision})"


def _add_model_args(parser: argparse.ArgumentParser, instances: bool = True) -> None:
    parser.add_argument("--model", default="ViT-B-32",
                        help="open_clip architecture (e.g. ViT-B-32) or a transformers CLIP directory")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--out", required=True, type=Path, help="output folder (tables and report.html)")
    if instances:
        parser.add_argument("--limit", type=int, default=None, help="use the first N instances only")
        parser.add_argument("--query-layers", type=int, nargs="*", default=None,
                            help="layers for the per-query-position view (default: the layer of the top head)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --out (refused without it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_args(parser)


def run_study(args: argparse.Namespace, study: Callable[..., dict], summary: Callable[[dict], str] = lambda t: "") -> int:
    """The steps every study command shares: seed, load the model, run `study(model, label)`,
    print its summary, and say what was written and how long it took."""
    from clip_lens.report import add_to_manifest

    torch.manual_seed(args.seed)
    model, label = load_model(args.model, args.pretrained, args.dtype, args.device)
    start = time.perf_counter()
    tables = study(model, label)
    add_to_manifest(args.out, command=["clip-lens", *args.argv], seed=args.seed, dtype=args.dtype, device=args.device,
                    seconds=round(time.perf_counter() - start, 1))
    lines = summary(tables)
    if lines:
        print(lines)
    print(f"wrote {args.out}/report.html and {len(tables)} tables in {time.perf_counter() - start:.1f}s")
    return 0



def cmd_valse_existence(args: argparse.Namespace) -> int:
    from clip_lens.experiments import negation_study

    studies = {"all": negation_study.VALSE_STUDIES, "text": negation_study.TEXT_STUDIES}.get(args.study, (args.study,))
    return run_study(args, lambda model, label: negation_study.valse_existence(
        model, label, args.valse, args.images, args.out, studies=studies, missing=args.missing_images, limit=args.limit,
        sample=args.sample, seed=args.seed, grey=args.grey, subject_size=args.clipseg, query_layers=args.query_layers,
        batch_size=args.batch_size, pair_chunk=args.pair_chunk, overwrite=args.overwrite, progress=not args.quiet),
        lambda tables: f"{tables['accuracy'].to_string(index=False)}\n"
                       f"{len(tables['instances'])} instances, {len(tables['excluded'])} excluded")


def cmd_cannot(args: argparse.Namespace) -> int:
    from clip_lens.experiments import negation_study

    return run_study(args, lambda model, label: negation_study.cannot_negator_attention(
        model, label, args.cannot, args.out, spacy_model=args.spacy_model, limit=args.limit,
        query_layers=args.query_layers, overwrite=args.overwrite, progress=not args.quiet),
        lambda tables: f"{tables['selection'].to_string(index=False)}\n"
                       f"{tables['negator_heads'].head(5).to_string(index=False)}")


def cmd_attention_cancellation(args: argparse.Namespace) -> int:
    from clip_lens.experiments import vision_study

    def study(model, label: str) -> dict:
        captioner = None if args.captioner is None else load_captioner(args.captioner, model, args.seed)
        return vision_study.attention_cancellation_study(
            model, label, args.out, images=args.images, captions=args.captions, labels=args.labels,
            settings=args.settings, map_images=args.map_images, captioner=captioner, caption_image=args.caption_image,
            beams=args.beams, overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        text = tables["summary"].to_string(index=False)
        if "captions_by_setting" in tables:
            text += "\n" + tables["captions_by_setting"].to_string(index=False)
        return text

    return run_study(args, study, summary)


def load_captioner(source: str, model, seed: int = 0):
    """--captioner: "random" (an untrained prefix captioner for this CLIP), the shipped
    clip_lens/tiny-shapes-captioner, a prefix captioner's file or a Hugging Face directory."""
    from clip_lens.captioning import load_captioner as load
    from clip_lens.captioning.train import random_captioner

    if source == "random":
        return random_captioner(model.vision.cfg.d_embed, seed).to(model.device)
    return load(source, device=model.device)


def cmd_attribution(args: argparse.Namespace) -> int:
    from clip_lens.experiments import attribution_study

    def summary(tables: dict) -> str:
        reliance = tables["reliance"]
        return (f"{tables['deletion_areas'].to_string(index=False)}\n{int(reliance['unexpected'].sum())} of "
                f"{len(reliance)} relied-on latents are unexpected (low alignment with their class)")

    return run_study(args, lambda model, label: attribution_study.attribution_study(
        model, label, args.out, images=args.images, captions=args.captions, labels=args.labels, tower=args.tower,
        sae=args.sae, sae_hook=args.sae_hook, sae_latents=args.sae_latents, sae_k=args.sae_k, sae_steps=args.sae_steps,
        ks=args.ks, concept_template=args.concept_template, limit=args.limit, seed=args.seed, overwrite=args.overwrite,
        progress=not args.quiet),
        summary)


def cmd_circuit(args: argparse.Namespace) -> int:
    from clip_lens.data.image_sets import open_image_set
    from clip_lens.experiments import circuit_study

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: EAP-IG needs m >= 1 interpolation steps")
    for option in ("check", "pair_chunk", "random"):
        if getattr(args, option) < (0 if option == "random" else 1):
            raise ValueError(f"--{option.replace('_', '-')} {getattr(args, option)}: give a positive number")

    def study(model, label: str) -> dict:
        if args.tower == "text" and args.pairs is not None:
            task = circuit_study.text_pairs_from_file(model, args.pairs, args.images, limit=args.limit)
        elif args.tower == "text" and args.valse is not None:
            if args.images is None:
                raise ValueError("--valse needs --images (the folder with the instances' image files)")
            task = circuit_study.negation_valse(model, args.valse, args.images, limit=args.limit, progress=not args.quiet)
        elif args.tower == "text":
            task = circuit_study.negation_scenes(model, n=args.scenes, seed=args.scene_seed)
        else:
            images = open_image_set(args.images, args.captions, args.labels, args.out / "sample_images")
            labelled = images.targets >= 0
            if not labelled.any():
                raise ValueError(f"no image in {images.source} has a label naming one of the captions")
            frame = images.frame[labelled].head(args.limit) if args.limit else images.frame[labelled]
            captions = [images.captions[t] for t in images.targets[labelled][: len(frame)]]
            task = circuit_study.images_against_mean_colour(model, list(frame["image"]), captions, args.corrupt)
        return circuit_study.circuit_study(
            model, label, args.out, task, steps=args.steps, path=args.path, check=args.check, sizes=args.sizes,
            n_random=args.random, selection=args.selection, signed=args.signed, pair_chunk=args.pair_chunk,
            seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        row = tables["summary"].iloc[0]
        agreement = tables["agreement"].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        return (f"circuit: {row['circuit_edges']} of {row['edges']:,} edges, faithfulness "
                f"{row['circuit_faithfulness']:.3f} (random circuits of its size: {row['random_faithfulness']:.3f})\n"
                f"against exact edge patching:\n{agreement}")

    return run_study(args, study, summary)


def cmd_compare_tasks(args: argparse.Namespace) -> int:
    from clip_lens.experiments import compare_tasks

    def study(model, label: str) -> dict:
        tasks = compare_tasks.build_tasks(
            model, valse=args.valse, pieces=args.pieces, cannot=args.cannot, pairs_files=args.pairs or (),
            images=args.images, generated_images=args.generated_images, limit=args.limit,
            spacy_model=args.spacy_model, seed=args.seed, progress=not args.quiet)
        images = "generated noise images" if args.generated_images else f"images from {args.images}"
        description = (f"{len(tasks)} tasks: " + ", ".join(f"{t.name} ({len(t.pairs)} pairs)" for t in tasks)
                       + f"; VALSE scored against {images}" * (args.valse is not None))
        return compare_tasks.compare_tasks(model, label, args.out, tasks, top_k=args.top_k, description=description,
                                           overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        top = tables["selectivity"].sort_values("a_N", ascending=False).groupby("task", sort=False).head(1)
        return "most selective head per task:\n" + top[["task", "layer", "head", "a_N"]].to_string(index=False)

    return run_study(args, study, summary)


def cmd_pairs(args: argparse.Namespace) -> int:
    from clip_lens.experiments import pairs_study

    def study(model, label: str) -> dict:
        return pairs_study.pairs_study(model, label, args.out, args.pairs, studies=args.study, images=args.images,
                                       top_k=args.top_k, choose=args.choose, alphas=args.alphas, limit=args.limit,
                                       overwrite=args.overwrite, progress=not args.quiet)

    def summary(tables: dict) -> str:
        lines = []
        if "heads" in tables:
            top = tables["heads"].groupby("task", sort=False).head(1)
            lines.append("most selective head per file:\n" + top[["task", "layer", "head", "a_N"]].to_string(index=False))
        if "ablation" in tables:
            ablation = tables["ablation"]
            lines.append(ablation[ablation["alpha"] == 0.0].groupby(["task", "condition"], sort=False)["accuracy"]
                         .mean().reset_index().to_string(index=False))
        return "\n".join(lines)

    return run_study(args, study, summary)


def cmd_covariates(args: argparse.Namespace) -> int:
    from clip_lens.experiments import covariates

    def summary(tables: dict) -> str:
        return (tables["grid"].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n"
                + tables["effects"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    return run_study(args, lambda model, label: covariates.covariate_study(
        model, label, args.out, n_per_cell=args.scenes, seed=args.seed, overwrite=args.overwrite), summary)


def cmd_train_tiny(args: argparse.Namespace) -> int:
    from clip_lens import tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    model, report = tiny.train(steps=args.steps, seed=args.seed, lr=args.lr, progress=not args.quiet, out=args.out)
    import clip_lens

    hooked = clip_lens.HookedCLIP.from_pretrained(tiny.register(), pretrained=args.out)
    accuracy = tiny.evaluate(hooked)
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min (final loss {report.final_loss:.3f}); "
          f"wrote {args.out}")
    print(f"held-out existence accuracy {accuracy['accuracy']:.3f} (negation in caption "
          f"{accuracy['negation_in_caption']:.3f}, in foil {accuracy['negation_in_foil']:.3f}; {accuracy['pairs']} pairs)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep spec; exit 1 when a task failed (the summary names each one)."""
    from clip_lens import sweep

    executor = "ray" if args.ray or args.ray_address else "local"
    result = sweep.run(args.spec, executor, ray_address=args.ray_address, workers=args.workers, progress=not args.quiet)
    print(result.summary())
    if result.report is not None:
        print(f"report: {result.report}")
    return 0 if result.ok else 1


def cmd_train_captioner(args: argparse.Namespace) -> int:
    import clip_lens
    from clip_lens import tiny
    from clip_lens.captioning import PrefixCaptioner, train

    if args.threads:
        torch.set_num_threads(args.threads)
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME)
    _, report = train.train(model, steps=args.steps, seed=args.seed, n_scenes=args.scenes, lr=args.lr,
                            progress=not args.quiet, out=args.out)
    result = train.evaluate(PrefixCaptioner.load(args.out), model)
    print(f"trained {report.steps} steps in {report.seconds / 60:.1f} min (final loss {report.final_loss:.4f}); "
          f"wrote {args.out}")
    print(f"held-out one-shape scenes ({result['scenes']}, seed {train.EVAL_SEED}): {result['accuracy']:.1%} name the "
          f"shape with its colour (colour {result['colour']:.1%}, shape {result['shape']:.1%}; "
          f"{result['exact']:.1%} word for word)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The shipped tiny CLIP on held-out synthetic scenes: every negation study and image ablation
    (out/report.html), attention cancellation (out/attention_cancellation/) and attribution
    (out/attribution/) on one-shape scenes, and the negation circuit of the text tower (out/circuit/)."""
    import clip_lens
    from clip_lens import tiny, zoo
    from clip_lens.data.shapes import export_valse, single_shape_set
    from clip_lens.experiments import attribution_study, circuit_study, negation_study, vision_study

    start = time.perf_counter()
    model = clip_lens.HookedCLIP.from_pretrained(tiny.NAME, device=args.device, dtype=DTYPES[args.dtype])
    accuracy = tiny.evaluate(model)
    line = (f"Held-out accuracy of {tiny.NAME} ({accuracy['pairs']} synthetic existence pairs, seed {tiny.EVAL_SEED}): "
            f"{accuracy['accuracy']:.1%} overall, {accuracy['negation_in_caption']:.1%} with the negation in the "
            f"caption, {accuracy['negation_in_foil']:.1%} in the foil.")
    print(line)
    scenes = export_valse(args.out / "scenes", args.scenes, seed=args.seed)
    tables = negation_study.valse_existence(
        model, f"{tiny.NAME} (a tiny CLIP trained on synthetic shape scenes, shipped with clip_lens)", scenes,
        args.out / "scenes" / "images", args.out, preface=[line], overwrite=True, progress=not args.quiet)
    loc = tables["causal_tracing_localisation"]
    correct = loc[loc["segment"] == "correct"].groupby("layer")["localisation"].max()
    print(tables["accuracy"].to_string(index=False))
    print("causal-tracing localisation of the correct segment by layer: "
          + ", ".join(f"{layer}: {value:.3f}" for layer, value in correct.items()))
    images, captions = single_shape_set(args.out / "single_shapes" / "images")
    cancel = vision_study.attention_cancellation_study(
        model, f"{tiny.NAME}", args.out / "attention_cancellation", images=images, captions=captions,
        captioner=load_captioner(zoo.CAPTIONER_NAME, model), overwrite=True, progress=not args.quiet)
    table = cancel["summary"].set_index("setting")
    print(f"attention cancellation on one-shape scenes: baseline accuracy {table.loc['baseline', 'accuracy']:.3f}; "
          f"generated captions' mean cosine {table.loc['baseline', 'mean_generated_cosine']:.3f} at baseline, "
          + ", ".join(f"{setting} {value:.3f}" for setting, value in table["mean_generated_cosine"].iloc[1:].items())
          + f" with attention cancelled; report {args.out}/attention_cancellation/report.html")
    attr = attribution_study.attribution_study(
        model, f"{tiny.NAME}", args.out / "attribution", images=images, captions=captions,
        concept_template="There is a {}.", sae_latents=64, sae_k=4, ks=(0, 1, 2, 4, 8), overwrite=True,
        progress=not args.quiet)
    areas = attr["deletion_areas"].set_index("method")["area"]
    print("attribution on one-shape scenes, area under the deletion curves (smaller = more faithful): "
          + ", ".join(f"{method} {area:.3f}" for method, area in areas.items())
          + f"; report {args.out}/attribution/report.html")
    circuit = circuit_study.circuit_study(
        model, f"{tiny.NAME}", args.out / "circuit", circuit_study.negation_scenes(model, n=64, seed=args.seed),
        overwrite=True, progress=not args.quiet)["summary"].iloc[0]
    print(f"negation circuit in the text tower: {circuit['circuit_edges']} of {circuit['edges']} edges carry "
          f"{circuit['circuit_faithfulness']:.0%} of the negated-vs-plain difference (random circuits of that size "
          f"{circuit['random_faithfulness']:.0%}); report {args.out}/circuit/report.html")
    print(f"wrote {args.out}/report.html in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-lens", description="Mechanistic interpretability for CLIP.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check a model's hooked forward pass against open_clip's")
    check.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    check.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file (default: random weights)")
    check.add_argument("--images", type=int, default=2, help="random images to compare on")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tolerance", type=float, default=1e-5)
    check.set_defaults(func=cmd_check)

    valse = sub.add_parser("valse-existence", help="negation studies on VALSE existence")
    valse.add_argument("study", choices=["causal-tracing", "negator-attention", "preliminary", "image-ablation", "text", "all"],
                       help="one study, 'text' (the three text-encoder studies) or 'all' (with image ablation)")
    valse.add_argument("--valse", required=True, type=Path, help="VALSE existence.json")
    valse.add_argument("--images", required=True, type=Path, help="folder with the instances' image files")
    valse.add_argument("--missing-images", choices=["raise", "skip"], default="raise",
                       help="stop with an error on missing images (default), or skip those instances and list them")
    valse.add_argument("--sample", type=int, default=None, help="a random sample of N instances (seeded by --seed)")
    valse.add_argument("--grey", action="store_true", help="image ablation: a grey mean colour instead of per-channel")
    valse.add_argument("--batch-size", type=int, default=None,
                       help="interventions per forward pass (memory: batch x positions x d_model floats)")
    valse.add_argument("--pair-chunk", type=int, default=None,
                       help="instances whose runs are cached at a time (memory: about 2L+1 residual streams each)")
    valse.add_argument("--clipseg", default=None, help="CLIPSeg checkpoint (local path) for the subject size")
    _add_model_args(valse)
    valse.set_defaults(func=cmd_valse_existence)

    cannot = sub.add_parser("cannot", help="negation studies on CANNOT")
    cannot.add_argument("study", choices=["negator-attention"])
    cannot.add_argument("--cannot", required=True, nargs="+", type=Path,
                        help="CANNOT .tsv files (premise/hypothesis/label or sentence/negated) or folders of them")
    cannot.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for the dependency parse")
    _add_model_args(cannot)
    cannot.set_defaults(func=cmd_cannot)

    cancel = sub.add_parser("attention-cancellation", help="cancel self-attention in vision layers; attention maps")
    cancel.add_argument("--images", type=Path, default=None,
                        help="image folder (labels from labels.csv or sub-folders); default: scikit-image's sample photos")
    cancel.add_argument("--captions", type=Path, default=None, help="candidate captions, one per line ('label<TAB>caption')")
    cancel.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label (default: folder/labels.csv)")
    cancel.add_argument("--settings", default=None,
                        help="layers to cancel, 1-based, e.g. '1 2 1-3 4-6 1,5,9' (default: each layer and the study's ranges)")
    cancel.add_argument("--map-images", type=int, default=3, help="images to draw class-token attention maps for")
    cancel.add_argument("--captioner", default=None,
                        help="also generate captions from the cancelled tower: clip_lens/tiny-shapes-captioner, a prefix "
                             "captioner's .safetensors file, a Hugging Face vision-encoder-decoder directory, or 'random'")
    cancel.add_argument("--beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    cancel.add_argument("--caption-image", type=int, default=0,
                        help="the image (index in the set) whose captions per setting the report tabulates")
    _add_model_args(cancel, instances=False)
    cancel.set_defaults(func=cmd_attention_cancellation)

    attr = sub.add_parser("attribution", help="attribute scores to heads, neurons, positions and SAE latents; "
                                              "Logit Lens and its faithfulness")
    attr.add_argument("--images", type=Path, default=None,
                      help="image folder (labels from labels.csv or sub-folders); default: scikit-image's sample photos")
    attr.add_argument("--captions", type=Path, default=None, help="one 'label<TAB>caption' per line: each image is scored "
                                                                    "against its label's caption")
    attr.add_argument("--labels", type=Path, default=None, help="CSV with columns image, label (default: folder/labels.csv)")
    attr.add_argument("--tower", choices=["vision", "text"], default="vision", help="the encoder whose components are attributed")
    attr.add_argument("--sae", type=Path, default=None, help="a saved TopKSAE (default: train one on the study's activations)")
    attr.add_argument("--sae-hook", default=None, help="hook the SAE reads (default: blocks.<L-1>.hook_resid_post)")
    attr.add_argument("--sae-latents", type=int, default=256)
    attr.add_argument("--sae-k", type=int, default=16)
    attr.add_argument("--sae-steps", type=int, default=1500)
    attr.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32],
                      help="numbers of heads removed along the deletion curves")
    attr.add_argument("--concept-template", default="a photo of a {}.", help="text for a class name in latent alignment")
    attr.add_argument("--limit", type=int, default=None, help="use the first N labelled images only")
    _add_model_args(attr, instances=False)
    attr.set_defaults(func=cmd_attribution)

    demo = sub.add_parser("demo", help="the shipped tiny CLIP on synthetic scenes: negation studies and a report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--scenes", type=int, default=400, help="held-out scenes to study (default 400)")
    demo.add_argument("--seed", type=int, default=20_000, help="seed of the scenes")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_args(demo)
    demo.set_defaults(func=cmd_demo)

    circuit = sub.add_parser("circuit", help="circuits in one tower: EAP / EAP-IG edge scores, exact edge patching, "
                                             "faithfulness curves and the circuit drawn")
    circuit.add_argument("tower", choices=["text", "vision"],
                         help="text: negated against non-negated sentences; vision: images against their mean colour")
    circuit.add_argument("--valse", type=Path, default=None,
                         help="text: VALSE existence.json (default: held-out synthetic scenes)")
    circuit.add_argument("--pairs", type=Path, default=None,
                         help="text: your own minimal pairs, a CSV or JSONL file with columns caption, foil, image "
                              "(the caption is the clean run)")
    circuit.add_argument("--corrupt", type=Path, default=None,
                         help="vision: a folder with a corrupted image of the same file name for each image "
                              "(default: each image's mean colour)")
    circuit.add_argument("--images", type=Path, default=None,
                         help="text with --valse or --pairs: the image folder; vision: an image folder "
                              "(default: scikit-image's sample photos)")
    circuit.add_argument("--captions", type=Path, default=None, help="vision: one 'label<TAB>caption' per line")
    circuit.add_argument("--labels", type=Path, default=None, help="vision: CSV with columns image, label")
    circuit.add_argument("--scenes", type=int, default=64, help="text without --valse: synthetic scenes (default 64)")
    circuit.add_argument("--scene-seed", type=int, default=20_000, help="seed of the synthetic scenes")
    circuit.add_argument("--limit", type=int, default=None, help="use the first N instances only")
    circuit.add_argument("--steps", type=int, default=5, help="EAP-IG's interpolation steps m (default 5)")
    circuit.add_argument("--path", choices=["inputs", "activations"], default="inputs",
                         help="EAP-IG's path: along the input, or along each sender group's output")
    circuit.add_argument("--check", type=int, default=50,
                         help="top edges of each method checked against exact edge patching (default 50)")
    circuit.add_argument("--sizes", type=int, nargs="+", default=None,
                         help="circuit sizes of the faithfulness curve (default 1, 2, 5, 10, ... every edge)")
    circuit.add_argument("--random", type=int, default=5, help="random circuits per size (default 5)")
    circuit.add_argument("--selection", choices=["paths", "greedy", "top"], default="paths",
                         help="how circuits are chosen from the scores (default: strongest input-to-output paths)")
    circuit.add_argument("--signed", action="store_true",
                         help="rank edges by the part of their score that moves the metric towards the corrupted run")
    circuit.add_argument("--pair-chunk", type=int, default=32, help="pairs per forward pass (default 32)")
    _add_model_args(circuit, instances=False)
    circuit.set_defaults(func=cmd_circuit)

    compare = sub.add_parser("compare-tasks", help="minimal-pair tasks side by side: selective heads, causal-tracing "
                                                   "localisation, head ablation")
    compare.add_argument("--valse", type=Path, default=None, help="the folder with VALSE's pieces (<piece>.json)")
    compare.add_argument("--pieces", nargs="+", default=None, help="VALSE pieces to use (default: all eleven)")
    compare.add_argument("--cannot", nargs="+", type=Path, default=None, help="CANNOT .tsv files or folders")
    compare.add_argument("--pairs", nargs="+", type=Path, default=None,
                         help="your own minimal pairs: CSV or JSONL files with columns caption, foil (and image)")
    compare.add_argument("--images", type=Path, default=None, help="the folder with VALSE's image files")
    compare.add_argument("--generated-images", action="store_true",
                         help="score VALSE against generated noise images (to run without the image set)")
    compare.add_argument("--limit", type=int, default=None, help="use the first N pairs of each task")
    compare.add_argument("--top-k", type=int, default=3, help="each task's most selective heads to ablate (default 3)")
    compare.add_argument("--spacy-model", default="en_core_web_sm", help="spaCy pipeline for CANNOT's parse")
    _add_model_args(compare, instances=False)
    compare.set_defaults(func=cmd_compare_tasks)

    pairs = sub.add_parser("pairs", help="the text studies on your minimal pairs: causal tracing, selective heads, "
                                         "head ablation")
    pairs.add_argument("study", choices=["causal-tracing", "heads", "ablate-heads", "all"])
    pairs.add_argument("--pairs", required=True, nargs="+", type=Path,
                       help="CSV or JSONL files with columns caption, foil, image (and id)")
    pairs.add_argument("--images", type=Path, default=None, help="the folder the image paths are relative to")
    pairs.add_argument("--top-k", type=int, default=3, help="heads to ablate (default 3)")
    pairs.add_argument("--choose", choices=["selectivity", "attribution"], default="selectivity",
                       help="choose the heads by selectivity or by attribution patching (default selectivity)")
    pairs.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.0, -1.0],
                       help="factors the chosen heads' output is scaled by (default 1 0.5 0 -1)")
    pairs.add_argument("--limit", type=int, default=None, help="use the first N pairs of each file")
    _add_model_args(pairs, instances=False)
    pairs.set_defaults(func=cmd_pairs)

    covariates = sub.add_parser("covariates", help="negation accuracy by subject size x caption length on synthetic scenes")
    covariates.add_argument("--scenes", type=int, default=100, help="scenes per subject size (default 100)")
    _add_model_args(covariates, instances=False)
    covariates.set_defaults(func=cmd_covariates)

    sweep = sub.add_parser("sweep", help="models x datasets x studies from a TOML spec; resumes; --ray for Ray")
    sweep.add_argument("spec", type=Path, help="the sweep spec (docs/sweeps.md)")
    sweep.add_argument("--ray", action="store_true", help="run the tasks on a local Ray instance started for the sweep")
    sweep.add_argument("--ray-address", default=None, help="join an existing Ray cluster ('auto' or host:port)")
    sweep.add_argument("--workers", type=int, default=None, help="with Ray: at most this many workers")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=cmd_sweep)

    train_cap = sub.add_parser("train-captioner", help="train the prefix captioner of the tiny CLIP on shape scenes")
    train_cap.add_argument("--steps", type=int, default=2000)
    train_cap.add_argument("--seed", type=int, default=0)
    train_cap.add_argument("--scenes", type=int, default=20_000, help="training scenes (embedded once)")
    train_cap.add_argument("--lr", type=float, default=1e-3)
    train_cap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    train_cap.add_argument("--out", type=Path, default=Path("tiny-shapes-captioner.safetensors"))
    train_cap.add_argument("--quiet", action="store_true", help="no progress bar")
    train_cap.set_defaults(func=cmd_train_captioner)

    train = sub.add_parser("train-tiny", help="train the tiny CLIP on synthetic shape scenes")
    train.add_argument("--steps", type=int, default=2400)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    train.add_argument("--out", type=Path, default=Path("tiny-shapes.safetensors"))
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train_tiny)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on every build
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in each study's manifest
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, RuntimeError, ValueError) as err:  # bad input: say what, not where
        if args.debug:
            raise
        print(f"clip-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
