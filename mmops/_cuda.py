"""The CUDA side of the command line, as functions for bench.py / check.py / train.py to call (`--device cuda`).

available()          whether this process can run the CUDA kernels (a GPU, and mmops built with csrc/cuda/*.cu)
require()            raises RuntimeError with one line saying why not (for the CLI to print and exit 2 early)
copy_bandwidth_gbs() the device's measured copy bandwidth (read + write), the yardstick of `bench --device cuda`
bench(...)           each op (forward + backward) against PyTorch's op and torch.compile of it: ms, GB/s, % of copy
check()              the cmp table on the GPU: every fused op vs the reference chain / PyTorch, run on cuda

Not yet run on a GPU (none is lent to this project's machines).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ._ops import ops


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("mmops::cross_entropy_forward", "CUDA")


def require() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if not available():
        raise RuntimeError("--device cuda: mmops was built without its CUDA kernels (rebuild with a CUDA build of "
                           "torch and CUDA_HOME set)")


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _row(op: str, size: str, cand: str, ms: float, nbytes: int, copy_gbs: float) -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"op": op, "size": size, "candidate": cand, "ms": ms, "GB/s": gbs, "% of copy": 100 * gbs / copy_gbs}


def bench(ce_sizes=((16384, 50257, torch.bfloat16), (4096, 27, torch.float32)),
          bn_sizes=((16384, 512), (32, 200)), compile_: bool = True) -> list[dict]:
    """Forward + backward of each op; bytes: what the fused kernels must move (inputs read, outputs written)."""
    require()
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for N, C, dtype in ce_sizes:
        x = torch.randn(N, C, device="cuda", dtype=dtype)
        t = torch.randint(0, C, (N,), device="cuda")
        nbytes = 2 * x.numel() * x.element_size()  # read the logits, write the gradient
        work = x.clone()
        cands = {
            "mmops (inplace)": lambda: ops.cross_entropy_forward_inplace(work, t, None, 1, -100, 0.0),
            "mmops": lambda: ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, True),
        }
        xg = x.detach().requires_grad_()
        cands["F.cross_entropy"] = lambda: torch.autograd.grad(F.cross_entropy(xg, t), xg)
        if compile_:
            cf = torch.compile(F.cross_entropy)
            cands["torch.compile"] = lambda: torch.autograd.grad(cf(xg, t), xg)
        for name, fn in cands.items():
            rows.append(_row("cross_entropy", f"({N}, {C}) {dtype}", name, time_ms(fn), nbytes, copy_gbs))
    for N, C in bn_sizes:
        x = torch.randn(N, C, device="cuda", requires_grad=True)
        w = torch.ones(C, device="cuda", requires_grad=True)
        b = torch.zeros(C, device="cuda", requires_grad=True)
        dh = torch.randn(N, C, device="cuda")
        nbytes = 5 * x.numel() * 4  # forward: read x, write h; backward: read dh, h, x, write dx (minus the 2nd x)
        from . import batch_norm

        fused = lambda: torch.autograd.grad(batch_norm(x, None, None, w, b, True, activation="tanh"), (x, w, b), dh)
        ref = lambda: torch.autograd.grad(torch.tanh(F.batch_norm(x, None, None, w, b, True)), (x, w, b), dh)
        cands = {"mmops": fused, "F.batch_norm + tanh": ref}
        if compile_:
            cref = torch.compile(lambda x, w, b: torch.tanh(F.batch_norm(x, None, None, w, b, True)))
            cands["torch.compile"] = lambda: torch.autograd.grad(cref(x, w, b), (x, w, b), dh)
        for name, fn in cands.items():
            rows.append(_row("batch_norm+tanh", f"({N}, {C})", name, time_ms(fn), nbytes, copy_gbs))
    return rows


def check() -> list:
    """The cmp rows of `python -m mmops check`, on the GPU (float64 and float32)."""
    require()
    from . import batch_norm, cross_entropy, reference, rnn
    from .testing import cmp

    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.float64, torch.float32):
        print(f"-- on cuda, {dtype}")
        logits = torch.randn(32, 27, device="cuda", dtype=dtype, generator=g).requires_grad_()
        Y = torch.randint(0, 27, (32,), device="cuda", generator=g)
        loss = cross_entropy(logits, Y)
        loss.backward()
        rows.append(cmp("ce loss vs F.cross_entropy", F.cross_entropy(logits.detach(), Y), loss))
        rows.append(cmp("ce dlogits vs closed form", reference.cross_entropy_closed_form_grad(logits, Y), logits))
        x = (torch.randn(32, 64, device="cuda", dtype=dtype, generator=g) * 2 + 0.3).requires_grad_()
        w = torch.ones(64, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.zeros(64, device="cuda", dtype=dtype, requires_grad=True)
        dh = torch.randn(32, 64, device="cuda", dtype=dtype, generator=g)
        h = batch_norm(x, None, None, w, b, True, bessel=True, activation="tanh")
        h.backward(dh)
        chain = reference.batch_norm_chain(x.detach(), w.detach().view(1, -1), b.detach().view(1, -1))
        h_ref = torch.tanh(chain["hpreact"])
        rows.append(cmp("bn h vs chain", h_ref, h))
        rows.append(cmp("bn dx vs one-line form",
                        reference.batch_norm_closed_form_grad(x, w, (1 - h_ref ** 2) * dh), x))
        xs = torch.randn(5, 4, 8, device="cuda", dtype=dtype, generator=g)
        h0 = torch.zeros(4, 16, device="cuda", dtype=dtype)
        w_ih = (torch.randn(16, 8, device="cuda", dtype=dtype, generator=g) * 0.3).requires_grad_()
        w_hh = (torch.randn(16, 16, device="cuda", dtype=dtype, generator=g) * 0.3).requires_grad_()
        out, _ = rnn(xs, h0, w_ih, w_hh)
        ref_rnn = torch.nn.RNN(8, 16, bias=False).to(device="cuda", dtype=dtype)
        with torch.no_grad():
            ref_rnn.weight_ih_l0.copy_(w_ih)
            ref_rnn.weight_hh_l0.copy_(w_hh)
        rows.append(cmp("rnn output vs nn.RNN", ref_rnn(xs, h0[None])[0], out))
    return rows
