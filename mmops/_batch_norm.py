"""BatchNorm (+ fused tanh/relu): the fake kernels of its ops, its torch.autograd.Function, and the drop-in for
F.batch_norm. The math (statistics, normalisation, running stats, the closed-form backward with the activation's
derivative folded in) is written once, in csrc/cpu/batch_norm.cpp."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _C
from ._ops import (ACTIVATIONS, LOW_PRECISION, c_apply, eager_or_op, first_order_only, ops, plain_autograd,
                   unwrap_if_dead)


def _like_input(input):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("mmops::batch_norm_forward")
def _forward_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, bessel, act):
    torch._check(input.dim() in (2, 3), lambda: "mmops.batch_norm: expected input of shape (N, C) or (N, C, L)")
    C = input.shape[1]
    return _like_input(input), input.new_empty((C,)), input.new_empty((C,))


@torch.library.register_fake("mmops::batch_norm_backward")
def _backward_fake(grad_output, output, input, weight, mean, invstd, training, bessel, act, output_mask):
    C = input.shape[1]
    dx = _like_input(input) if output_mask[0] else input.new_empty((0,))
    return dx, input.new_empty((C if output_mask[1] else 0,)), input.new_empty((C if output_mask[2] else 0,))


@torch.library.register_fake("mmops::batch_norm_stats")
def _stats_fake(input):
    C = input.shape[1]
    return input.new_empty((C,), dtype=torch.float64), input.new_empty((C,), dtype=torch.float64)


@torch.library.register_fake("mmops::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_output, output, input, mean, act):
    return _stats_fake(input)


@torch.library.register_fake("mmops::batch_norm_backward_elemt")
def _backward_elemt_fake(grad_output, output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count, bessel, act):
    return _like_input(input)


# The overloads through their eager entry points (mmops/_ops.py: eager_or_op).
_forward_op = eager_or_op(_C.batch_norm_forward, ops.batch_norm_forward.default)
_backward_op = eager_or_op(_C.batch_norm_backward, ops.batch_norm_backward.default)


class BatchNormFunction(torch.autograd.Function):
    """act(BatchNorm(x)) in one forward kernel; the closed-form backward with the activation's derivative
    folded in, in one reduction pass and one elementwise pass. Input (N, C) or (N, C, L)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, bessel, act):
        h, mean, invstd = _forward_op(input, weight, bias, running_mean, running_var, training, momentum,
                                                 eps, bessel, act)
        ctx.save_for_backward(input, h, weight, mean, invstd)
        ctx.flags = (training, bessel, act)
        return h

    @staticmethod
    @first_order_only("mmops.batch_norm")
    def backward(ctx, grad_h):
        input, h, weight, mean, invstd = ctx.saved_tensors
        training, bessel, act = ctx.flags
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], need[2]]
        dx, dw, db = _backward_op(grad_h, h, input, weight, mean, invstd, training, bessel, act, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None, None)


_ACTIVATION_FNS = {0: lambda t: t, 1: torch.tanh, 2: torch.relu}  # for the empty input PyTorch handles


def activation_code(activation, fn: str) -> int:
    code = ACTIVATIONS.get(activation) if activation is None or isinstance(activation, str) else None
    if code is None:
        raise ValueError(f"{fn}: activation must be None, 'tanh' or 'relu', got {activation!r}")
    return code


_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the kernels compute in, with no conversion
_c_apply = c_apply(BatchNormFunction)


