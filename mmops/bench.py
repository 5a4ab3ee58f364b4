"""`python -m mmops bench`: forward+backward timings, candidates interleaved in one process.

Each candidate is a closure that runs forward and backward once. Candidates of one size are timed in
rounds, each candidate once per round in a shuffled order (A C B, B A C, ...), so that drift in a noisy machine hits
all of them alike and no candidate always follows the same neighbour; the table
reports each one's median over rounds and its ratio to the PyTorch op (ratio > 1: faster than PyTorch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import mmops

from . import _C, reference
from ._ops import c_apply

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def results_dir() -> str:
    """Where this machine's tables go: bench/results/ for the AVX-512 path, bench/results/<path>/ for another (avx2,
    scalar), so that a run on one class of CPU never overwrites the tables of the other."""
    isa = isa_path()
    return RESULTS_DIR if isa == "avx512" else os.path.join(RESULTS_DIR, isa)


def _time_once(fn: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(cands: dict[str, Callable[[], None]], rounds: int, target_s: float = 0.02) -> dict[str, dict]:
    """Median seconds per call of each candidate over `rounds` interleaved rounds (in a shuffled order each round)."""
    for fn in cands.values():  # warm up (and compile, for torch.compile candidates)
        for _ in range(3):
            fn()
    inner = {}
    for name, fn in cands.items():  # calls per round: enough for ~target_s of work
        once = _time_once(fn, 1)
        inner[name] = max(1, int(target_s / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in cands}
    names = list(cands)
    order = random.Random(0)
    for r in range(rounds):
        # a fresh order each round (seeded): a candidate that always followed the same one (say, one that frees large
        # buffers) would carry that neighbour's after-effects in every sample. (Rotating the list is not enough: it
        # keeps every candidate's neighbour; --ftz-cost's "off" of one op always followed the previous op's "on".)
        order.shuffle(names)
        for name in names:
            samples[name].append(_time_once(cands[name], inner[name]))
    return {
        name: {"median_s": statistics.median(v), "min_s": min(v), "rounds": len(v), "calls_per_round": inner[name]}
        for name, v in samples.items()
    }


class _DoNothing(torch.autograd.Function):
    """The cheapest torch.autograd.Function: a clone forward and an identity backward. Its row in the tables is
    the cost of the Python Function mechanism that every mmops op is built on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


# Called the way mmops' drop-ins call their Functions (the C++ apply, mmops/_ops.py), so that the row measures the
# Function mechanism they pay, not the Python layer of Function.apply they skip.
_do_nothing = c_apply(_DoNothing)


def _ce_candidates(N: int, C: int, compile_: bool) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=g).requires_grad_()
    target = torch.randint(0, C, (N,), generator=g)
    # a grad_output other than 1, so that every candidate's backward does its work (mmops' backward is free
    # when grad_output is exactly 1)
    go = torch.tensor(0.37)

    def step(loss_fn):
        def run():
            logits.grad = None
            loss_fn(logits, target).backward(go)

        return run

    cands = {
        "reference chain": step(lambda x, y: reference.cross_entropy_chain(x, y)["loss"]),
        "F.cross_entropy": step(F.cross_entropy),
    }
    if compile_:
        compiled = torch.compile(F.cross_entropy, dynamic=False)
        cands["torch.compile(F.cross_entropy)"] = step(compiled)
    cands["mmops.cross_entropy"] = step(mmops.cross_entropy)
    # The fixed cost of one autograd forward+backward (a sum and its backward through the engine): no
    # autograd op can be faster than this, so at tiny sizes it bounds every candidate's speed-up.
    cands["floor: logits.sum().backward()"] = step(lambda x, y: x.sum())
    if N * C <= 1 << 16:  # where the fixed costs dominate: the Python Function mechanism alone
        cands["do-nothing autograd.Function + sum"] = step(lambda x, y: _do_nothing(x).sum())
    else:
        cands[COPY] = _copy_of(ce_min_bytes(N, C))
    return cands


