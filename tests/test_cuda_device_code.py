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
                       grad="new", max_threads=64, kind=-1):
    """Runs the forward; grad: "new" (a fresh buffer), "inplace" (into x), None. Returns (loss, grad, bad_row)."""
    N, C = x.shape
    prob = target.is_floating_point()
    red = REDUCTION_CODES[reduction]
    g = torch.full_like(x, float("nan")) if grad == "new" else x if grad == "inplace" else None
    out = torch.full((N,) if red == 0 else (), float("nan"), dtype=x.dtype)
    bad = lib.shim_ce_forward(DTYPE_CODES[x.dtype], ptr(x), N, C, None if prob else ptr(target),
                              ptr(target) if prob else None, ptr(weight), ignore_index, label_smoothing, red, ptr(g),
                              ptr(out), max_threads, kind)
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
