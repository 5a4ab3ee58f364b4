"""`python -m mmops check`: the cmp table of the manual chain vs autograd, and of every fused op family
(cross-entropy, BatchNorm, RNN cell and sequence) vs its reference chain with the manual backward. Exits with
code 1 if any row is not approximately equal."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import mmops

from . import reference
from .testing import CmpRow, cmp


def check_manual_chain(dtype=torch.float64, n: int = 32) -> list[CmpRow]:
    """The notebook's exercise 1: every manual gradient of the MLP against autograd."""
    print(f"-- manual backward of the MLP chain vs autograd ({dtype}, batch {n})")
    g = torch.Generator().manual_seed(42)
    p = reference.mlp_params(dtype=dtype)
    Xb = torch.randint(0, 27, (n, 3), generator=g)
    Yb = torch.randint(0, 27, (n,), generator=g)
    chain = reference.mlp_chain(p, Xb, Yb)
    chain["loss"].backward()
    d = reference.mlp_chain_backward(p, chain, Xb, Yb)
    rows = []
    for name in ["logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
                 "logits", "h", "hpreact", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff", "bnmeani", "hprebn",
                 "embcat", "emb"]:
        rows.append(cmp(name, d["d" + name], chain[name]))
    for name in ["W2", "b2", "bngain", "bnbias", "W1", "b1", "C"]:
        rows.append(cmp(name, d["d" + name], p[name]))
    return rows


def check_cross_entropy(dtype=torch.float64, n: int = 32, C: int = 27) -> list[CmpRow]:
    print(f"-- fused mmops.cross_entropy vs the chain ({dtype}, ({n}, {C}))")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, C, generator=g, dtype=dtype).requires_grad_()
    Y = torch.randint(0, C, (n,), generator=g)
    chain = reference.cross_entropy_chain(logits.detach(), Y)
    loss = mmops.cross_entropy(logits, Y)
    loss.backward()
    closed = reference.cross_entropy_closed_form_grad(logits, Y)
    manual = reference.cross_entropy_chain_backward(chain, Y)["dlogits"]
    return [
        cmp("loss vs chain", chain["loss"], loss),
        cmp("loss vs F.cross_entropy", F.cross_entropy(logits.detach(), Y), loss),
        cmp("dlogits vs manual chain", manual, logits),
        cmp("dlogits vs closed form", closed, logits),
    ]


def check_batch_norm(dtype=torch.float64, n: int = 32, C: int = 64) -> list[CmpRow]:
    print(f"-- fused mmops.batch_norm(bessel=True, activation='tanh') vs the chain ({dtype}, ({n}, {C}))")
    g = torch.Generator().manual_seed(2)
    hprebn = (torch.randn(n, C, generator=g, dtype=dtype) * 2 + 0.3).requires_grad_()
    bngain = (torch.randn(C, generator=g, dtype=dtype) * 0.1 + 1).requires_grad_()
    bnbias = (torch.randn(C, generator=g, dtype=dtype) * 0.1).requires_grad_()
    dh = torch.randn(n, C, generator=g, dtype=dtype)
    chain = reference.batch_norm_chain(hprebn.detach(), bngain.detach().view(1, -1), bnbias.detach().view(1, -1))
    h_ref = torch.tanh(chain["hpreact"])
    dhpreact = (1 - h_ref**2) * dh
    manual = reference.batch_norm_chain_backward(chain, dhpreact)
    h = mmops.batch_norm(hprebn, None, None, bngain, bnbias, True, bessel=True, activation="tanh")
    h.backward(dh)
    return [
        cmp("h vs chain", h_ref, h),
        cmp("dhprebn vs manual chain", manual["dhprebn"], hprebn),
        cmp("dhprebn vs one-line form", reference.batch_norm_closed_form_grad(hprebn, bngain, dhpreact), hprebn),
        cmp("dbngain vs manual chain", manual["dbngain"].view(-1), bngain),
        cmp("dbnbias vs manual chain", manual["dbnbias"].view(-1), bnbias),
    ]


