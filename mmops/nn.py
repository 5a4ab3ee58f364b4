"""Drop-in modules: same constructor arguments, parameter and buffer names as their torch.nn twins."""
from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils.rnn import PackedSequence

from ._batch_norm import activation_code, batch_norm
from ._cross_entropy import cross_entropy
from ._ops import ACTIVATIONS
from ._rnn import nonlinearity_code, reverse_within_lengths, rnn_cell, run_direction
from ._sync_batch_norm import SyncBatchNormFunction

__all__ = ["CrossEntropyLoss", "BatchNorm1d", "SyncBatchNorm", "RNN", "RNNCell"]


def __dir__():
    return __all__


# torch added the `bias` keyword to the BatchNorm modules in a recent release: emulated where it is missing
_NORM_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


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
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                                inplace_backward=self.inplace_backward)


class BatchNorm1d(_NormBase):
    """Drop-in for torch.nn.BatchNorm1d (same parameters, buffers and state_dict: weight, bias, running_mean,
    running_var, num_batches_tracked; momentum=None is a cumulative average) on the fused kernel, plus
    ``bessel`` and a fused ``activation`` ("tanh" | "relu")."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 bessel: bool = False, activation: str | None = None):
        activation_code(activation, f"mmops.nn.{type(self).__name__}")
        kw = {"bias": bias} if _NORM_TAKES_BIAS else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **kw)
        if not bias and not _NORM_TAKES_BIAS:
            self.register_parameter("bias", None)
        self.bessel = bessel
        self.activation = activation

    def _check_input_dim(self, input: Tensor) -> None:
        name = type(self).__name__
        if input.dim() not in (2, 3):
            raise ValueError(f"mmops.nn.{name}: expected 2D or 3D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise RuntimeError(f"mmops.nn.{name}: the input has {input.shape[1]} channels (dim 1 of its shape "
                               f"{tuple(input.shape)}) but the module was built with num_features={self.num_features}")

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
        return batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                             self.weight, self.bias, use_batch_stats, factor, self.eps, bessel=self.bessel,
                             activation=self.activation)


class SyncBatchNorm(BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batches of every rank of a torch.distributed process
    group (gloo on CPU, nccl on GPU), on the fused kernels: one all_gather of (count, mean, M2) forward, one
    all_reduce of the two backward sums. Ranks may hold unequal batches. Outside an initialised process group,
    with world size 1, or in eval mode it is exactly mmops.nn.BatchNorm1d (no communication)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, bessel: bool = False, activation: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias, bessel=bessel, activation=activation)
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
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, rm, rv, factor, self.eps, self.bessel,
                                           ACTIVATIONS[self.activation], self.process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every mmops.nn.BatchNorm1d and torch.nn.BatchNorm1d in module by a SyncBatchNorm with the
        same parameters, buffers and options (bessel/activation carried over from mmops layers)."""
        out = module
        if isinstance(module, (BatchNorm1d, nn.BatchNorm1d)) and not isinstance(module, SyncBatchNorm):
            p = next((t for t in (module.weight, module.running_mean) if t is not None), None)
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, device=None if p is None else p.device, dtype=None if p is None else p.dtype,
                      bias=module.bias is not None or not module.affine, bessel=getattr(module, "bessel", False),
                      activation=getattr(module, "activation", None))
            out.load_state_dict(module.state_dict())
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


def _check_rnn_args(name: str, input_size, hidden_size, bias, nonlinearity, num_layers=1, batch_first=False,
                    dropout=0.0, bidirectional=False) -> None:
    """nn.RNNBase's / nn.RNNCellBase's argument checks, with their exception types."""
    if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise ValueError(f"mmops.nn.{name}: dropout should be a number in range [0, 1], got {dropout!r}")
    for flag, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
        if not isinstance(value, bool) and not (flag == "bias" and name == "RNNCell"):  # nn.RNNCell takes any
            raise TypeError(f"mmops.nn.{name}: {flag} should be of type bool, got: {type(value).__name__}")
    for size, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"mmops.nn.{name}: {size} should be of type int, got: {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"mmops.nn.{name}: {size} must be greater than zero, got {value}")
    nonlinearity_code(nonlinearity, f"mmops.nn.{name}")


class _RecurrentBase(nn.Module):
    """What mmops.nn.RNN and RNNCell share with their torch twins: every parameter drawn from U(-1/sqrt(H), 1/sqrt(H))
    in registration order (so one seed gives both modules the same weights)."""

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -stdv, stdv)


