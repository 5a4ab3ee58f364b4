"""`python -m mmops train`: the makemore runs on fused ops, with the notebooks' diagnostics.

Defaults reproduce the BatchNorm notebook: the MLP, 200,000 steps of batch 32, lr 0.1 then 0.01 from the
halfway step. The MLP's step is its hand-written backward on the fused kernels (models.MLP.train_step); the
deep MLP and the RNN use autograd through the fused ops, SGD(foreach=True), the RNN with gradient clipping.
No step syncs with the host except every --log-every steps (the progress bar's loss).

Every argument, output path, checkpoint and corpus is checked before training starts: a mistake is one
line and exit code 2. A checkpoint carries the whole run configuration; `--load CK --steps N` continues the
same run up to the total N (the same losses as one run of N steps).

Distributed: `--nproc N` spawns N processes on this machine; under torchrun (RANK, WORLD_SIZE, ... set, one
or many nodes) every process joins torchrun's group. Both: DDP with SyncBatchNorm, the global batch split
across all ranks, one summary and one checkpoint from rank 0.

Text mode (`--model rnn --text [FILE]`): the Dive into Deep Learning character RNN on running text (FILE, or
the embedded Python documentation topics): one stream of characters, minibatches of --batch-size rows of
--num-steps characters (sequential partitioning with the hidden state carried and detached between
minibatches, or random sampling), relu by default, hidden 256, SGD lr 1, gradient-norm clip 1, no lr decay;
perplexity and tokens/s per epoch. `python -m mmops generate --load CKPT --prefix '...'` continues a prefix.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from . import _distributed as dist_util
from . import data as D
from . import models as M

DEFAULT_LR = {"mlp": 0.1, "deep": 0.1, "rnn": 1.0}

# The run configuration a checkpoint carries (argument name -> default when neither the command line nor a
# checkpoint gives it; None: derived in _resolve_defaults). On --load, a different value on the command line
# is an error for the keys that shape the data or the model, and a printed override for the schedule keys.
RUN_DEFAULTS = {"model": "mlp", "data": None, "block_size": 3, "batch_size": 32, "seed": 2147483647, "lr": None,
                "decay_at": None, "clip": 1.0, "text": None, "preprocess": None, "sampling": None,
                "nonlinearity": None, "num_steps": None, "hidden_size": None}
SCHEDULE_KEYS = ("lr", "decay_at", "clip")
# text mode only (an error on a word-list run), and their defaults: the book's hyperparameters
TEXT_DEFAULTS = {"preprocess": "none", "sampling": "sequential", "nonlinearity": "relu", "num_steps": 35,
                 "hidden_size": 256}
DEFAULT_TEXT_EPOCHS = 20
EMBEDDED_TEXT = "<embedded>"  # --text without FILE: data.default_text()
TEXT_SAMPLE_CHARS = 80  # the continuation printed at the end of a text run


class CheckpointError(ValueError):
    """A --load file that cannot be resumed from."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmops train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", choices=sorted(M.MODELS), default=None,
      help="mlp: the BatchNorm notebook's MLP; deep: 5 x (Linear, BatchNorm, Tanh); rnn: character RNN "
           "(default: mlp, or the checkpoint's)")
    a("--data", metavar="FILE", help="corpus, one word per line (default: the embedded 1990 US-census first names)")
    a("--steps", type=int, default=None, help="total optimisation steps (minibatches); with --load, the total to "
      f"reach (default: 200000; text mode: {DEFAULT_TEXT_EPOCHS} epochs)")
    a("--batch-size", type=int, default=None, help="global minibatch size (default: 32)")
    a("--lr", type=float, default=None, help="learning rate, divided by 10 from --decay-at (default: 0.1; "
      "rnn 1.0)")
    a("--decay-at", type=int, default=None, help="step from which lr is divided by 10 (default: half of --steps "
      "of the first run, text mode: never; a checkpoint keeps it)")
    a("--seed", type=int, default=None, help="seed of the init, the minibatch generator and the samples "
      "(default: 2147483647)")
    a("--block-size", type=int, default=None, help="context length of the MLPs (default: 3)")
    a("--clip", type=float, default=None, help="gradient-norm clip of the RNN (default: 1.0)")
    a("--device", choices=["cpu", "cuda"], default="cpu", help="cuda needs a build of mmops with its CUDA kernels "
      "(default: cpu)")
    a("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; with N processes on "
      "one machine, torch's divided by N)")
    a("--log-every", type=int, default=1000, help="steps between progress-bar loss updates, each a host sync "
      "(default: 1000)")
    a("--plots", metavar="DIR", help="write the diagnostics as PNG files in DIR (created if missing)")
    a("--json", metavar="FILE", help="write the run's summary as JSON")
    a("--save", metavar="FILE", help="write a checkpoint at the end (resumable with --load)")
    a("--load", metavar="FILE", help="resume from a checkpoint: its model, data, schedule and seed, continued "
      "up to --steps")
    a("--samples", type=int, default=10, help="names sampled at the end; text mode: 0 turns the greedy "
      f"{TEXT_SAMPLE_CHARS}-character continuation off (default: 10)")
    a("--quiet", action="store_true", help="no progress bar")
    t = p.add_argument_group("text mode (the d2l character RNN on running text; needs --model rnn or no --model)")
    t.add_argument("--text", nargs="?", const=EMBEDDED_TEXT, metavar="FILE",
                   help="train on running text: any UTF-8 FILE as one character stream (no FILE: the embedded "
                        "Python documentation topics of the standard library's pydoc_data)")
    t.add_argument("--preprocess", choices=["none", "d2l"], default=None,
                   help="none: the characters as they are; d2l: the book's (non-letters -> space, lower case: "
                        "26 letters, space, <unk>) (default: none)")
    t.add_argument("--sampling", choices=["sequential", "random"], default=None,
                   help="sequential partitioning with the state carried between minibatches, or random sampling "
                        "with a fresh zero state per minibatch (default: sequential)")
    t.add_argument("--nonlinearity", choices=["relu", "tanh"], default=None, help="the RNN's activation "
                   "(default: relu, as the book)")
    t.add_argument("--num-steps", type=int, default=None, help="characters per row of a minibatch (default: 35)")
    t.add_argument("--hidden-size", type=int, default=None, help="hidden units of the RNN (default: 256)")
    t.add_argument("--epochs", type=int, default=None, help=f"passes over the text, instead of --steps (default: "
                   f"{DEFAULT_TEXT_EPOCHS})")
    a("--nproc", type=int, default=1, help="data-parallel processes on this machine (DDP + SyncBatchNorm; gloo "
      "on CPU, nccl on GPU); the global batch is split across them. Under torchrun, leave it out: torchrun's "
      "processes form the group (default: 1)")
    return p


