"""clip_lens: mechanistic interpretability for CLIP, built on TransformerLens.

    import clip_lens
    model = clip_lens.HookedCLIP.from_pretrained("ViT-B-32", pretrained="/path/to/weights.bin")
    logits, cache = model.run_with_cache(text=model.to_tokens(["a cat"]), image=model.to_pixels(["cat.jpg"]))
"""

from clip_lens.config import TextConfig, TowerConfig, VisionConfig
from clip_lens.loading import UnsupportedArchitecture
from clip_lens.model import HookedCLIP
from clip_lens.patching import PatchResult, hook_name, interaction_table, patch, value_only_attention
from clip_lens.tokenization import Tokenizer
from clip_lens.towers import HookedTextTower, HookedVisionTower

from_open_clip = HookedCLIP.from_open_clip
from_pretrained = HookedCLIP.from_pretrained
from_huggingface = HookedCLIP.from_huggingface

__all__ = [
    "HookedCLIP",
    "hook_name",
    "PatchResult",
    "patch",
    "interaction_table",
    "value_only_attention",
    "HookedTextTower",
    "HookedVisionTower",
    "TextConfig",
    "TowerConfig",
    "VisionConfig",
    "Tokenizer",
    "UnsupportedArchitecture",
    "from_huggingface",
    "from_open_clip",
    "from_pretrained",
]
__version__ = "0.1.0"
