"""CLAM's patch transforms (Resize -> ToTensor -> Normalize), per image and per batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PatchTransforms:
    """CLAM's eval transforms (Resize -> ToTensor -> Normalize), per image and per batch.

    ``__call__`` follows CLAM's chain on one PIL image (the reference path); :meth:`batch` does
    the same on a uint8 tensor batch at once (antialiased bilinear resize), for fast extraction.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_torchvision(self):
        from torchvision import transforms

        steps = []
        if self.input_size > 0:
            steps.append(transforms.Resize(self.input_size))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return self.to_torchvision()(img)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> normalised float (N, 3, S, S).

        On the CPU a uint8 batch is resized in uint8 (torch's antialiased bilinear kernel, which
        rounds like PIL, within one grey level, and is ~20x faster than resizing floats).
        """
        if images.ndim != 4:
            raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as channels-last NCHW
        size = self.input_size
        h, w = images.shape[-2:]
        if size > 0 and (h != size or w != size):
            # torchvision's Resize(int) sets the *shorter* side to `size`.
            out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            if images.dtype != torch.uint8 or images.device.type != "cpu":
                images = images.float()
            images = torch.nn.functional.interpolate(
                images, size=out, mode="bilinear", antialias=True, align_corners=False
            )
        x = images.float() if images.dtype != torch.float32 else images.clone()
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std, in place on the one float copy
        return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)
