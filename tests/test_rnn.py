"""mmops.rnn / rnn_cell / mmops.nn.RNN against nn.RNN, nn.RNNCell and the reference step loop with manual BPTT."""
import pytest
import torch
import torch.nn.functional as F

import mmops
import mmops.nn
from mmops import reference
from mmops._ops import ops
from mmops.bench import isa_path
from mmops.testing import cmp

from .conftest import tol


def _grads(module_or_params, *extra):
    ps = list(module_or_params.parameters()) if hasattr(module_or_params, "parameters") else list(module_or_params)
    return [p.grad for p in ps] + [e.grad for e in extra]


def _twin(cls_ref, cls_ours, *args, dtype, **kw):
    ref = cls_ref(*args, **kw).to(dtype)
    ours = cls_ours(*args, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# ---- the reference chain: the step loop with manual BPTT ---------------------------------------------------
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_bptt_matches_autograd_and_mmops(nonlinearity, bias):
    T, B, I, H = 6, 4, 5, 7
    X = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    W_xh = (torch.randn(I, H, dtype=torch.float64) * 0.5).requires_grad_()
    W_hh = (torch.randn(H, H, dtype=torch.float64) * 0.3).requires_grad_()
    b_h = (torch.randn(H, dtype=torch.float64) * 0.1).requires_grad_() if bias else None
    dout = torch.randn(T, B, H, dtype=torch.float64)

    chain = reference.rnn_chain(X, h0, W_xh, W_hh, b_h, nonlinearity)
    chain["outputs"].backward(dout)
    manual = reference.rnn_chain_backward(chain, dout)
    rows = [cmp("dW_xh", manual["dW_xh"], W_xh), cmp("dW_hh", manual["dW_hh"], W_hh), cmp("dinputs", manual["dinputs"], X),
            cmp("dh0", manual["dh0"], h0)]
    rows += [cmp(f"dhpreact[{t}]", manual["dhpreacts"][t], chain["hpreacts"][t]) for t in range(T)]
    if bias:
        rows.append(cmp("db_h", manual["db_h"], b_h))
    assert all(r.approx for r in rows), [str(r) for r in rows if not r.approx]

    # the fused op computes the same thing (nn.RNN's orientation: weight_ih = W_xh^T)
    Xm, h0m = X.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()
    w_ih = W_xh.detach().T.contiguous().requires_grad_()
    w_hh = W_hh.detach().T.contiguous().requires_grad_()
    b = b_h.detach().clone().requires_grad_() if bias else None
    out, _ = mmops.rnn(Xm, h0m, w_ih, w_hh, b, None, nonlinearity)
    out.backward(dout)
    torch.testing.assert_close(out, chain["outputs"].detach(), **tol(torch.float64))
    assert cmp("mmops dW_ih", manual["dW_xh"].T, w_ih).approx
    assert cmp("mmops dW_hh", manual["dW_hh"].T, w_hh).approx
    assert cmp("mmops dinput", manual["dinputs"], Xm).approx
    assert cmp("mmops dhx", manual["dh0"], h0m).approx
    if bias:
        assert cmp("mmops dbias", manual["db_h"], b).approx


# ---- against nn.RNN -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1, 1, 1), (5, 3, 4, 6), (35, 8, 28, 32), (12, 17, 9, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_module_matches_nn_rnn(size, dtype, nonlinearity, bias, batch_first, with_h0, num_layers):
    T, B, I, H = size
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, I, H, num_layers=num_layers, nonlinearity=nonlinearity, bias=bias,
                      batch_first=batch_first, dtype=dtype)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=dtype)
    h0 = torch.randn(num_layers, B, H, dtype=dtype) if with_h0 else None
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        hi = h0.clone().requires_grad_() if with_h0 else None
        out, h_n = m(xi, hi)
        # a loss that reaches the output and h_n separately (h_n's gradient must add to the last step's)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().add((h_n**2).sum()).backward()
        results.append((out.detach(), h_n.detach(), xi.grad, hi.grad if with_h0 else None, _grads(m)))
    (o1, hn1, dx1, dh1, g1), (o2, hn2, dx2, dh2, g2) = results
    # float32: two summation orders over T*B rows (relu values are unbounded): compare at 1e-3 relative
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(o2, o1, **t)
    torch.testing.assert_close(hn2, hn1, **t)
    torch.testing.assert_close(dx2, dx1, **t)
    if with_h0:
        torch.testing.assert_close(dh2, dh1, **t)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, **t)


