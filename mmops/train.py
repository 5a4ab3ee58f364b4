"""`python -m mmops train`: the makemore runs on fused ops, with the notebooks' diagnostics.

Defaults reproduce the BatchNorm notebook: the MLP, 200,000 steps of batch 32, lr 0.1 then 0.01 from the
halfway step. The MLP's step is its hand-written backward on the fused kernels (models.MLP.train_step); the
deep MLP and the RNN use autograd through the fused ops, SGD(foreach=True), the RNN with gradient clipping.
No step syncs with the host except every --log-every steps (the progress bar's loss).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from . import data as D
from . import models as M

DEFAULT_LR = {"mlp": 0.1, "deep": 0.1, "rnn": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmops train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(M.MODELS), default="mlp")
    p.add_argument("--data", metavar="FILE", help="corpus, one word per line (default: the embedded census names)")
    p.add_argument("--steps", type=int, default=200_000, help="total optimisation steps (default 200000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 0.1; rnn 1.0); /10 from --decay-at")
    p.add_argument("--decay-at", type=int, default=None, help="step from which lr is divided by 10 (default steps/2)")
    p.add_argument("--seed", type=int, default=2147483647, help="seed of the init and the minibatch generator")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--block-size", type=int, default=3, help="context length of the MLPs")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip of the RNN")
    p.add_argument("--log-every", type=int, default=1000, help="progress-bar loss update period (a host sync)")
    p.add_argument("--plots", metavar="DIR", help="write the diagnostics as PNG files in DIR")
    p.add_argument("--json", metavar="FILE", help="write the run's summary as JSON")
    p.add_argument("--save", metavar="FILE", help="write a checkpoint at the end (resumable with --load)")
    p.add_argument("--load", metavar="FILE", help="resume from a checkpoint (continues up to --steps)")
    p.add_argument("--samples", type=int, default=10, help="names sampled at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DDP + SyncBatchNorm; gloo on CPU, "
                   "nccl on GPU); the global batch is split across them")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error("--steps must be >= 0")
    for name in ("batch_size", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.nproc < 1 or args.batch_size % args.nproc:
        p.error(f"--nproc must be >= 1 and divide --batch-size ({args.batch_size}), got {args.nproc}")
    if args.nproc > 1 and args.model != "mlp":
        p.error("--nproc > 1 trains the mlp model only")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.model]
    if args.decay_at is None:
        args.decay_at = args.steps // 2
    return args


def _check_device(device: str) -> None:
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this torch has no CUDA device available")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mmops::cross_entropy_forward", "CUDA"):
        raise SystemExit("error: --device cuda: mmops was built without its CUDA kernels (build on a machine "
                         "whose torch has CUDA, with CUDA_HOME set)")


@torch.no_grad()
def split_loss(model, X, Y, chunk: int = 65536) -> float:
    """Mean loss over a whole split in eval mode (BatchNorm with its running statistics)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, X.shape[0], chunk):
            xb, yb = X[i : i + chunk], Y[i : i + chunk]
            n = int((yb != -100).sum())
            total += float(model(xb, yb)) * n
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


def _weights(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 2]


