"""Cross-entropy: the fake kernels of its ops, its torch.autograd.Function, and the drop-in for
F.cross_entropy. The math (forward, the gradient the forward writes, the backward) is written once, in
csrc/cpu/cross_entropy.cpp."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _C
from ._ops import (LOW_PRECISION, REDUCTIONS, c_apply, eager_or_op, first_order_only, ops, plain_autograd,
                   unwrap_if_dead)


@torch.library.register_fake("mmops::cross_entropy_forward")
def _forward_fake(input, target, weight, reduction, ignore_index, label_smoothing, compute_grad):
    torch._check(input.dim() == 2, lambda: "mmops.cross_entropy: expected input of shape (N, C)")
    loss = input.new_empty((input.shape[0],)) if reduction == 0 else input.new_empty(())
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad


@torch.library.register_fake("mmops::cross_entropy_forward_inplace")
def _forward_inplace_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    return input.new_empty((input.shape[0],)) if reduction == 0 else input.new_empty(())


@torch.library.register_fake("mmops::cross_entropy_backward")
def _backward_fake(grad, grad_output):
    return torch.empty_like(grad)


@torch.library.register_fake("mmops::cross_entropy_scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


# The overloads through their eager entry points (mmops/_ops.py: eager_or_op).
_forward_op = eager_or_op(_C.cross_entropy_forward, ops.cross_entropy_forward.default)
_backward_op = eager_or_op(_C.cross_entropy_backward, ops.cross_entropy_backward.default)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused softmax + NLL on 2-D logits. The forward writes the gradient, already scaled for the reduction;
    the backward returns it as it is when grad_output is 1 (loss.backward()) and scales it otherwise.
    A probability target that requires grad gets d loss / d t = -(1 - e) w log_softmax(x), scaled alike."""

    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing, inplace_backward):
        ctx.inplace = inplace_backward
        ctx.reduction = reduction
        ctx.target_grad_args = (weight, label_smoothing)
        # the target's gradient needs the logits (the caller turns inplace_backward off in that case)
        logits = input if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            loss = _forward_op(input, target, weight, reduction, ignore_index, label_smoothing, False)[0]
            ctx.save_for_backward(None, logits)
            return loss
        if inplace_backward:
            loss = ops.cross_entropy_forward_inplace(input, target, weight, reduction, ignore_index, label_smoothing)
            torch.autograd.graph.increment_version(input)  # whatever else saved the logits must notice
            grad = input
        else:
            loss, grad = _forward_op(input, target, weight, reduction, ignore_index, label_smoothing, True)
        ctx.save_for_backward(grad, logits)
        return loss

    @staticmethod
    @first_order_only("mmops.cross_entropy")
    def backward(ctx, grad_loss):
        grad, logits = ctx.saved_tensors
        if grad is not None:
            if ctx.inplace:
                # The logits' storage is the gradient buffer: scale it there (the user chose to trade the
                # logits for memory); a second backward through this graph then fails on the version check.
                ops.cross_entropy_scale_grad_(grad, grad_loss)
                torch.autograd.graph.increment_version(grad)
            elif torch.compiler.is_compiling() or grad_loss.numel() != 1 or grad_loss.item() != 1.0:
                grad = _backward_op(grad, grad_loss)
            # else: grad_output is 1 and the saved gradient is the answer (it is not modified, so a retained
            # graph can be run again).
        grad_target = _target_grad(logits, ctx, grad_loss) if logits is not None else None
        return grad, grad_target, None, None, None, None, None


def _target_grad(x: Tensor, ctx, grad_loss: Tensor) -> Tensor:
    """d loss / d t for probability targets: loss_i = sum_c w_c t'_c (lse_i - x_ic), t' = (1-e) t + e/C, so
    d loss_i / d t_ic = -(1 - e) w_c log_softmax(x_i)_c; "mean" divides by N, "none" scales row i by grad_loss[i]."""
    weight, e = ctx.target_grad_args
    g = torch.log_softmax(x, dim=1).mul_(-(1.0 - e))
    if weight is not None:
        g.mul_(weight)
    if ctx.reduction == REDUCTIONS["mean"]:
        g.div_(x.shape[0])
    return g * (grad_loss.unsqueeze(1) if ctx.reduction == REDUCTIONS["none"] else grad_loss)


_KERNEL_DTYPES = (torch.float32, torch.float64)  # what the kernels compute in, with no conversion
_c_apply = c_apply(CrossEntropyFunction)


