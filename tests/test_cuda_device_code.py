"""The CUDA device code (csrc/cuda/*.cuh) executed on the CPU through the test-only shim (tests/cuda_shim), with the
schedules the .cu launchers use, against PyTorch (float64 reference) and the CPU kernels. No GPU involved: this is
what proves the kernels' arithmetic on a machine without one. Blocks are kept small (64-128 threads, each a CPU
thread) so that the suite stays fast; the row shapes (one warp per row, a block with the row in registers, a block
streaming the row) are each forced where the sizes would pick another.
"""
import pytest
import torch
import torch.nn.functional as F

from .cuda_shim import DTYPE_CODES, build_shim_library, ptr

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
WARP_ROWS, BLOCK_ROWS, STREAM = 0, 1, 2


@pytest.fixture(scope="module")
def lib():
    return build_shim_library()


def shim_cross_entropy(lib, x, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                       grad="new", max_threads=64, kind=-1, max_blocks=0):
    """Runs the forward; grad: "new" (a fresh buffer), "inplace" (into x), None. Returns (loss, grad, bad_row)."""
    N, C = x.shape
    prob = target.is_floating_point()
    red = REDUCTION_CODES[reduction]
    g = torch.full_like(x, float("nan")) if grad == "new" else x if grad == "inplace" else None
    out = torch.full((N,) if red == 0 else (), float("nan"), dtype=x.dtype)
    bad = lib.shim_ce_forward(DTYPE_CODES[x.dtype], ptr(x), N, C, None if prob else ptr(target),
                              ptr(target) if prob else None, ptr(weight), ignore_index, label_smoothing, red, ptr(g),
                              ptr(out), max_threads, kind, max_blocks)
    return out, g, bad


