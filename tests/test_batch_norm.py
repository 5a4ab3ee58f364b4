"""mmops.batch_norm / mmops.nn.BatchNorm1d against F.batch_norm (+ tanh/relu) and the reference chain."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmops
import mmops.nn
from mmops import reference
from mmops._ops import ops
from mmops.testing import cmp

from .conftest import tol

ACT = {None: lambda t: t, "tanh": torch.tanh, "relu": torch.relu}


def _run(fn, x, rm, rv, w, b, go):
    xi = x.detach().clone().requires_grad_()
    wi = None if w is None else w.detach().clone().requires_grad_()
    bi = None if b is None else b.detach().clone().requires_grad_()
    y = fn(xi, rm, rv, wi, bi)
    y.backward(go)
    grads = [xi.grad] + [p.grad for p in (wi, bi) if p is not None]
    return y.detach(), grads


@pytest.mark.parametrize("shape", [(2, 3), (32, 64), (7, 200), (300, 17), (8, 5, 9), (3, 4, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_matches_torch(shape, dtype, training, affine, activation, momentum):
    C = shape[1]
    x = torch.randn(*shape, dtype=dtype) * 2 + 0.5
    w = torch.randn(C, dtype=dtype) if affine else None
    b = torch.randn(C, dtype=dtype) if affine else None
    rm0, rv0 = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    go = torch.randn(*shape, dtype=dtype)
    rm1, rv1, rm2, rv2 = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    y1, g1 = _run(lambda x, rm, rv, w, b: mmops.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5,
                                                           activation=activation), x, rm1, rv1, w, b, go)
    y2, g2 = _run(lambda x, rm, rv, w, b: ACT[activation](F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)),
                  x, rm2, rv2, w, b, go)
    t = tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1, y2, **t)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, **t)
    torch.testing.assert_close(rm1, rm2, **t)
    torch.testing.assert_close(rv1, rv2, **t)


# float32 (N, C): the SIMD row loops (sums in double), one parallel region split by rows; these shapes cover widths
# below, at and past a vector, and the multi-threaded split. test_streaming_passes runs them through the streaming
# stores as well (channels that wrap inside a 16-float chunk: C = 7, 17, 70, 33).
@pytest.mark.parametrize("shape", [(2000, 70), (333, 256), (65, 32), (4100, 33), (301, 7), (129, 17)])
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_float32_path_matches_float64(shape, activation, offset):
    C = shape[1]
    torch.manual_seed(0)
    # offset: the shifted sums must not cancel. The truth is float64 math on the float32 values.
    x = (torch.randn(*shape) * 0.5 + offset).double()
    w, b = torch.randn(C).double(), torch.randn(C).double()
    go = torch.randn(*shape).double()
    if activation == "relu":  # where the pre-activation is ~0, float rounding may take either side of the kink
        pre = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        go[pre.abs() < 1e-3] = 0
    rm32, rv32, rm64, rv64 = torch.zeros(C), torch.ones(C), torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y1, g1 = _run(lambda x, rm, rv, w, b: mmops.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation=activation),
                  x.float(), rm32, rv32, w.float(), b.float(), go.float())
    y2, g2 = _run(lambda x, rm, rv, w, b: ACT[activation](F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
                  x, rm64, rv64, w, b, go)
    # At offset 1000 the float32 mean itself is off by up to ulp(1000)/2 = 3e-5, i.e. ~1e-4 of xhat here.
    atol = 1e-4 if offset == 0 else 5e-4
    torch.testing.assert_close(y1, y2.float(), rtol=1e-4, atol=atol)
    y3, _ = _run(lambda x, rm, rv, w, b: ACT[activation](F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)),
                 x.float(), None, None, w.float(), b.float(), go.float())
    assert (y1.double() - y2).abs().max() <= (y3.double() - y2).abs().max() * 1.5 + 1e-6  # no worse than PyTorch
    for a, e in zip(g1, g2):  # dgamma/dbeta are sums over N rows: scale the tolerance with N
        torch.testing.assert_close(a, e.float(), rtol=1e-3, atol=atol * shape[0] ** 0.5)
    torch.testing.assert_close(rm32, rm64.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv32, rv64.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, row, value", [((32, 200), 0, 5.0), ((32, 200), 20, 5.0), ((4096, 200), 0, 64.0),
                                               ((4096, 16), 100, 64.0), ((32768, 8), 0, 181.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_statistics_keep_their_precision_with_an_outlier_row(shape, row, value, threads):
    """The float32 statistics are sums of (x - K)^2 about a shift K: an outlier that pulls K away from the mean (as
    one in row 0 did when K was the channel's first value: invstd 2e-6 to 4e-5 off) must not cost precision. The
    bound is PyTorch's own float32 error on the same data; the truth is float64 math on the float32 values."""
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(*shape)
    x[row] = value
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5, False, 0)
        rm, rv = torch.zeros(C), torch.ones(C)
        mmops.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)
        _, t_mean, t_invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    finally:
        torch.set_num_threads(prev)
    xd = x.double()
    var, m = torch.var_mean(xd, 0, unbiased=False)
    true_invstd = 1 / torch.sqrt(var + 1e-5)
    rel = lambda a, e: ((a.double() - e) / e).abs().max().item()
    torch_err = rel(t_invstd, true_invstd)
    assert rel(invstd, true_invstd) <= max(2 * torch_err, 3e-7), (rel(invstd, true_invstd), torch_err)
    assert (mean.double() - m).abs().max().item() <= max(2 * (t_mean.double() - m).abs().max().item(), 1e-7)
    true_rv = 0.9 + 0.1 * torch.var(xd, 0, unbiased=True)
    assert rel(rv, true_rv) <= 3e-7