# The bytes a minimal fused implementation must move, forward + backward: read the logits (and the targets),
# write the gradient.
def ce_min_bytes(N: int, C: int) -> int:
    return 4 * N * C * 2 + 8 * N


# Forward reads x and writes h; backward reads dh and x (or h) and writes dx.
def bn_min_bytes(N: int, C: int) -> int:
    return 4 * N * C * 5


COPY = "copy of the minimal traffic (memory limit)"


def _copy_of(nbytes: int) -> Callable[[], None]:
    """A memory copy that moves nbytes (half read, half written): the time the minimal traffic of an op takes at
    this machine's copy bandwidth, measured in the same interleaved run as the op."""
    src = torch.ones(max(1, nbytes // 8))
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


CE_SIZES = [(32, 27), (4096, 27), (32768, 27), (1024, 8192)]
BN_SIZES = [(32, 64), (32, 200), (4096, 200), (32768, 200)]


def _bn_candidates(N: int, C: int, compile_: bool) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).requires_grad_()
    gamma = torch.ones(C).requires_grad_()
    beta = torch.zeros(C).requires_grad_()
    rm, rv = torch.zeros(C), torch.ones(C)
    go = torch.randn(N, C, generator=g)
    params = (x, gamma, beta)

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            fn().backward(go)

        return run

    def torch_bn_tanh():
        return torch.tanh(F.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5))

    cands = {
        "reference chain": step(lambda: reference.batch_norm_chain(x, gamma, beta, bessel=False)["hpreact"]),
        "F.batch_norm": step(lambda: F.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5)),
        "F.batch_norm + torch.tanh": step(torch_bn_tanh),
    }
    if compile_:
        compiled = torch.compile(lambda x, g, b: torch.tanh(F.batch_norm(x, rm, rv, g, b, True, 0.1, 1e-5)))
        cands["torch.compile(F.batch_norm + tanh)"] = step(lambda: compiled(x, gamma, beta))
    cands["mmops.batch_norm"] = step(lambda: mmops.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5))
    cands["mmops.batch_norm(activation=tanh)"] = step(
        lambda: mmops.batch_norm(x, rm, rv, gamma, beta, True, 0.1, 1e-5, activation="tanh"))
    if N * C <= 1 << 16:
        cands["floor: x * 1 (one autograd op)"] = step(lambda: x * 1.0)
        cands["do-nothing autograd.Function"] = step(lambda: _do_nothing(x))
    else:
        cands[COPY] = _copy_of(bn_min_bytes(N, C))
    return cands


# Each mmops candidate is compared with the PyTorch composition that computes the same thing.
BN_BASELINE = {"mmops.batch_norm(activation=tanh)": "F.batch_norm + torch.tanh",
               "torch.compile(F.batch_norm + tanh)": "F.batch_norm + torch.tanh"}


def bench_bn(sizes, rounds: int, compile_: bool) -> list[dict]:
    rows = []
    for N, C in sizes:
        res = interleaved(_bn_candidates(N, C, compile_), rounds)
        for name, r in res.items():
            base = res[BN_BASELINE.get(name, "F.batch_norm")]["median_s"]
            rows.append({"op": "bn", "size": f"({N}, {C})", "candidate": name, **r,
                         "baseline": BN_BASELINE.get(name, "F.batch_norm"), "speedup_vs_torch": base / r["median_s"],
                         **({"gbs": bn_min_bytes(N, C) / r["median_s"] / 1e9} if COPY in res else {})})
    return rows


def bench_ce(sizes, rounds: int, compile_: bool) -> list[dict]:
    rows = []
    for N, C in sizes:
        res = interleaved(_ce_candidates(N, C, compile_), rounds)
        base = res["F.cross_entropy"]["median_s"]
        for name, r in res.items():
            rows.append({"op": "ce", "size": f"({N}, {C})", "candidate": name, **r, "speedup_vs_torch": base / r["median_s"],
                         **({"gbs": ce_min_bytes(N, C) / r["median_s"] / 1e9} if COPY in res else {})})
    return rows


RNN_SIZES = [(35, 32, 28, 256, False), (16, 32, 64, 64, False), (64, 128, 128, 512, False), (35, 32, 28, 256, True)]


