"""SyncBatchNorm: BatchNorm over the union of every rank's batch (torch.distributed), on the fused BatchNorm
kernels (csrc/cpu/batch_norm.cpp: the statistics, the backward sums and the elementwise passes)."""
from __future__ import annotations

import torch

from ._ops import first_order_only, ops


def _collective(what: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RuntimeError as e:  # a dead or stuck peer: name what failed instead of a bare gloo/nccl message
        raise RuntimeError(f"mmops.nn.SyncBatchNorm: the {what} across ranks failed (a rank died, diverged or "
                           f"timed out): {e}") from e


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
    @first_order_only("mmops.nn.SyncBatchNorm")
    def backward(ctx, grad_h):
        import torch.distributed as dist

        input, h, weight, mean, invstd = ctx.saved_tensors
        n, bessel, act, group = ctx.flags
        C = input.shape[1]
        sdy, sdyx = ops.batch_norm_backward_reduce(grad_h, h, input, mean, act)
        dgamma = (sdyx * invstd.double()).to(input.dtype) if ctx.needs_input_grad[1] else None
        dbeta = sdy.to(input.dtype) if ctx.needs_input_grad[2] else None
        packed = torch.cat([sdy, sdyx])
        _collective("all_reduce of the backward sums", dist.all_reduce, packed, group=group)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ops.batch_norm_backward_elemt(grad_h, h, input, weight, mean, invstd, packed[:C], packed[C:], n,
                                               bessel, act)
        return dx, dgamma, dbeta, None, None, None, None, None, None, None
