"""The drop-ins' usual call goes to the Functions' C++ apply without torch.autograd.Function.apply's Python layer
(mmops/_ops.py): the graph, the gradients and the behaviour under functorch must be those of Function.apply."""
import pytest
import torch
import torch.nn.functional as F

import mmops
from mmops._batch_norm import BatchNormFunction
from mmops._cross_entropy import CrossEntropyFunction
from mmops._ops import plain_autograd


def _dead_wrapper(shape):
    """A tensor left over from a finished torch.func.grad: a functorch wrapper whose level is gone."""
    escaped = []

    def f(x):
        escaped.append(x)
        return (x * x).sum()

    torch.func.grad(f)(torch.randn(*shape))
    assert torch._C._functorch.is_functorch_wrapped_tensor(escaped[0])
    return escaped[0]


def test_plain_autograd_is_false_under_a_transform():
    assert plain_autograd()
    seen = []
    torch.func.grad(lambda x: (seen.append(plain_autograd()), x.sum())[1])(torch.randn(3))
    assert seen == [False]


@pytest.mark.parametrize("via", ["drop-in", "Function.apply"])
def test_cross_entropy_graph_node_and_gradient(via):
    x = torch.randn(32, 27, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 27, (32,))
    loss = (mmops.cross_entropy(x, y) if via == "drop-in"
            else CrossEntropyFunction.apply(x, y, None, 1, -100, 0.0, False))
    assert type(loss.grad_fn).__name__ == "CrossEntropyFunctionBackward"
    go = torch.tensor(0.37, dtype=torch.float64)
    loss.backward(go)
    xr = x.detach().clone().requires_grad_()
    F.cross_entropy(xr, y).backward(go)
    torch.testing.assert_close(x.grad, xr.grad)


def test_batch_norm_graph_node_and_gradients():
    x = torch.randn(32, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    out = mmops.batch_norm(x, rm, rv, w, b, True, activation="tanh")
    assert type(out.grad_fn).__name__ == "BatchNormFunctionBackward"
    go = torch.randn_like(out)
    out.backward(go)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    torch.tanh(F.batch_norm(leaves[0], rm2, rv2, leaves[1], leaves[2], True)).backward(go)
    for mine, ref in zip((x, w, b), leaves):
        torch.testing.assert_close(mine.grad, ref.grad)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_functorch_transform_takes_the_public_path():
    # Function.apply's own answer under a transform (these Functions define no setup_context): the same error
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: mmops.cross_entropy(x, y))(x)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: mmops.batch_norm(x, None, None, training=True).sum())(x)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: BatchNormFunction.apply(x, None, None, None, None, True, 0.1, 1e-5, False, 0).sum())(x)


def test_dead_functorch_wrappers_are_unwrapped_as_function_apply_does():
    # Function.apply unwraps them (the leftover tensor does not require grad): so must the direct call, or the
    # result would carry a graph node that PyTorch's own op does not give it.
    x, y = _dead_wrapper((4, 5)), torch.randint(0, 5, (4,))
    loss = mmops.cross_entropy(x, y)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x, y))
    out = mmops.batch_norm(x, None, None, training=True)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True))