def _rnn_candidates(T: int, B: int, I: int, H: int, tokens: bool) -> dict[str, Callable[[], None]]:
    """nn.RNN, a Python loop of nn.RNNCell and mmops.nn.RNN with the same weights, backpropagating a dense random
    gradient of the output.
    With tokens=True the input is (T, B) token ids: PyTorch gets one-hot floats (F.one_hot(...).float(),
    built inside the timed step, as the d2l chapter does), mmops the ids."""
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.RNN(I, H)
    cell = torch.nn.RNNCell(I, H)
    ours = mmops.nn.RNN(I, H)
    cell.load_state_dict({k[:-3]: v for k, v in ref.state_dict().items()})
    ours.load_state_dict(ref.state_dict())
    if tokens:
        tok = torch.randint(0, I, (T, B), generator=g)
        x_torch = lambda: F.one_hot(tok, I).float()  # noqa: E731
        x_ours = lambda: tok  # noqa: E731
    else:
        x = torch.randn(T, B, I, generator=g)
        x_torch = x_ours = lambda: x  # noqa: E731

    go = torch.randn(T, B, H, generator=g)  # a dense gradient (out.sum() would hand every candidate a stride-0 one)

    def step(module, fn):
        def run():
            for p in module.parameters():
                p.grad = None
            fn().backward(go)

        return run

    def cell_loop():
        xs, h, outs = x_torch(), torch.zeros(B, H), []
        for t in range(T):
            h = cell(xs[t], h)
            outs.append(h)
        return torch.stack(outs)

    name = "nn.RNN(one_hot floats)" if tokens else "nn.RNN"
    a, b = torch.randn(T * B, H, generator=g), torch.randn(H, max(H, I), generator=g)
    return {
        name: step(ref, lambda: ref(x_torch())[0]),
        "loop of nn.RNNCell": step(cell, cell_loop),
        "mmops.nn.RNN" + (" (token ids)" if tokens else ""): step(ours, lambda: ours(x_ours())[0]),
        # the machine's GEMM rate on a product as large as all the steps of one direction together
        f"sgemm ({T * B}, {H}) x ({H}, {max(H, I)}) (GEMM limit)": lambda: torch.mm(a, b),
    }


def rnn_flops(T: int, B: int, I: int, H: int, tokens: bool) -> float:
    """2 x the multiply-adds of one forward+backward: forward x W_ih^T and h W_hh^T; backward dpre W_hh, dW_hh,
    dW_ih and d_input. Token ids have no input products (a row gather forward, a scatter-add backward)."""
    return 2.0 * T * B * (3 * H * H + (0 if tokens else 3 * I * H))


def bench_rnn(sizes, rounds: int, compile_: bool) -> list[dict]:
    rows = []
    for T, B, I, H, tokens in sizes:
        res = interleaved(_rnn_candidates(T, B, I, H, tokens), rounds)
        base_name = next(iter(res))
        base = res[base_name]["median_s"]
        size = f"(T{T}, B{B}, {'vocab' if tokens else 'I'}{I}, H{H})"
        for name, r in res.items():
            flops = 2.0 * T * B * H * max(H, I) if name.startswith("sgemm") else rnn_flops(T, B, I, H, tokens)
            rows.append({"op": "rnn", "size": size, "candidate": name, **r, "baseline": base_name,
                         "speedup_vs_torch": base / r["median_s"], "gflops": flops / r["median_s"] / 1e9})
    return rows