# Large products (B * H * H up to 42M multiply-adds per step) on each float32 backend (csrc/cpu/rnn.cpp:
# choose_backend, forced with MMOPS_RNN_BACKEND): the kernels (the default from T = 2 on an AVX-512 or AVX2 CPU; on
# an AVX-512 CPU "kernel_avx2" runs their AVX2 build, MMOPS_KERNEL_ISA=avx2), oneDNN per step (W_hh reordered once
# from 3 products on) and MKL; T = 1 checks the forced kernel on one step. Against nn.RNN in float64. On a CPU with
# neither ISA every backend falls back to MKL.
@pytest.mark.parametrize("backend", ["kernel", "kernel_avx2", "onednn", "mkl"])
@pytest.mark.parametrize("size", [(2, 64, 64, 512), (5, 256, 300, 272), (1, 128, 512, 384)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("tokens", [False, True])
def test_large_products_match_float64(monkeypatch, backend, size, nonlinearity, tokens):
    if backend == "kernel_avx2":
        backend = "kernel"
        monkeypatch.setenv("MMOPS_KERNEL_ISA", "avx2")
    monkeypatch.setenv("MMOPS_RNN_BACKEND", backend)
    T, B, I, H = size
    torch.manual_seed(0)
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, I, H, nonlinearity=nonlinearity, dtype=torch.float32)
    ref = ref.double()
    tok = torch.randint(0, I, (T, B))
    x = F.one_hot(tok, I).float() if tokens else torch.randn(T, B, I) * 0.2
    h0 = torch.randn(1, B, H) * 0.5
    go = torch.randn(T, B, H)
    results = []
    for m, xi, hi in ((ref, x.double(), h0.double()), (ours, tok if tokens else x, h0)):
        xi = xi.clone().requires_grad_(not tokens)
        hi = hi.clone().requires_grad_()
        out, h_n = m(xi, hi)
        (out * go.to(out.dtype)).sum().add(h_n.sum()).backward()
        results.append([out, h_n, hi.grad] + ([] if tokens else [xi.grad]) + _grads(m))
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a.detach(), e.detach().float(), rtol=2e-3, atol=2e-3)


# The backend's environment variables are checked on every call: a misspelt value raises, naming the variable,
# rather than silently measuring the default; MMOPS_KERNEL_ISA asks only for what the CPU has.
@pytest.mark.parametrize("name, value", [("MMOPS_RNN_BACKEND", "onednnn"), ("MMOPS_NO_STEP_KERNEL", "yes"),
                                         ("MMOPS_KERNEL_ISA", "sse4")])
def test_backend_environment_is_checked(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    rnn = mmops.nn.RNN(3, 8)
    with pytest.raises(ValueError, match=name):
        rnn(torch.randn(4, 2, 3))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_kernel_isa_asks_only_for_what_the_cpu_has(monkeypatch, isa):
    monkeypatch.setenv("MMOPS_KERNEL_ISA", isa)
    has = isa_path() in (("avx2", "avx512") if isa == "avx2" else ("avx512",))  # from /proc/cpuinfo's flags
    torch.manual_seed(0)
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, 3, 40, dtype=torch.float32)
    x = torch.randn(5, 7, 3)
    if has:
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=f"MMOPS_KERNEL_ISA={isa}, but this CPU has no"):
            ours(x)