def test_streaming_passes():
    """Large calls write their outputs with streaming stores (csrc/cpu/batch_norm_kernels.cpp); a threshold of 0
    bytes sends every size through those passes, so the float32 and the torch-matrix tests run on them here."""
    env = {**os.environ, "MMOPS_BN_STREAM_ABOVE_BYTES": "0"}
    tests = [f"{__file__}::test_float32_path_matches_float64", f"{__file__}::test_matches_torch"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *tests], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


_SUMS_SCRIPT = """
import sys, torch, mmops
ops = torch.ops.mmops
out = []
for seed, (N, C, act, dtype) in enumerate([(2000, 70, 0, torch.float32), (333, 256, 1, torch.float32),
                                           (4100, 33, 2, torch.float32), (515, 96, 1, torch.float64),
                                           (47, 64, 0, torch.float32), (301, 7, 1, torch.float32),
                                           (150, 200, 0, torch.float32), (40, 27, 2, torch.float64)]):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=dtype) * 3 + 100
    x[:, C // 2] *= 1e19  # squares that overflow float32: this channel's blocks are summed again in double
    w, b = torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    _, mean, invstd = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, False, act)
    h = torch.tanh(torch.randn(N, C, generator=g, dtype=dtype))  # the same output in both runs
    dh = torch.randn(N, C, generator=g, dtype=dtype)
    _, dw, db = ops.batch_norm_backward(dh, h, x, w, mean, invstd, True, False, act, [False, True, True])
    out.append([mean, invstd, rm, rv, dw, db])
# The outputs too: every activation over pre-activations from -12 to 12 (tanh saturates from 7.905 on), forward and
# backward, with the output each run computes.
g = torch.Generator().manual_seed(99)
x = torch.randn(3000, 200, generator=g)
for act in ("tanh", "relu", None):
    xr = x.clone().requires_grad_()
    h = mmops.batch_norm(xr, None, None, torch.full((200,), 3.0), torch.linspace(-12, 12, 200), True,
                         activation=act)
    h.backward(torch.randn(3000, 200, generator=g))
    out.append([h.detach(), xr.grad])
torch.save(out, sys.argv[1])
"""


def test_sums_are_bitwise_the_same_from_cache_and_from_memory(tmp_path):
    # The sums read data in cache in tiles of rows (32, 8, 4 and 1 channels wide: the sizes here take every width)
    # and data from memory row after row (csrc/cpu/batch_norm_kernels.cpp), and the elementwise passes are a row loop
    # in cache and a flat walk with streaming stores from memory (the outputs compared at the end); every channel adds its values in the same blocks and order either way
    # (including a channel summed again in double), so the statistics and running statistics (and the backward's sums)
    # must not differ in a single bit (MMOPS_BN_STREAM_ABOVE_BYTES=0: every size takes the from-memory loops). A
    # difference would make a model's numbers depend on the machine's cache size.
    root = os.path.dirname(os.path.dirname(__file__))
    runs = {}
    for name, extra in (("cached", {}), ("memory", {"MMOPS_BN_STREAM_ABOVE_BYTES": "0"})):
        path = str(tmp_path / f"{name}.pt")
        env = {k: v for k, v in os.environ.items() if k != "MMOPS_BN_STREAM_ABOVE_BYTES"}
        subprocess.run([sys.executable, "-c", _SUMS_SCRIPT, path], env={**env, **extra}, cwd=root, check=True)
        runs[name] = torch.load(path)
    for case_cached, case_memory in zip(runs["cached"], runs["memory"]):
        for a, b in zip(case_cached, case_memory):
            assert torch.equal(a, b), (a - b).abs().max()