def _check_device(p: argparse.ArgumentParser, device: str) -> None:
    if device != "cuda":
        return
    if not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device available")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mmops::cross_entropy_forward", "CUDA"):
        p.error("--device cuda: mmops was built without its CUDA kernels (build on a machine whose torch has "
                "CUDA, with CUDA_HOME set)")


def _prepare_output(p: argparse.ArgumentParser, flag: str, path: str | None, *, is_dir: bool = False) -> None:
    """Creates the directory an output goes to and checks it is writable, before any training."""
    if path is None:
        return
    target = path if is_dir else (os.path.dirname(os.path.abspath(path)))
    if not is_dir and os.path.isdir(path):
        p.error(f"{flag} {path!r} is a directory; give a file name")
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        p.error(f"{flag} {path!r}: cannot create the directory {target!r} ({e.strerror})")
    if not os.path.isdir(target):
        p.error(f"{flag} {path!r}: {target!r} is not a directory")
    if not os.access(target, os.W_OK):
        p.error(f"{flag} {path!r}: the directory {target!r} is not writable")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by `train --save`; CheckpointError (one line) for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist (or is not a file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path!r} is not a checkpoint written by `train --save` ({first})") from None
    need = ("model", "config", "state_dict", "step", "vocab", "lossi", "run")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise CheckpointError(f"{path!r} is not a checkpoint written by `train --save` of this mmops version "
                              f"(it lacks {[k for k in need if not isinstance(ckpt, dict) or k not in ckpt]})")
    return ckpt


def _apply_checkpoint(p: argparse.ArgumentParser, args: argparse.Namespace, ckpt: dict) -> None:
    run = ckpt["run"]
    for key, stored in run.items():
        given = getattr(args, key, None)
        flag = "--" + key.replace("_", "-")
        if given is None:
            setattr(args, key, stored)
        elif given != stored:
            if key in SCHEDULE_KEYS:
                print(f"note: {flag} {given} overrides the checkpoint's {stored}: the run no longer follows "
                      "one uninterrupted schedule", file=sys.stderr)
            else:
                p.error(f"{flag} {given!r} disagrees with the checkpoint {args.load!r} ({stored!r}); leave it out "
                        "to continue the checkpoint's run")