def check_rnn(nonlinearity: str, dtype=torch.float64, T: int = 6, B: int = 4, I: int = 5, H: int = 8) -> list[CmpRow]:
    """The fused RNN (sequence and cell) against d2l's step loop (reference.rnn_chain) and its manual backprop
    through time (reference.rnn_chain_backward); nn.RNN's weight_ih / weight_hh are the loop's W_xh^T / W_hh^T
    and its two biases add up to b_h, so each receives the loop's db_h."""
    print(f"-- fused mmops.rnn / mmops.rnn_cell ({nonlinearity}) vs the step loop and its manual BPTT "
          f"({dtype}, T{T} B{B} I{I} H{H})")
    g = torch.Generator().manual_seed(3)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    x, h0 = leaf(T, B, I), leaf(B, H, scale=0.5)
    w_ih, w_hh = leaf(H, I, scale=0.4), leaf(H, H, scale=0.3)
    b_ih, b_hh = leaf(H, scale=0.1), leaf(H, scale=0.1)
    dout = torch.randn(T, B, H, generator=g, dtype=dtype)
    # float32: the fused kernels sum in another order than the loop; the rows are near 1e-6 relative
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)

    chain = reference.rnn_chain(x.detach(), h0.detach(), w_ih.detach().T, w_hh.detach().T,
                                (b_ih + b_hh).detach(), nonlinearity)
    manual = reference.rnn_chain_backward(chain, dout)
    out, _ = mmops.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity)
    out.backward(dout)
    rows = [
        cmp("rnn output vs loop", chain["outputs"], out.detach(), **tol),
        cmp("rnn dinput vs BPTT", manual["dinputs"], x, **tol),
        cmp("rnn dh0 vs BPTT", manual["dh0"], h0, **tol),
        cmp("rnn dweight_ih vs BPTT", manual["dW_xh"].T, w_ih, **tol),
        cmp("rnn dweight_hh vs BPTT", manual["dW_hh"].T, w_hh, **tol),
        cmp("rnn dbias_ih vs BPTT", manual["db_h"], b_ih, **tol),
        cmp("rnn dbias_hh vs BPTT", manual["db_h"], b_hh, **tol),
    ]
    for t in (x, h0, w_ih, w_hh, b_ih, b_hh):
        t.grad = None
    step = reference.rnn_chain(x[:1].detach(), h0.detach(), w_ih.detach().T, w_hh.detach().T,
                               (b_ih + b_hh).detach(), nonlinearity)
    step_manual = reference.rnn_chain_backward(step, dout[:1])
    h1 = mmops.rnn_cell(x[0], h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity)
    h1.backward(dout[0])
    rows += [
        cmp("cell h vs one step", step["outputs"][0], h1.detach(), **tol),
        cmp("cell dinput vs manual", step_manual["dinputs"][0], x.grad[0], **tol),
        cmp("cell dhx vs manual", step_manual["dh0"], h0, **tol),
        cmp("cell dweight_ih vs manual", step_manual["dW_xh"].T, w_ih, **tol),
        cmp("cell dweight_hh vs manual", step_manual["dW_hh"].T, w_hh, **tol),
        cmp("cell dbias vs manual", step_manual["db_h"], b_ih, **tol),
    ]
    return rows


def run_all() -> list[CmpRow]:
    rows = []
    rows += check_manual_chain()
    for dtype in (torch.float64, torch.float32):
        rows += check_cross_entropy(dtype)
        rows += check_batch_norm(dtype)
        for nonlinearity in ("tanh", "relu"):
            rows += check_rnn(nonlinearity, dtype)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmops check", description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the cmp rows on the GPU through mmops' CUDA kernels (default cpu)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        from . import _cuda

        try:
            _cuda.require()
        except RuntimeError as e:
            p.error(str(e))
        rows = _cuda.check()
    else:
        rows = run_all()
    bad = [r.name for r in rows if not r.approx]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} approx" + (f"; NOT approx: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0