# float32 recurrences (T >= 2) run on the hand-written kernels where the CPU has AVX-512 or AVX2
# (csrc/cpu/rnn_recurrence.cpp: step product + epilogue; csrc/cpu/gemm.cpp: the input projection, d_input, and
# dW_hh / dW_ih as one product over all rows); "step_kernel_avx2" forces their AVX2 build (the same as
# "step_kernel" on an AVX2 CPU); MMOPS_NO_STEP_KERNEL=1 takes the matmul-per-step loop. All against nn.RNN in
# float64, at sizes with row tails (B not a multiple of 8 or 6, B < 6), column tails (H not a multiple of 32 or 16,
# H < 16, H <= 8: the second vector of a panel wholly outside), more rows than one chunk of gemm_tn (T * B > 128),
# T = 1, and with / without the gradient of hx.
@pytest.mark.parametrize("path", ["step_kernel", "step_kernel_avx2", "matmul_per_step"])
@pytest.mark.parametrize("size", [(35, 32, 28, 256), (7, 13, 5, 45), (3, 5, 3, 17), (40, 9, 30, 70), (1, 3, 2, 33),
                                  (9, 64, 40, 100), (6, 7, 3, 5), (4, 13, 2, 12)])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("hx_grad", [True, False])
def test_float32_paths_match_float64(monkeypatch, path, size, nonlinearity, tokens, hx_grad):
    if path == "matmul_per_step":
        monkeypatch.setenv("MMOPS_NO_STEP_KERNEL", "1")
    elif path == "step_kernel_avx2":
        monkeypatch.setenv("MMOPS_KERNEL_ISA", "avx2")
    T, B, I, H = size
    torch.manual_seed(T * 1000 + B + H)
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, I, H, nonlinearity=nonlinearity, dtype=torch.float32)
    ref = ref.double()
    tok = torch.randint(0, I, (T, B))
    x = F.one_hot(tok, I).float() if tokens else torch.randn(T, B, I)
    h0 = torch.randn(1, B, H) * 0.5
    go = torch.randn(T, B, H)
    results = []
    for m, xi, hi in ((ref, x.double(), h0.double()), (ours, tok if tokens else x, h0)):
        xi = xi.clone().requires_grad_(not tokens)
        hi = hi.clone().requires_grad_(hx_grad)
        out, h_n = m(xi, hi)
        (out * go.to(out.dtype)).sum().add(h_n.sum()).backward()
        results.append([out, h_n] + ([hi.grad] if hx_grad else []) + ([] if tokens else [xi.grad]) + _grads(m))
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a.detach(), e.detach().float(), rtol=1e-3, atol=1e-3)


# ---- hostile values: saturation and NaN, as nn.RNN / nn.RNNCell treat them ----------------------------------------
# An input of 1e30 saturates every unit it reaches: tanh is then exactly +-1, so 1 - h^2 = 0 and no gradient flows
# through that unit (an approximation that stops just short of 1 gave 1 - h^2 ~ 1e-7 and weight gradients ~1e23).
# A NaN input makes its unit NaN; relu's backward passes the gradient there (threshold_backward blocks only h <= 0),
# tanh's makes it NaN. Every output and gradient must equal PyTorch's, NaN in the same places, on each path:
# float32 with the step kernel (T >= 2, where the CPU has AVX-512 or AVX2; and its AVX2 build forced), float32 matmul
# per step, float64.
_PATHS = [(torch.float32, "step_kernel"), (torch.float32, "step_kernel_avx2"), (torch.float32, "matmul_per_step"),
          (torch.float64, "matmul_per_step")]


