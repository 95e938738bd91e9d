"""The one model-forward path: extraction, the teacher cache and the fine-tuner all go through it.

Patches arrive as uint8 (B, H, W, 3); :func:`model_input` resizes and normalises them as one
batch on the device (channels-last on CUDA, where convolutions are faster), and
:func:`autocast` applies the precision option (``auto``: bf16 on a GPU that has it, float32 on the
CPU; ``bf16`` runs on the CPU too).
torch is imported inside the functions, so ``PRECISIONS`` can be read without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np

from ..utils import ClamMcmkdError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def bf16_supported(device: str) -> bool:
    """Whether `device` runs bf16 natively: the CPU (torch's kernels), a CUDA GPU of compute
    capability >= 8 (Ampere on); older GPUs emulate it slowly or not at all."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return True  # no GPU to ask (a spec for a CUDA run made elsewhere): the modern default
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def autocast_dtype(
    device: str, precision: str = "auto", *, training: bool = False, bf16: bool | None = None
):
    """The autocast dtype for a device and precision name (None: plain float32).

    ``auto``: bf16 on a CUDA GPU that has it, else fp16 for inference and float32 for training
    (fp16 training needs loss scaling, which this project does not do: ``fp16`` with
    ``training`` is refused); float32 on the CPU. ``bf16`` runs bf16 autocast on the CPU too
    (the test suite's way to run that path). `bf16` overrides :func:`bf16_supported`.
    """
    import torch

    if precision not in PRECISIONS:
        raise ClamMcmkdError(f"unknown precision '{precision}' (choices: {', '.join(PRECISIONS)})")
    if training and precision == "fp16":
        raise ClamMcmkdError(
            "--precision fp16 cannot train (no loss scaling: small gradients underflow to "
            "zero); use bf16 (compute capability >= 8), fp32, or auto"
        )
    cuda = str(device).startswith("cuda")
    if precision == "fp32" or (not cuda and precision != "bf16"):
        return None
    if precision == "auto":
        if bf16 if bf16 is not None else bf16_supported(device):
            return torch.bfloat16
        return None if training else torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: str, precision: str = "auto", *, training: bool = False):
    """Autocast context for `device` and `precision` (a no-op where it runs float32)."""
    import torch

    dtype = autocast_dtype(device, precision, training=training)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def prepare_encoder(encoder, device: str):
    """Move the model to `device`; channels-last on CUDA (faster convolutions)."""
    import torch

    model = encoder.model.to(device)
    if str(device).startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(tensor, device: str):
    """`tensor` on `device`; a CPU tensor goes to a GPU from pinned memory, asynchronously (a
    copy from pageable memory first waits for everything queued on the GPU)."""
    if not str(device).startswith("cuda") or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def model_input(images, transforms, device: str):
    """uint8 (B, H, W, 3) patches (or a float batch already through `transforms`) -> the
    model's input on `device`: resized and normalised there, channels-last on CUDA."""
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    cuda = str(device).startswith("cuda")
    x = to_device(images, device)
    if x.dtype == torch.uint8:  # else already transformed (by the loader)
        x = transforms.batch(x)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def encode_batch(encoder, images, device: str = "cpu", precision: str = "auto"):
    """uint8 (B, H, W, 3) patches (or float batches already through ``encoder.transforms``)
    -> float32 features (B, D) on the CPU.

    The model must already be on `device` (see :func:`prepare_encoder`); its train/eval mode is
    left as the caller set it.
    """
    return encode_on_device(encoder, images, device, precision).float().cpu()


def encode_on_device(encoder, images, device: str = "cpu", precision: str = "auto"):
    """Like :func:`encode_batch`, but the features stay on `device` in the model's output
    dtype (no host sync: a consumer downloads many batches at once)."""
    import torch

    x = model_input(images, encoder.transforms, device)
    with torch.inference_mode(), autocast(device, precision):
        return encoder.model(x)


def encode_batches(
    encoder, batches: Iterable, device: str = "cpu", precision: str = "auto"
) -> np.ndarray:
    """Encode an iterable of uint8 (B, H, W, 3) batches; features (N, D) float32 in order."""
    prepare_encoder(encoder, device)
    outs = [encode_batch(encoder, b, device, precision).numpy() for b in batches]
    if not outs:
        return np.zeros((0, encoder.out_dim), np.float32)
    return np.concatenate(outs).astype(np.float32, copy=False)


def encode_patches(
    encoder, patches: np.ndarray, batch_size: int = 64, device: str = "cpu", precision="auto"
) -> np.ndarray:
    """Encode an in-memory uint8 (N, H, W, 3) array of patches in batches."""
    chunks = (patches[i : i + batch_size] for i in range(0, len(patches), batch_size))
    return encode_batches(encoder, chunks, device, precision)


def encoder_flops_params(encoder, device: str = "cpu") -> dict[str, float]:
    """Parameters (M) and GFLOPs per patch (forward, multiply-adds x2) for the compute table."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in encoder.model.parameters()) / 1e6
    size = encoder.transforms.input_size or 224
    x = torch.zeros(1, 3, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.model.to(device)(x)
    return {"params_m": params, "gflops_per_patch": counter.get_total_flops() / 1e9}