def _check_per_channel(t, name: str, C: int, input: Tensor) -> None:
    if t is None:
        return
    if t.numel() != C or t.dim() != 1:
        raise RuntimeError(f"mmops.batch_norm: {name} should contain {C} elements (one per channel of the input "
                           f"{tuple(input.shape)}), not shape {tuple(t.shape)}")
    # PyTorch's mixed-dtype rule: parameters of the input's dtype, or float32 for a float16/bfloat16 input
    if t.dtype != input.dtype and not (input.dtype in LOW_PRECISION and t.dtype == torch.float32):
        raise RuntimeError(f"mmops.batch_norm: {name} has dtype {t.dtype}, expected the input's {input.dtype}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    bessel: bool = False,
    activation: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` on (N, C, *) input (any rank >= 2), plus:

    bessel=True normalises training batches with the unbiased variance (n - 1), as the makemore notebooks
    do (running_var is updated with the unbiased variance either way, as in PyTorch);
    activation="tanh" | "relu" applies the activation in the same kernel, forward and backward.
    float32/float64; float16/bfloat16 input (with parameters and running stats of its dtype or float32) is computed
    in float32 and returned in its dtype. Gradients are first order: differentiating them again raises.
    """
    act = 0 if activation is None else activation_code(activation, "mmops.batch_norm")
    if (isinstance(input, Tensor) and (weight is None or isinstance(weight, Tensor))
            and (bias is None or isinstance(bias, Tensor))
            and (running_mean is None or isinstance(running_mean, Tensor))
            and (running_var is None or isinstance(running_var, Tensor)) and input.dtype in _KERNEL_DTYPES
            and 2 <= input.dim() <= 3 and input.numel() > 0 and plain_autograd()):
        # The usual call (makemore's: float32 (N, C)), with nothing to convert or reshape: the op checks the rest
        # (per-channel shapes, dtypes and devices, running stats given together, eps, more than one value per
        # channel; csrc/op_args.h and batch_norm.cpp) with the exception types of the general path below, which
        # does them in Python (the messages name the same argument). At batch 32 each Python step here is a
        # visible share of the call: the type checks are one condition here (with messages below, for a call that
        # fails them), 16.8-18.9 -> 16.0-16.3 us for this function's forward at (32, 200), 1 thread.
        u = unwrap_if_dead
        return _c_apply(u(input), weight if weight is None else u(weight), bias if bias is None else u(bias),
                        running_mean if running_mean is None else u(running_mean),
                        running_var if running_var is None else u(running_var), bool(training), float(momentum),
                        float(eps), bool(bessel), act)
    if not isinstance(input, Tensor):
        raise TypeError(f"mmops.batch_norm: input must be a Tensor, got {type(input).__name__}")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"mmops.batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    dtype, dim = input.dtype, input.dim()
    if not input.is_floating_point():
        raise NotImplementedError(f"mmops.batch_norm: input must be a floating-point tensor, got {input.dtype}")
    if input.numel() == 0:  # no values: PyTorch's op defines what that means (an empty output)
        out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return _ACTIVATION_FNS[act](out)
    if dim < 2:
        raise ValueError(f"mmops.batch_norm: expected input of shape (N, C, *), got {tuple(input.shape)}")
    C = input.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_per_channel(t, name, C, input)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("mmops.batch_norm: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise RuntimeError("mmops.batch_norm: running_mean must be defined in evaluation mode (training=False)")
    if training and eps <= 0:
        raise ValueError(f"mmops.batch_norm: eps must be positive during training, but got {eps}")
    n = input.numel() // C
    if training and n <= 1:
        raise ValueError(f"mmops.batch_norm: expected more than 1 value per channel when training, got input of "
                         f"shape {tuple(input.shape)}")

    x = input if dim <= 3 else input.reshape(input.shape[0], C, -1)  # (N, C, *) as (N, C, L)
    if dtype not in LOW_PRECISION:
        out = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training), float(momentum),
                                      float(eps), bool(bessel), act)
    else:  # computed in float32; the running statistics are updated in float32 copies and written back
        f32 = (lambda t: None if t is None else t.float())
        rm, rv = f32(running_mean), f32(running_var)
        out = BatchNormFunction.apply(x.float(), f32(weight), f32(bias), rm, rv, bool(training), float(momentum),
                                      float(eps), bool(bessel), act).to(dtype)
        if training and running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(rm)
                running_var.copy_(rv)
    return out.reshape(input.shape) if out.shape != input.shape else out