class RNN(_RecurrentBase):
    """Drop-in for torch.nn.RNN on the fused sequence kernel: same constructor, parameter names (weight_ih_l0,
    weight_hh_l0, bias_ih_l0, bias_hh_l0, ..., and *_reverse for bidirectional), initialisation
    (U(-1/sqrt(H), 1/sqrt(H)), drawn in nn.RNN's order, so one seed gives both the same weights) and state_dict.

    forward(input, hx=None) -> (output, h_n): input (T, B, input_size) ((B, T, input_size) with batch_first),
    unbatched (T, input_size), or a PackedSequence (then output is a PackedSequence: each stretch of steps with
    the same number of running sequences is one call of the fused kernel); integer input (T, B) / (B, T) / (T,)
    is token ids standing for one-hot rows of size input_size (first layer only: a row gather of weight_ih_l0,
    no one-hot matrix). h_n is (num_layers * num_directions, B, H). bidirectional: the reverse direction runs
    the same kernel over each sequence reversed within its length. It does not subclass nn.RNN (torch.compile
    refuses to trace those).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_rnn_args("RNN", input_size, hidden_size, bias, nonlinearity, num_layers, batch_first, dropout,
                        bidirectional)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        directions = 2 if bidirectional else 1
        kw = {"device": device, "dtype": dtype}
        for k in range(num_layers):
            in_k = input_size if k == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                setattr(self, f"weight_ih_l{k}{suffix}", nn.Parameter(torch.empty(hidden_size, in_k, **kw)))
                setattr(self, f"weight_hh_l{k}{suffix}", nn.Parameter(torch.empty(hidden_size, hidden_size, **kw)))
                if bias:
                    setattr(self, f"bias_ih_l{k}{suffix}", nn.Parameter(torch.empty(hidden_size, **kw)))
                    setattr(self, f"bias_hh_l{k}{suffix}", nn.Parameter(torch.empty(hidden_size, **kw)))
        self.reset_parameters()

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
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _layer_params(self, k: int, suffix: str = ""):
        b_ih = getattr(self, f"bias_ih_l{k}{suffix}") if self.bias else None
        b_hh = getattr(self, f"bias_hh_l{k}{suffix}") if self.bias else None
        return getattr(self, f"weight_ih_l{k}{suffix}"), getattr(self, f"weight_hh_l{k}{suffix}"), b_ih, b_hh

    def forward(self, input, hx: Tensor | None = None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            x, lengths = torch.nn.utils.rnn.pad_packed_sequence(input)  # (T, B, ...) in the caller's order
            if sorted_indices is not None:  # run in the packed (decreasing length) order, as batch_sizes is
                x, lengths = x.index_select(1, sorted_indices), lengths[sorted_indices.cpu()]
            steps = batch_sizes.tolist()
            batched = True
        else:
            tokens = not input.is_floating_point()
            batched_dim = 2 if tokens else 3
            if input.dim() not in (batched_dim - 1, batched_dim):
                kind = "token input of shape (T, B) or (T,)" if tokens else \
                    "input of shape (T, B, input_size) or (T, input_size)"
                raise ValueError(f"mmops.nn.RNN: expected {kind}, got {tuple(input.shape)}")
            batched = input.dim() == batched_dim
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            steps = lengths = None
        B, H, D = x.shape[1], self.hidden_size, 2 if self.bidirectional else 1
        w0 = self.weight_ih_l0
        if hx is None:
            hx = torch.zeros(self.num_layers * D, B, H, dtype=w0.dtype, device=w0.device)
        else:
            expect = (self.num_layers * D, B, H) if batched else (self.num_layers * D, H)
            if tuple(hx.shape) != expect:
                raise RuntimeError(f"mmops.nn.RNN: expected hx of shape {expect}, got {tuple(hx.shape)}")
            if not batched:
                hx = hx.unsqueeze(1)
            elif packed and sorted_indices is not None:
                hx = hx.index_select(1, sorted_indices)
        layer_in, h_n = x, []
        for k in range(self.num_layers):
            out, h_last = run_direction(layer_in, hx[k * D], self._layer_params(k), self.nonlinearity, steps)
            h_n.append(h_last)
            if self.bidirectional:
                rev_in = reverse_within_lengths(layer_in, lengths)
                rev_out, h_last = run_direction(rev_in, hx[k * D + 1], self._layer_params(k, "_reverse"),
                                                self.nonlinearity, steps)
                h_n.append(h_last)
                out = torch.cat([out, reverse_within_lengths(rev_out, lengths)], dim=2)
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)
            layer_in = out
        h_n = torch.stack(h_n)
        out = layer_in
        if packed:
            # the packed data: at step t, the first batch_sizes[t] rows of the (decreasing-length) order
            out_data = torch.cat([out[t, :b] for t, b in enumerate(steps)])
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
            return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), h_n
        if not batched:
            return out.squeeze(1), h_n.squeeze(1)
        return (out.transpose(0, 1) if self.batch_first else out), h_n


class RNNCell(_RecurrentBase):
    """Drop-in for torch.nn.RNNCell on the fused kernel (one step: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)):
    same constructor, parameter names (weight_ih, weight_hh, bias_ih, bias_hh), initialisation and state_dict.
    forward(input, hx=None): input (B, input_size) or unbatched (input_size,); integer input (B,) is token ids."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None):
        super().__init__()
        _check_rnn_args("RNNCell", input_size, hidden_size, bias, nonlinearity)
        bias = bool(bias)
        self.input_size, self.hidden_size, self.bias, self.nonlinearity = input_size, hidden_size, bias, nonlinearity
        kw = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return rnn_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.nonlinearity)
