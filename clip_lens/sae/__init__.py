"""Sparse autoencoders on CLIP's activations (docs/sae.md; docs/methods.md#sparse-autoencoders).

    acts = cache_activations(model, "vision.blocks.11.hook_resid_post", pixels, position=0)  # [N, d_model]
    sae, history = train_sae(acts, n_latents=4096, k=32, steps=5000, checkpoint_dir="runs/sae")
    clip_lens.sae.save(sae, "runs/sae/final")              # or layout="saelens": a folder SAELens reads
    sae = clip_lens.sae.load("runs/sae/final")             # either layout
    stats = sae_statistics(sae, acts)      # explained variance, dead latents, mean active

Splicing an SAE into a model (`model.add_sae`) lives below the model, in `clip_lens.splicing`.

The package, one job a file:

- `architectures`: the SAEs (standard, TopK, BatchTopK, JumpReLU) and what they share;
- `files`: clip_lens's own file layout (a JSON config beside a safetensors file);
- `saelens`: SAELens's layout (a folder with cfg.json and sae_weights.safetensors);
- `layouts`: `load` and `save`, for either layout;
- `training`: training on activations in memory, with checkpoints and resume;
- `activations`: one hook's activations collected in memory;
- `store`: the activation store on disk (shards, a manifest, resume, shuffled batches);
- `alignment`: each latent's decoder direction against concept words in the joint space;
- `browser`, `browser_page`: the latent browser, one self-contained HTML page per SAE;
- `evaluation`: one evaluation table for any SAE; `separation`: latents that separate two groups.
"""

from clip_lens.sae.activations import cache_activations
from clip_lens.sae.alignment import latent_alignment
from clip_lens.sae.architectures import (
    ARCHITECTURES,
    BatchTopKSAE,
    JumpReLUSAE,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
)
from clip_lens.sae.browser import browser_data, read_browser_data, write_browser
from clip_lens.sae.evaluation import evaluate_reconstruction, evaluate_sae
from clip_lens.sae.layouts import LAYOUTS, load, save
from clip_lens.sae.store import ActivationStore, StoreError, fill_store, write_vectors
from clip_lens.sae.training import TrainHistory, sae_statistics, train_sae

__all__ = [
    "ARCHITECTURES", "BatchTopKSAE", "JumpReLUSAE", "SparseAutoencoder", "StandardSAE", "TopKSAE",   # architectures
    "LAYOUTS", "load", "save",                                                                        # files
    "ActivationStore", "StoreError", "fill_store", "write_vectors",                                  # the store
    "TrainHistory", "sae_statistics", "train_sae", "cache_activations",                              # training
    "evaluate_sae", "evaluate_reconstruction",                                                       # evaluation
    "browser_data", "read_browser_data", "write_browser", "latent_alignment",                        # browsing
]