def _ddp_worker(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    import pickle
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    try:
        if args.device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        res = train(args, rank=rank, world=world)
        if rank == 0:
            with open(out_file, "wb") as f:
                pickle.dump(res, f)
    except BaseException:
        dist.destroy_process_group()
        raise
    end_spawned_worker(dist)


def end_spawned_worker(dist) -> None:
    """The success path's end of a spawned worker: wait for every rank (no rank tears its gloo connections down
    while another still runs), destroy the process group, and leave the process with os._exit(0). CI once saw a
    rank that had finished first abort in C++ (`terminate called without an active exception`, the message of a
    std::thread destroyed while joinable) after its work was done; torch's own reports of it come from teardown
    at interpreter exit, which os._exit skips. Everything a worker produces is written (and flushed) before."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_ddp(args) -> dict:
    """--nproc N: N processes (torch.multiprocessing spawn, file:// rendezvous), the MLP's BatchNorm converted to
    mmops.nn.SyncBatchNorm, DDP averaging the gradients; every rank draws the same global minibatch and trains on
    its slice, so the run follows the single-process run on the same global batches."""
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pkl")
        mp.spawn(_ddp_worker, args=(args.nproc, os.path.join(d, "rendezvous"), args, out), nprocs=args.nproc)
        with open(out, "rb") as f:
            return pickle.load(f)


def train(args, rank: int = 0, world: int = 1) -> dict:
    if world == 1 and args.nproc > 1:
        return train_ddp(args)
    _check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        words = D.load_words(args.data)
        splits = D.make_splits(words, args.block_size, sequences=args.model == "rnn")
    except D.CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    vocab = splits.vocab
    dev = torch.device(args.device)
    Xtr, Ytr = (t.to(dev) for t in splits.train)
    Xva, Yva = (t.to(dev) for t in splits.val)

    model = M.build_model(args.model, len(vocab), args.block_size, seed=args.seed).to(dev)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    start, lossi, ud = 0, [], []
    if args.load:
        ckpt = torch.load(args.load, map_location=dev, weights_only=False)
        if ckpt["model"] != args.model:
            raise SystemExit(f"error: checkpoint {args.load!r} holds a {ckpt['model']!r} model, not {args.model!r}")
        if ckpt["vocab"] != vocab.itos:
            raise SystemExit(f"error: checkpoint {args.load!r} was trained on another vocabulary "
                             f"({''.join(ckpt['vocab'])!r}); pass the same --data")
        model.load_state_dict(ckpt["state_dict"])
        g.set_state(ckpt["generator"].cpu())
        start, lossi, ud = ckpt["step"], list(ckpt["lossi"]), list(ckpt.get("ud", []))
    model.train()
    core = model  # what is saved, evaluated and sampled
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        from .nn import SyncBatchNorm

        if args.threads is None:
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        core = model = SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model)
    params = list(model.parameters())
    opt = None if (args.model == "mlp" and world == 1) else torch.optim.SGD(params, lr=args.lr, foreach=True)
    weights = _weights(model)
    ud_every = max(1, args.steps // 2000) if args.plots else 0

    n_steps = max(0, args.steps - start)
    losses = torch.empty(n_steps, device=dev)
    from tqdm import tqdm

    bar = tqdm(range(start, args.steps), initial=0, total=n_steps, disable=args.quiet or rank > 0, dynamic_ncols=True,
               desc=f"train {args.model}", mininterval=0.5, file=sys.stderr)
    t0 = time.perf_counter()
    for k, i in enumerate(bar):
        lr = args.lr if i < args.decay_at else args.lr / 10
        ix = torch.randint(0, Xtr.shape[0], (args.batch_size,), generator=g, device=dev)
        if world > 1:  # this rank's slice of the global batch
            b = args.batch_size // world
            ix = ix[rank * b : (rank + 1) * b]
        Xb, Yb = Xtr[ix], Ytr[ix]
        if opt is None:
            loss, grads = model.train_step(Xb, Yb, lr)
        else:
            loss = model(Xb, Yb)
            for p in params:
                p.grad = None
            loss.backward()
            if args.model == "rnn":
                torch.nn.utils.clip_grad_norm_(params, args.clip, foreach=True)
            opt.param_groups[0]["lr"] = lr
            opt.step()
            grads = [p.grad for p in params]
        losses[k] = loss.detach()
        if ud_every and i % ud_every == 0:  # update:data ratio, kept on the device (no sync)
            gmap = dict(zip([id(p) for p in params], grads))
            ud.append(torch.stack([(lr * gmap[id(p)].std() / p.data.std()).log10() for _, p in weights]).cpu())
        if (k + 1) % args.log_every == 0 and not args.quiet and rank == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", lr=lr, refresh=False)
    seconds = time.perf_counter() - t0
    bar.close()
    lossi = lossi + losses.cpu().tolist()
    model = core
    if rank > 0:
        return {}

    train_loss = split_loss(model, Xtr, Ytr)
    val_loss = split_loss(model, Xva, Yva)
    result = {"model": args.model, "steps": args.steps, "seconds": seconds,
              "steps_per_s": n_steps / seconds if seconds > 0 else float("nan"),
              "train_loss": train_loss, "val_loss": val_loss}
    print(f"train loss {train_loss:.4f}  val loss {val_loss:.4f}" +
          (f"  (val perplexity {math.exp(val_loss):.2f})" if args.model == "rnn" else "") +
          f"  |  {n_steps} steps in {seconds:.1f} s = {result['steps_per_s']:.0f} steps/s")
    if args.samples:
        names = M.sample(model.cpu(), vocab, args.samples, seed=args.seed + 10)
        model.to(dev)
        print("samples: " + " ".join(names))
        result["samples"] = names
    if args.save:
        torch.save({"model": args.model, "config": model.config, "state_dict": model.state_dict(), "step": args.steps,
                    "vocab": vocab.itos, "generator": g.get_state(), "lossi": lossi, "ud": ud}, args.save)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: result[k] for k in ("model", "steps", "seconds", "steps_per_s", "train_loss", "val_loss")},
                      f, indent=1)
    if args.plots:
        from .plots import write_plots

        paths = write_plots(args.plots, model, lossi, ud, [n for n, _ in weights], Xtr, Ytr, g)
        print("plots: " + " ".join(paths))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    train(args)
    return 0
