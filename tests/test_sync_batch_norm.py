"""mmops.nn.SyncBatchNorm with 2 gloo processes on CPU against one BatchNorm over the concatenated batch."""
import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmops
import mmops.nn
from mmops._ops import ops
from mmops._distributed import end_spawned_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _init(rank, world, init_file, timeout_s=60):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def _equality_worker(rank, world, init_file, out_dir, sizes, bessel, activation, shape_tail):
    _init(rank, world, init_file)
    try:
        g = torch.Generator().manual_seed(0)
        C = 6
        xs = [torch.randn(n, C, *shape_tail, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]
        gos = [torch.randn(n, C, *shape_tail, generator=g, dtype=torch.float64) for n in sizes]
        bn = mmops.nn.SyncBatchNorm(C, momentum=0.3, bessel=bessel, activation=activation).double()
        with torch.no_grad():
            bn.weight.copy_(torch.randn(C, generator=g))
            bn.bias.copy_(torch.randn(C, generator=g))
        x = xs[rank].clone().requires_grad_()
        y = bn(x)
        y.backward(gos[rank])
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP does (up to its 1/world)
        torch.save({"y": y.detach(), "dx": x.grad, "dw": grads[:C], "db": grads[C:], "rm": bn.running_mean,
                    "rv": bn.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    end_spawned_worker(dist)  # barrier, destroy, os._exit(0): see mmops/_distributed.py


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        mp.spawn(fn, args=(world, init_file, d, *args), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("sizes", [(8, 8), (5, 11), (1, 6)])
@pytest.mark.parametrize("bessel", [False, True])
@pytest.mark.parametrize("activation", [None, "tanh"])
def test_matches_one_batchnorm_over_the_concatenated_batch(sizes, bessel, activation):
    res = _spawn(_equality_worker, 2, sizes, bessel, activation, ())
    g = torch.Generator().manual_seed(0)
    C = 6
    xs = [torch.randn(n, C, generator=g, dtype=torch.float64) * 2 + 1 for n in sizes]
    gos = [torch.randn(n, C, generator=g, dtype=torch.float64) for n in sizes]
    bn = mmops.nn.BatchNorm1d(C, momentum=0.3, bessel=bessel, activation=activation).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C, generator=g))
        bn.bias.copy_(torch.randn(C, generator=g))
    x = torch.cat(xs).requires_grad_()
    y = bn(x)
    y.backward(torch.cat(gos))
    t = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach(), **t)
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), x.grad, **t)
    for r in res:
        torch.testing.assert_close(r["dw"], bn.weight.grad, **t)
        torch.testing.assert_close(r["db"], bn.bias.grad, **t)
        torch.testing.assert_close(r["rm"], bn.running_mean, **t)
        torch.testing.assert_close(r["rv"], bn.running_var, **t)


def test_three_dim_input():
    res = _spawn(_equality_worker, 2, (3, 4), False, "relu", (5,))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 6, 5, generator=g, dtype=torch.float64) * 2 + 1 for n in (3, 4)]
    gos = [torch.randn(n, 6, 5, generator=g, dtype=torch.float64) for n in (3, 4)]
    bn = mmops.nn.BatchNorm1d(6, momentum=0.3, activation="relu").double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(6, generator=g))
        bn.bias.copy_(torch.randn(6, generator=g))
    x = torch.cat(xs).requires_grad_()
    bn(x).backward(torch.cat(gos))
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), x.grad, rtol=1e-9, atol=1e-9)


def _dead_rank_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file, timeout_s=20)
    bn = mmops.nn.SyncBatchNorm(4)
    x = torch.randn(8, 4, requires_grad=True)
    bn(x).sum().backward()  # one good step
    if rank == 1:
        os._exit(3)  # dies mid-training, without a word
    t0 = time.time()
    try:
        bn(x).sum().backward()
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    torch.save({"msg": msg, "seconds": time.time() - t0}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_dead_rank_is_a_clear_error_not_a_hang():
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_dead_rank_worker, args=(2, os.path.join(d, "rdv"), d), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(d, "rank0.pt")) and time.time() < deadline:
            time.sleep(0.2)
        for p in ctx.processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        assert os.path.exists(os.path.join(d, "rank0.pt")), "rank 0 hung instead of failing"
        r = torch.load(os.path.join(d, "rank0.pt"))
    assert "mmops.nn.SyncBatchNorm" in r["msg"] and "failed" in r["msg"], r["msg"]
    assert r["seconds"] < 60


def test_single_process_is_batchnorm1d_and_convert_keeps_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5),
                              mmops.nn.BatchNorm1d(5, bessel=True, activation="tanh"))
    net(torch.randn(16, 3))  # some running stats
    conv = mmops.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(conv[1], mmops.nn.SyncBatchNorm) and isinstance(conv[2], mmops.nn.SyncBatchNorm)
    assert conv[2].bessel and conv[2].activation == "tanh"
    for k, v in net.state_dict().items():
        assert torch.equal(conv.state_dict()[k], v), k
    x = torch.randn(10, 3)
    ref = mmops.nn.BatchNorm1d(5, bessel=True, activation="tanh")
    ref.load_state_dict(net[2].state_dict())
    h = net[1](net[0](x)).detach()
    torch.testing.assert_close(conv[2](h), ref(h))  # no process group: exactly BatchNorm1d
    conv.eval(), ref.eval()
    torch.testing.assert_close(conv[2](h), ref(h))


def test_stats_ops_opcheck():
    x = torch.randn(7, 4, dtype=torch.float64)
    torch.library.opcheck(ops.batch_norm_stats.default, (x,), test_utils=("test_schema", "test_faketensor"))
    mean, m2 = ops.batch_norm_stats(x)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2, ((x - x.mean(0)) ** 2).sum(0))
