"""What a latent means in words: the cosine of its decoder direction, carried into the joint
embedding space, with the text embedding of each concept name
(docs/methods.md#semantic-alignment-of-a-latent). Shared by the attribution study and the latent
browser."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from clip_lens.lens import joint_space_directions


@torch.no_grad()
def latent_alignment(model: Any, sae, tower: str, concepts: Sequence[str],
                     template: str = "a photo of a {}.") -> Float[Tensor, "latent concept"]:
    """Cosine of each latent's decoder direction, carried into the joint space
    (`clip_lens.lens.joint_space_directions`), with the text embedding of each concept name
    (`template` filled with the name).

    Args:
        model: a HookedCLIP.
        tower: "vision" or "text", the tower whose activations the SAE reads.
    """
    if tower not in ("vision", "text"):
        raise ValueError(f"tower={tower!r}: the SAE reads the 'vision' or the 'text' tower")
    directions = joint_space_directions(model.vision if tower == "vision" else model.text, sae.W_dec.detach())
    names = model.encode_text(model.to_tokens([template.format(c) for c in concepts]))
    return F.cosine_similarity(directions[:, None], names[None].to(directions), dim=-1)
