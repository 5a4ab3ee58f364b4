"""Drop-in modules: same constructor arguments, parameter and buffer names as their torch.nn twins."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import functional as MF

__all__ = ["CrossEntropyLoss", "BatchNorm1d"]


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


class BatchNorm1d(_NormBase):
    """Drop-in for torch.nn.BatchNorm1d (same parameters, buffers and state_dict: weight, bias, running_mean,
    running_var, num_batches_tracked; momentum=None is a cumulative average) on the fused kernel, plus
    ``bessel`` and a fused ``activation`` ("tanh" | "relu")."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bessel: bool = False,
                 activation: str | None = None):
        if activation not in MF.ACTIVATIONS:
            raise ValueError(f"mmops.nn.BatchNorm1d: activation must be None, 'tanh' or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.bessel = bessel
        self.activation = activation

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"mmops.nn.BatchNorm1d: expected 2D or 3D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bessel={self.bessel}, activation={self.activation!r}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # nn.BatchNorm1d's rules for the running-average factor and for when batch statistics are used
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return MF.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                             self.weight, self.bias, use_batch_stats, factor, self.eps, bessel=self.bessel,
                             activation=self.activation)