def _resolve_defaults(p: argparse.ArgumentParser, args: argparse.Namespace, given_text_flags: list[str]) -> None:
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key) is None and default is not None:
            setattr(args, key, default)
    if args.text is not None:
        if args.model != "rnn":
            p.error(f"--text trains the rnn model, not {args.model!r}")
        for key, default in TEXT_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
    elif given_text_flags:
        p.error(f"{given_text_flags[0]} applies to text mode only (--model rnn --text [FILE])")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.model]


def _prepare_text(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reads and encodes the text, and turns --epochs (or its default) into --steps."""
    path = None if args.text == EMBEDDED_TEXT else args.text
    try:
        corpus = D.make_text_corpus(D.load_text(path), args.preprocess)
    except D.CorpusError as e:
        p.error(f"--text: {e}")
    n, B, T = corpus.stream.numel(), args.batch_size, args.num_steps
    need = D.min_stream_length(B, T)
    if n < need:
        p.error(f"--text: {path or 'the embedded text'!r} has {n} characters" +
                (" after --preprocess d2l" if args.preprocess == "d2l" else "") +
                f"; one minibatch of --batch-size {B} x --num-steps {T} needs at least {need}")
    args.corpus = corpus
    args.batches_per_epoch = D.batches_per_epoch(n, B, T)
    if args.epochs is not None:
        if args.steps is not None:
            p.error("--epochs and --steps both give the length of the run; pass one")
        args.steps = args.epochs * args.batches_per_epoch
    elif args.steps is None:
        args.steps = DEFAULT_TEXT_EPOCHS * args.batches_per_epoch


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed and checked command line: every error here is argparse's (usage, one line, exit code 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    for name, low in (("steps", 0), ("batch_size", 1), ("block_size", 1), ("log_every", 1), ("threads", 1),
                      ("samples", 0), ("decay_at", 0), ("num_steps", 1), ("hidden_size", 1), ("epochs", 0)):
        v = getattr(args, name)
        if v is not None and v < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    for name in ("lr", "clip"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            p.error(f"--{name} must be a positive number, got {v}")
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    if args.text is not None and args.text != EMBEDDED_TEXT:
        args.text = os.path.abspath(args.text)
    if args.text is not None and args.data is not None:
        p.error("--data is the word list of the word models; text mode reads --text FILE")
    if args.text is not None and args.model is None:
        args.model = "rnn"
    given_text_flags = ["--" + k.replace("_", "-") for k in (*TEXT_DEFAULTS, "epochs") if getattr(args, k) is not None]
    try:
        env = dist_util.torchrun_env()
    except ValueError as e:
        p.error(str(e))
    if env is not None and args.nproc != 1:
        p.error(f"--nproc {args.nproc} cannot be combined with torchrun (RANK={env.rank}, WORLD_SIZE="
                f"{env.world_size}): torchrun's processes form the group; leave --nproc out")
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    args.torchrun = env
    _check_device(p, args.device)

    args.checkpoint = None
    if args.load is not None:
        try:
            args.checkpoint = load_checkpoint(args.load)
        except CheckpointError as e:
            p.error(f"--load {e}")
        _apply_checkpoint(p, args, args.checkpoint)
    _resolve_defaults(p, args, given_text_flags)
    if args.text is not None:
        _prepare_text(p, args)
    elif args.steps is None:
        args.steps = 200_000
    if args.decay_at is None and args.text is None:
        args.decay_at = args.steps // 2
    if args.checkpoint is not None and args.steps <= args.checkpoint["step"]:
        p.error(f"--steps {args.steps}: the checkpoint {args.load!r} is already at step {args.checkpoint['step']}; "
                "pass the larger total to reach")

    world = env.world_size if env is not None else args.nproc
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    if world > 1 and args.model != "mlp":
        p.error(f"{world} processes train the mlp model only, not {args.model!r}")

    _prepare_output(p, "--save", args.save)
    _prepare_output(p, "--json", args.json)
    _prepare_output(p, "--plots", args.plots, is_dir=True)

    if args.text is None:
        try:
            words = D.load_words(args.data)
            args.splits = D.make_splits(words, args.block_size, sequences=args.model == "rnn")
        except D.CorpusError as e:
            p.error(f"--data: {e}" if args.data else str(e))
        vocab = args.splits.vocab
    else:
        vocab = args.corpus.vocab
    if args.checkpoint is not None and args.checkpoint["vocab"] != vocab.itos:
        p.error(f"--load {args.load!r} was trained on another vocabulary ({''.join(args.checkpoint['vocab'])!r}) "
                f"than {args.text or args.data or 'the embedded corpus'!r}")
    return args


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
    if count == 0:
        raise ValueError("split_loss: the split has no targets")
    return total / count


def _weights(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 2]


def _run_config(args) -> dict:
    return {k: getattr(args, k) for k in RUN_DEFAULTS}


def _leave_group(world: int) -> None:
    """The end of the collective part of a run: every rank has finished its steps. After this no rank waits
    for another: rank 0's evaluation, samples, checkpoint and plots run on a local copy of the model."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def train(args, rank: int = 0, world: int = 1) -> dict:
    if args.text is not None:
        return train_text(args)
    if world == 1 and args.nproc > 1:
        return dist_util.spawn(train, (args,), args.nproc, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if args.torchrun is not None else world
        torch.set_num_threads(max(1, torch.get_num_threads() // local))
    splits = args.splits
    vocab = splits.vocab
    dev = torch.device(args.device)
    Xtr, Ytr = (t.to(dev) for t in splits.train)
    Xva, Yva = (t.to(dev) for t in splits.val)

    model = M.build_model(args.model, len(vocab), args.block_size, seed=args.seed).to(dev)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    start, lossi, ud, ud_steps = 0, [], [], []
    ckpt = args.checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        g.set_state(ckpt["generator"].cpu())
        start, lossi = ckpt["step"], list(ckpt["lossi"])
        ud, ud_steps = list(ckpt.get("ud", [])), list(ckpt.get("ud_steps", []))
    model.train()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        from .nn import SyncBatchNorm

        model = DistributedDataParallel(SyncBatchNorm.convert_sync_batchnorm(model))
    params = list(model.parameters())
    opt = None if (args.model == "mlp" and world == 1) else torch.optim.SGD(params, lr=args.lr, foreach=True)
    weights = [(n.removeprefix("module."), p) for n, p in _weights(model)]  # DDP's prefix
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
            ud_steps.append(i)
        if (k + 1) % args.log_every == 0 and not args.quiet and rank == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}", lr=lr, refresh=False)
    seconds = time.perf_counter() - t0
    bar.close()
    lossi = lossi + losses.cpu().tolist()
    if world > 1:
        core = model.module
        model = M.build_model(args.model, len(vocab), args.block_size, seed=args.seed).to(dev)
        model.load_state_dict(core.state_dict())
        model.train()
        _leave_group(world)
    if rank > 0:
        return {}
    return _finish(args, model, vocab, g, lossi, ud, ud_steps, weights, n_steps, seconds, (Xtr, Ytr), (Xva, Yva))


def _finish(args, model, vocab, g, lossi, ud, ud_steps, weights, n_steps, seconds, train_split, val_split) -> dict:
    """Rank 0's work after the steps: losses of the splits, samples, checkpoint, JSON, plots."""
    dev = torch.device(args.device)
    train_loss = split_loss(model, *train_split)
    val_loss = split_loss(model, *val_split)
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
                    "vocab": vocab.itos, "generator": g.get_state(), "lossi": lossi, "ud": ud, "ud_steps": ud_steps,
                    "run": _run_config(args)}, args.save)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: result[k] for k in ("model", "steps", "seconds", "steps_per_s", "train_loss", "val_loss")},
                      f, indent=1)
    if args.plots:
        from .plots import write_plots

        paths = write_plots(args.plots, model, lossi, ud, ud_steps, [n for n, _ in weights], *train_split, g)
        print("plots: " + " ".join(paths))
    return result


