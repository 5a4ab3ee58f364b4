"""The differentiable mmops functions: torch.autograd.Function classes over torch.ops.mmops.*, their fake
(meta) kernels for torch.compile, and the public drop-ins for torch.nn.functional.

Each op's math is written once, beside its kernel in csrc/cpu/*.cpp; this file only routes tensors.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ._ops import REDUCTIONS, ops

__all__ = ["cross_entropy", "CrossEntropyFunction", "batch_norm", "BatchNormFunction", "rnn", "rnn_cell",
           "RNNFunction", "SyncBatchNormFunction"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# Inside an autograd.Function the ops are called below the Autograd key: the op-level autograd formulas
# (register_autograd, for users of torch.ops.mmops.* directly) are Python kernels that cost ~4 us a call.
# Under torch.compile the Function is traced as a whole and the guard is neither traceable nor needed.
def _below_autograd():
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._AutoDispatchBelowAutograd()


# ---------------------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------------------
@torch.library.register_fake("mmops::cross_entropy_forward")
def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing, compute_grad):
    torch._check(input.dim() == 2, lambda: "mmops.cross_entropy: expected input of shape (N, C)")
    loss = input.new_empty((input.shape[0],)) if reduction == 0 else input.new_empty(())
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad


@torch.library.register_fake("mmops::cross_entropy_forward_inplace")
def _cross_entropy_forward_inplace_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    return input.new_empty((input.shape[0],)) if reduction == 0 else input.new_empty(())


@torch.library.register_fake("mmops::cross_entropy_backward")
def _cross_entropy_backward_fake(grad, grad_output):
    return torch.empty_like(grad)


@torch.library.register_fake("mmops::cross_entropy_scale_grad_")
def _cross_entropy_scale_grad_fake(grad, grad_output):
    return None


def _ce_op_setup_context(ctx, inputs, output):
    ctx.reduction = inputs[3]
    ctx.save_for_backward(output[1])


def _ce_op_backward(ctx, grad_loss, _grad_of_grad):
    # The op used on its own (not through CrossEntropyFunction): out of place, grad_output broadcast per row.
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss.numel() != 0:
        raise RuntimeError("mmops.cross_entropy_forward: called with compute_grad=False, so it has no gradient")
    scale = grad_loss.unsqueeze(-1) if ctx.reduction == 0 else grad_loss
    return grad * scale, None, None, None, None, None, None


torch.library.register_autograd(
    "mmops::cross_entropy_forward", _ce_op_backward, setup_context=_ce_op_setup_context
)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused softmax + NLL on 2-D logits. The forward writes the gradient, already scaled for the reduction;
    the backward returns it as it is when grad_output is 1 (loss.backward()) and scales it otherwise."""

    @staticmethod
    def forward(ctx, input, target, weight, reduction, ignore_index, label_smoothing, inplace_backward):
        with _below_autograd():  # this Function is the autograd formula: skip the op's own (Python) one
            if not ctx.needs_input_grad[0]:
                return ops.cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                                                 False)[0]
            if inplace_backward:
                loss = ops.cross_entropy_forward_inplace(input, target, weight, reduction, ignore_index,
                                                         label_smoothing)
                torch.autograd.graph.increment_version(input)  # whatever else saved the logits must notice
                grad = input
            else:
                loss, grad = ops.cross_entropy_forward(input, target, weight, reduction, ignore_index,
                                                       label_smoothing, True)
        ctx.inplace = inplace_backward
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if ctx.inplace:
            # The logits' storage is the gradient buffer: scale it there (the user chose to trade the
            # logits for memory); a second backward through this graph then fails on the version check.
            ops.cross_entropy_scale_grad_(grad, grad_loss)
            torch.autograd.graph.increment_version(grad)
        elif torch.compiler.is_compiling() or grad_loss.numel() != 1 or grad_loss.item() != 1.0:
            grad = ops.cross_entropy_backward(grad, grad_loss)
        # else: grad_output is 1 and the saved gradient is the answer (it is not modified, so a retained
        # graph can be run again).
        return grad, None, None, None, None, None, None


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

    input: (N, C), (C,) or (N, C, d1, ...) logits; target: class indices ((N,), (), (N, d1, ...)) or class
    probabilities (the input's shape). float32/float64; float16/bfloat16 are computed in float32.
    ``inplace_backward=True`` writes the gradient into the logits' storage during the forward (the logits
    are overwritten; saves one logits-sized buffer). It applies when the (N, C) view of the logits is
    contiguous float32/float64; otherwise the gradient goes to a fresh buffer as usual.
    """
    red = REDUCTIONS.get(reduction)
    if red is None:
        raise ValueError(f"mmops.cross_entropy: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(
            "mmops.cross_entropy: input must be a floating-point tensor of logits, got "
            + (str(input.dtype) if isinstance(input, Tensor) else type(input).__name__)
        )
    if not isinstance(target, Tensor):
        raise TypeError(f"mmops.cross_entropy: target must be a Tensor, got {type(target).__name__}")
    prob = target.is_floating_point()
    if prob and target.requires_grad:
        raise NotImplementedError("mmops.cross_entropy: gradients with respect to probability targets are not supported")
    if not prob and target.dtype != torch.long:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"mmops.cross_entropy: class-index target must be an integer tensor, got {target.dtype}")
        target = target.long()

    dim = input.dim()
    out_shape = None
    if dim == 2:
        x, t = input, target
    elif dim == 1:
        x = input.unsqueeze(0)
        t = target.unsqueeze(0)
        out_shape = ()
    elif dim > 2:
        C = input.shape[1]
        x = input.movedim(1, -1).reshape(-1, C)
        if prob:
            t = target.movedim(1, -1).reshape(-1, C) if target.shape == input.shape else target
        else:
            spatial = (input.shape[0],) + tuple(input.shape[2:])
            if tuple(target.shape) != spatial:
                raise ValueError(
                    f"mmops.cross_entropy: target must have shape {spatial} for input {tuple(input.shape)}, "
                    f"got {tuple(target.shape)}"
                )
            t = target.reshape(-1)
        out_shape = spatial if not prob else (input.shape[0],) + tuple(input.shape[2:])
    else:
        raise ValueError("mmops.cross_entropy: input must have at least one dimension (the classes)")

    low = x.dtype in _LOW_PRECISION
    if low:  # computed in float32, returned in the input's dtype
        x = x.float()
        if prob:
            t = t.float()
    if weight is not None and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    inplace = inplace_backward and not low and x.is_contiguous() and dim == 2
    loss = CrossEntropyFunction.apply(x, t, weight, red, ignore_index, float(label_smoothing), inplace)
    if out_shape is not None and red == 0:
        loss = loss.reshape(out_shape)
    return loss.to(input.dtype) if low else loss


# ---------------------------------------------------------------------------------------------------------
# BatchNorm (+ fused activation)
# ---------------------------------------------------------------------------------------------------------
ACTIVATIONS = {None: 0, "tanh": 1, "relu": 2}


@torch.library.register_fake("mmops::batch_norm_forward")
def _batch_norm_forward_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, bessel, act):
    torch._check(input.dim() in (2, 3), lambda: "mmops.batch_norm: expected input of shape (N, C) or (N, C, L)")
    C = input.shape[1]
    return torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty((C,)), input.new_empty((C,))


@torch.library.register_fake("mmops::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, output, input, weight, mean, invstd, training, bessel, act, output_mask):
    C = input.shape[1]
    dx = torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else input.new_empty((0,))
    return dx, input.new_empty((C if output_mask[1] else 0,)), input.new_empty((C if output_mask[2] else 0,))


@torch.library.register_fake("mmops::batch_norm_stats")
def _batch_norm_stats_fake(input):
    C = input.shape[1]
    return input.new_empty((C,), dtype=torch.float64), input.new_empty((C,), dtype=torch.float64)


@torch.library.register_fake("mmops::batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, output, input, mean, act):
    return _batch_norm_stats_fake(input)


@torch.library.register_fake("mmops::batch_norm_backward_elemt")
def _batch_norm_backward_elemt_fake(grad_output, output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count,
                                    bessel, act):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


class BatchNormFunction(torch.autograd.Function):
    """act(BatchNorm(x)) in one forward kernel; the closed-form backward with the activation's derivative
    folded in, in one reduction pass and one elementwise pass."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, bessel, act):
        with _below_autograd():
            h, mean, invstd = ops.batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                                                     momentum, eps, bessel, act)
        ctx.save_for_backward(input, h, weight, mean, invstd)
        ctx.flags = (training, bessel, act)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        input, h, weight, mean, invstd = ctx.saved_tensors
        training, bessel, act = ctx.flags
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[1], need[2]]
        dx, dw, db = ops.batch_norm_backward(grad_h, h, input, weight, mean, invstd, training, bessel, act, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None, None)


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
    """Drop-in for ``torch.nn.functional.batch_norm`` on (N, C) and (N, C, L) input, plus:

    bessel=True normalises training batches with the unbiased variance (n - 1), as the makemore notebooks
    do (running_var is updated with the unbiased variance either way, as in PyTorch);
    activation="tanh" | "relu" applies the activation in the same kernel, forward and backward.
    float32/float64; float16/bfloat16 input is computed in float32 (statistics and parameters in float32).
    """
    act = ACTIVATIONS.get(activation, -1) if activation is None or isinstance(activation, str) else -1
    if act < 0:
        raise ValueError(f"mmops.batch_norm: activation must be None, 'tanh' or 'relu', got {activation!r}")
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError("mmops.batch_norm: input must be a floating-point tensor, got "
                        + (str(input.dtype) if isinstance(input, Tensor) else type(input).__name__))
    if input.dim() not in (2, 3):
        raise ValueError(f"mmops.batch_norm: expected input of shape (N, C) or (N, C, L), got {tuple(input.shape)}")
    low = input.dtype in _LOW_PRECISION
    x = input.float() if low else input
    out = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, bool(training), float(momentum),
                                  float(eps), bool(bessel), act)
    return out.to(input.dtype) if low else out


