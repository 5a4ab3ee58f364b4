"""The CUDA kernels on a GPU: against PyTorch's ops, gradcheck in float64, opcheck, torch.compile. Skipped where
torch.cuda.is_available() is false (and where mmops was built without its CUDA sources). NOT YET RUN on a GPU:
written to be ready for one (the kernels' arithmetic is proven on the CPU by tests/test_cuda_device_code.py).
"""
import pytest
import torch
import torch.nn.functional as F

import mmops
from mmops._ops import ops


def _has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("mmops::cross_entropy_forward", "CUDA")
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _has_cuda_kernels(), reason="needs a CUDA GPU and mmops built with its CUDA "
                                                                "sources (torch with CUDA, CUDA_HOME set)")
DEV = "cuda"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


# ---- cross-entropy -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(33, 27), (1, 1), (64, 1000), (16, 50257), (8, 40000)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, ignore_index=3),
                                     dict(weight=True, reduction="sum"), dict(reduction="none")])
def test_cross_entropy_op_matches_torch(dtype, shape, options):
    N, C = shape
    options = dict(options)
    x = (torch.randn(N, C, device=DEV) * 3).to(dtype)
    t = torch.randint(0, C, (N,), device=DEV)
    if options.pop("weight", False):
        options["weight"] = (torch.rand(C, device=DEV) + 0.5).to(dtype)
    red = {"none": 0, "mean": 1, "sum": 2}[options.get("reduction", "mean")]
    loss, grad = ops.cross_entropy_forward(x, t, options.get("weight"), red, options.get("ignore_index", -100),
                                           options.get("label_smoothing", 0.0), True)
    xd = x.double().requires_grad_()
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    ref = F.cross_entropy(xd, t, **kw)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), equal_nan=True, **TOL[dtype])
    scale = max(xd.grad.abs().max().item(), 1e-30) if dtype in (torch.bfloat16, torch.float16) else 1
    torch.testing.assert_close(grad.double() / scale, xd.grad / scale, **TOL[dtype])


def test_cross_entropy_inplace_and_backward():
    x = torch.randn(64, 1000, device=DEV)
    t = torch.randint(0, 1000, (64,), device=DEV)
    loss, grad = ops.cross_entropy_forward(x, t, None, 1, -100, 0.0, True)
    xi = x.clone()
    loss_i = ops.cross_entropy_forward_inplace(xi, t, None, 1, -100, 0.0)
    torch.testing.assert_close(loss_i, loss)
    torch.testing.assert_close(xi, grad)
    go = torch.randn(64, device=DEV)
    torch.testing.assert_close(ops.cross_entropy_backward(grad, go), grad * go[:, None])
    ops.cross_entropy_scale_grad_(xi, torch.ones((), device=DEV))
    torch.testing.assert_close(xi, grad)


def test_cross_entropy_bad_target_raises_before_writing():
    x = torch.randn(4, 27, device=DEV)
    before = x.clone()
    with pytest.raises(IndexError, match="target"):
        ops.cross_entropy_forward_inplace(x, torch.tensor([0, 27, 1, 2], device=DEV), None, 1, -100, 0.0)
    torch.testing.assert_close(x, before)


def test_cross_entropy_public_function_and_gradcheck():
    x = torch.randn(9, 27, device=DEV, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 27, (9,), device=DEV)
    assert torch.autograd.gradcheck(lambda x: mmops.cross_entropy(x, t, label_smoothing=0.1), (x,))
    loss = mmops.cross_entropy(x, t)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))


