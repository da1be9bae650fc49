"""Study "attribution": each labelled image's score with its own caption attributed to heads, MLP
neurons, positions and SAE latents; Logit Lens; the faithfulness of head rankings (deletion curves,
attribution patching next to Logit Lens and random); latent alignment with the class names and
unexpected reliance (docs/attribution.md).

`data` is an image set (`clip_lens.data.image_sets.ImageSet`, each image scored against its label's
caption), or `AttributionData` (the image set and functions handed the SAE trained in the run and
the latent browser's data, so that a front end can write them: compute writes no file; the command
line writes out/sae.safetensors and out/latents.html, the page each latent of the report links to).

Tables: instances, logit_lens, head_attributions, top_neurons, position_attributions (text tower),
deletion_curves, deletion_areas, reliance (with a `page` column, `latents.html#latent-N`, when the
browser's data was asked for), latent_attributions, sae_evaluation (`clip_lens.sae.evaluation.evaluate_sae`
on the study's images, each scored against its label's caption, with `k` and `trained` added); and
for the report images (each instance's path and the model's input size) and patch_attributions
(vision tower: attribution per position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import torch

from clip_lens.data.image_sets import ImageSet
from clip_lens.lens import logit_lens
from clip_lens.model import HookedCLIP
from clip_lens.patching import hook_name
from clip_lens.plot import head_heatmap
from clip_lens.report import Report
from clip_lens.sae import SparseAutoencoder, TopKSAE, browser_data, cache_activations, train_sae
from clip_lens.sae import load as load_any_sae
from clip_lens.sae.evaluation import evaluate_sae
from clip_lens.scores import score as clip_score
from clip_lens.studies.analyses import attention_maps
from clip_lens.studies.analyses import component_attribution as attribution
from clip_lens.studies.options import OptionError, StudyOptions, option
from clip_lens.studies.runner import Study, Tables, no_checkpoints

# tables the report is drawn from, not results of their own (the sweep leaves them out)
REPORT_TABLES = ("images", "patch_attributions")
# the latent browser's page, beside report.html (the command line writes it); the report links each latent to
# BROWSER_PAGE#latent-N
BROWSER_PAGE = "latents.html"


@dataclass(frozen=True, kw_only=True)
class Options(StudyOptions):
    tower: str = option("vision", "the encoder whose components are attributed", choices=("vision", "text"))
    sae: Optional[str] = option(None, "a saved SAE: clip_lens's path with or without .safetensors, or a SAELens folder "
                                      "(default: train a TopK SAE on the study's activations)")
    sae_hook: Optional[str] = option(None, "tower hook the SAE reads (default: the last residual, "
                                           "hook_name('resid', L, L))")
    sae_latents: int = option(256, "latents of the SAE trained here", minimum=1)
    sae_k: int = option(16, "active latents per input of the SAE trained here (at most sae_latents)", minimum=1)
    sae_steps: int = option(1500, "training steps of the SAE trained here", minimum=1)
    ks: tuple[int, ...] = option((0, 1, 2, 4, 8, 16, 32), "numbers of heads removed along the deletion curves "
                                 "(increasing)", minimum=0, min_items=2)
    concept_template: str = option("a photo of a {}.", "text for a class name in latent alignment")
    top: int = option(5, "latents per class in the reliance table", minimum=1)
    map_images: int = option(6, "images whose attribution per patch the report draws (vision tower)", minimum=0)
    limit: Optional[int] = option(None, "use the first N labelled images only", minimum=1)
    seed: int = option(0, "seed of the SAE and of the random ranking", minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(b <= a for a, b in zip(self.ks, self.ks[1:])):
            raise OptionError(f"ks={list(self.ks)!r}: give increasing numbers of heads, e.g. 0 1 2 4")
        if "{}" not in self.concept_template:
            raise OptionError(f"concept_template={self.concept_template!r}: give a text with {{}} for the class name")


# options sized to clip_lens/tiny-shapes (64-wide towers of 4 heads, captions "There is a red circle."),
# for the demo and the reproduction: Options(**TINY_CLIP)
TINY_CLIP = dict(sae_latents=64, sae_k=4, ks=(0, 1, 2, 4, 8), concept_template="There is a {}.")


@dataclass
class AttributionData:
    """The image set; `on_sae_trained(sae)`, called with the SAE the run trains (not with a loaded
    one), for a front end that saves it; and `on_browser_data(data)`, which asks for the latent
    browser (`clip_lens.sae.browser_data` over the study's images or captions, its concepts and its
    latent_attributions table) and is handed its data, for a front end that writes it as
    BROWSER_PAGE beside the report (`clip_lens.sae.write_browser`)."""

    images: ImageSet
    on_sae_trained: Optional[Callable[[TopKSAE], None]] = None
    on_browser_data: Optional[Callable[[dict], None]] = None


@dataclass
class _Inputs:
    """The instances made ready: `frame` (image, label, caption), `names` (image stems), `pixels`
    [n, 3, H, W], `tokens` [n, pos], the tower's `inputs` and the `other` modality's embedding
    [n, d_embed], the attributed `tower`, and `score` [n] (S of each image with its caption)."""

    frame: pd.DataFrame
    names: list
    pixels: torch.Tensor
    tokens: torch.Tensor
    inputs: torch.Tensor
    other: torch.Tensor
    tower: object
    score: torch.Tensor


def _labelled(image_set: ImageSet, limit: Optional[int]) -> pd.DataFrame:
    """The labelled images with their caption (image, label, caption), the first `limit`."""
    frame, targets = image_set.frame, image_set.targets
    frame = frame.assign(caption=[image_set.captions[t] if t >= 0 else None for t in targets])[targets >= 0]
    if frame.empty:
        raise ValueError(f"no image in {image_set.source} has a label with a caption")
    frame = frame.reset_index(drop=True)
    return frame.head(limit) if limit is not None else frame


def _prepare(model: HookedCLIP, image_set: ImageSet, options: Options) -> _Inputs:
    frame = _labelled(image_set, options.limit)
    pixels = model.to_pixels(list(frame["image"]))
    tokens = model.to_tokens(list(frame["caption"]))
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(tokens)
    inputs, other = (pixels, text_emb) if options.tower == "vision" else (tokens, image_emb)
    tower = model.vision if options.tower == "vision" else model.text
    score = clip_score(model, text_emb, image_emb).detach()
    return _Inputs(frame, [Path(p).stem for p in frame["image"]], pixels, tokens, inputs, other, tower, score)


def _sae_hook(tower, options: Options) -> str:
    n_layers = tower.cfg.n_layers
    return options.sae_hook or hook_name("resid", n_layers, n_layers)


def load_sae(options: Options, tower, device) -> Optional[SparseAutoencoder]:
    """The saved SAE `options.sae` (None without one; either layout, `clip_lens.sae.load`), checked
    against the tower and hook it reads; an SAE that names no hook is taken to read this one."""
    if options.sae is None:
        return None
    hook = _sae_hook(tower, options)
    sae = load_any_sae(options.sae, tower=options.tower).to(device)
    if sae.d_in != tower.cfg.d_model:
        raise ValueError(f"the SAE in {options.sae} reads {sae.d_in}-dimensional activations; {options.tower}.{hook} has "
                         f"{tower.cfg.d_model}")
    if sae.hook is not None and sae.hook != f"{options.tower}.{hook}":
        raise ValueError(f"the SAE in {options.sae} was trained on {sae.hook}, not on {options.tower}.{hook}")
    sae.hook = f"{options.tower}.{hook}"
    return sae


def compute(model: HookedCLIP, data: Union[ImageSet, AttributionData], options: Options, *, checkpoints=None,
            progress: bool = True) -> Tables:
    """The tables listed in the module docstring."""
    data = data if isinstance(data, AttributionData) else AttributionData(data)
    checkpoints = checkpoints or no_checkpoints()
    run = _prepare(model, data.images, options)
    loaded = load_sae(options, run.tower, model.device)  # before any work, so that a wrong SAE costs nothing
    tables = _scores(model, run)
    components, positions = _components(model, run, options, progress)
    tables.update(components)
    faith = attribution.faithfulness(model, run.inputs, run.other, ks=options.ks, seed=options.seed,
                                     checkpoints=checkpoints)
    tables["deletion_curves"], tables["deletion_areas"] = faith.curves, faith.areas
    latents, sae = _latents(model, run, options, loaded, data, checkpoints, progress)
    tables.update(latents)
    tables["images"] = pd.DataFrame({"instance": run.names, "image": [str(p) for p in run.frame["image"]],
                                     "height": run.pixels.shape[-2], "width": run.pixels.shape[-1]})
    if options.tower == "vision":
        tables["patch_attributions"] = _patch_table(model, run.names, positions)
    tables["sae_evaluation"] = _evaluation(model, sae, run).assign(k=getattr(sae, "k", None), trained=loaded is None)
    if data.on_browser_data is not None:
        data.on_browser_data(_browser(model, sae, run, options, tables["latent_attributions"], progress))
        tables["reliance"] = tables["reliance"].assign(page=[f"{BROWSER_PAGE}#latent-{int(latent)}"
                                                             for latent in tables["reliance"]["latent"]])
    return tables


def _scores(model: HookedCLIP, run: _Inputs) -> Tables:
    """instances (with S) and logit_lens (per layer; the last layer is the model's own score)."""
    n_layers = run.tower.cfg.n_layers
    lens = logit_lens(model, run.inputs, run.other)
    instances = run.frame.assign(image=[Path(p).name for p in run.frame["image"]], score=run.score.cpu().numpy())
    lens_table = pd.DataFrame([dict(instance=run.names[i], layer=l, score=float(lens[i, l]))
                               for i in range(len(run.names)) for l in range(n_layers + 1)])
    return {"instances": instances, "logit_lens": lens_table}


def _components(model: HookedCLIP, run: _Inputs, options: Options, progress: bool) -> tuple[Tables, torch.Tensor]:
    """(head_attributions, top_neurons and position_attributions (text tower); the attribution
    per position at layer 0, [n, pos])."""
    heads = attribution.attribution_scores(model, run.inputs, run.other)
    neurons = attribution.neuron_attributions(model, run.inputs, run.other, progress=progress)
    positions = attribution.position_attributions(model, run.inputs, run.other)[:, 0]          # [n, pos]
    tables = {"head_attributions": attribution.components_frame(heads, "head", instances=run.names),
              "top_neurons": attribution.components_frame(neurons, "neuron", top=20)}
    if options.tower == "text":
        tables["position_attributions"] = _token_table(model, run.tokens, run.names, positions)
    return tables, positions


def _latents(model: HookedCLIP, run: _Inputs, options: Options, sae: Optional[SparseAutoencoder],
             data: AttributionData, checkpoints, progress: bool) -> tuple[Tables, SparseAutoencoder]:
    """(reliance and latent_attributions, the SAE) of the loaded SAE, or of one trained on the
    study's own activations at every position."""
    hook = _sae_hook(run.tower, options)
    if sae is None:
        folder = checkpoints.folder / "sae" if checkpoints.folder is not None else None
        sae, _ = train_sae(_activations(run.tower, hook, run.inputs), n_latents=options.sae_latents,
                           k=min(options.sae_k, options.sae_latents), steps=options.sae_steps, seed=options.seed,
                           progress=progress, hook=f"{options.tower}.{hook}", checkpoint_dir=folder)
        if data.on_sae_trained is not None:
            data.on_sae_trained(sae)
    sae.eval()
    latents = attribution.latent_attributions(model, sae, hook, run.inputs, run.other)             # [n, latent]
    concepts = _concepts(run)
    alignment = attribution.latent_alignment(model, sae, options.tower, concepts, template=options.concept_template)
    reliance = attribution.unexpected_reliance(latents, run.frame["label"], alignment, concepts, top=options.top)
    table = pd.DataFrame(latents.float().cpu().numpy()).assign(instance=run.names, label=list(run.frame["label"])) \
        .melt(id_vars=["instance", "label"], var_name="latent", value_name="attribution")
    return {"reliance": reliance, "latent_attributions": table[table["attribution"] != 0]}, sae


def _concepts(run: _Inputs) -> list:
    """The class names latents are aligned with: the instances' labels, in order of appearance."""
    return list(dict.fromkeys(run.frame["label"]))


def _evaluation(model: HookedCLIP, sae: SparseAutoencoder, run: _Inputs) -> pd.DataFrame:
    """`evaluate_sae` on the study's images, each scored against its own label's caption, the
    classes of zero-shot accuracy being the distinct captions (so S_clean is the mean S of the
    instances table)."""
    captions = list(dict.fromkeys(run.frame["caption"]))
    labels = [captions.index(caption) for caption in run.frame["caption"]]
    return evaluate_sae(model, sae, images=run.pixels, labels=labels, classes=captions, template="{}")


def _browser(model: HookedCLIP, sae: SparseAutoencoder, run: _Inputs, options: Options,
             attributions: pd.DataFrame, progress: bool) -> dict:
    """The latent browser's data: the study's images (vision tower) or its distinct captions (text
    tower), each latent's best-aligned concepts (the study's class names and concept_template,
    the cosines of the reliance table) and its attribution per class."""
    inputs = ([Path(p) for p in run.frame["image"]] if options.tower == "vision"
              else list(dict.fromkeys(run.frame["caption"])))
    data = browser_data(model, sae, inputs, attributions=attributions, progress=progress)
    concepts = _concepts(run)
    cosines = attribution.latent_alignment(model, sae, options.tower, concepts, template=options.concept_template)
    values, order = cosines.cpu().topk(min(5, len(concepts)), dim=1)
    for entry, vs, cs in zip(data["latents"], values, order):
        entry["concepts"] = [{"concept": concepts[int(c)], "cosine": round(float(v), 4)} for v, c in zip(vs, cs)]
    return data


def _activations(tower, hook: str, inputs) -> torch.Tensor:
    """Activations of `hook` at every position of every input (text: up to EOT), [n_vectors, d]."""
    acts = cache_activations(tower, hook, inputs)                                  # [n, pos, d]
    own = torch.arange(acts.shape[1], device=acts.device)[None] < tower.sequence_lengths(inputs)[:, None]  # [n, pos]
    return acts[own]


def _token_table(model: HookedCLIP, tokens: torch.Tensor, names: list, positions: torch.Tensor) -> pd.DataFrame:
    """instance, position, token, attribution: one row per token up to EOT."""
    rows = []
    for i, name in enumerate(names):
        for q, tok in enumerate(model.text.to_str_tokens(tokens[i])[: int(tokens[i].argmax()) + 1]):
            rows.append(dict(instance=name, position=q, token=tok, attribution=float(positions[i, q])))
    return pd.DataFrame(rows)


def _patch_table(model: HookedCLIP, names: list, positions: torch.Tensor) -> pd.DataFrame:
    """instance, position, row, col (-1 for the class token), attribution: one row per position."""
    gh, gw = model.vision.cfg.grid_size
    n, n_pos = positions.shape
    grid = np.arange(n_pos) - 1
    return pd.DataFrame({"instance": np.repeat(np.asarray(names, dtype=object), n_pos), "position": np.tile(np.arange(n_pos), n),
                         "row": np.tile(np.where(grid >= 0, grid // gw, -1), n),
                         "col": np.tile(np.where(grid >= 0, grid % gw, -1), n),
                         "attribution": positions.float().cpu().numpy().ravel()})


# --- report --------------------------------------------------------------------------------------
def report(tables: Tables, options: Options) -> Report:
    out = Report(f"Attributing CLIP's scores to components of its {options.tower} encoder")
    images = tables["images"]
    folders = sorted({str(Path(p).parent) for p in images["image"]})
    out.section("Setup").text(
        f"Images: {folders[0] if len(folders) == 1 else f'{len(folders)} folders'} ({len(images)} labelled images). "
        f"Each image is scored against its own caption (S = logit_scale.exp() x cosine); the {options.tower} tower's "
        "components are attributed, the other modality's embedding held fixed.")
    out.text("Attribution of a component: the attribution-patching estimate of how much S drops when the component "
             "is zeroed, a . dS/da from one forward and one backward pass (docs/methods.md#component-attribution). "
             "Positive: the component supports the score.", note=True)
    out.table(tables["instances"], max_rows=40, caption="Instances and their scores")
    _lens_section(out, tables)
    _components_section(out, tables, options)
    _faithfulness_section(out, tables)
    _sae_section(out, tables, options)
    return out


def _lens_section(out: Report, tables: Tables) -> None:
    out.section("Logit Lens")
    lens = tables["logit_lens"]
    names = list(dict.fromkeys(lens["instance"]))
    scores = torch.tensor(lens["score"].to_numpy()).reshape(len(names), -1)      # [n, layer 0..L]
    out.figure(attribution.logit_lens_figure(scores, names, torch.tensor(tables["instances"]["score"].to_numpy())))
    out.text("Each layer's residual stream at the pooled position, read out through the final norm and projection. "
             "At the last layer it is the model's own score.", note=True)


def _components_section(out: Report, tables: Tables, options: Options) -> None:
    out.section("Heads, neurons and positions")
    mean_heads = tables["head_attributions"].groupby(["layer", "head"], as_index=False)["attribution"].mean()
    out.figure(head_heatmap(mean_heads, "Attribution per head (mean over instances)", value="attribution"))
    out.table(tables["top_neurons"], max_rows=20,
              caption="MLP neurons with the largest mean |attribution| (all positions; share_positive: share of "
                      "instances where it supports S)")
    if options.tower == "text":
        out.table(tables["position_attributions"], max_rows=60, caption="Attribution per token (input x gradient at layer 0)")
        return
    patches, images = tables["patch_attributions"], tables["images"]
    shown = images.head(options.map_images)
    views, maps = [], []
    for row in shown.itertuples(index=False):
        own = patches[(patches["instance"] == row.instance) & (patches["row"] >= 0)]
        views.append(attention_maps.view_of_file(row.image, (int(row.height), int(row.width))))
        maps.append(torch.tensor(own["attribution"].to_numpy()).reshape(own["row"].max() + 1, own["col"].max() + 1))
    out.figure(attribution.position_map_figure(views, torch.stack(maps) if maps else torch.zeros(0, 1, 1),
                                               list(shown["instance"])))
    class_token = patches.loc[patches["row"] < 0, "attribution"]
    out.text(f"Class token (position 0): mean attribution {float(class_token.mean()):.4f}.", note=True)


def _faithfulness_section(out: Report, tables: Tables) -> None:
    out.section("Faithfulness: deletion curves")
    out.figure(attribution.Faithfulness(tables["deletion_curves"], tables["deletion_areas"], {}).figure())
    out.table(tables["deletion_areas"],
              caption="Area under each deletion curve (mean S per unit of k; smaller = the score falls faster)")
    out.text("The top-k heads of each instance's ranking are zeroed together (exact runs) and S is recorded. Logit "
             "Lens ranks heads by their direct effect only; attribution patching includes what later layers do "
             "with a head's output.", note=True)


EVALUATION_SHOWN = ["vectors", "explained_variance", "l0", "dead_fraction", "dense_fraction", "S_clean", "S_recovered",
                    "accuracy_clean", "accuracy_recovered"]


def _sae_section(out: Report, tables: Tables, options: Options) -> None:
    out.section("Sparse-autoencoder latents")
    sae = tables["sae_evaluation"].iloc[0]
    origin = ("trained here on the study's own activations at every position (the command line saves it as "
              "sae.safetensors)") if bool(sae["trained"]) else f"loaded from {options.sae}"
    k = f", k = {float(sae['k']):g}" if pd.notna(sae["k"]) else ""
    out.text(f"{sae['architecture']} SAE on {sae['hook']}: {int(sae['n_latents'])} latents{k}, {origin}. "
             "Latent attributions are taken at the pooled position (class token / EOT).")
    out.table(tables["sae_evaluation"][EVALUATION_SHOWN],
              caption="SAE evaluation on the study's images, each scored against its label's caption")
    out.text("How to read it: explained variance (1 at best) and L0 (active latents per vector) say how well and how "
             "sparsely the SAE reconstructs the hook's activations; dead latents never fire and dense ones fire on "
             "more than 10% of vectors; S and accuracy recovered are 1 when the reconstruction, spliced in place of "
             "the activation, keeps the clean score and zero-shot accuracy (over the captions), and 0 when it does "
             "no better than zeroing the activation (docs/methods.md#evaluating-an-sae).", note=True)
    out.figure(attribution.reliance_figure(tables["reliance"]))
    caption = ("Per class, the latents with the largest mean attribution; alignment = cosine of the decoder direction "
               "(through the final norm's linear part and the projection) with the class name's text embedding; "
               "unexpected = less aligned with the class than the median latent")
    if "page" in tables["reliance"]:
        out.table(tables["reliance"], max_rows=60, links={"latent": "page"},
                  caption=caption + f"; each latent links to its page in the latent browser ({BROWSER_PAGE})")
    else:
        out.table(tables["reliance"], max_rows=60, caption=caption)


STUDY = Study("attribution", Options, compute, report,
              data="an image set (clip_lens.data.image_sets.ImageSet) or AttributionData (the set and functions "
                   "handed the SAE trained in the run and the latent browser's data)")
