"""Photos that ship inside scikit-image, with labels and captions: a demo image set that needs no
download (attention cancellation, attention maps)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Union

import pandas as pd

# label: (scikit-image loader, caption)
SAMPLES = {
    "astronaut": ("astronaut", "a photo of an astronaut"),
    "cat": ("chelsea", "a photo of a cat"),
    "coffee": ("coffee", "a photo of a cup of coffee"),
    "rocket": ("rocket", "a photo of a rocket"),
    "cameraman": ("camera", "a photo of a man with a camera"),
    "coins": ("coins", "a photo of coins"),
    "moon": ("moon", "a photo of the moon"),
    "text": ("page", "a scanned page of text"),
    "motorcycle": ("stereo_motorcycle", "a photo of a motorcycle"),
    "clock": ("clock", "a photo of a clock"),
    "galaxies": ("hubble_deep_field", "a photo of galaxies in deep space"),
    "retina": ("retina", "a photo of a retina"),
}


def sample_images(folder: Optional[Union[str, Path]] = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Write scikit-image's sample photos as PNG files.

    Returns:
        (images, captions): a DataFrame with columns `image` (path) and `label`, and the caption of
        each label.
    """
    try:
        import skimage.data
    except ImportError as err:
        raise RuntimeError("the sample photos come from scikit-image: pip install scikit-image") from err
    import numpy as np
    from PIL import Image

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="clip_lens_samples_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, (loader, _) in SAMPLES.items():
        array = getattr(skimage.data, loader)()
        array = array[0] if isinstance(array, tuple) else array
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        path = folder / f"{label}.png"
        Image.fromarray(array[..., :3].astype(np.uint8)).save(path)
        rows.append(dict(image=str(path), label=label))
    return pd.DataFrame(rows), {label: caption for label, (_, caption) in SAMPLES.items()}
