"""The registered ops (torch.ops.mmops.*): internal building blocks of the torch.autograd.Function classes.
Every op passes torch.library.opcheck with the checks that apply to an op without its own autograd formula
(schema, autograd registration, fake kernel, AOT dispatch, on inputs that do not require grad), and a direct
call on an input that requires grad raises instead of returning a result whose backward leaves .grad None."""
import pytest
import torch

import mmops  # noqa: F401  (registers the ops)
from mmops._ops import ACTIVATIONS, ops

TANH, RELU = ACTIVATIONS["tanh"], ACTIVATIONS["relu"]


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, t, w = r(6, 5), torch.tensor([0, 4, -100, 2, 2, 1]), torch.rand(5, generator=g)
    yield "cross_entropy_forward", (x, t, None, 1, -100, 0.0, True)
    yield "cross_entropy_forward", (x, t, w, 0, -100, 0.1, True)
    yield "cross_entropy_forward", (x, torch.softmax(r(6, 5), 1), w, 2, -100, 0.0, False)
    yield "cross_entropy_forward_inplace", (r(6, 5), t, w, 1, -100, 0.0)
    yield "cross_entropy_backward", (r(6, 5), torch.tensor(2.0))
    yield "cross_entropy_backward", (r(6, 5), torch.rand(6, generator=g))
    yield "cross_entropy_scale_grad_", (r(6, 5), torch.rand(6, generator=g))
    xb, wb, bb = r(8, 5), torch.rand(5, generator=g), torch.rand(5, generator=g)
    for training, act in [(True, 0), (True, TANH), (False, RELU)]:
        yield "batch_norm_forward", (xb, wb, bb, torch.zeros(5), torch.ones(5), training, 0.1, 1e-5, False, act)
    yield "batch_norm_forward", (r(4, 5, 3), None, None, None, None, True, 0.1, 1e-5, True, 0)
    h, mean, invstd = ops.batch_norm_forward(xb, wb, bb, None, None, True, 0.1, 1e-5, False, TANH)
    yield "batch_norm_backward", (r(8, 5), h, xb, wb, mean, invstd, True, False, TANH, [True, True, True])
    yield "batch_norm_backward", (r(8, 5), h, xb, None, mean, invstd, False, False, TANH, [True, False, True])
    yield "batch_norm_stats", (xb,)
    yield "batch_norm_backward_reduce", (r(8, 5), h, xb, mean, TANH)
    sdy, sdyx = ops.batch_norm_backward_reduce(r(8, 5), h, xb, mean, TANH)
    yield "batch_norm_backward_elemt", (r(8, 5), h, xb, wb, mean, invstd, sdy, sdyx, 8, False, TANH)
    T, B, I, H = 3, 2, 4, 5
    xs, h0 = r(T, B, I), r(B, H)
    w_ih, w_hh, b = r(H, I), r(H, H), r(H)
    tok = torch.randint(0, I, (T, B), generator=g)
    yield "rnn_forward", (xs, h0, w_ih, w_hh, b, b, TANH)
    yield "rnn_forward", (tok, h0, w_ih, w_hh, None, b, RELU)
    out = ops.rnn_forward(xs, h0, w_ih, w_hh, b, b, TANH)
    yield "rnn_backward", (r(T, B, H), out, xs, h0, w_ih, w_hh, TANH, [True] * 5)
    yield "rnn_backward", (r(T, B, H), out, tok, h0, w_ih, w_hh, TANH, [False, True, True, True, True])
    yield "rnn_cell_forward", (xs[0], h0, w_ih, w_hh, b, b, RELU)
    h1 = ops.rnn_cell_forward(xs[0], h0, w_ih, w_hh, b, b, TANH)
    yield "rnn_cell_backward", (r(B, H), h1, xs[0], h0, w_ih, w_hh, TANH, [True] * 5)
    V, block, E, Hm = 7, 3, 4, 6  # the MLP's step: vocabulary, context, embedding and hidden sizes
    X, Y = torch.randint(0, V, (5, block), generator=g), torch.randint(0, V, (5,), generator=g)
    params = [r(V, E), r(Hm, block * E), r(Hm), r(Hm), r(V, Hm), r(V)]
    for bessel in (False, True):
        yield "mlp_train_step", (X, Y, *[p.clone() for p in params], torch.zeros(Hm), torch.ones(Hm), 0.1, 1e-5,
                                 bessel, 0.01)


CASES = list(_cases())


def test_every_op_has_a_case():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmops::")}
    assert {name for name, _ in CASES} == registered


@pytest.mark.parametrize("name,args", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("name,args", [c for c in CASES if not c[0].endswith("_")],
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES) if not n.endswith("_")])
def test_direct_call_on_an_input_that_requires_grad_raises(name, args):
    first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    args = list(args)
    args[first] = args[first].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="internal building block of mmops and has no gradient of its own"):
        getattr(ops, name)(*args)
    with torch.no_grad():  # below autograd it is an ordinary kernel call
        getattr(ops, name)(*args)