# ---- BatchNorm -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 200), (4096, 64), (33, 5, 7), (64, 16, 300)])
def test_batch_norm_matches_torch(dtype, shape):
    C = shape[1]
    x = (torch.randn(shape, device=DEV, dtype=dtype) * 2 + 1).requires_grad_()
    w = torch.rand(C, device=DEV, dtype=dtype).add(0.5).requires_grad_()
    b = torch.randn(C, device=DEV, dtype=dtype).requires_grad_()
    rm, rv = torch.zeros(C, device=DEV, dtype=dtype), torch.ones(C, device=DEV, dtype=dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    out = mmops.batch_norm(x, rm, rv, w, b, training=True)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.batch_norm(x2, rm2, rv2, w2, b2, training=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(rm, rm2, **TOL[dtype])
    torch.testing.assert_close(rv, rv2, **TOL[dtype])
    go = torch.randn_like(out)
    out.backward(go)
    ref.backward(go)
    for a, r in [(x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)]:
        torch.testing.assert_close(a, r, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-4 if dtype ==
                                   torch.float32 else 1e-10)


@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("bessel", [False, True])
def test_batch_norm_gradcheck(activation, bessel):
    x = torch.randn(12, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, device=DEV, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(5, device=DEV, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: mmops.batch_norm(x, None, None, w, b, training=True, bessel=bessel, activation=activation)
    assert torch.autograd.gradcheck(f, (x, w, b))


# ---- RNN -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_matches_torch(nonlinearity):
    torch.manual_seed(0)
    ref = torch.nn.RNN(16, 32, nonlinearity=nonlinearity).to(DEV)
    mine = mmops.nn.RNN(16, 32, nonlinearity=nonlinearity).to(DEV)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(35, 8, 16, device=DEV)
    out, h = mine(x)
    out_r, h_r = ref(x)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    out_r.sum().backward()
    for (n, p), (_, q) in zip(mine.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_gradcheck(nonlinearity):
    T, B, I, H = 4, 3, 5, 6
    kw = dict(device=DEV, dtype=torch.float64, requires_grad=True)
    x, h0 = torch.randn(T, B, I, **kw), torch.randn(B, H, **kw)
    w_ih, w_hh = torch.randn(H, I, **kw), torch.randn(H, H, **kw)
    b_ih, b_hh = torch.randn(H, **kw), torch.randn(H, **kw)
    assert torch.autograd.gradcheck(lambda *a: mmops.rnn(*a, nonlinearity=nonlinearity), (x, h0, w_ih, w_hh, b_ih, b_hh))
    tok = torch.randint(0, I, (T, B), device=DEV)
    assert torch.autograd.gradcheck(lambda *a: mmops.rnn(tok, *a, nonlinearity=nonlinearity), (h0, w_ih, w_hh, b_ih))


def test_rnn_bad_token_raises():
    w_ih, w_hh, hx = torch.randn(6, 5, device=DEV), torch.randn(6, 6, device=DEV), torch.zeros(2, 6, device=DEV)
    with pytest.raises(IndexError, match="token"):
        ops.rnn_forward(torch.tensor([[0, 5]], device=DEV), hx, w_ih, w_hh, None, None, 1)


# ---- opcheck and torch.compile ---------------------------------------------------------------------------------------
def test_opcheck_on_cuda():
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    x, t = torch.randn(8, 27, device=DEV), torch.randint(0, 27, (8,), device=DEV)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, t, None, 1, -100, 0.1, True), test_utils=utils)
    xb, w, b = torch.randn(8, 5, device=DEV), torch.rand(5, device=DEV), torch.rand(5, device=DEV)
    torch.library.opcheck(ops.batch_norm_forward.default, (xb, w, b, torch.zeros(5, device=DEV),
                                                           torch.ones(5, device=DEV), True, 0.1, 1e-5, False, 1),
                          test_utils=utils)
    h, mean, invstd = ops.batch_norm_forward(xb, w, b, None, None, True, 0.1, 1e-5, False, 1)
    torch.library.opcheck(ops.batch_norm_backward.default,
                          (torch.randn(8, 5, device=DEV), h, xb, w, mean, invstd, True, False, 1, [True] * 3),
                          test_utils=utils)
    xs, h0 = torch.randn(3, 2, 4, device=DEV), torch.randn(2, 5, device=DEV)
    w_ih, w_hh = torch.randn(5, 4, device=DEV), torch.randn(5, 5, device=DEV)
    torch.library.opcheck(ops.rnn_forward.default, (xs, h0, w_ih, w_hh, None, None, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_on_cuda():
    m = torch.nn.Sequential(torch.nn.Linear(10, 32), mmops.nn.BatchNorm1d(32, activation="tanh"),
                            torch.nn.Linear(32, 27)).to(DEV)
    x, t = torch.randn(64, 10, device=DEV), torch.randint(0, 27, (64,), device=DEV)
    f = lambda x, t: mmops.cross_entropy(m(x), t)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), f(x, t), rtol=1e-5, atol=1e-6)