def reference_cross_entropy(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """F.cross_entropy in float64 on the same (already rounded) inputs; the gradient of the loss's sum."""
    xd = x.double().requires_grad_()
    td = target.double() if target.is_floating_point() else target
    wd = None if weight is None else weight.double()
    loss = F.cross_entropy(xd, td, weight=wd, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    loss.sum().backward()
    return loss.detach(), xd.grad


def assert_close(actual, expected, dtype, what):
    if dtype == torch.float64:
        kw = dict(rtol=1e-10, atol=1e-12)
    elif dtype == torch.float32:
        kw = dict(rtol=2e-5, atol=2e-6)
    else:  # one rounding of the result to 8 (bf16) or 11 (fp16) bits
        kw = dict(rtol=2e-2, atol=2e-2 * max(expected.abs().max().item(), 1e-30) if expected.numel() else 0)
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, msg=lambda m: f"{what}: {m}",
                               **kw)


def logits(N, C, dtype, scale=3.0, misalign=False):
    x = torch.randn(N * C + 1, dtype=torch.float64) * scale
    x = x.to(dtype)
    # misalign: the rows start 1 element past a 16-byte boundary (a view with a storage offset)
    return x[1:].view(N, C) if misalign else x[:-1].view(N, C).clone()


# (reduction, weighted, smoothing, ignore)
OPTIONS = [("mean", False, 0.0, False), ("none", True, 0.1, True), ("sum", False, 0.2, False),
           ("mean", True, 0.1, True), ("mean", True, 0.0, True), ("none", False, 0.0, False)]
# (N, C, max_threads, forced kind): one warp per row, a block with the row in registers, a block streaming it
SHAPES = [(33, 27, 64, -1), (1, 1, 64, -1), (33, 200, 64, -1), (5, 1000, 64, -1), (5, 1000, 64, STREAM),
          (3, 5000, 64, -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}-t{t}-k{k}" for n, c, t, k in SHAPES])
@pytest.mark.parametrize("options", OPTIONS, ids=["-".join(map(str, o)) for o in OPTIONS])
def test_cross_entropy_index_targets(lib, dtype, shape, options):
    N, C, threads, kind = shape
    reduction, weighted, smoothing, ignore = options
    x = logits(N, C, dtype)
    t = torch.randint(0, C, (N,))
    if ignore:
        t[::3] = -7
    w = torch.rand(C, dtype=dtype) + 0.5 if weighted else None
    kw = dict(weight=w, ignore_index=-7 if ignore else -100, label_smoothing=smoothing, reduction=reduction)
    loss, g, bad = shim_cross_entropy(lib, x, t, max_threads=threads, kind=kind, **kw)
    assert bad == -1
    ref_loss, ref_grad = reference_cross_entropy(x, t, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    # the saved gradient is already scaled for the reduction: d(loss.sum())/dx
    assert_close(g, ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(33, 27, 64, -1), (33, 1000, 64, -1), (4, 50257, 128, -1), (2, 8000, 128, -1)],
                         ids=["warp-27", "block-1000", "stream-50257", "block-8000"])
@pytest.mark.parametrize("smoothing", [0.0, 0.05])  # 0: the kernels without the general options (the hot case)
def test_cross_entropy_low_precision_and_long_rows(lib, dtype, shape, smoothing):
    N, C, threads, kind = shape
    x = logits(N, C, dtype, misalign=True)  # odd rows start anywhere: head, vectors, tail
    t = torch.randint(0, C, (N,))
    t[1] = -100
    loss, g, bad = shim_cross_entropy(lib, x, t, max_threads=threads, kind=kind, label_smoothing=smoothing)
    ref_loss, ref_grad = reference_cross_entropy(x, t, label_smoothing=smoothing)
    assert bad == -1
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, ref_grad, dtype, "grad")
    assert torch.all(g[1] == 0)


@pytest.mark.parametrize("shape", [(33, 27, 64, -1), (9, 1000, 64, -1), (7, 3000, 64, STREAM)])
def test_cross_entropy_blocks_loop_over_rows(lib, shape):
    """A grid smaller than the rows: each block (or each warp of a block) takes several rows in turn."""
    N, C, threads, kind = shape
    x = logits(N, C, torch.float32)
    t = torch.randint(0, C, (N,))
    t[N // 2] = -100
    loss, g, _ = shim_cross_entropy(lib, x, t, reduction="none", max_threads=threads, kind=kind, max_blocks=2)
    ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(g, ref_grad, torch.float32, "grad")


def test_plans_cover_every_row_shape(lib):
    kinds = {(DTYPE_CODES[d], c): lib.shim_ce_plan_kind(DTYPE_CODES[d], 33, c, t)
             for d, c, t in [(torch.float32, 27, 64), (torch.float32, 1000, 64), (torch.float32, 5000, 64),
                             (torch.bfloat16, 8000, 128), (torch.bfloat16, 50257, 128)]}
    assert sorted(set(kinds.values())) == [WARP_ROWS, BLOCK_ROWS, STREAM]
    # at full size on a GPU (512-thread blocks): C = 32768 float32 and 45056 bf16 keep the row in registers
    assert lib.shim_ce_plan_kind(DTYPE_CODES[torch.float32], 16384, 32768, 512) == BLOCK_ROWS
    assert lib.shim_ce_plan_kind(DTYPE_CODES[torch.bfloat16], 16384, 45056, 512) == BLOCK_ROWS
    assert lib.shim_ce_plan_kind(DTYPE_CODES[torch.bfloat16], 16384, 50257, 512) == STREAM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(33, 27, 64, -1), (5, 1000, 64, -1), (3, 5000, 64, -1)])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.15)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_probability_targets(lib, dtype, shape, weighted, smoothing, reduction):
    N, C, threads, kind = shape
    x = logits(N, C, dtype)
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(dtype)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    kw = dict(weight=w, label_smoothing=smoothing, reduction=reduction)
    loss, g, _ = shim_cross_entropy(lib, x, t, max_threads=threads, kind=kind, **kw)
    ref_loss, ref_grad = reference_cross_entropy(x, t, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, ref_grad, dtype, "grad")


@pytest.mark.parametrize("shape", [(33, 27, 64, -1), (5, 1000, 64, -1), (3, 5000, 64, -1)])
def test_cross_entropy_inplace_matches_out_of_place(lib, shape):
    N, C, threads, kind = shape
    x = logits(N, C, torch.float32)
    t = torch.randint(0, C, (N,))
    t[0] = -100
    loss, g, _ = shim_cross_entropy(lib, x, t, max_threads=threads, kind=kind, label_smoothing=0.1)
    xi = x.clone()
    loss_i, g_i, _ = shim_cross_entropy(lib, xi, t, grad="inplace", max_threads=threads, kind=kind,
                                        label_smoothing=0.1)
    assert g_i.data_ptr() == xi.data_ptr()
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0)
    torch.testing.assert_close(xi, g, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(33, 27, 64, -1), (5, 1000, 64, -1), (3, 5000, 64, -1)])
