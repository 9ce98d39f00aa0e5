"""Numeric precision of the training forward pass: bfloat16 autocast where the hardware computes it natively."""

from __future__ import annotations

import logging

import torch

__all__ = ["PRECISIONS", "native_bf16", "resolve_precision"]

logger = logging.getLogger("s2l")

#: values of the ``precision`` key of ``configs/train.json``
PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 convolutions in hardware, and in words why (for the log).

    CPUs: Intel AMX tiles (Sapphire Rapids and later), which oneDNN uses for bfloat16 convolutions; CPUs without
    them emulate bfloat16 (PyTorch's documented CPU behaviour; not measured in this project), so ``auto`` keeps
    float32 there.
    CUDA: devices that report native bfloat16 (compute capability 8.0 and later).

    Args:
        device: the training device.

    Returns:
        ``(native, reason)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        name = torch.cuda.get_device_name(device)
        return native, f"{name} {'has' if native else 'has no'} native bfloat16"
    if device.type == "cpu":
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return amx, "CPU with AMX tiles" if amx else "CPU without AMX tiles (bfloat16 would be emulated)"
    return False, f"{device.type} devices are not checked for bfloat16"


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of the training forward pass for the ``precision`` key, logged once.

    Args:
        precision: ``"auto"`` (bfloat16 where :func:`native_bf16`, else float32), ``"bf16"`` (always) or
            ``"fp32"`` (never).
        device: the training device.

    Returns:
        ``torch.bfloat16`` or None (float32, no autocast).

    Raises:
        ValueError: an unknown ``precision``.
    """
    value = str(precision).lower()
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    native, reason = native_bf16(device)
    use = value == "bf16" or (value == "auto" and native)
    logger.info(
        "training precision: %s (%s: %s); the weights, the loss, the ensemble and inference stay float32",
        "bfloat16 autocast" if use else "float32",
        "auto" if value == "auto" else "asked for",
        reason,
    )
    return torch.bfloat16 if use else None