def _train_candidates(steps_per_call: int) -> dict[str, Callable[[], None]]:
    """Training steps of the makemore MLP (batch 32, lr 0.1): a plain PyTorch loop (nn.Embedding, nn.Linear,
    nn.BatchNorm1d, nn.Tanh, F.cross_entropy, SGD(foreach=True)), the mmops model through autograd with the same
    optimiser, and `python -m mmops train`'s step (MLP.train_step: the hand-written backward on the fused
    kernels). Each call runs steps_per_call steps, minibatches drawn with torch.randint, no host sync."""
    from . import data as D
    from . import models as M

    words = D.load_words(None)  # the embedded corpus: what every install has
    splits = D.make_splits(words, 3)
    Xtr, Ytr = splits.train
    V = len(splits.vocab)
    g = torch.Generator().manual_seed(0)
    ours = M.MLP(V)
    plain = M.TorchMLP(V)
    plain.load_state_dict(ours.state_dict())
    auto = M.MLP(V)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, foreach=True)
    opt_auto = torch.optim.SGD(auto.parameters(), lr=0.1, foreach=True)

    def autograd_loop(model, opt):
        def run():
            for _ in range(steps_per_call):
                ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
                loss = model(Xtr[ix], Ytr[ix])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    def fused_loop():
        for _ in range(steps_per_call):
            ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
            ours.train_step(Xtr[ix], Ytr[ix], 0.1)

    return {"plain PyTorch loop": autograd_loop(plain, opt_plain), "mmops MLP + autograd": autograd_loop(auto, opt_auto),
            "mmops train step (python -m mmops train)": fused_loop}


def bench_train(sizes, rounds: int, compile_: bool) -> list[dict]:
    rows = []
    for steps in sizes:
        res = interleaved(_train_candidates(steps), rounds, target_s=0.0)
        base = res["plain PyTorch loop"]["median_s"]
        for name, r in res.items():
            rows.append({"op": "train", "size": f"MLP, batch 32 ({steps} steps a call)", "candidate": name, **r,
                         "steps_per_s": steps / r["median_s"], "speedup_vs_torch": base / r["median_s"]})
    for r in rows:
        print(f"{r['candidate']}: {r['steps_per_s']:.0f} steps/s")
    return rows