def test_cross_entropy_nan_rows_and_ignored_rows(lib, shape):
    N, C, threads, kind = shape
    x = logits(N, C, torch.float32)
    x[0, C // 2] = float("nan")  # a NaN row: NaN loss and gradient, as PyTorch
    x[1, 0] = float("nan")       # a NaN row that is ignored: 0 loss, 0 gradient
    t = torch.randint(0, C, (N,))
    t[1] = -100
    loss, g, _ = shim_cross_entropy(lib, x, t, reduction="none", max_threads=threads, kind=kind)
    ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[0]) and torch.isnan(g[0]).all()
    assert loss[1] == 0 and torch.all(g[1] == 0)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(g[2:], ref_grad[2:], torch.float32, "grad")
    mean, _, _ = shim_cross_entropy(lib, x, t, max_threads=threads, kind=kind)
    assert torch.isnan(mean)


def test_cross_entropy_all_rows_ignored_mean_is_nan(lib):
    x = logits(4, 27, torch.float32)
    t = torch.full((4,), -100)
    loss, g, _ = shim_cross_entropy(lib, x, t)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, t))
    assert torch.all(g == 0)
    total, _, _ = shim_cross_entropy(lib, x, t, reduction="sum")
    assert total == 0


def test_cross_entropy_bad_target_found_before_anything_is_written(lib):
    x = logits(9, 27, torch.float32)
    before = x.clone()
    t = torch.randint(0, 27, (9,))
    t[5], t[7] = 27, -1
    _, _, bad = shim_cross_entropy(lib, x, t, grad="inplace")
    assert bad == 5
    assert torch.equal(x, before)


