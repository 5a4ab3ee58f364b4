"""mmops.cross_entropy against F.cross_entropy and the reference chain; gradcheck, opcheck, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import mmops
import mmops.nn
from mmops import reference
from mmops._ops import ops
from mmops.testing import cmp

from .conftest import tol


def _both(x, t, **kw):
    """loss and input grad of mmops and of PyTorch for the same inputs and options."""
    go_seed = kw.pop("go_seed", None)
    out = []
    for fn in (mmops.cross_entropy, F.cross_entropy):
        xi = x.detach().clone().requires_grad_()
        loss = fn(xi, t, **kw)
        go = torch.ones_like(loss) if go_seed is None else torch.rand(
            loss.shape, generator=torch.Generator().manual_seed(go_seed), dtype=loss.dtype)
        loss.backward(go)
        out.append((loss.detach(), xi.grad))
    return out


# C <= 32 takes the AVX-512 or the AVX2 short-row kernel (four rows at a time, a row-by-row tail); (4099, 32) and
# (2501, 27) run on several threads, whose ranges of rows end inside a step of four; C <= 8 (AVX2: every store masked)
# and 9 <= C <= 32 (AVX2: a row's last vector stored whole over the next row) take different stores.
@pytest.mark.parametrize("shape", [(1, 2), (32, 27), (7, 1000), (300, 3), (5, 4097), (103, 16), (4099, 32),
                                   (2501, 27), (61, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore", [False, True])
def test_class_targets_match_torch(shape, dtype, reduction, weighted, smoothing, ignore):
    N, C = shape
    x = torch.randn(N, C, dtype=dtype) * 3
    t = torch.randint(0, C, (N,))
    if ignore:
        t[::5] = 5 if C > 5 else -100  # ignore_index chosen per case below; some groups of 4 rows have none
    ii = 5 if (ignore and C > 5) else -100
    w = torch.rand(C, dtype=dtype) + 0.5 if weighted else None
    (l1, g1), (l2, g2) = _both(x, t, weight=w, reduction=reduction, label_smoothing=smoothing, ignore_index=ii,
                               go_seed=1)
    torch.testing.assert_close(l1, l2, **tol(dtype))
    torch.testing.assert_close(g1, g2, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(33, 19), (3, 2500)])  # blocks of short rows; long rows one at a time
def test_probability_targets_match_torch(dtype, reduction, weighted, smoothing, shape):
    N, C = shape
    x = torch.randn(N, C, dtype=dtype)
    t = torch.softmax(torch.randn(N, C, dtype=dtype), 1)
    w = torch.rand(C, dtype=dtype) if weighted else None
    (l1, g1), (l2, g2) = _both(x, t, weight=w, reduction=reduction, label_smoothing=smoothing, go_seed=2)
    torch.testing.assert_close(l1, l2, **tol(dtype))
    torch.testing.assert_close(g1, g2, **tol(dtype))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_spatial_and_1d_inputs(reduction):
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    t = torch.randint(0, 6, (4, 3, 5))
    (l1, g1), (l2, g2) = _both(x, t, reduction=reduction)
    assert l1.shape == l2.shape
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    tp = torch.softmax(torch.randn(4, 6, 3, 5, dtype=torch.float64), 1)
    (l1, g1), (l2, g2) = _both(x, tp, reduction=reduction)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    x1 = torch.randn(9, dtype=torch.float64)
    (l1, g1), (l2, g2) = _both(x1, torch.tensor(4), reduction=reduction)
    assert l1.shape == l2.shape == ()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


def test_non_contiguous_input():
    base = torch.randn(27, 64)
    x = base.t()  # (64, 27), not contiguous
    t = torch.randint(0, 27, (64,))
    (l1, g1), (l2, g2) = _both(x, t)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


def test_bfloat16_computes_in_float():
    x = torch.randn(64, 27).bfloat16()
    t = torch.randint(0, 27, (64,))
    (l1, g1), (l2, g2) = _both(x, t)
    assert l1.dtype == torch.bfloat16 and g1.dtype == torch.bfloat16
    ref = F.cross_entropy(x.float(), t)
    torch.testing.assert_close(l1.float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g1.float(), g2.float(), **tol(torch.bfloat16))


def test_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(4, 5)
    t = torch.full((4,), -100)
    (l1, g1), (l2, g2) = _both(x, t)
    assert torch.isnan(l1) and torch.isnan(l2)
    torch.testing.assert_close(g1, g2)  # zero rows: every row is ignored


def test_nan_row_stays_in_its_row():
    x = torch.randn(5, 7)
    x[2, 3] = float("nan")
    t = torch.randint(0, 7, (5,))
    (l1, g1), (l2, g2) = _both(x, t, reduction="none")
    assert torch.isnan(l1[2]) and torch.isnan(g1[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(l1[keep], l2[keep])
    torch.testing.assert_close(g1[keep], g2[keep])


def test_grad_output_scaling_and_chained_use():
    x = torch.randn(16, 10, requires_grad=True)
    t = torch.randint(0, 10, (16,))
    (3.0 * mmops.cross_entropy(x, t) + mmops.cross_entropy(x, t, reduction="sum")).backward()
    xr = x.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(xr, t) + F.cross_entropy(xr, t, reduction="sum")).backward()
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("go", [1.0, 2.0])
def test_retained_graph_runs_twice(go):
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    loss = mmops.cross_entropy(x, t)
    g1 = torch.autograd.grad(loss, x, torch.tensor(go), retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, x, torch.tensor(go))[0]
    expected = go * reference.cross_entropy_closed_form_grad(x, t)
    torch.testing.assert_close(g1, expected)
    torch.testing.assert_close(g2, expected)


def test_inplace_backward_second_backward_fails_loudly():
    x = torch.randn(8, 5, requires_grad=True)
    logits = x * 1.0
    loss = mmops.cross_entropy(logits, torch.randint(0, 5, (8,)), inplace_backward=True)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.tensor(2.0))


def test_inplace_backward_writes_grad_into_logits():
    h = torch.randn(32, 16, requires_grad=True)
    W = torch.randn(16, 27)
    t = torch.randint(0, 27, (32,))
    logits = h @ W
    storage = logits.data_ptr()
    loss = mmops.cross_entropy(logits, t, inplace_backward=True)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ W, t)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    # the logits' own storage now holds dloss/dlogits
    expected = reference.cross_entropy_closed_form_grad((h2 @ W).detach(), t)
    assert logits.data_ptr() == storage
    torch.testing.assert_close(logits.detach(), expected)


# The short-row kernels write each row's gradient over its logits only after reading every row of its step; the
# AVX2 one stores a row's last vector whole, over the next row's first logits (cross_entropy_short_rows.h).
@pytest.mark.parametrize("shape", [(2501, 27), (4099, 32), (61, 9), (300, 3), (17, 25)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_inplace_backward_gives_the_gradient_of_the_copy(shape, reduction):
    N, C = shape
    x = torch.randn(N, C) * 3
    t = torch.randint(0, C, (N,))
    t[3::7] = -100
    a = x.clone().requires_grad_()
    loss_a = mmops.cross_entropy(a, t, reduction=reduction)
    logits = x.clone().requires_grad_()
    b = logits * 1.0  # a non-leaf, which inplace_backward overwrites
    loss_b = mmops.cross_entropy(b, t, reduction=reduction, inplace_backward=True)
    go = torch.rand_like(loss_a) + 0.5
    loss_a.backward(go)
    loss_b.backward(go)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(a.grad, logits.grad)


def test_inplace_backward_detects_other_users_of_the_logits():
    x = torch.randn(8, 5, requires_grad=True)
    logits = x * 2
    s = logits.sigmoid()  # saves its output, not logits; exp saves logits' result too
    e = logits.exp()  # exp saves its result; pow saves its input:
    p = logits.pow(2)
    loss = mmops.cross_entropy(logits, torch.randint(0, 5, (8,)), inplace_backward=True) + s.sum() + e.sum() + p.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_against_reference_chain_cmp():
    logits = torch.randn(32, 27, dtype=torch.float64, requires_grad=True)
    Y = torch.randint(0, 27, (32,))
    chain = reference.cross_entropy_chain(logits.detach(), Y)
    mmops.cross_entropy(logits, Y).backward()
    rows = [
        cmp("dlogits chain", reference.cross_entropy_chain_backward(chain, Y)["dlogits"], logits, verbose=False),
        cmp("dlogits closed", reference.cross_entropy_closed_form_grad(logits, Y), logits, verbose=False),
    ]
    assert all(r.approx for r in rows), rows
    assert max(r.maxdiff for r in rows) < 1e-15


def test_manual_chain_matches_autograd():
    from mmops.check import check_manual_chain

    rows = check_manual_chain()
    assert all(r.approx for r in rows), [r for r in rows if not r.approx]


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(prob, reduction):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1) if prob else torch.tensor([0, 4, -100, 2, 2, 1])
    w = torch.rand(5, dtype=torch.float64) + 0.1
    for kw in (dict(), dict(weight=w, label_smoothing=0.15)):
        assert torch.autograd.gradcheck(lambda x: mmops.cross_entropy(x, t, reduction=reduction, **kw), (x,))


def test_opcheck():
    x = torch.randn(6, 5)
    t = torch.tensor([0, 4, -100, 2, 2, 1])
    w = torch.rand(5)
    for args in [(x, t, None, 1, -100, 0.0, True), (x, t, w, 0, -100, 0.1, True), (x.detach(), t, w, 2, -100, 0.0, False)]:
        torch.library.opcheck(ops.cross_entropy_forward.default, args)
    # mutating ops (no autograd formula of their own: CrossEntropyFunction is theirs)
    mutating = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.cross_entropy_forward_inplace.default, (torch.randn(6, 5), t, w, 1, -100, 0.0),
                          test_utils=mutating)
    torch.library.opcheck(ops.cross_entropy_scale_grad_.default, (torch.randn(6, 5), torch.rand(6)), test_utils=mutating)
    torch.library.opcheck(ops.cross_entropy_backward.default, (torch.randn(6, 5), torch.tensor(2.0)), test_utils=mutating)


def test_torch_compile_fullgraph():
    x = torch.randn(16, 27, requires_grad=True)
    t = torch.randint(0, 27, (16,))
    f = torch.compile(lambda x, t: mmops.cross_entropy(x, t, label_smoothing=0.05), fullgraph=True, backend="aot_eager")
    loss = f(x, t)
    loss.backward()
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, t, label_smoothing=0.05).backward()
    torch.testing.assert_close(loss, F.cross_entropy(xr.detach(), t, label_smoothing=0.05))
    torch.testing.assert_close(x.grad, xr.grad)


def test_module():
    w = torch.rand(7)
    m, r = mmops.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    x, t = torch.randn(10, 7), torch.randint(0, 7, (10,))
    torch.testing.assert_close(m(x, t), r(x, t))
    assert set(m.state_dict()) == set(r.state_dict())


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 5, 2]), {}), IndexError, r"target\[2\] = 5 is out of range"),
        (lambda: (torch.randn(4, 5), torch.tensor([0, -1, 1, 2]), {}), IndexError, r"target\[1\] = -1"),
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2]), {}), ValueError, "expected target of shape"),
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), dict(weight=torch.ones(4))), RuntimeError, "weight must"),
        (lambda: (torch.randint(0, 3, (4, 5)), torch.tensor([0, 1, 2, 3]), {}), NotImplementedError, "floating-point"),
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), dict(reduction="avg")), ValueError, "reduction"),
        (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), dict(label_smoothing=1.5)), RuntimeError,
         "label_smoothing"),
        (lambda: (torch.randn(4, 5), torch.randn(4, 6), {}), RuntimeError, "probability target"),
        (lambda: (torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), {}), RuntimeError, "target must have shape"),
    ],
)
def test_bad_input(make, exc, match):
    x, t, kw = make()
    with pytest.raises(exc, match=match):
        mmops.cross_entropy(x, t, **kw)


def test_bad_target_fails_before_inplace_write():
    x = torch.randn(4, 5)
    before = x.clone()
    with pytest.raises(IndexError):
        mmops.cross_entropy(x.requires_grad_(), torch.tensor([0, 1, 9, 2]), inplace_backward=True)
    torch.testing.assert_close(x.detach(), before)


def test_equal_large_logits_give_log_c():
    """issue 15: with lse = m + log s, 1e8 + log 40 rounds back to 1e8 and the loss came out 0."""
    for C in (27, 40):
        x = torch.full((2, C), 1e8)
        loss = mmops.cross_entropy(x, torch.tensor([0, 1]))
        torch.testing.assert_close(loss, torch.tensor(C, dtype=torch.float32).log())


# Every loss is log s + (m - x_y) (or sums of w t' (m - x_c)): nothing subtracts two numbers of the offset's
# size. (27, 40) is the AVX-512 small-row path when there is no weight or smoothing; (9, 300) the generic one.
@pytest.mark.parametrize("offset", [1e4, 1e8, -1e8, 1e30])
@pytest.mark.parametrize("shape", [(40, 27), (9, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["index", "index weight smoothing", "probability", "probability weight smoothing"])
def test_large_logit_offsets_match_torch(offset, shape, dtype, reduction, case):
    N, C = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, generator=g, dtype=dtype) * 3 + offset
    if case.startswith("index"):
        t = torch.randint(0, C, (N,), generator=g)
    else:
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=dtype), 1)
    kw = dict(weight=torch.rand(C, generator=g, dtype=dtype) + 0.5, label_smoothing=0.1) if "weight" in case else {}
    (l1, g1), (l2, g2) = _both(x, t, reduction=reduction, go_seed=4, **kw)
    assert torch.isfinite(l2).all()
    torch.testing.assert_close(l1, l2, **tol(dtype))
    torch.testing.assert_close(g1, g2, **tol(dtype))


# Run in a child process with the underflow exception unmasked: any instruction whose result is tiny (a
# subnormal, or a nonzero result rounded to 0), exact or not, raises SIGFPE there. On Intel cores each such
# result costs a microcode assist unless flush-to-zero is set, and users never set it; AVX-512 lanes masked
# off do not raise, as they do not take assists. One thread, so that the kernels run on the trapping thread.
_UNDERFLOW_TRAP_CHILD = r"""
import ctypes, ctypes.util
import torch
import mmops
from mmops._ops import ops