def _time_collectives(dist) -> list[float]:
    """Wraps this process's all_gather and all_reduce so that their time adds up in the returned one-element
    list (SyncBatchNorm's only collectives); the benchmark's own instrument, not the library's."""
    total = [0.0]

    def timed(fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                total[0] += time.perf_counter() - t0

        return run

    dist.all_gather, dist.all_reduce = timed(dist.all_gather), timed(dist.all_reduce)
    return total


def _syncbn_worker(rank, world, init_file, out_file, N, C, steps):
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    comm_s = _time_collectives(dist)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        bn = mmops.nn.SyncBatchNorm(C, activation="tanh")
        x = torch.randn(N // world, C, requires_grad=True)
        go = torch.randn(N // world, C)
        for _ in range(5):
            bn(x).backward(go)
        dist.barrier()
        comm_s[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            x.grad = None
            bn(x).backward(go)
        total = time.perf_counter() - t0
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"step_s": total / steps, "comm_s": comm_s[0] / steps}, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    from ._distributed import end_spawned_worker

    end_spawned_worker(dist)


SYNCBN_SIZES = [(2, 4096, 200), (4, 4096, 200), (2, 32768, 200), (4, 32768, 200)]


def bench_syncbn(sizes, rounds: int, compile_: bool) -> list[dict]:
    """Forward+backward of mmops.nn.SyncBatchNorm(activation=tanh) over a global batch (N, C) split across
    `world` gloo processes (1 thread each) on this machine; the share of the step spent in the collectives."""
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    for world, N, C in sizes:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            mp.spawn(_syncbn_worker, args=(world, os.path.join(d, "rdv"), out, N, C, 20 * rounds), nprocs=world)
            with open(out) as f:
                r = json.load(f)
        share = r["comm_s"] / r["step_s"]
        rows.append({"op": "syncbn", "size": f"({N}, {C}) on {world} processes", "candidate": "mmops.nn.SyncBatchNorm",
                     "median_s": r["step_s"], "comm_s": r["comm_s"], "comm_share": share, "speedup_vs_torch": float("nan"),
                     "world": world})
        print(f"world {world}, global batch ({N}, {C}): step {r['step_s'] * 1e6:.0f} us, in collectives "
              f"{r['comm_s'] * 1e6:.0f} us = {share * 100:.0f}% of the step")
    return rows


def bench_text(sizes, rounds: int, compile_: bool) -> list[dict]:
    """`train --text`'s training step (the d2l character RNN: forward, backward, gradient clipping at 1, SGD at
    lr 1, the state carried between minibatches) in tokens/s, on the same minibatches of the embedded text
    (--preprocess d2l: the book's 28-token vocabulary) for three implementations with the same parameters:
    the book's from-scratch loop (mmops.reference: one-hot inputs, a Python loop over time steps), nn.RNN +
    nn.Linear + F.cross_entropy on one-hot floats, and mmops' TextRNN (token ids, fused RNN, fused
    cross-entropy). sizes: (batch_size, num_steps, hidden_size)."""
    from . import data as D
    from . import models as M

    corpus = D.make_text_corpus(D.default_text(), "d2l")
    V = len(corpus.vocab)
    rows = []
    for B, T, H in sizes:
        X, Y = D.epoch_minibatches(corpus.stream, B, T, "sequential", torch.Generator().manual_seed(0))
        ours = M.TextRNN(V, H, "relu", seed=0)
        params = [p for p in ours.parameters() if p.requires_grad]
        book = reference.d2l_rnn_params(V, H)
        with torch.no_grad():  # one set of parameters for all three
            for name, t in zip(("W_xh", "W_hh", "b_h", "W_hq", "b_q"), params):
                book[name].copy_(t.T if t.dim() == 2 else t)
        rnn = torch.nn.RNN(V, H, nonlinearity="relu")
        head = torch.nn.Linear(H, V)
        rnn.load_state_dict(ours.rnn.state_dict())
        head.load_state_dict(ours.head.state_dict())
        torch_params = list(rnn.parameters()) + list(head.parameters())
        opt_ours = torch.optim.SGD(params, lr=1.0, foreach=True)
        opt_torch = torch.optim.SGD(torch_params, lr=1.0, foreach=True)

        def stepper(step):
            pos = {"k": 0, "state": None}

            def run():
                k = pos["k"]
                state = pos["state"].detach() if pos["state"] is not None else None
                pos["state"] = step(X[k], Y[k], state)
                pos["k"] = (k + 1) % X.shape[0]
                if pos["k"] == 0:
                    pos["state"] = None
            return run

        def scratch_step(x, y, state):
            loss, state = reference.d2l_rnn_loss(book, x, y, state)
            for t in book.values():
                t.grad = None
            loss.backward()
            reference.d2l_grad_clipping(list(book.values()), 1.0)
            with torch.no_grad():
                for t in book.values():
                    t -= 1.0 * t.grad
            return state

        def torch_step(x, y, state):
            out, state = rnn(F.one_hot(x, V).float(), state)
            loss = F.cross_entropy(head(out.reshape(-1, H)), y.reshape(-1))
            for t in torch_params:
                t.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(torch_params, 1.0, foreach=True)
            opt_torch.step()
            return state

        def ours_step(x, y, state):
            loss, state = ours.loss(x, y, state)
            for t in params:
                t.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt_ours.step()
            return state

        cands = {"d2l from scratch (one-hot, Python loop over steps)": stepper(scratch_step),
                 "nn.RNN + nn.Linear + F.cross_entropy (one-hot)": stepper(torch_step),
                 "mmops TextRNN (train --text)": stepper(ours_step)}
        res = interleaved(cands, rounds)
        names = list(res)
        scratch, plain = res[names[0]]["median_s"], res[names[1]]["median_s"]
        for name, r in res.items():
            rows.append({"op": "text", "size": f"batch {B} x {T} steps, hidden {H}, vocab {V}", "candidate": name,
                         **r, "tokens_per_s": B * T / r["median_s"], "speedup_vs_torch": plain / r["median_s"],
                         "speedup_vs_scratch": scratch / r["median_s"]})
    for r in rows:
        print(f"{r['candidate']}: {r['tokens_per_s']:,.0f} tokens/s ({r['speedup_vs_scratch']:.2f}x the from-scratch "
              f"loop, {r['speedup_vs_torch']:.2f}x nn.RNN)")
    return rows


BENCHMARKS = {"ce": (bench_ce, CE_SIZES), "bn": (bench_bn, BN_SIZES), "rnn": (bench_rnn, RNN_SIZES),
              "train": (bench_train, [500]), "syncbn": (bench_syncbn, SYNCBN_SIZES),
              "text": (bench_text, [(32, 35, 256)])}


def _cpuinfo(field: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:  # exact: "model" must not match "model name"
                    return value.strip()
    except OSError:
        pass
    return ""


def isa_path() -> str:
    """The SIMD path mmops' kernels take on this CPU (chosen at run time: csrc/cpu/simd.h)."""
    flags = set(_cpuinfo("flags").split())
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "scalar"


def _machine() -> dict:
    return {
        # the model name alone can be as vague as "AMD EPYC" in a VM: family and model tell the core (25/1: Zen 3)
        "cpu": (_cpuinfo("model name") or platform.processor() or platform.machine())
        + (f" (family {_cpuinfo('cpu family')}, model {_cpuinfo('model')})" if _cpuinfo("cpu family") else ""),
        "isa": isa_path(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # the last-level cache as the BatchNorm kernels see it (csrc/cpu/batch_norm.cpp): above it, from-memory loops
        "bn_from_memory_bytes": _C.bn_from_memory_bytes(),
    }


def machine_line() -> str:
    m = _machine()
    return (f"machine: {m['cpu']}, mmops ISA path {m['isa']}, {m['threads']} threads, torch {m['torch']}, "
            f"BatchNorm from memory above {m['bn_from_memory_bytes'] / 2**20:g} MiB")


def print_table(rows: list[dict]) -> str:
    """The table, under the machine line. GB/s: the bytes a minimal implementation must move over the time (the
    copy row is the machine's limit for them); GFLOP/s: the RNN's multiply-adds x 2 over the time (the sgemm row is
    the machine's GEMM rate)."""
    lines = [machine_line(), "", "| op | size | candidate | median | vs PyTorch op | GB/s or GFLOP/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["median_s"]
        ts = f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"
        last = f"{r['comm_share'] * 100:.0f}% in collectives" if "comm_share" in r else f"{r['speedup_vs_torch']:.2f}x"
        rate = f"{r['gbs']:.1f} GB/s" if "gbs" in r else f"{r['gflops']:.0f} GFLOP/s" if "gflops" in r else ""
        lines.append(f"| {r['op']} | {r['size']} | {r['candidate']} | {ts} | {last} | {rate} |")
    text = "\n".join(lines)
    print(text)
    return text


def write_results(name: str, rows: list[dict], table: str) -> None:
    out = results_dir()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"machine": _machine(), "rows": rows}, f, indent=1)
    # the generated table goes between the markers; hand-written sections around it are kept
    md = os.path.join(out, f"{name}.md")
    block = (f"<!-- bench table -->\n`python -m mmops bench --op {name}`: forward+backward, float32, dense random "
             f"grad_output, candidates interleaved (each round in a shuffled order), medians.\n\n{table}\n<!-- /bench table -->")
    old = open(md).read() if os.path.isfile(md) else ""
    start, end = old.find("<!-- bench table -->"), old.find("<!-- /bench table -->")
    text = old[:start] + block + old[end + len("<!-- /bench table -->"):] if 0 <= start < end else block + "\n"
    with open(md, "w") as f:
        f.write(text)
    try:
        _plot(name, rows)
    except ImportError:
        print("(matplotlib not installed: no PNG)")


def _plot(name: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.2 * len(sizes) + 2, 4))
    width = 0.8 / len(cands)
    for k, c in enumerate(cands):
        ys = [next((r["speedup_vs_torch"] for r in rows if r["size"] == s and r["candidate"] == c), 0) for s in sizes]
        ax.bar([i + k * width for i in range(len(sizes))], ys, width, label=c)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], sizes)
    ax.set_ylabel("speed-up vs the PyTorch op (median)")
    ax.set_title(f"{name}: forward+backward, {torch.get_num_threads()} threads, float32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir(), f"{name}.png"), dpi=100)
    plt.close(fig)


FTZ_CASES = {"ce": [(4096, 16), (4096, 27), (4096, 32), (1024, 8192)], "bn": [(32, 200), (4096, 200)],
             "rnn": [(35, 32, 28, 256, False), (16, 32, 64, 64, False)]}


def ftz_cost(ops: list[str], rounds: int) -> str:
    """Each case's time with flush-to-zero off (what users run) and on, 1 thread, interleaved. On Intel cores a
    subnormal result costs a microcode assist unless FTZ is set, even in a discarded SIMD lane: a kernel that
    creates subnormals on ordinary input shows a ratio well above 1 there."""
    torch.set_num_threads(1)  # the FTZ flag is per thread (MXCSR): OpenMP workers would not see it
    lines = [machine_line(), "", "| op | size | candidate | FTZ off | FTZ on | off / on |", "|---|---|---|---|---|---|"]
    makers = {"ce": lambda s: _ce_candidates(*s, False), "bn": lambda s: _bn_candidates(*s, False),
              "rnn": lambda s: _rnn_candidates(*s)}
    for op in ops:
        for size in FTZ_CASES[op]:
            cands = {k: v for k, v in makers[op](size).items() if not k.startswith(("copy", "sgemm", "reference",
                                                                                    "floor", "do-nothing", "loop"))}
            both = {}
            for name, fn in cands.items():
                for flag in (False, True):
                    both[(name, flag)] = (lambda fn=fn, flag=flag: (torch.set_flush_denormal(flag), fn()))
            res = interleaved({f"{n}|{f}": fn for (n, f), fn in both.items()}, rounds)
            torch.set_flush_denormal(False)
            for name in cands:
                off, on = res[f"{name}|False"]["median_s"], res[f"{name}|True"]["median_s"]
                lines.append(f"| {op} | {size} | {name} | {off * 1e6:.1f} us | {on * 1e6:.1f} us | {off / on:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmops bench", description=__doc__)
    p.add_argument("--op", choices=[*BENCHMARKS, "all"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    p.add_argument("--quick", action="store_true", help="smallest sizes only, few rounds (a smoke test)")
    p.add_argument("--no-save", action="store_true",
                   help="print only; do not write bench/results/ (bench/results/<isa>/ on a CPU without AVX-512)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: each op on the GPU against PyTorch and torch.compile, in GB/s against the device's "
                   "measured copy bandwidth (default cpu)")
    p.add_argument("--ftz-cost", action="store_true", help="time each ce/bn/rnn case with flush-to-zero off and on "
                   "(1 thread) instead: a ratio above 1 means subnormal results cost time on this CPU")
    args = p.parse_args(argv)
    if args.device == "cuda":
        from . import _cuda

        try:
            _cuda.require()
        except RuntimeError as e:
            p.error(str(e))
        for r in _cuda.bench():
            print(" | ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items()))
        return 0
    if args.ftz_cost:
        ops = ["ce", "bn", "rnn"] if args.op == "all" else [args.op]
        if not set(ops) <= set(FTZ_CASES):
            p.error(f"--ftz-cost covers --op {', '.join(FTZ_CASES)} (or all)")
        text = ftz_cost(ops, 3 if args.quick else args.rounds)
        if not args.no_save and not args.quick:
            os.makedirs(results_dir(), exist_ok=True)
            with open(os.path.join(results_dir(), "ftz.md"), "w") as f:
                f.write(f"`python -m mmops bench --ftz-cost`: forward+backward, 1 thread, float32.\n\n{text}\n")
        return 0
    torch.set_num_threads(args.threads)
    if not args.no_compile:
        # no background compile workers competing with the timed candidates
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    rounds = 3 if args.quick else args.rounds
    for op, (bench, sizes) in BENCHMARKS.items():
        if args.op not in (op, "all"):
            continue
        rows = bench(sizes[:1] if args.quick else sizes, rounds, compile_=not args.no_compile and not args.quick)
        table = print_table(rows)
        if not args.no_save and not args.quick:
            write_results(op, rows, table)
    return 0