def _hostile_input(shape, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    flat = x.view(-1)
    positions = torch.randperm(flat.numel(), generator=g)[:3]
    if kind == "huge":
        flat[positions] = torch.tensor([1e30, -1e30, 1e30], dtype=dtype)
    else:
        flat[positions[:2]] = float("nan")
    return x


def _assert_same_values(ours, theirs, dtype, what):
    # NaN positions equal (equal_nan); elsewhere float32 sums in another order: relative 1e-4, and an absolute
    # slack that scales with the tensor's largest finite value (relu carries the 1e30 forward, and a sum of
    # 1e29-sized terms that cancels has an absolute error far above 1e-5).
    finite = theirs[torch.isfinite(theirs)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    atol = rtol * max(1.0, scale) * 0.1
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype, path", _PATHS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("kind", ["huge", "nan"])
def test_saturation_and_nan_match_nn_rnn(monkeypatch, dtype, path, nonlinearity, kind):
    if path == "matmul_per_step":
        monkeypatch.setenv("MMOPS_NO_STEP_KERNEL", "1")
    elif path == "step_kernel_avx2":  # the AVX2 build of the kernels, also on an AVX-512 CPU
        monkeypatch.setenv("MMOPS_KERNEL_ISA", "avx2")
    T, B, I, H = 6, 5, 4, 40  # H = 40: a full and a partial 32-column panel of the step kernel
    torch.manual_seed(11)
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, I, H, nonlinearity=nonlinearity, dtype=dtype)
    x = _hostile_input((T, B, I), kind, dtype, seed=3)
    h0 = torch.randn(1, B, H, dtype=dtype) * 0.5
    go = torch.randn(T, B, H, dtype=dtype)
    results = []
    for m in (ref, ours):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        out, h_n = m(xi, hi)
        (out * go).sum().add(h_n.sum()).backward()
        results.append([out, h_n, xi.grad, hi.grad] + _grads(m))
    names = ["output", "h_n", "d_input", "d_hx", "d_weight_ih", "d_weight_hh", "d_bias_ih", "d_bias_hh"]
    for name, a, e in zip(names, results[1], results[0]):
        _assert_same_values(a.detach(), e.detach(), dtype, name)
    if kind == "huge" and nonlinearity == "tanh":  # the saturated rows pass no gradient at all
        assert torch.isfinite(results[1][4]).all() and results[1][4].abs().max() < 1e3


# The cell (T = 1) runs on MKL by default; MMOPS_RNN_BACKEND=kernel forces the kernels onto one step.
@pytest.mark.parametrize("dtype, path", [(torch.float32, "default"), (torch.float32, "kernel"),
                                         (torch.float32, "matmul_per_step"), (torch.float64, "default")])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("kind", ["huge", "nan"])
def test_cell_saturation_and_nan_match_nn_rnncell(monkeypatch, dtype, path, nonlinearity, kind):
    if path == "matmul_per_step":
        monkeypatch.setenv("MMOPS_NO_STEP_KERNEL", "1")
    elif path == "kernel":
        monkeypatch.setenv("MMOPS_RNN_BACKEND", "kernel")
    B, I, H = 7, 4, 40
    torch.manual_seed(12)
    ref = torch.nn.RNNCell(I, H, nonlinearity=nonlinearity).to(dtype)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x = _hostile_input((B, I), kind, dtype, seed=4)
    h = torch.randn(B, H, dtype=dtype)
    go = torch.randn(B, H, dtype=dtype)
    x1, h1, x2, h2 = (t.clone().requires_grad_() for t in (x, h, x, h))
    ref(x1, h1).backward(go)
    y2 = mmops.rnn_cell(x2, h2, *params, nonlinearity=nonlinearity)
    y2.backward(go)
    _assert_same_values(y2.detach(), ref(x, h).detach(), dtype, "h'")
    for name, a, e in [("d_input", x2.grad, x1.grad), ("d_hx", h2.grad, h1.grad)] + [
            (n, p.grad, q.grad) for n, p, q in zip(["d_weight_ih", "d_weight_hh", "d_bias_ih", "d_bias_hh"], params,
                                                   ref.parameters())]:
        _assert_same_values(a, e, dtype, name)


@pytest.mark.parametrize("threads", [1, 3])
def test_float32_kernels_any_thread_count(threads):
    """The step and weight-gradient kernels split their blocks by the team's size: 3 threads (each with blocks of
    two panels, row and column tails: B = 30, H = 170 -> 4 x 6 blocks per step, 867K multiply-adds, enough for
    3 threads) and one thread give nn.RNN's result in float64."""
    T, B, I, H = 12, 30, 10, 170
    torch.manual_seed(5)
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, I, H, dtype=torch.float32)
    ref = ref.double()
    x, h0, go = torch.randn(T, B, I), torch.randn(1, B, H), torch.randn(T, B, H)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for m, xi, hi in ((ref, x.double(), h0.double()), (ours, x, h0)):
            xi, hi = xi.clone().requires_grad_(), hi.clone().requires_grad_()
            out, h_n = m(xi, hi)
            (out * go.to(out.dtype)).sum().backward()
            results.append([out, hi.grad, xi.grad] + _grads(m))
    finally:
        torch.set_num_threads(before)
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a.detach(), e.detach().float(), rtol=1e-3, atol=1e-3)


