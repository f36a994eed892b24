"""Rounding to the nearest integer, halves away from zero, on torch tensors: TFLite's and CMSIS-NN's
rounding, which the integer operators of pockengine/quantize.py and pockengine/smoothquant.py use
(frontend/quantized_ops.round_half_away is the same in TIR)."""

from __future__ import annotations

import torch


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """Exactly: trunc(t) plus the sign where |t - trunc(t)| >= 1/2 (the difference is exact)."""
    whole = torch.trunc(t)
    return whole + torch.where((t - whole).abs() >= 0.5, torch.sign(t), torch.zeros_like(t))