def _lr_at(args, step: int) -> float:
    return args.lr if args.decay_at is None or step < args.decay_at else args.lr / 10


def train_text(args) -> dict:
    """The d2l training loop on the fused RNN: per epoch, the minibatches of data.epoch_minibatches (drawn
    from a generator seeded with seed + epoch, so that a run resumes mid-epoch exactly); sequential: the state
    starts at zero each epoch and is carried, detached (no copy), from one minibatch to the next; random: zero
    state per minibatch. Loss: the mean cross-entropy over every predicted character; SGD; clip_grad_norm_.
    The only host syncs: one per epoch (perplexity) and every --log-every steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    corpus, B, T, K = args.corpus, args.batch_size, args.num_steps, args.batches_per_epoch
    vocab = corpus.vocab
    model = M.TextRNN(len(vocab), args.hidden_size, args.nonlinearity, seed=args.seed).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, foreach=True)
    start, lossi, state, epochs = 0, [], None, []
    ckpt = args.checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        start, lossi, epochs = ckpt["step"], list(ckpt["lossi"]), list(ckpt.get("epochs", []))
        state = ckpt.get("state")
        state = state.to(dev) if state is not None else None
    model.train()
    n_steps = max(0, args.steps - start)
    losses = torch.empty(n_steps, device=dev)
    from tqdm import tqdm

    bar = tqdm(total=n_steps, disable=args.quiet, dynamic_ncols=True, desc="train rnn (text)", mininterval=0.5,
               file=sys.stderr)
    step, epoch = start, start // K
    t0 = time.perf_counter()
    while step < args.steps:
        X, Y = D.epoch_minibatches(corpus.stream, B, T, args.sampling, torch.Generator().manual_seed(args.seed + epoch))
        X, Y = X.to(dev), Y.to(dev)
        first, t_epoch = step - epoch * K, time.perf_counter()
        if first == 0:
            state = None  # the book: a fresh state at the start of every epoch
        last = min(K, first + args.steps - step)
        for k in range(first, last):
            if args.sampling == "random":
                state = None
            elif state is not None:
                state = state.detach()  # a view: the carried state, cut from the previous minibatch's graph
            loss, state = model.loss(X[k], Y[k], state)
            for p in params:
                p.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.clip, foreach=True)
            opt.param_groups[0]["lr"] = _lr_at(args, step)
            opt.step()
            losses[step - start] = loss.detach()
            step += 1
            bar.update(1)
            if (step - start) % args.log_every == 0 and not args.quiet:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}", refresh=False)
        if last == K:  # a whole epoch: its perplexity (mean over its minibatches) and throughput
            seconds = time.perf_counter() - t_epoch
            here = losses[max(0, epoch * K - start) : step - start].cpu().tolist()
            before = lossi[epoch * K :] if epoch * K < start else []
            ppl = math.exp(sum(before + here) / K)
            tok_s = (last - first) * B * T / seconds if seconds > 0 else float("nan")
            epochs.append({"epoch": epoch + 1, "perplexity": ppl, "tokens_per_s": tok_s})
            bar.set_postfix(epoch=epoch + 1, perplexity=f"{ppl:.2f}", tokens_per_s=f"{tok_s:,.0f}", refresh=False)
        epoch += 1
    seconds = time.perf_counter() - t0
    bar.close()
    lossi = lossi + losses.cpu().tolist()
    window = lossi[-K:]
    train_loss = sum(window) / len(window) if window else float("nan")
    ppl = math.exp(train_loss) if window else float("nan")
    tok_s = n_steps * B * T / seconds if seconds > 0 else float("nan")
    result = {"model": "rnn", "mode": "text", "steps": args.steps, "epochs": args.steps / K, "seconds": seconds,
              "tokens_per_s": tok_s, "steps_per_s": n_steps / seconds if seconds > 0 else float("nan"),
              "train_loss": train_loss, "train_perplexity": ppl,
              "epoch_perplexities": [e["perplexity"] for e in epochs]}
    print(f"perplexity {ppl:.2f} (train loss {train_loss:.4f}, mean over the last {len(window)} minibatches)  |  "
          f"{n_steps} steps ({n_steps / K:.1f} epochs of {K}) in {seconds:.1f} s = {tok_s:,.0f} tokens/s")
    if args.samples:
        prefix = "the " if all(ch in vocab.stoi for ch in "the ") else vocab.decode(corpus.stream[:4])
        ids = model.predict(vocab.encode(prefix), TEXT_SAMPLE_CHARS)
        result["continuation"] = prefix + vocab.decode(ids)
        print("generate: " + repr(result["continuation"]))
    if args.save:
        torch.save({"model": "rnn", "mode": "text", "config": model.config, "state_dict": model.state_dict(),
                    "step": args.steps, "vocab": vocab.itos, "lossi": lossi, "epochs": epochs,
                    "state": state.detach().cpu() if state is not None and args.sampling == "sequential" else None,
                    "run": _run_config(args)}, args.save)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plots:
        from .plots import write_text_plots

        print("plots: " + " ".join(write_text_plots(args.plots, lossi, epochs, K)))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torchrun is None:
        train(args)
        return 0
    import torch.distributed as dist

    env = args.torchrun
    dist_util.init_torchrun(env, args.device)
    try:
        train(args, rank=env.rank, world=env.world_size)
    finally:
        if dist.is_initialized():  # a failed rank: others see the closed connections and fail fast
            dist.destroy_process_group()
    return 0