# ---------------------------------------------------------------------------------------------------------
# RNN: the cell and the whole sequence (BPTT in C++)
# ---------------------------------------------------------------------------------------------------------
NONLINEARITIES = {"tanh": 1, "relu": 2}  # the codes of ACTIVATIONS (csrc/cpu/simd.h)


@torch.library.register_fake("mmops::rnn_forward")
def _rnn_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, act):
    return w_ih.new_empty((input.shape[0], input.shape[1], w_hh.shape[0]))


@torch.library.register_fake("mmops::rnn_cell_forward")
def _rnn_cell_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, act):
    return w_ih.new_empty((input.shape[0], w_hh.shape[0]))


def _rnn_backward_fake_impl(grad_output, output, input, hx, w_ih, w_hh, act, output_mask):
    def maybe(flag, shape):
        return w_ih.new_empty(shape if flag else (0,))

    return (maybe(output_mask[0] and input.is_floating_point(), input.shape), maybe(output_mask[1], hx.shape),
            maybe(output_mask[2], w_ih.shape), maybe(output_mask[3], w_hh.shape),
            maybe(output_mask[4], (w_hh.shape[0],)))


torch.library.register_fake("mmops::rnn_backward")(_rnn_backward_fake_impl)
torch.library.register_fake("mmops::rnn_cell_backward")(_rnn_backward_fake_impl)


