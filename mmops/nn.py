"""Drop-in modules: same constructor arguments, parameter and buffer names as their torch.nn twins."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from . import functional as MF

__all__ = ["CrossEntropyLoss", "BatchNorm1d", "SyncBatchNorm", "RNN"]


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

    def _running_factor(self) -> float:
        """nn.BatchNorm1d's rule for the running-average factor (momentum, or 1/num_batches_tracked when
        momentum is None); counts the batch in training."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self._running_factor()
        # nn.BatchNorm1d's rule for when batch statistics are used
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return MF.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                             self.weight, self.bias, use_batch_stats, factor, self.eps, bessel=self.bessel,
                             activation=self.activation)


class SyncBatchNorm(BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batches of every rank of a torch.distributed process
    group (gloo on CPU, nccl on GPU), on the fused kernels: one all_gather of (count, mean, M2) forward, one
    all_reduce of the two backward sums. Ranks may hold unequal batches. Outside an initialised process group,
    with world size 1, or in eval mode it is exactly mmops.nn.BatchNorm1d (no communication)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bessel: bool = False, activation: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bessel=bessel, activation=activation)
        self.process_group = process_group

    def _world(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self._world() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if input.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mmops.nn.SyncBatchNorm: input must be float32 or float64, got {input.dtype}")
        factor = self._running_factor()
        rm, rv = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return MF.SyncBatchNormFunction.apply(input, self.weight, self.bias, rm, rv, factor, self.eps, self.bessel,
                                              MF.ACTIVATIONS[self.activation], self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every mmops.nn.BatchNorm1d and torch.nn.BatchNorm1d in module by a SyncBatchNorm with the
        same parameters, buffers and options (bessel/activation carried over from mmops layers)."""
        out = module
        if isinstance(module, (BatchNorm1d, nn.BatchNorm1d)) and not isinstance(module, SyncBatchNorm):
            p = next((t for t in (module.weight, module.running_mean) if t is not None), None)
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, device=None if p is None else p.device, dtype=None if p is None else p.dtype,
                      bessel=getattr(module, "bessel", False), activation=getattr(module, "activation", None))
            out.load_state_dict(module.state_dict())
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class RNN(nn.Module):
    """Drop-in for torch.nn.RNN (unidirectional) on the fused sequence kernel: same constructor, parameter
    names (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, ...), initialisation (U(-1/sqrt(H), 1/sqrt(H)),
    drawn in nn.RNN's order, so one seed gives both the same weights) and state_dict.

    forward(input, hx=None) -> (output, h_n): input (T, B, input_size) ((B, T, input_size) with batch_first)
    or unbatched (T, input_size); integer input (T, B) / (B, T) / (T,) is token ids standing for one-hot rows
    of size input_size (first layer only: a row gather of weight_ih_l0, no one-hot matrix). h_n is
    (num_layers, B, H). It does not subclass nn.RNN (torch.compile refuses to trace those).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if bidirectional:
            raise NotImplementedError("mmops.nn.RNN: bidirectional RNNs are not implemented")
        if nonlinearity not in MF.NONLINEARITIES:
            raise ValueError(f"mmops.nn.RNN: unknown nonlinearity {nonlinearity!r} (expected 'tanh' or 'relu')")
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"mmops.nn.RNN: hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"mmops.nn.RNN: num_layers must be a positive integer, got {num_layers!r}")
        if not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"mmops.nn.RNN: dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), False
        kw = {"device": device, "dtype": dtype}
        for k in range(num_layers):
            in_k = input_size if k == 0 else hidden_size
            setattr(self, f"weight_ih_l{k}", nn.Parameter(torch.empty(hidden_size, in_k, **kw)))
            setattr(self, f"weight_hh_l{k}", nn.Parameter(torch.empty(hidden_size, hidden_size, **kw)))
            if bias:
                setattr(self, f"bias_ih_l{k}", nn.Parameter(torch.empty(hidden_size, **kw)))
                setattr(self, f"bias_hh_l{k}", nn.Parameter(torch.empty(hidden_size, **kw)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s

    def _layer_params(self, k: int):
        b_ih = getattr(self, f"bias_ih_l{k}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_l{k}") if self.bias else None
        return getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"), b_ih, b_hh

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        tokens = not input.is_floating_point()
        batched_dim = 2 if tokens else 3
        if input.dim() not in (batched_dim - 1, batched_dim):
            kind = "token input of shape (T, B) or (T,)" if tokens else "input of shape (T, B, input_size) or (T, input_size)"
            raise ValueError(f"mmops.nn.RNN: expected {kind}, got {tuple(input.shape)}")
        batched = input.dim() == batched_dim
        if not batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        T, B = input.shape[0], input.shape[1]
        H, L = self.hidden_size, self.num_layers
        w0 = self.weight_ih_l0
        if hx is None:
            hx = torch.zeros(L, B, H, dtype=w0.dtype, device=w0.device)
        else:
            expect = (L, B, H) if batched else (L, H)
            if tuple(hx.shape) != expect:
                raise ValueError(f"mmops.nn.RNN: expected hx of shape {expect}, got {tuple(hx.shape)}")
            if not batched:
                hx = hx.unsqueeze(1)
        layer_in = input
        h_n = []
        for k in range(L):
            out, h_last = MF.rnn(layer_in, hx[k], *self._layer_params(k), nonlinearity=self.nonlinearity)
            h_n.append(h_last)
            if self.dropout > 0 and self.training and k < L - 1:
                out = F.dropout(out, self.dropout, training=True)
            layer_in = out
        h_n = torch.stack(h_n)
        out = layer_in
        if not batched:
            return out.squeeze(1), h_n.squeeze(1)
        return (out.transpose(0, 1) if self.batch_first else out), h_n