def test_unbatched_input_matches_nn_rnn():
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, 4, 6, num_layers=2, dtype=torch.float64)
    x, h0 = torch.randn(7, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    for a, b in zip(ref(x, h0), ours(x, h0)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, **tol(torch.float64))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(1)
    m = mmops.nn.RNN(4, 8, num_layers=2, dropout=0.5).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    m.eval()
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)  # no dropout in eval
    m.train()
    torch.manual_seed(2)
    c = m(x)[0]
    torch.manual_seed(3)
    d = m(x)[0]
    assert not torch.equal(c, d)


def test_same_seed_same_weights_and_state_dict_both_ways():
    torch.manual_seed(5)
    ref = torch.nn.RNN(3, 5, num_layers=2, nonlinearity="relu")
    torch.manual_seed(5)
    ours = mmops.nn.RNN(3, 5, num_layers=2, nonlinearity="relu")
    assert list(ref.state_dict()) == list(ours.state_dict())
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    other = torch.nn.RNN(3, 5, num_layers=2, nonlinearity="relu")
    other.load_state_dict(ours.state_dict())
    ours2 = mmops.nn.RNN(3, 5, num_layers=2, nonlinearity="relu")
    ours2.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours2.parameters(), ours.parameters()))


# ---- the cell ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("BIH", [(1, 1, 1), (4, 3, 5), (32, 28, 64)])
def test_cell_matches_nn_rnncell(dtype, nonlinearity, bias, BIH):
    B, I, H = BIH
    ref = torch.nn.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity).to(dtype)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x, h = torch.randn(B, I, dtype=dtype), torch.randn(B, H, dtype=dtype)
    go = torch.randn(B, H, dtype=dtype)
    x1, h1, x2, h2 = (t.clone().requires_grad_() for t in (x, h, x, h))
    y1 = ref(x1, h1)
    y1.backward(go)
    w_ih, w_hh = params[0], params[1]
    b_ih, b_hh = (params[2], params[3]) if bias else (None, None)
    y2 = mmops.rnn_cell(x2, h2, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    y2.backward(go)
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, y1, **t)
    torch.testing.assert_close(x2.grad, x1.grad, **t)
    torch.testing.assert_close(h2.grad, h1.grad, **t)
    for a, b in zip(params, ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **t)


def test_python_loop_of_cells_equals_sequence():
    T, B, I, H = 9, 4, 3, 5
    p = [torch.randn(H, I, dtype=torch.float64), torch.randn(H, H, dtype=torch.float64) * 0.4,
         torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64)]
    x = torch.randn(T, B, I, dtype=torch.float64)
    h = torch.zeros(B, H, dtype=torch.float64)
    steps = []
    for t in range(T):
        h = mmops.rnn_cell(x[t], h, *p)
        steps.append(h)
    out, _ = mmops.rnn(x, None, *p)
    torch.testing.assert_close(out, torch.stack(steps), **tol(torch.float64))


# ---- token input: a row gather, equal to one-hot input ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("token_dtype", [torch.long, torch.int32])
def test_tokens_equal_one_hot(dtype, batch_first, num_layers, token_dtype):
    V, H, T, B = 28, 16, 11, 5
    m = mmops.nn.RNN(V, H, num_layers=num_layers, batch_first=batch_first).to(dtype)
    m2 = mmops.nn.RNN(V, H, num_layers=num_layers, batch_first=batch_first).to(dtype)
    m2.load_state_dict(m.state_dict())
    tok = torch.randint(0, V, (B, T) if batch_first else (T, B))
    h0 = torch.randn(num_layers, B, H, dtype=dtype)
    o1, hn1 = m(tok.to(token_dtype), h0)
    o2, hn2 = m2(F.one_hot(tok, V).to(dtype), h0)
    go = torch.randn_like(o1)
    (o1 * go).sum().add(hn1.sum()).backward()
    (o2 * go).sum().add(hn2.sum()).backward()
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1, o2, **t)
    torch.testing.assert_close(hn1, hn2, **t)
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **t)