class RNNFunction(torch.autograd.Function):
    """The whole sequence (cell=False: input projection as one matmul, the recurrence and BPTT in C++, each
    weight gradient one matmul over all steps) or one step (cell=True: the same kernel with T = 1,
    h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)). The math is in csrc/cpu/rnn.cpp."""

    @staticmethod
    def forward(ctx, input, hx, w_ih, w_hh, b_ih, b_hh, act, cell):
        with _below_autograd():
            fwd = ops.rnn_cell_forward if cell else ops.rnn_forward
            out = fwd(input, hx, w_ih, w_hh, b_ih, b_hh, act)
        ctx.save_for_backward(input, hx, w_ih, w_hh, out)
        ctx.flags = (act, cell)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, hx, w_ih, w_hh, out = ctx.saved_tensors
        act, cell = ctx.flags
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[4] or need[5]]
        with _below_autograd():
            bwd = ops.rnn_cell_backward if cell else ops.rnn_backward
            d_in, d_hx, d_w_ih, d_w_hh, d_b = bwd(grad_out, out, input, hx, w_ih, w_hh, act, mask)
        # b_ih and b_hh get the same gradient: two tensors, so that accumulating into one .grad never
        # writes the other's
        return (d_in if need[0] else None, d_hx if need[1] else None, d_w_ih if need[2] else None,
                d_w_hh if need[3] else None, d_b if need[4] else None,
                (d_b.clone() if need[4] else d_b) if need[5] else None, None, None)