def _fail(exc, msg: str):
    raise exc(f"mmops.cross_entropy: {msg}")


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy`` (fused log-softmax + NLL, one pass per row).

    input: (N, C), (C,) or (N, C, d1, ...) logits; target: class indices ((N,), (), (N, d1, ...); int64 or uint8)
    or class probabilities (the input's shape; a float64 target promotes the result to float64, as in PyTorch).
    float32/float64; float16/bfloat16 are computed in float32 and returned in their dtype.
    ``inplace_backward=True`` writes the gradient into the logits' storage during the forward (the logits
    are overwritten; saves one logits-sized buffer). It applies when the (N, C) view of the logits is
    contiguous float32/float64; otherwise the gradient goes to a fresh buffer as usual.
    Gradients are first order: differentiating them again (create_graph=True) raises.
    """
    red = REDUCTIONS.get(reduction)
    if red is None:
        _fail(ValueError, f"{reduction!r} is not a valid value for reduction ('none', 'mean' or 'sum')")
    if (isinstance(input, Tensor) and isinstance(target, Tensor) and weight is None and not inplace_backward
            and input.dtype in _KERNEL_DTYPES and target.dtype == torch.int64 and input.dim() == 2
            and target.dim() == 1 and 0.0 <= label_smoothing <= 1.0 and plain_autograd()):
        # The usual call (makemore's: float32 (N, C) logits, int64 class indices): nothing to convert or reshape;
        # the op checks the rest (batch sizes, C > 0, the targets' range; csrc/op_args.h) with the exception types
        # of the general path below (the messages name the same argument). At batch 32 each Python step here is a
        # visible share of the call.
        return _c_apply(unwrap_if_dead(input), unwrap_if_dead(target), None, red, ignore_index, float(label_smoothing),
                        False)
    if not isinstance(input, Tensor):
        _fail(TypeError, f"input must be a Tensor of logits, got {type(input).__name__}")
    if not input.is_floating_point():  # PyTorch's type for this: its log_softmax has no integer kernel
        _fail(NotImplementedError, f"input must be a floating-point tensor of logits, got {input.dtype}")
    if not isinstance(target, Tensor):
        _fail(TypeError, f"target must be a Tensor, got {type(target).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        _fail(RuntimeError, f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    prob = target.is_floating_point()
    if prob:
        if ignore_index >= 0:
            _fail(RuntimeError, "ignore_index is not supported for floating point (probability) target")
        if target.shape != input.shape:
            _fail(RuntimeError, f"probability target must have the input's shape {tuple(input.shape)}, got "
                  f"{tuple(target.shape)}")
    elif target.dtype != torch.long:
        if target.dtype != torch.uint8:
            _fail(RuntimeError, f"expected target dtype to be Long or Byte (class indices), but got {target.dtype}")
        target = target.long()
    if weight is not None:
        if not isinstance(weight, Tensor):
            _fail(TypeError, f"weight must be a Tensor or None, got {type(weight).__name__}")
        if weight.dtype != input.dtype:
            _fail(RuntimeError, f"expected weight of the input's dtype {input.dtype}, got {weight.dtype}")
        C = input.shape[1] if input.dim() >= 2 else input.shape[0]
        if weight.dim() != 1 or weight.shape[0] != C:
            _fail(RuntimeError, f"weight must have shape ({C},) (one per class), got {tuple(weight.shape)}")

    dim = input.dim()
    out_shape = None
    if dim == 2:
        x, t = input, target
        if not prob and target.dim() != 1:
            _fail(RuntimeError, f"expected a 1-D target of class indices of shape ({input.shape[0]},) for input "
                  f"{tuple(input.shape)}, got shape {tuple(target.shape)}")
        if not prob and target.shape[0] != input.shape[0]:
            _fail(ValueError, f"expected target of shape ({input.shape[0]},) to match input {tuple(input.shape)} "
                  f"(its batch size), got {tuple(target.shape)}")
    elif dim == 1:
        if not prob and target.dim() != 0:
            _fail(RuntimeError, f"for unbatched input {tuple(input.shape)} the target must be a scalar class "
                  f"index, got shape {tuple(target.shape)}")
        x, t = input.unsqueeze(0), target.unsqueeze(0)
        out_shape = ()
    elif dim > 2:
        C = input.shape[1]
        x = input.movedim(1, -1).reshape(-1, C)
        spatial = (input.shape[0],) + tuple(input.shape[2:])
        if prob:
            t = target.movedim(1, -1).reshape(-1, C)
        else:
            if tuple(target.shape) != spatial:
                _fail(RuntimeError, f"target must have shape {spatial} for input {tuple(input.shape)}, got "
                      f"{tuple(target.shape)}")
            t = target.reshape(-1)
        out_shape = spatial
    else:
        _fail(ValueError, "input must have at least one dimension (the classes)")

    out_dtype = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    compute = torch.float32 if out_dtype in LOW_PRECISION else out_dtype
    if x.dtype != compute:
        x = x.to(compute)
    if prob and t.dtype != compute:
        t = t.to(compute)
    if weight is not None and weight.dtype != compute:
        weight = weight.to(compute)
    inplace = inplace_backward and x is input and x.is_contiguous() and not (prob and target.requires_grad)
    loss = CrossEntropyFunction.apply(x, t, weight, red, ignore_index, float(label_smoothing), inplace)
    if out_shape is not None and red == 0:
        loss = loss.reshape(out_shape)
    return loss if loss.dtype == out_dtype else loss.to(out_dtype)