def test_tokens_match_nn_rnn_on_one_hot_floats():
    V, H = 28, 32
    ref, ours = _twin(torch.nn.RNN, mmops.nn.RNN, V, H, dtype=torch.float32)
    tok = torch.randint(0, V, (35, 8))
    o1, _ = ref(F.one_hot(tok, V).float())
    o2, _ = ours(tok)
    o1.sum().backward()
    o2.sum().backward()
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight_ih_l0.grad, ref.weight_ih_l0.grad, rtol=1e-5, atol=1e-5)


def test_token_cell_equals_one_hot_cell():
    V, H, B = 10, 6, 7
    p = [torch.randn(H, V, dtype=torch.float64, requires_grad=True), torch.randn(H, H, dtype=torch.float64)]
    tok = torch.randint(0, V, (B,))
    h = torch.randn(B, H, dtype=torch.float64)
    a = mmops.rnn_cell(tok, h, *p)
    a.sum().backward()
    ga = p[0].grad.clone()
    p[0].grad = None
    b = mmops.rnn_cell(F.one_hot(tok, V).double(), h, *p)
    b.sum().backward()
    torch.testing.assert_close(a, b, **tol(torch.float64))
    torch.testing.assert_close(ga, p[0].grad, **tol(torch.float64))


# ---- gradcheck, opcheck, torch.compile ---------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradcheck_sequence_and_cell(nonlinearity):
    T, B, I, H = 4, 3, 2, 5
    d = dict(dtype=torch.float64, requires_grad=True)
    x, h0 = torch.randn(T, B, I, **d), torch.randn(B, H, **d)
    w_ih, w_hh = torch.randn(H, I, **d), (torch.randn(H, H, dtype=torch.float64) * 0.5).requires_grad_()
    b_ih, b_hh = torch.randn(H, **d), torch.randn(H, **d)
    assert torch.autograd.gradcheck(lambda *a: mmops.rnn(*a, nonlinearity=nonlinearity), (x, h0, w_ih, w_hh, b_ih, b_hh))
    assert torch.autograd.gradcheck(lambda *a: mmops.rnn_cell(*a, nonlinearity=nonlinearity),
                                    (x[0].detach().requires_grad_(), h0, w_ih, w_hh, b_ih, b_hh))
    tok = torch.randint(0, I, (T, B))
    assert torch.autograd.gradcheck(lambda *a: mmops.rnn(tok, *a, nonlinearity=nonlinearity), (h0, w_ih, w_hh, b_ih))