# ---- the ops' eager entry points (mmops._C.<op>, csrc/python_calls.cpp) ------------------------------------------
def _eager_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, t = r(6, 5), torch.tensor([0, 4, -100, 2, 2, 1])
    yield "cross_entropy_forward", (x, t, None, 1, -100, 0.0, True)
    yield "cross_entropy_forward", (x, torch.tensor([0, 4, 3, 2, 2, 1]), torch.rand(5, generator=g), 0, 2, 0.1, False)
    yield "cross_entropy_backward", (r(6, 5), torch.tensor(0.5))
    xb, w, b = r(8, 5) * 3 + 1, r(5), r(5)
    yield "batch_norm_forward", (xb, w, b, torch.zeros(5), torch.ones(5), True, 0.3, 1e-3, True, 1)
    yield "batch_norm_forward", (r(4, 5, 3), None, b, None, None, True, 0.1, 1e-5, False, 2)
    yield "batch_norm_forward", (xb, w, None, r(5), torch.rand(5, generator=g) + 1, False, 0.1, 1e-5, False, 0)
    h, mean, invstd = torch.ops.mmops.batch_norm_forward(xb, w, b, None, None, True, 0.1, 1e-5, False, 1)
    yield "batch_norm_backward", (r(8, 5), h, xb, w, mean, invstd, True, True, 1, [True, False, True])
    yield "batch_norm_backward", (r(8, 5), h, xb, None, mean, invstd, False, False, 1, [True, True, True])
    # nn.Parameter (the modules' weights) takes the entry point too: its __torch_function__ is disabled
    P = torch.nn.Parameter
    yield "batch_norm_forward", (xb, P(w), P(b), torch.zeros(5), torch.ones(5), True, 0.1, 1e-5, False, 1)
    V, block, E, H = 7, 3, 4, 6
    X, Y = torch.randint(0, V, (5, block), generator=g), torch.randint(0, V, (5,), generator=g)
    params = [P(r(V, E)), P(r(H, block * E)), P(r(H)), P(r(H)), P(r(V, H)), P(r(V))]
    yield "mlp_train_step", (X, Y, *params, torch.zeros(H), torch.ones(H), 0.1, 1e-5, False, 0.01)


def _clone(args):
    return [(torch.nn.Parameter(a.detach().clone()) if isinstance(a, torch.nn.Parameter) else a.clone())
            if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("name,args", list(_eager_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_eager_entry_point_is_the_op(name, args):
    # the same op with the same arguments: the same outputs and the same in-place updates (running statistics),
    # bit for bit; and the outputs are freed with their last reference (no reference leaked by the C wrapper)
    import weakref
    eager, op = getattr(mmops._C, name), getattr(torch.ops.mmops, name).default
    a, b = _clone(args), _clone(args)
    with torch.no_grad():
        got, want = eager(*a), op(*b)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want) and all(torch.equal(u, v) for u, v in zip(got, want))
    assert all(torch.equal(u, v) for u, v in zip(a, b) if isinstance(u, torch.Tensor))
    refs = [weakref.ref(t) for t in got]
    del got
    assert all(ref() is None for ref in refs)


def test_eager_entry_point_declines_what_is_not_plain_eager():
    # NotImplemented (the caller then takes torch.ops) with grad mode on, a tensor subclass, an argument of another
    # Python type, under a functorch transform or a dispatch mode, and under autocast
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    f = mmops._C.cross_entropy_forward
    assert f(x, t, None, 1, -100, 0.0, True) is NotImplemented  # grad mode is on here

    class Sub(torch.Tensor):
        pass

    with torch.no_grad():
        assert f(x, t, None, 1, -100, 0.0, True) is not NotImplemented
        assert f(x.as_subclass(Sub), t, None, 1, -100, 0.0, True) is NotImplemented
        assert f(x, t, None, 1, -100, 0, True) is NotImplemented  # an int where the schema has a float
        assert f(x, t, None, 1, 2**70, 0.0, True) is NotImplemented  # beyond int64: torch.ops says what is wrong
        with torch.autocast("cpu"):
            assert f(x, t, None, 1, -100, 0.0, True) is NotImplemented
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            assert f(torch.empty(4, 3), torch.zeros(4, dtype=torch.long), None, 1, -100, 0.0, True) is NotImplemented
        with torch.overrides.TorchFunctionMode():
            assert f(x, t, None, 1, -100, 0.0, True) is NotImplemented
    seen = []
    torch.func.grad(lambda y: (seen.append(f(y.detach(), t, None, 1, -100, 0.0, True)), y.sum())[1])(x)
    assert seen == [NotImplemented]
    with pytest.raises(TypeError, match="takes 7 arguments"):
        f(x, t)


def test_eager_entry_point_raises_what_the_op_raises():
    x, bad = torch.randn(4, 3), torch.tensor([0, 1, 3, 0])  # class 3 of 3
    with torch.no_grad():
        with pytest.raises(Exception) as via_ops:
            torch.ops.mmops.cross_entropy_forward(x, bad, None, 1, -100, 0.0, True)
        with pytest.raises(Exception) as via_eager:
            mmops._C.cross_entropy_forward(x, bad, None, 1, -100, 0.0, True)
    assert type(via_eager.value) is type(via_ops.value) and str(via_eager.value) == str(via_ops.value)
