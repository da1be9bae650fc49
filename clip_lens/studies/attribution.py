"""The attribution study end to end, as `clip-lens attribution` runs it: attributions of each image's
score with its own caption to heads, MLP neurons, positions and SAE latents; Logit Lens; the
faithfulness of head rankings (deletion curves, attribution patching next to Logit Lens and random);
latent alignment with the class names and unexpected reliance. Writes tables and one HTML report.
With no image folder, scikit-image's sample photos are the demo set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import torch

from clip_lens.checkpoints import claim_resumable_output, weights_fingerprint
from clip_lens.data.image_sets import open_image_set
from clip_lens.lens import logit_lens
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name
from clip_lens.plot import head_heatmap
from clip_lens.report import Report, write_study
from clip_lens.sae import TopKSAE, cache_activations, sae_statistics, train_sae
from clip_lens.scores import score as clip_score
from clip_lens.studies.analyses import attention_maps
from clip_lens.studies.analyses import component_attribution as attribution

PathLike = Union[str, Path]


def _image_set(out: Path, images: Optional[PathLike], captions: Optional[PathLike], labels: Optional[PathLike]):
    """(frame of labelled images: image, label, caption; description of the source)."""
    image_set = open_image_set(images, captions, labels, out / "sample_images")
    frame, targets, source = image_set.frame, image_set.targets, image_set.source
    frame = frame.assign(caption=[image_set.captions[t] if t >= 0 else None for t in targets])[targets >= 0]
    if frame.empty:
        raise ValueError(f"no image in {source} has a label with a caption")
    return frame.reset_index(drop=True), source


def _activations(tower, hook: str, inputs) -> torch.Tensor:
    """Activations of `hook` at every position of every input (text: up to EOT), [n_vectors, d]."""
    acts = cache_activations(tower, hook, inputs)                                  # [n, pos, d]
    own = torch.arange(acts.shape[1], device=acts.device)[None] < tower.sequence_lengths(inputs)[:, None]  # [n, pos]
    return acts[own]


def attribution_study(model: HookedCLIP, model_label: str, out: PathLike, *, images: Optional[PathLike] = None,
                      captions: Optional[PathLike] = None, labels: Optional[PathLike] = None, tower: str = "vision",
                      sae: Optional[PathLike] = None, sae_hook: Optional[str] = None, sae_latents: int = 256,
                      sae_k: int = 16, sae_steps: int = 1500, ks: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
                      concept_template: str = "a photo of a {}.", top: int = 5, map_images: int = 6,
                      limit: Optional[int] = None, seed: int = 0, overwrite: bool = False,
                      progress: bool = True) -> dict[str, pd.DataFrame]:
    """Run the study on each labelled image and its caption, and write `out/`: the tables as CSV, the
    SAE (out/sae.safetensors + .json, when trained here) and report.html. Returns the tables.

    Args:
        tower: "vision" (attribute S to the image encoder's components, the caption embedding
            fixed) or "text" (the caption encoder's, the image embedding fixed).
        sae: a saved TopKSAE (path without suffix or .safetensors); without it one is trained on
            the study's own activations of `sae_hook` at every position (`sae_latents`, `sae_k`,
            `sae_steps`).
        sae_hook: tower hook the SAE reads (default: the last residual, blocks.<L-1>.hook_resid_post).
        ks: numbers of heads removed along the deletion curves.
        concept_template: how a class name is put to the text tower for latent alignment.
        limit: use the first N labelled images only.
    """
    if tower not in ("vision", "text"):
        raise ValueError(f"tower={tower!r}: use 'vision' or 'text'")
    identity = dict(study="attribution", tower=tower, model=model_label, dtype=str(model.dtype), device=str(model.device),
                    weights=weights_fingerprint(model), images=images,
                    captions=captions, labels=labels, sae=sae, sae_hook=sae_hook, sae_latents=sae_latents, sae_k=sae_k,
                    sae_steps=sae_steps, ks=list(ks), limit=limit, seed=seed)
    checkpoints = claim_resumable_output(out, identity, overwrite=overwrite)
    out = Path(out)
    frame, source = _image_set(out, images, captions, labels)
    if limit is not None:
        frame = frame.head(limit)
    pixels = model.to_pixels(list(frame["image"]))
    tokens = model.to_tokens(list(frame["caption"]))
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(tokens)
    inputs, other = (pixels, text_emb) if tower == "vision" else (tokens, image_emb)
    blocks = model.vision if tower == "vision" else model.text
    n_layers = blocks.cfg.n_layers
    names = [Path(p).stem for p in frame["image"]]
    hook = sae_hook or hook_name("resid", n_layers, n_layers)
    if sae is not None:  # checked before any work, so that a wrong SAE costs nothing
        sae_model, trained = TopKSAE.load(Path(sae).with_suffix("")).to(model.device), False
        if sae_model.d_in != blocks.cfg.d_model:
            raise ValueError(f"the SAE in {sae} reads {sae_model.d_in}-dimensional activations; {tower}.{hook} has "
                             f"{blocks.cfg.d_model}")
        if sae_model.hook is not None and sae_model.hook != f"{tower}.{hook}":
            raise ValueError(f"the SAE in {sae} was trained on {sae_model.hook}, not on {tower}.{hook}")
    score = clip_score(model, text_emb, image_emb).detach()

    # Logit Lens per layer; the last layer is the model's own score
    lens = logit_lens(model, inputs, other)
    tables = {"instances": frame.assign(image=[Path(p).name for p in frame["image"]], score=score.cpu().numpy())}
    tables["logit_lens"] = pd.DataFrame([dict(instance=names[i], layer=l, score=float(lens[i, l]))
                                         for i in range(len(names)) for l in range(n_layers + 1)])

    # attributions per head, neuron and position
    heads = attribution.attribution_scores(model, inputs, other)
    tables["head_attributions"] = attribution.components_frame(heads, "head", instances=names)
    neurons = attribution.neuron_attributions(model, inputs, other, progress=progress)
    tables["top_neurons"] = attribution.components_frame(neurons, "neuron", top=20)
    positions = attribution.position_attributions(model, inputs, other)[:, 0]          # [n, pos]
    if tower == "text":
        tables["position_attributions"] = _token_table(model, tokens, names, positions)

    # faithfulness of the head rankings
    faith = attribution.faithfulness(model, inputs, other, ks=ks, seed=seed, checkpoints=checkpoints)
    tables["deletion_curves"], tables["deletion_areas"] = faith.curves, faith.areas

    # SAE latents: attribution, alignment with the class names, unexpected reliance
    acts = _activations(blocks, hook, inputs)
    if sae is None:
        sae_model, _ = train_sae(acts, n_latents=sae_latents, k=min(sae_k, sae_latents), steps=sae_steps, seed=seed,
                                 progress=progress, hook=f"{tower}.{hook}", checkpoint_dir=checkpoints.folder / "sae")
        sae_model.save(out / "sae")
        trained = True
    stats = sae_statistics(sae_model, acts)
    latents = attribution.latent_attributions(model, sae_model, hook, inputs, other)             # [n, latent]
    concepts = list(dict.fromkeys(frame["label"]))
    alignment = attribution.latent_alignment(model, sae_model, tower, concepts, template=concept_template)
    tables["reliance"] = attribution.unexpected_reliance(latents, frame["label"], alignment, concepts, top=top)
    tables["latent_attributions"] = pd.DataFrame(latents.float().cpu().numpy()).assign(instance=names, label=list(frame["label"])) \
        .melt(id_vars=["instance", "label"], var_name="latent", value_name="attribution")
    tables["latent_attributions"] = tables["latent_attributions"][tables["latent_attributions"]["attribution"] != 0]

    run = _Run(model, model_label, source, tower, frame, names, pixels, score, lens, positions, faith, hook,
               sae_model, trained, stats)
    write_study(out, tables, _report(run, tables, map_images),
                manifest={"study": f"attribution ({tower} tower)", "model": model_label, "seed": seed, "limit": limit,
                          "data": {"images": source, "captions": captions, "labels": labels, "sae": sae},
                          "instances": checkpoints.summary()})
    checkpoints.finish()
    return tables


def _token_table(model: HookedCLIP, tokens: torch.Tensor, names: list, positions: torch.Tensor) -> pd.DataFrame:
    """instance, position, token, attribution: one row per token up to EOT."""
    rows = []
    for i, name in enumerate(names):
        for q, tok in enumerate(model.text.to_str_tokens(tokens[i])[: int(tokens[i].argmax()) + 1]):
            rows.append(dict(instance=name, position=q, token=tok, attribution=float(positions[i, q])))
    return pd.DataFrame(rows)


@dataclass
class _Run:
    """What the report is written from (besides the tables)."""

    model: HookedCLIP
    model_label: str
    source: str                  # where the images came from
    tower: str
    frame: pd.DataFrame          # image, label, caption per instance
    names: list
    pixels: torch.Tensor         # [n, 3, H, W]
    score: torch.Tensor          # [n], S of each image with its caption
    lens: torch.Tensor           # [n, layer 0..L], Logit Lens
    positions: torch.Tensor      # [n, pos], attribution per position at layer 0
    faith: attribution.Faithfulness
    hook: str
    sae: TopKSAE
    sae_trained: bool
    sae_stats: dict


def _report(run: _Run, tables: dict, map_images: int) -> Report:
    model, tower, frame, names, positions = run.model, run.tower, run.frame, run.names, run.positions
    report = Report(f"Attributing CLIP's scores to components of its {tower} encoder")
    report.section("Setup").text(
        f"Model: {run.model_label}. Images: {run.source} ({len(frame)} labelled images). Each image is scored against its own "
        f"caption (S = logit_scale.exp() x cosine); the {tower} tower's components are attributed, the other "
        f"modality's embedding held fixed.")
    report.text("Attribution of a component: the attribution-patching estimate of how much S drops when the component "
                "is zeroed, a . dS/da from one forward and one backward pass (docs/methods.md#component-attribution). Positive: the component "
                "supports the score.", note=True)
    report.table(tables["instances"], max_rows=40, caption="Instances and their scores")

    report.section("Logit Lens")
    report.figure(attribution.logit_lens_figure(run.lens, names, run.score))
    report.text("Each layer's residual stream at the pooled position, read out through the final norm and projection. "
                "At the last layer it is the model's own score.", note=True)

    report.section("Heads, neurons and positions")
    mean_heads = tables["head_attributions"].groupby(["layer", "head"], as_index=False)["attribution"].mean()
    report.figure(head_heatmap(mean_heads, "Attribution per head (mean over instances)", value="attribution"))
    report.table(tables["top_neurons"], max_rows=20,
                 caption="MLP neurons with the largest mean |attribution| (all positions; share_positive: share of instances where it supports S)")
    if tower == "vision":
        grid = model.vision.cfg.grid_size
        shown = min(map_images, len(frame))
        maps = positions[:shown, 1:].reshape(shown, *grid)
        report.figure(attribution.position_map_figure([attention_maps.model_view(model, run.pixels[i]) for i in range(shown)],
                                                      maps, [names[i] for i in range(shown)]))
        report.text(f"Class token (position 0): mean attribution {float(positions[:, 0].mean()):.4f}.", note=True)
    else:
        report.table(tables["position_attributions"], max_rows=60, caption="Attribution per token (input x gradient at layer 0)")

    report.section("Faithfulness: deletion curves")
    report.figure(run.faith.figure())
    report.table(run.faith.areas, caption="Area under each deletion curve (mean S per unit of k; smaller = the score falls faster)")
    report.text("The top-k heads of each instance's ranking are zeroed together (exact runs) and S is recorded. Logit "
                "Lens ranks heads by their direct effect only; attribution patching includes what later layers do "
                "with a head's output.", note=True)

    report.section("Sparse-autoencoder latents")
    origin = "trained here on the study's own activations at every position (saved as sae.safetensors)" if run.sae_trained else "loaded"
    report.text(f"TopK SAE on {tower}.{run.hook}: {run.sae.n_latents} latents, k = {run.sae.k}, {origin}. "
                "Latent attributions are taken at the pooled position (class token / EOT).")
    report.table(pd.DataFrame([run.sae_stats]), caption="SAE statistics on the study's activations")
    report.figure(attribution.reliance_figure(tables["reliance"]))
    report.table(tables["reliance"], max_rows=60,
                 caption="Per class, the latents with the largest mean attribution; alignment = cosine of the decoder "
                         "direction (through the final norm's linear part and the projection) with the class name's text "
                         "embedding; unexpected = less aligned with the class than the median latent")
    return report