def test_opcheck():
    T, B, I, H = 3, 2, 4, 5
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh, b = torch.randn(H, I), torch.randn(H, H), torch.randn(H)
    tok = torch.randint(0, I, (T, B))
    for args in [(x, h0, w_ih, w_hh, b, b, 1), (tok, h0, w_ih, w_hh, None, b, 2), (x, h0, w_ih, w_hh, None, None, 1)]:
        torch.library.opcheck(ops.rnn_forward.default, args, test_utils=("test_schema", "test_faketensor"))
    out = ops.rnn_forward(x, h0, w_ih, w_hh, b, b, 1)
    go = torch.randn_like(out)
    for mask in ([True] * 5, [False, True, False, True, False]):
        torch.library.opcheck(ops.rnn_backward.default, (go, out, x, h0, w_ih, w_hh, 1, mask),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.rnn_backward.default, (go, out, tok, h0, w_ih, w_hh, 1, [False, True, True, True, True]),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.rnn_cell_forward.default, (x[0], h0, w_ih, w_hh, b, b, 1),
                          test_utils=("test_schema", "test_faketensor"))
    h1 = ops.rnn_cell_forward(x[0], h0, w_ih, w_hh, b, b, 1)
    torch.library.opcheck(ops.rnn_cell_backward.default, (torch.randn_like(h1), h1, x[0], h0, w_ih, w_hh, 1, [True] * 5),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    class CharRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = mmops.nn.RNN(12, 16, num_layers=2)
            self.head = torch.nn.Linear(16, 12)

        def forward(self, tok, y):
            out, _ = self.rnn(tok)
            return mmops.cross_entropy(self.head(out).reshape(-1, 12), y.reshape(-1))

    torch.manual_seed(0)
    m = CharRNN()
    tok, y = torch.randint(0, 12, (7, 3)), torch.randint(0, 12, (7, 3))
    eager = m(tok, y)
    eager.backward()
    g_eager = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(tok, y)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for a, p in zip(g_eager, m.parameters()):
        torch.testing.assert_close(p.grad, a)


# ---- bad input ----------------------------------------------------------------------------------------------------
def _p(I=4, H=5):
    return torch.randn(H, I), torch.randn(H, H), torch.randn(H), torch.randn(H)


@pytest.mark.parametrize("case, exc, match", [
    ("input_size", RuntimeError, r"input.size\(-1\) must be equal to input_size: expected 4"),
    ("hx_shape", RuntimeError, "expected hx of shape"),
    ("token_range", IndexError, "out of range for input_size"),
    ("negative_token", IndexError, "out of range"),
    ("nonlinearity", ValueError, "unknown nonlinearity 'sigmoid'"),
    ("input_dim", ValueError, "expected float input with 3 dimensions"),
    ("token_dim", ValueError, "token input with 2 dimensions"),
    ("dtype_mismatch", ValueError, "does not match weight dtype"),
    ("bool_input", TypeError, "floating point or integer tokens"),
    ("bias_shape", ValueError, "bias_ih must have shape"),
    ("weight_hh_shape", ValueError, "weight_hh must be"),
])
def test_bad_input(case, exc, match):
    w_ih, w_hh, b_ih, b_hh = _p()
    x, h = torch.randn(6, 2, 4), torch.randn(2, 5)
    call = {
        "input_size": lambda: mmops.rnn(torch.randn(6, 2, 3), h, w_ih, w_hh),
        "hx_shape": lambda: mmops.rnn(x, torch.randn(3, 5), w_ih, w_hh),
        "token_range": lambda: mmops.rnn(torch.tensor([[0, 4]]), h, w_ih, w_hh),
        "negative_token": lambda: mmops.rnn(torch.tensor([[0, -1]]), h, w_ih, w_hh),
        "nonlinearity": lambda: mmops.rnn(x, h, w_ih, w_hh, nonlinearity="sigmoid"),
        "input_dim": lambda: mmops.rnn(torch.randn(6, 4), h, w_ih, w_hh),
        "token_dim": lambda: mmops.rnn(torch.zeros(6, 2, 1, dtype=torch.long), h, w_ih, w_hh),
        "dtype_mismatch": lambda: mmops.rnn(x.double(), h, w_ih, w_hh),
        "bool_input": lambda: mmops.rnn(torch.zeros(6, 2, dtype=torch.bool), h, w_ih, w_hh),
        "bias_shape": lambda: mmops.rnn(x, h, w_ih, w_hh, torch.randn(4)),
        "weight_hh_shape": lambda: mmops.rnn(x, h, w_ih, torch.randn(5, 4)),
    }[case]
    with pytest.raises(exc, match=match):
        call()


def test_module_bad_input():
    m = mmops.nn.RNN(4, 5, num_layers=2)
    with pytest.raises(RuntimeError, match=r"expected hx of shape \(2, 3, 5\)"):
        m(torch.randn(6, 3, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="expected input of shape"):
        m(torch.randn(6, 3, 4, 1))
    with pytest.raises(IndexError, match="out of range"):
        m(torch.full((6, 3), 4))
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        mmops.nn.RNN(4, 5, nonlinearity="gelu")
    with pytest.raises(RuntimeError, match="expected hx of shape"):
        mmops.rnn_cell(torch.randn(3, 4), torch.randn(2, 5), *_p()[:2])