def _sysfs_last_level_cache_bytes():
    """The L3 size the kernel describes for cpu0, or None."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    for index in range(8):
        try:
            with open(f"{root}/index{index}/level") as f_level, open(f"{root}/index{index}/size") as f_size:
                level, size = int(f_level.read()), f_size.read().strip()
        except OSError:
            return None
        if level == 3:
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
            return int(size.rstrip("KM")) * scale
    return None


def test_from_memory_threshold_is_the_last_level_cache_at_most_32_mib(tmp_path):
    # The threshold above which BatchNorm takes its from-memory loops (streaming stores, statistics row after row)
    # is the L3 that sysfs describes, capped at 32 MiB; glibc's sysconf figure can be the host's (320 MB on an AMD
    # EPYC VM whose sysfs says 32 MB), with which no call ever streamed. Run in a fresh process without the variable
    # that overrides it (the threshold is read once per process).
    env = {k: v for k, v in os.environ.items() if k != "MMOPS_BN_STREAM_ABOVE_BYTES"}
    code = "import mmops; print(mmops._C.bn_from_memory_bytes())"
    root = os.path.dirname(os.path.dirname(__file__))
    got = int(subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True, capture_output=True,
                             text=True).stdout)
    assert 0 < got <= 32 << 20
    sysfs = _sysfs_last_level_cache_bytes()
    if sysfs is not None:
        assert got == min(sysfs, 32 << 20)
    got = subprocess.run([sys.executable, "-c", code], env={**env, "MMOPS_BN_STREAM_ABOVE_BYTES": "12345"}, cwd=root,
                         check=True, capture_output=True, text=True).stdout
    assert int(got) == 12345
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "MMOPS_BN_STREAM_ABOVE_BYTES": "32M"}, cwd=root,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "MMOPS_BN_STREAM_ABOVE_BYTES must be a number of bytes" in bad.stderr


def test_bessel_matches_reference_chain_cmp():
    n, C = 32, 64
    hprebn = torch.randn(n, C, dtype=torch.float64) * 3 + 1
    bngain = torch.randn(1, C, dtype=torch.float64) * 0.1 + 1
    bnbias = torch.randn(1, C, dtype=torch.float64) * 0.1
    dhpreact = torch.randn(n, C, dtype=torch.float64)
    chain = reference.batch_norm_chain(hprebn, bngain, bnbias)
    manual = reference.batch_norm_chain_backward(chain, dhpreact)
    x = hprebn.clone().requires_grad_()
    g = bngain.view(-1).clone().requires_grad_()
    b = bnbias.view(-1).clone().requires_grad_()
    out = mmops.batch_norm(x, None, None, g, b, training=True, bessel=True)
    out.backward(dhpreact)
    rows = [
        cmp("hpreact", chain["hpreact"], out.detach(), verbose=False),
        cmp("dhprebn (chain)", manual["dhprebn"], x, verbose=False),
        cmp("dhprebn (one-line)", reference.batch_norm_closed_form_grad(hprebn, bngain, dhpreact), x, verbose=False),
        cmp("dbngain", manual["dbngain"], g, verbose=False),
        cmp("dbnbias", manual["dbnbias"], b, verbose=False),
    ]
    assert all(r.approx for r in rows), rows


def test_bessel_tanh_matches_chain_then_tanh():
    x = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    g = torch.rand(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    go = torch.randn(16, 10, dtype=torch.float64)
    y = mmops.batch_norm(x, None, None, g, b, True, bessel=True, activation="tanh")
    grads = torch.autograd.grad(y, (x, g, b), go)
    ref = torch.tanh(reference.batch_norm_chain(x, g, b, bessel=True)["hpreact"])
    ref_grads = torch.autograd.grad(ref, (x, g, b), go)
    torch.testing.assert_close(y, ref)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e)


def test_running_stats_over_several_steps_and_cumulative_momentum():
    for momentum in (0.1, None):
        m = mmops.nn.BatchNorm1d(12, momentum=momentum)
        r = torch.nn.BatchNorm1d(12, momentum=momentum)
        for step in range(5):
            x = torch.randn(20, 12) * (step + 1) + step
            torch.testing.assert_close(m(x), r(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_mean, r.running_mean)
        torch.testing.assert_close(m.running_var, r.running_var)
        assert int(m.num_batches_tracked) == int(r.num_batches_tracked) == 5
        m.eval(), r.eval()
        x = torch.randn(7, 12)
        torch.testing.assert_close(m(x), r(x), rtol=1e-4, atol=1e-5)


def test_no_running_stats_uses_batch_stats_in_eval():
    m = mmops.nn.BatchNorm1d(6, track_running_stats=False).eval()
    r = torch.nn.BatchNorm1d(6, track_running_stats=False).eval()
    x = torch.randn(9, 6)
    torch.testing.assert_close(m(x), r(x), rtol=1e-4, atol=1e-5)


def test_state_dict_both_ways():
    r = torch.nn.BatchNorm1d(8)
    r.train()(torch.randn(10, 8))
    with torch.no_grad():
        r.weight.uniform_(), r.bias.uniform_()
    m = mmops.nn.BatchNorm1d(8, activation="tanh")
    m.load_state_dict(r.state_dict())
    assert set(m.state_dict()) == set(r.state_dict())
    r2 = torch.nn.BatchNorm1d(8)
    r2.load_state_dict(m.state_dict())
    for k, v in r.state_dict().items():
        torch.testing.assert_close(r2.state_dict()[k], v)
    m.eval(), r.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(m(x), torch.tanh(r(x)), rtol=1e-4, atol=1e-5)


def test_bfloat16_input():
    x = torch.randn(64, 16).bfloat16()
    rm, rv = torch.zeros(16), torch.ones(16)
    y = mmops.batch_norm(x, rm, rv, None, None, True, activation="tanh")
    assert y.dtype == torch.bfloat16
    ref = torch.tanh(F.batch_norm(x.float(), torch.zeros(16), torch.ones(16), None, None, True))
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bessel", [False, True])
def test_gradcheck(activation, training, bessel):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    if activation == "relu":  # keep pre-activations away from the kink at 0
        x = (torch.randn(6, 4, dtype=torch.float64) + torch.tensor([3.0, -3.0, 3.0, 3.0], dtype=torch.float64))
        x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = (torch.rand(4, dtype=torch.float64) * (2.0 if activation == "relu" else 0.2)).requires_grad_()
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    f = lambda x, w, b: mmops.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, bessel=bessel,
                                         activation=activation)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_torch_compile_fullgraph():
    m = mmops.nn.BatchNorm1d(10, activation="tanh")
    r = torch.nn.BatchNorm1d(10)
    x = torch.randn(16, 10, requires_grad=True)
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = f(x)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    yr = torch.tanh(r(xr))
    yr.sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_mean, r.running_mean)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: mmops.batch_norm(torch.randn(1, 4), None, None, training=True), ValueError, "more than 1 value"),
        (lambda: mmops.batch_norm(torch.randn(5, 4), None, None, torch.ones(3), training=True), RuntimeError, "weight"),
        (lambda: mmops.batch_norm(torch.randn(5, 4), None, None, None, torch.ones(5), True), RuntimeError, "bias"),
        (lambda: mmops.batch_norm(torch.randn(5, 4), torch.zeros(3), torch.ones(3), training=True), RuntimeError,
         "running_mean"),
        (lambda: mmops.batch_norm(torch.randn(5, 4), None, None, training=False), RuntimeError, "running_mean"),
        (lambda: mmops.batch_norm(torch.randint(0, 3, (5, 4)), None, None, training=True), NotImplementedError,
         "floating"),
        (lambda: mmops.batch_norm(torch.randn(5, 4), None, None, training=True, activation="gelu"), ValueError,
         "activation"),
        (lambda: mmops.batch_norm(torch.randn(5), None, None, training=True), ValueError, r"\(N, C, \*\)"),
        (lambda: mmops.nn.BatchNorm1d(4)(torch.randn(5)), ValueError, "2D or 3D"),
        (lambda: mmops.nn.BatchNorm1d(4)(torch.randn(5, 6)), RuntimeError, "input has 6 channels"),
        (lambda: mmops.nn.BatchNorm1d(4, activation="sigmoid"), ValueError, "activation"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_op_with_no_rows_in_eval_mode():
    # the op itself (the public function hands empty input to PyTorch): no first row to read the shift from
    h, mean, invstd = ops.batch_norm_forward(torch.empty(0, 3), None, None, torch.zeros(3), torch.ones(3), False, 0.1,
                                             1e-5, False, 0)
    assert h.shape == (0, 3)
    torch.testing.assert_close(invstd, torch.full((3,), (1 + 1e-5) ** -0.5))