def _nonlinearity_code(nonlinearity, fn: str) -> int:
    code = NONLINEARITIES.get(nonlinearity) if isinstance(nonlinearity, str) else None
    if code is None:
        raise ValueError(f"{fn}: unknown nonlinearity {nonlinearity!r} (expected 'tanh' or 'relu')")
    return code


def _check_rnn_input(input, w_ih, fn: str, token_dim: int) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.is_floating_point():
        if input.dim() != token_dim + 1:
            raise ValueError(f"{fn}: expected float input with {token_dim + 1} dimensions, got shape {tuple(input.shape)}")
        if input.shape[-1] != w_ih.shape[1]:
            raise ValueError(f"{fn}: input has input_size {input.shape[-1]} but weight_ih expects {w_ih.shape[1]}")
        if input.dtype != w_ih.dtype:
            raise TypeError(f"{fn}: input dtype {input.dtype} does not match weight_ih dtype {w_ih.dtype}")
    elif input.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if input.dim() != token_dim:
            raise ValueError(f"{fn}: expected integer token input with {token_dim} dimensions, got shape "
                             f"{tuple(input.shape)}")
    else:
        raise TypeError(f"{fn}: input must be floating point or integer tokens, got {input.dtype}")


def rnn(
    input: Tensor,
    hx: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
    batch_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """One RNN layer over a whole sequence: returns (output, h_n).

    input: (T, B, input_size) float, or integer tokens (T, B) that stand for one-hot rows of size input_size
    (a row gather of weight_ih; no one-hot matrix is built); (B, T, ...) with batch_first.
    hx: (B, H), (1, B, H) or None (zeros). output: (T, B, H) ((B, T, H) with batch_first); h_n: hx's shape,
    (1, B, H) when hx is None, as nn.RNN with one layer.
    """
    fn = "mmops.rnn"
    act = _nonlinearity_code(nonlinearity, fn)
    _check_rnn_input(input, weight_ih, fn, 2)
    if batch_first:
        input = input.transpose(0, 1)
    T, B = input.shape[0], input.shape[1]
    H = weight_hh.shape[0]
    if input.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        input = input.long()
    squeeze_h = True
    if hx is None:
        h0 = weight_ih.new_zeros((B, H))
    else:
        if hx.dim() == 3 and hx.shape[0] == 1:
            h0, squeeze_h = hx[0], True
        elif hx.dim() == 2:
            h0, squeeze_h = hx, False
        else:
            raise ValueError(f"{fn}: hx must have shape ({B}, {H}) or (1, {B}, {H}), got {tuple(hx.shape)}")
        if tuple(h0.shape) != (B, H):
            raise ValueError(f"{fn}: hx must have shape ({B}, {H}) or (1, {B}, {H}), got {tuple(hx.shape)}")
    if T == 0:
        raise ValueError(f"{fn}: the sequence is empty (T = 0)")
    out = RNNFunction.apply(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, act, False)
    h_n = out[-1]
    if squeeze_h:
        h_n = h_n.unsqueeze(0)
    return (out.transpose(0, 1) if batch_first else out), h_n


def rnn_cell(
    input: Tensor,
    hx: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One step, as nn.RNNCell: input (B, input_size) float or tokens (B,); hx (B, H) or None (zeros)."""
    fn = "mmops.rnn_cell"
    act = _nonlinearity_code(nonlinearity, fn)
    _check_rnn_input(input, weight_ih, fn, 1)
    if not input.is_floating_point() and input.dtype != torch.long:
        input = input.long()
    B, H = input.shape[0], weight_hh.shape[0]
    if hx is None:
        hx = weight_ih.new_zeros((B, H))
    elif tuple(hx.shape) != (B, H):
        raise ValueError(f"{fn}: hx must have shape ({B}, {H}), got {tuple(hx.shape)}")
    return RNNFunction.apply(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, act, True)


# ---------------------------------------------------------------------------------------------------------
# SyncBatchNorm: BatchNorm over the union of every rank's batch (torch.distributed), on the fused kernels
# ---------------------------------------------------------------------------------------------------------
COMM_SECONDS = [0.0]  # time spent inside SyncBatchNorm's collectives (read by `bench --op syncbn`)


def _collective(what: str, fn, *args, **kw):
    import time

    t0 = time.perf_counter()
    try:
        return fn(*args, **kw)
    except RuntimeError as e:  # a dead or stuck peer: name what failed instead of a bare gloo/nccl message
        raise RuntimeError(f"mmops.nn.SyncBatchNorm: the {what} across ranks failed (a rank died, diverged or "
                           f"timed out): {e}") from e
    finally:
        COMM_SECONDS[0] += time.perf_counter() - t0


class SyncBatchNormFunction(torch.autograd.Function):
    """Forward: local (count, mean, M2) from the fused statistics kernel, one all_gather of them (so ranks may
    hold unequal batches), Chan's combination into the global mean and M2, then the fused normalise +
    activation with the global statistics. Backward: local (sum dy', sum dy' (x - mean)), one all_reduce,
    then the fused elementwise pass with the global count. weight/bias get the local sums (DDP averages
    them, as with torch.nn.SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, bessel, act, group):
        import torch.distributed as dist

        C = input.shape[1]
        with _below_autograd():
            mean_l, m2_l = ops.batch_norm_stats(input)
        n_l = input.shape[0] * (input.shape[2] if input.dim() == 3 else 1)
        packed = torch.cat([mean_l.new_tensor([float(n_l)]), mean_l, m2_l])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        _collective("all_gather of the batch statistics", dist.all_gather, gathered, packed, group=group)
        g = torch.stack(gathered)
        counts, means, m2s = g[:, :1], g[:, 1 : 1 + C], g[:, 1 + C :]
        n = int(counts.sum().item())
        if n <= 1:
            raise ValueError(f"mmops.nn.SyncBatchNorm: expected more than 1 value per channel when training, got {n} "
                             "across all ranks")
        mean = (counts * means).sum(0) / n
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)  # Chan et al.: M2 of the union
        var = m2 / (n - 1 if bessel else n)
        dt = input.dtype
        with _below_autograd():
            # the fused normalise + activation, fed the global statistics in the running-stat slots (eval path)
            h, mean_t, invstd = ops.batch_norm_forward(input, weight, bias, mean.to(dt), var.to(dt), False, 0.0, eps,
                                                       False, act)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(dt), alpha=momentum)
                running_var.mul_(1 - momentum).add_((m2 / (n - 1)).to(dt), alpha=momentum)
        ctx.save_for_backward(input, h, weight, mean_t, invstd)
        ctx.flags = (n, bessel, act, group)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        import torch.distributed as dist

        input, h, weight, mean, invstd = ctx.saved_tensors
        n, bessel, act, group = ctx.flags
        C = input.shape[1]
        with _below_autograd():
            sdy, sdyx = ops.batch_norm_backward_reduce(grad_h, h, input, mean, act)
        dgamma = (sdyx * invstd.double()).to(input.dtype) if ctx.needs_input_grad[1] else None
        dbeta = sdy.to(input.dtype) if ctx.needs_input_grad[2] else None
        packed = torch.cat([sdy, sdyx])
        _collective("all_reduce of the backward sums", dist.all_reduce, packed, group=group)
        dx = None
        if ctx.needs_input_grad[0]:
            with _below_autograd():
                dx = ops.batch_norm_backward_elemt(grad_h, h, input, weight, mean, invstd, packed[:C], packed[C:], n,
                                                   bessel, act)
        return dx, dgamma, dbeta, None, None, None, None, None, None, None