def test_cross_entropy_matches_cpu_kernel(lib):
    ops = pytest.importorskip("mmops._ops").ops
    x = logits(33, 1000, torch.float32)
    t = torch.randint(0, 1000, (33,))
    t[4] = -100
    w = torch.rand(1000) + 0.5
    for red in (0, 1, 2):
        cpu_loss, cpu_grad = ops.cross_entropy_forward(x, t, w, red, -100, 0.1, True)
        red_name = {0: "none", 1: "mean", 2: "sum"}[red]
        loss, g, _ = shim_cross_entropy(lib, x, t, weight=w, label_smoothing=0.1, reduction=red_name)
        torch.testing.assert_close(loss, cpu_loss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(g, cpu_grad, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_scale_grad(lib, dtype):
    g = torch.randn(33, 27).to(dtype)
    code = DTYPE_CODES[dtype]
    per_row = torch.randn(33).to(dtype)
    out = torch.empty_like(g)
    lib.shim_ce_scale_grad(code, ptr(g), ptr(out), 33, 27, ptr(per_row), 1)
    assert_close(out, g.double() * per_row.double()[:, None], dtype, "per-row")
    two = torch.tensor(2.0, dtype=dtype)
    lib.shim_ce_scale_grad(code, ptr(g), ptr(out), 33, 27, ptr(two), 0)
    assert torch.equal(out, g * 2)
    inplace = g.clone()
    one = torch.tensor(1.0, dtype=dtype)  # a name keeps it alive while the shim reads it
    lib.shim_ce_scale_grad(code, ptr(inplace), ptr(inplace), 33, 27, ptr(one), 0)
    assert torch.equal(inplace, g)  # in place with 1: nothing to do
    lib.shim_ce_scale_grad(code, ptr(inplace), ptr(inplace), 33, 27, ptr(two), 0)
    assert torch.equal(inplace, g * 2)


# ---- BatchNorm ---------------------------------------------------------------------------------------------------
ACTS = {0: lambda y: y, 1: torch.tanh, 2: torch.relu}


def reference_batch_norm(x, w, b, rm, rv, training, momentum, eps, bessel, act):
    """The chain in float64: h, mean, invstd, new running stats; x/w/b are leaves for autograd."""
    dims = [0] if x.dim() == 2 else [0, 2]
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
    if training:
        n = x.numel() // x.shape[1]
        mean = x.mean(dims)
        var_b = ((x - mean.view(shape)) ** 2).mean(dims)
        var_u = var_b * n / (n - 1)
        var = var_u if bessel else var_b
        rm_new = None if rm is None else (1 - momentum) * rm + momentum * mean.detach()
        rv_new = None if rv is None else (1 - momentum) * rv + momentum * var_u.detach()
    else:
        mean, var = rm, rv
        rm_new, rv_new = rm, rv
    invstd = 1 / torch.sqrt(var + eps)
    y = (x - mean.view(shape)) * invstd.view(shape)
    if w is not None:
        y = y * w.view(shape) + b.view(shape)
    return ACTS[act](y), mean, invstd, rm_new, rv_new


def shim_batch_norm(lib, x, w, b, rm, rv, training, momentum, eps, bessel, act, threads, splits):
    N, C = x.shape[:2]
    L = x.shape[2] if x.dim() == 3 else 1
    h = torch.full_like(x, float("nan"))
    mean, invstd = torch.full((C,), float("nan"), dtype=x.dtype), torch.full((C,), float("nan"), dtype=x.dtype)
    lib.shim_bn_forward(DTYPE_CODES[x.dtype], ptr(x), ptr(h), N, C, L, ptr(w), ptr(b), ptr(rm), ptr(rv), ptr(mean),
                        ptr(invstd), int(training), momentum, eps, int(bessel), act, threads, splits)
    return h, mean, invstd


# (shape, threads, forced splits): channel tiles (L = 1) with tails past C, one channel per block (L > 1), one
# split and several (the two-level reduction), N = 1 with L > 1
BN_SHAPES = [((33, 27), 64, 0), ((33, 27), 64, 3), ((200, 40), 128, 0), ((1, 3, 17), 64, 0), ((33, 5, 7), 64, 2),
             ((16, 3, 100), 128, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", BN_SHAPES, ids=[f"{'x'.join(map(str, s))}-t{t}-s{k}" for s, t, k in BN_SHAPES])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("training,bessel,affine", [(True, False, True), (True, True, False), (False, False, True)])
def test_batch_norm_forward_and_backward(lib, dtype, case, act, training, bessel, affine):
    shape, threads, splits = case
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(C, dtype=torch.float64).to(dtype) if affine else None
    rm, rv = torch.randn(C, dtype=dtype), (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    h, mean, invstd = shim_batch_norm(lib, x, w, b, rm, rv, training, 0.1, 1e-5, bessel, act, threads, splits)

    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_() if affine else None
    bd = b.double().requires_grad_() if affine else None
    ref_h, ref_mean, ref_invstd, ref_rm, ref_rv = reference_batch_norm(xd, wd, bd, rm0.double(), rv0.double(),
                                                                       training, 0.1, 1e-5, bessel, act)
    assert_close(h, ref_h.detach(), dtype, "h")
    assert_close(mean, ref_mean.detach(), dtype, "mean")
    assert_close(invstd, ref_invstd.detach(), dtype, "invstd")
    assert_close(rm, ref_rm, dtype, "running_mean")
    assert_close(rv, ref_rv, dtype, "running_var")

    dh = torch.randn(shape, dtype=dtype)
    ref_h.backward(dh.double())
    N, L = shape[0], shape[2] if len(shape) == 3 else 1
    dx, dg, db = torch.full_like(x, float("nan")), torch.full((C,), float("nan"), dtype=dtype), torch.full(
        (C,), float("nan"), dtype=dtype)
    lib.shim_bn_backward(DTYPE_CODES[dtype], ptr(dh), ptr(h), ptr(x), ptr(dx), ptr(dg), ptr(db), N, C, L, ptr(w),
                         ptr(mean), ptr(invstd), int(training), int(bessel), act, threads, splits)
    # tanh: the reference differentiates tanh itself, the kernel uses 1 - h^2 of the rounded h
    assert_close(dx, xd.grad, dtype, "dx")
    if affine:
        assert_close(dg, wd.grad, dtype, "dgamma")
        assert_close(db, bd.grad, dtype, "dbeta")


def test_batch_norm_backward_without_sums_in_eval(lib):
    """Eval mode, dx only: no reduction runs, dx = gamma * invstd * dy'."""
    x = torch.randn(9, 5)
    w, mean, invstd = torch.rand(5) + 0.5, torch.randn(5), torch.rand(5) + 0.5
    h = torch.relu((x - mean) * invstd * w)
    dh = torch.randn(9, 5)
    dx = torch.full_like(x, float("nan"))
    lib.shim_bn_backward(0, ptr(dh), ptr(h), ptr(x), ptr(dx), None, None, 9, 5, 1, ptr(w), ptr(mean), ptr(invstd), 0,
                         0, 2, 64, 0)
    torch.testing.assert_close(dx, torch.where(h > 0, dh, 0) * invstd * w)
    x[0, 0] = float("inf")  # eval: no 0 * (x - mean) term, so an inf in x does not make dx NaN
    lib.shim_bn_backward(0, ptr(dh), ptr(h), ptr(x), ptr(dx), None, None, 9, 5, 1, ptr(w), ptr(mean), ptr(invstd), 0,
                         0, 2, 64, 0)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batch_norm_low_precision(lib, dtype):
    x = (torch.randn(64, 40, dtype=torch.float64) + 1).to(dtype)
    w, b = torch.ones(40, dtype=dtype), torch.zeros(40, dtype=dtype)
    h, mean, invstd = shim_batch_norm(lib, x, w, b, None, None, True, 0.1, 1e-5, False, 1, 64, 0)
    ref_h, ref_mean, ref_invstd, _, _ = reference_batch_norm(x.double(), None, None, None, None, True, 0.1, 1e-5,
                                                             False, 1)
    assert_close(h, ref_h, dtype, "h")
    assert_close(mean, ref_mean, dtype, "mean")


def test_batch_norm_large_mean_keeps_digits(lib):
    """mean 1000, std 1: Welford and the x - mean form keep float32's digits (a sum-of-squares form loses them)."""
    x = torch.randn(300, 8, dtype=torch.float64).add(1000).float()
    h, mean, invstd = shim_batch_norm(lib, x, None, None, None, None, True, 0.1, 1e-5, False, 0, 64, 3)
    ref_h, _, ref_invstd, _, _ = reference_batch_norm(x.double(), None, None, None, None, True, 0.1, 1e-5, False, 0)
    torch.testing.assert_close(invstd.double(), ref_invstd, rtol=1e-4, atol=0)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(33, 27), (5, 3, 11)])
def test_sync_batch_norm_pieces(lib, shape):
    """batch_norm_stats / backward_reduce / backward_elemt against the CPU kernels (float64 outputs)."""
    ops = pytest.importorskip("mmops._ops").ops
    N, C = shape[:2]
    L = shape[2] if len(shape) == 3 else 1
    x = torch.randn(shape) * 3 + 1
    mean64, m2 = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    lib.shim_bn_stats(0, ptr(x), N, C, L, ptr(mean64), ptr(m2), 64, 2)
    cpu_mean, cpu_m2 = ops.batch_norm_stats(x)
    torch.testing.assert_close(mean64, cpu_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m2, cpu_m2, rtol=1e-5, atol=1e-4)

    mean = cpu_mean.float()
    invstd = (1 / torch.sqrt(cpu_m2 / (N * L) + 1e-5)).float()
    w = torch.rand(C) + 0.5
    shape_c = (1, -1) if len(shape) == 2 else (1, -1, 1)
    h = torch.tanh((x - mean.view(shape_c)) * (invstd * w).view(shape_c))
    dh = torch.randn(shape)
    sdy, sdyx = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    lib.shim_bn_backward_reduce(0, ptr(dh), ptr(h), ptr(x), ptr(mean), N, C, L, 1, ptr(sdy), ptr(sdyx), 64, 2)
    cpu_sdy, cpu_sdyx = ops.batch_norm_backward_reduce(dh, h, x, mean, 1)
    torch.testing.assert_close(sdy, cpu_sdy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdyx, cpu_sdyx, rtol=1e-5, atol=1e-5)

    dx = torch.empty_like(x)
    lib.shim_bn_backward_elemt(0, ptr(dh), ptr(h), ptr(x), ptr(dx), N, C, L, ptr(w), ptr(mean), ptr(invstd), ptr(sdy),
                               ptr(sdyx), N * L, 1, 1, 64)
    cpu_dx = ops.batch_norm_backward_elemt(dh, h, x, w, mean, invstd, sdy, sdyx, N * L, True, 1)
    torch.testing.assert_close(dx, cpu_dx, rtol=1e-5, atol=1e-5)


# ---- RNN (the schedule of rnn.cu with a plain-loop GEMM standing in for cuBLAS) -----------------------------------
def reference_rnn(x, hx, w_ih, w_hh, b, act):
    """The step loop in float64 (x: (T, B, I) floats, one-hot rows for tokens)."""
    f = torch.tanh if act == 1 else torch.relu
    h, outs = hx, []
    for t in range(x.shape[0]):
        pre = x[t] @ w_ih.T + h @ w_hh.T
        h = f(pre + b if b is not None else pre)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [(5, 3, 4, 7), (1, 2, 3, 5), (4, 2, 27, 33)], ids=["T5", "T1", "tokens-T4"])
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_forward_and_backward(lib, dtype, dims, act, bias):
    T, B, I, H = dims
    tokens = I == 27
    w_ih = (torch.randn(H, I, dtype=torch.float64) / I ** 0.5).to(dtype)
    w_hh = (torch.randn(H, H, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = torch.randn(H, dtype=dtype) * 0.1 if bias else None
    hx = torch.randn(B, H, dtype=dtype) * 0.5
    if tokens:
        tok = torch.randint(0, I, (T, B))
        x = None
        xd = F.one_hot(tok, I).double()
    else:
        tok = None
        x = torch.randn(T, B, I, dtype=dtype)
        xd = x.double()
    table = w_ih.T.contiguous() if tokens else None
    out = torch.full((T, B, H), float("nan"), dtype=dtype)
    code = DTYPE_CODES[dtype]
    lib.shim_rnn_forward(code, ptr(x), ptr(tok), ptr(table), ptr(hx), ptr(w_ih), ptr(w_hh), ptr(b), ptr(out), T, B, I,
                         H, act, 64)
    leaves = [t.double().requires_grad_() for t in (hx, w_ih, w_hh)]
    bd = b.double().requires_grad_() if bias else None
    if not tokens:
        xd.requires_grad_()
    ref = reference_rnn(xd, *leaves, bd, act)
    assert_close(out, ref.detach(), dtype, "output")

    dout = torch.randn(T, B, H, dtype=dtype)
    ref.backward(dout.double())
    dpre = torch.empty(T, B, H, dtype=dtype)
    d_input = None if tokens else torch.full((T, B, I), float("nan"), dtype=dtype)
    d_hx, d_w_hh = torch.full_like(hx, float("nan")), torch.full_like(w_hh, float("nan"))
    d_w_ih, d_b = torch.full_like(w_ih, float("nan")), torch.full((H,), float("nan"), dtype=dtype)
    lib.shim_rnn_backward(code, ptr(dout), ptr(out), ptr(x), ptr(tok), ptr(hx), ptr(w_ih), ptr(w_hh), ptr(dpre),
                          ptr(d_input), ptr(d_hx), ptr(d_w_ih), ptr(d_w_hh), ptr(d_b), T, B, I, H, act, 64)
    assert_close(d_hx, leaves[0].grad, dtype, "d_hx")
    assert_close(d_w_ih, leaves[1].grad, dtype, "d_w_ih")
    assert_close(d_w_hh, leaves[2].grad, dtype, "d_w_hh")
    if bias:
        assert_close(d_b, bd.grad, dtype, "d_b")
    if not tokens:
        assert_close(d_input, xd.grad, dtype, "d_input")


def test_rnn_matches_cpu_kernel(lib):
    ops = pytest.importorskip("mmops._ops").ops
    T, B, I, H = 6, 4, 5, 16
    x, hx = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh = torch.randn(H, I) / 3, torch.randn(H, H) / 4
    b_ih, b_hh = torch.randn(H) / 10, torch.randn(H) / 10
    cpu_out = ops.rnn_forward(x, hx, w_ih, w_hh, b_ih, b_hh, 1)
    out = torch.empty(T, B, H)
    bias = b_ih + b_hh
    lib.shim_rnn_forward(0, ptr(x), None, None, ptr(hx), ptr(w_ih), ptr(w_hh), ptr(bias), ptr(out), T, B, I, H, 1, 64)
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=1e-6)
    dout = torch.randn(T, B, H)
    cpu_grads = ops.rnn_backward(dout, cpu_out, x, hx, w_ih, w_hh, 1, [True] * 5)
    grads = [torch.empty(T, B, I), torch.empty(B, H), torch.empty(H, I), torch.empty(H, H), torch.empty(H)]
    dpre = torch.empty(T, B, H)  # named: the shim writes into it
    lib.shim_rnn_backward(0, ptr(dout), ptr(out), ptr(x), None, ptr(hx), ptr(w_ih), ptr(w_hh), ptr(dpre),
                          *map(ptr, grads), T, B, I, H, 1, 64)
    for name, g, c in zip(["d_input", "d_hx", "d_w_ih", "d_w_hh", "d_b"], grads, cpu_grads):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
