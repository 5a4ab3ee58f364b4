"""Drop-in modules: same constructor arguments, parameter and buffer names as their torch.nn twins."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as MF

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss on the fused kernel (weight is a buffer, as in PyTorch)."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, inplace_backward: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return MF.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                                inplace_backward=self.inplace_backward)
