"""The RNN: the fake kernels of its ops, its torch.autograd.Function (the cell and the whole sequence), the drop-ins
for one layer (mmops.rnn, mmops.rnn_cell), and the layer runner behind mmops.nn.RNN (both directions, padded or
packed batches). The math (the recurrence, backprop through time, the weight gradients) is written once, in
csrc/cpu/rnn.cpp."""
from __future__ import annotations

import torch
from torch import Tensor

from ._ops import ACTIVATIONS, first_order_only, ops

TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@torch.library.register_fake("mmops::rnn_forward")
def _forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, act):
    return w_ih.new_empty((input.shape[0], input.shape[1], w_hh.shape[0]))


@torch.library.register_fake("mmops::rnn_cell_forward")
def _cell_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, act):
    return w_ih.new_empty((input.shape[0], w_hh.shape[0]))


def _backward_fake(grad_output, output, input, hx, w_ih, w_hh, act, output_mask):
    def maybe(flag, shape):
        return w_ih.new_empty(shape if flag else (0,))

    return (maybe(output_mask[0] and input.is_floating_point(), input.shape), maybe(output_mask[1], hx.shape),
            maybe(output_mask[2], w_ih.shape), maybe(output_mask[3], w_hh.shape),
            maybe(output_mask[4], (w_hh.shape[0],)))


torch.library.register_fake("mmops::rnn_backward")(_backward_fake)
torch.library.register_fake("mmops::rnn_cell_backward")(_backward_fake)


class RNNFunction(torch.autograd.Function):
    """The whole sequence (cell=False: input projection as one matmul, the recurrence and BPTT in C++, each
    weight gradient one matmul over all steps) or one step (cell=True: the same kernel with T = 1,
    h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh))."""

    @staticmethod
    def forward(ctx, input, hx, w_ih, w_hh, b_ih, b_hh, act, cell):
        out = (ops.rnn_cell_forward if cell else ops.rnn_forward)(input, hx, w_ih, w_hh, b_ih, b_hh, act)
        ctx.save_for_backward(input, hx, w_ih, w_hh, out)
        ctx.flags = (act, cell)
        return out

    @staticmethod
    @first_order_only("mmops.rnn")
    def backward(ctx, grad_out):
        input, hx, w_ih, w_hh, out = ctx.saved_tensors
        act, cell = ctx.flags
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[4] or need[5]]
        bwd = ops.rnn_cell_backward if cell else ops.rnn_backward
        d_in, d_hx, d_w_ih, d_w_hh, d_b = bwd(grad_out, out, input, hx, w_ih, w_hh, act, mask)
        # b_ih and b_hh get the same gradient: two tensors, so that accumulating into one .grad never
        # writes the other's
        return (d_in if need[0] else None, d_hx if need[1] else None, d_w_ih if need[2] else None,
                d_w_hh if need[3] else None, d_b if need[4] else None,
                (d_b.clone() if need[4] else d_b) if need[5] else None, None, None)


def nonlinearity_code(nonlinearity, fn: str) -> int:
    code = ACTIVATIONS.get(nonlinearity) if isinstance(nonlinearity, str) else None
    if code is None:
        raise ValueError(f"{fn}: unknown nonlinearity {nonlinearity!r} (expected 'tanh' or 'relu')")
    return code


