"""The ops trace for device `cuda` without a GPU: their fake kernels (registered in Python, device-agnostic) give
outputs on the input's device with the right shapes and dtypes under FakeTensorMode, and torch.compile(fullgraph=True)
traces the public functions with fake cuda inputs.

What a CPU-only build of torch cannot do, and so is not tested here: autograd on fake cuda tensors, and views of
them (`out[-1]`, AOT functionalization of the running-stat updates) -- both need torch's CUDA device guard ("PyTorch
is not linked with support for cuda devices"). Those paths are traced for real in tests/test_cuda_gpu.py where a GPU
is present.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import mmops
from mmops._ops import ops


@pytest.fixture
def fake():
    return FakeTensorMode()


def _on_cuda(*tensors):
    for t in tensors:
        assert isinstance(t, FakeTensor) and t.device.type == "cuda", t


def test_every_op_has_a_fake_kernel_for_cuda(fake):
    with fake:
        x, t = torch.randn(8, 27, device="cuda"), torch.randint(0, 27, (8,), device="cuda")
        loss, grad = ops.cross_entropy_forward(x, t, None, 0, -100, 0.1, True)
        _on_cuda(loss, grad)
        assert loss.shape == (8,) and grad.shape == (8, 27)
        assert ops.cross_entropy_forward_inplace(x, t, None, 1, -100, 0.0).shape == ()
        _on_cuda(ops.cross_entropy_backward(grad, torch.ones((), device="cuda")))
        ops.cross_entropy_scale_grad_(grad, torch.ones(8, device="cuda"))

        xb = torch.randn(16, 10, 3, device="cuda", dtype=torch.bfloat16)
        w, b = torch.ones(10, device="cuda", dtype=torch.bfloat16), torch.zeros(10, device="cuda", dtype=torch.bfloat16)
        rm, rv = torch.zeros(10, device="cuda", dtype=torch.bfloat16), torch.ones(10, device="cuda", dtype=torch.bfloat16)
        h, mean, invstd = ops.batch_norm_forward(xb, w, b, rm, rv, True, 0.1, 1e-5, False, 1)
        _on_cuda(h, mean, invstd)
        assert h.shape == xb.shape and h.dtype == torch.bfloat16 and mean.shape == (10,)
        dx, dg, db = ops.batch_norm_backward(h, h, xb, w, mean, invstd, True, False, 1, [True, True, False])
        _on_cuda(dx, dg, db)
        assert dx.shape == xb.shape and dg.shape == (10,) and db.shape == (0,)
        m64, m2 = ops.batch_norm_stats(xb)
        _on_cuda(m64, m2)
        assert m64.dtype == torch.float64
        _on_cuda(*ops.batch_norm_backward_reduce(h, h, xb, mean, 1))
        _on_cuda(ops.batch_norm_backward_elemt(h, h, xb, w, mean, invstd, m64, m2, 48, False, 1))

        xs, hx = torch.randn(5, 3, 4, device="cuda"), torch.zeros(3, 7, device="cuda")
        wih, whh = torch.randn(7, 4, device="cuda"), torch.randn(7, 7, device="cuda")
        out = ops.rnn_forward(xs, hx, wih, whh, None, None, 1)
        _on_cuda(out)
        assert out.shape == (5, 3, 7)
        grads = ops.rnn_backward(out, out, xs, hx, wih, whh, 2, [True, True, True, True, False])
        _on_cuda(*grads)
        assert [g.shape for g in grads] == [(5, 3, 4), (3, 7), (7, 4), (7, 7), (0,)]
        tokens = torch.randint(0, 4, (3,), device="cuda")
        _on_cuda(ops.rnn_cell_forward(tokens, hx, wih, whh, None, None, 1))


def test_compile_traces_the_functions_for_cuda(fake):
    with fake:
        x, t = torch.randn(8, 27, device="cuda"), torch.randint(0, 27, (8,), device="cuda")
        xb = torch.randn(16, 10, device="cuda")
        rm, rv, w, b = (torch.zeros(10, device="cuda"), torch.ones(10, device="cuda"), torch.ones(10, device="cuda"),
                        torch.zeros(10, device="cuda"))
        xs, hx = torch.randn(5, 3, 4, device="cuda"), torch.zeros(3, 7, device="cuda")
        wih, whh = torch.randn(7, 4, device="cuda"), torch.randn(7, 7, device="cuda")

    def ce(x, t):
        return mmops.cross_entropy(x, t, label_smoothing=0.1)

    def bn(x, rm, rv, w, b):
        return mmops.batch_norm(x, rm, rv, w, b, training=True, activation="tanh")

    def rnn(x, hx, wih, whh):
        return torch.ops.mmops.rnn_forward(x, hx, wih, whh, None, None, 2)

    # aot_eager: Dynamo's graph plus AOTAutograd's forward graph; eager: Dynamo's graph (bn's running-stat update
    # is an input mutation whose AOT functionalization needs views of cuda tensors: see the module docstring)
    for fn, args, backend in [(ce, (x, t), "aot_eager"), (rnn, (xs, hx, wih, whh), "aot_eager"),
                              (bn, (xb, rm, rv, w, b), "eager")]:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        with fake:
            out = compiled(*args)
        _on_cuda(out)


def test_cuda_cli_helpers_say_why_not_without_a_gpu(monkeypatch):
    """mmops._cuda (for `bench/check/train --device cuda`): without a GPU, available() is False and require() raises
    one clear line before any work starts."""
    from mmops import _cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cuda.available() is False
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        _cuda.require()
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        _cuda.bench()