libm = ctypes.CDLL(ctypes.util.find_library("m"))
FE_UNDERFLOW = 0x10  # x86's underflow flag, as in glibc's <fenv.h>
torch.set_num_threads(1)
g = torch.Generator().manual_seed(5)
for dtype in (torch.float32, torch.float64):
    for N, C in ((4099, 27), (64, 5), (64, 16), (64, 32), (300, 33), (64, 1000)):
        x = torch.randn(N, C, generator=g, dtype=dtype) * 3
        y = torch.randint(0, C, (N,), generator=g)
        y[::7] = -100
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=dtype) * 3, 1)
        w = torch.rand(C, generator=g, dtype=dtype) + 0.5
        go = torch.rand(N, generator=g, dtype=dtype) + 0.5
        for target in (y, t):
            for weight, smoothing in ((None, 0.0), (w, 0.1)):
                for reduction in (0, 1, 2):
                    for compute_grad in (True, False):
                        print(dtype, (N, C), target.dtype, weight is not None, reduction, compute_grad, flush=True)
                        assert libm.feenableexcept(FE_UNDERFLOW) != -1
                        loss, grad = ops.cross_entropy_forward(x, target, weight, reduction, -100, smoothing,
                                                               compute_grad)
                        if compute_grad:
                            ops.cross_entropy_backward(grad, go if reduction == 0 else go[0])
                        inplace = x.clone()
                        ops.cross_entropy_forward_inplace(inplace, target, weight, reduction, -100, smoothing)
                        ops.cross_entropy_scale_grad_(inplace, go if reduction == 0 else go[0])
                        libm.fedisableexcept(FE_UNDERFLOW)
print("no underflow")
"""


def test_no_subnormal_results_on_ordinary_input():
    import ctypes.util
    import os
    import platform
    import subprocess
    import sys

    if not (sys.platform == "linux" and platform.machine() == "x86_64" and ctypes.util.find_library("m")):
        pytest.skip("the underflow trap is set through glibc's feenableexcept on x86-64 Linux")
    package_root = os.path.dirname(os.path.dirname(mmops.__file__))  # the child imports this same mmops
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _UNDERFLOW_TRAP_CHILD], env=env, capture_output=True, text=True,
                          timeout=300)
    last_case = proc.stdout.strip().splitlines()[-1:] or ["(none)"]
    assert proc.returncode == 0 and "no underflow" in proc.stdout, (
        f"exit code {proc.returncode} (-8: SIGFPE, a tiny result) in the case {last_case[0]}\n{proc.stderr[-2000:]}")