def _check_input(input, w_ih, fn: str, token_dim: int) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if input.is_floating_point():
        if input.dim() != token_dim + 1:
            raise ValueError(f"{fn}: expected float input with {token_dim + 1} dimensions, got shape "
                             f"{tuple(input.shape)}")
        if input.shape[-1] != w_ih.shape[1]:
            raise RuntimeError(f"{fn}: input.size(-1) must be equal to input_size: expected {w_ih.shape[1]} (weight_ih), "
                               f"got {input.shape[-1]}")
        if input.dtype != w_ih.dtype:
            raise ValueError(f"{fn}: input dtype {input.dtype} does not match weight dtype {w_ih.dtype}")
    elif input.dtype in TOKEN_DTYPES:
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
    act = nonlinearity_code(nonlinearity, fn)
    _check_input(input, weight_ih, fn, 2)
    if batch_first:
        input = input.transpose(0, 1)
    T, B = input.shape[0], input.shape[1]
    H = weight_hh.shape[0]
    if not input.is_floating_point() and input.dtype != torch.long:
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
            raise RuntimeError(f"{fn}: expected hx of shape ({B}, {H}) or (1, {B}, {H}), got {tuple(hx.shape)}")
        if tuple(h0.shape) != (B, H):
            raise RuntimeError(f"{fn}: expected hx of shape ({B}, {H}) or (1, {B}, {H}), got {tuple(hx.shape)}")
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
    """One step, as nn.RNNCell: input (B, input_size) float or tokens (B,), or unbatched (input_size,) float or a
    0-d token; hx (B, H) ((H,) unbatched) or None (zeros)."""
    fn = "mmops.rnn_cell"
    act = nonlinearity_code(nonlinearity, fn)
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    if hx is not None and hx.dim() not in (1, 2):
        raise ValueError(f"{fn}: expected hx to be 1-D or 2-D, got {hx.dim()}-D")
    unbatched = input.dim() == (1 if input.is_floating_point() else 0)
    if unbatched:
        input = input.unsqueeze(0)
        if hx is not None:
            if hx.dim() != 1:
                raise RuntimeError(f"{fn}: for unbatched input hx must be 1-D (hidden_size,), got {tuple(hx.shape)}")
            hx = hx.unsqueeze(0)
    _check_input(input, weight_ih, fn, 1)
    if not input.is_floating_point() and input.dtype != torch.long:
        input = input.long()
    B, H = input.shape[0], weight_hh.shape[0]
    if hx is None:
        hx = weight_ih.new_zeros((B, H))
    elif tuple(hx.shape) != (B, H):
        raise RuntimeError(f"{fn}: expected hx of shape ({B}, {H}), got {tuple(hx.shape)}")
    h = RNNFunction.apply(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, act, True)
    return h.squeeze(0) if unbatched else h


# ---- the layers of mmops.nn.RNN: one direction over a padded batch whose sequences may end early --------------
def reverse_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x (T, B, ...) with sequence b reversed over its first lengths[b] steps (the padding after it stays put).
    lengths None: every sequence is T long (a plain flip). The map is its own inverse."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    L = lengths.to(x.device).unsqueeze(0)
    idx = torch.where(t < L, L - 1 - t, t)  # (T, B)
    idx = idx.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, idx)


def run_direction(x: Tensor, h0: Tensor, params, nonlinearity: str, batch_sizes: list[int] | None) -> tuple[Tensor, Tensor]:
    """One direction of one layer: x (T, B, I) or tokens (T, B), h0 (B, H). batch_sizes (the packed sequence's,
    sorted by decreasing length): at step t only rows [0, batch_sizes[t]) are running; a row that has ended keeps
    its last hidden state, and its outputs past the end are 0. Each stretch of steps with one batch size is one
    call of the fused sequence kernel. Returns (output (T, B, H), h_last (B, H))."""
    if batch_sizes is None:
        out, _ = rnn(x, h0, *params, nonlinearity=nonlinearity)
        return out, out[-1]
    T, B = x.shape[0], x.shape[1]
    outs, h, t0 = [], h0, 0
    while t0 < T:
        b = batch_sizes[t0]
        t1 = t0
        while t1 < T and batch_sizes[t1] == b:
            t1 += 1
        out, _ = rnn(x[t0:t1, :b], h[:b], *params, nonlinearity=nonlinearity)
        h = torch.cat([out[-1], h[b:]]) if b < B else out[-1]
        outs.append(torch.nn.functional.pad(out, (0, 0, 0, B - b)) if b < B else out)
        t0 = t1
    return torch.cat(outs), h
