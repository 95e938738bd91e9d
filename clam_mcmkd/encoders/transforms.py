"""Patch transforms (Resize [-> CenterCrop] -> ToTensor -> Normalize), per image and per batch.

One class for every encoder: CLAM's chain (``Resize(input_size)``, no crop) by default, and the
resize size, centre crop and interpolation that foundation-model cards prescribe
(Prov-GigaPath: bicubic 256 then crop 224).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .catalog import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PatchTransforms"]


@dataclass(frozen=True)
class PatchTransforms:
    """Eval transforms, per image (``__call__``, torchvision's PIL chain: the reference) and per
    uint8 batch (:meth:`batch`, torchvision v2 on whole batches, for fast extraction).

    ``resize_size=None`` is CLAM's chain: Resize(input_size) (shorter side), no crop, so a
    non-square patch keeps its aspect. With ``resize_size`` set: Resize(resize_size) then
    CenterCrop(input_size), as the foundation-model cards write it.
    """

    input_size: int = 224  # what the model sees (the crop, or the resized shorter side)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None  # None: Resize(input_size), no crop (CLAM)
    interpolation: str = "bilinear"  # torchvision InterpolationMode value: bilinear | bicubic

    @property
    def crop(self) -> bool:
        return self.resize_size is not None

    def _resize_to(self) -> int:
        return self.resize_size if self.resize_size is not None else self.input_size

    def to_torchvision(self):
        from torchvision import transforms

        steps = []
        if self._resize_to() > 0:
            mode = transforms.InterpolationMode(self.interpolation)
            steps.append(transforms.Resize(self._resize_to(), interpolation=mode))
        if self.crop:
            steps.append(transforms.CenterCrop(self.input_size))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return self.to_torchvision()(img)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> normalised float (N, 3, S, S).

        A uint8 batch on the CPU is resized in uint8 (torch's antialiased kernels round like
        PIL, within one grey level, and are ~20x faster than floats). Elsewhere (a CUDA batch)
        it is resized as float; bicubic then runs as PIL does, width then height with a rounded
        0-255 intermediate: in one float pass its overshoot at sharp edges reaches ~10 grey
        levels. Bilinear has no overshoot and needs no such step.
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if images.ndim != 4:
            raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as channels-last NCHW
        mode = InterpolationMode(self.interpolation)
        size = self._resize_to()
        x = images
        if size > 0:
            if x.dtype != torch.uint8 or x.device.type != "cpu":
                x = x.float()
            if mode == InterpolationMode.BICUBIC and x.dtype != torch.uint8:
                x = _bicubic_as_pil(x, size)
            else:
                x = F.resize(x, [size], interpolation=mode, antialias=True)
        if self.crop:
            x = F.center_crop(x, [self.input_size, self.input_size])
        x = x.float() if x.dtype != torch.float32 else x.clone()
        scale, shift = _normalisation(self.mean, self.std, x.device)
        # (x / 255 - mean) / std, in place on the one float copy
        return x.mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device):
    """(1 / (255 std), -mean / std) as (1, 3, 1, 1) float32 tensors on `device`, made once per
    device: a copy to a GPU per batch would wait for the GPU each time."""
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)


def _bicubic_as_pil(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float 0-255 (N, 3, H, W) -> shorter side `size`, bicubic in PIL's two rounded passes."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = x.shape[-2:]
    out_h, out_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    for shape in ((h, out_w), (out_h, out_w)):
        if tuple(x.shape[-2:]) != shape:
            x = F.resize(x, list(shape), interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = x.add_(0.5).floor_().clamp_(0.0, 255.0)  # PIL: round half up, clip to uint8
    return x
