"""`python -m mmops generate`: continue a prefix with a character RNN trained by `train --text`.

As the book's predict(): the prefix runs through the network to warm the hidden state, then each new
character is the argmax of the last output (greedy, the default) or, with --temperature T > 0, drawn from
softmax(logits / T) with a seeded generator. The last line printed is the prefix and its continuation, on
one line: a newline inside the text is written as the two characters \\n (a backslash as \\\\).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from . import models as M
from .data import CorpusError, Vocab
from .train import CheckpointError, load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmops generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", metavar="CKPT", required=True, help="a checkpoint of `train --text ... --save CKPT`")
    p.add_argument("--prefix", required=True, help="the text to continue; every character must be in the "
                   "checkpoint's vocabulary")
    p.add_argument("-n", "--num-preds", type=int, default=100, help="characters to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (argmax, the book's predict); > 0: "
                   "sample from softmax(logits / T) (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_preds < 0:
        p.error(f"-n/--num-preds must be >= 0, got {args.num_preds}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        p.error(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if not args.prefix:
        p.error("--prefix must hold at least one character")
    try:
        ckpt = load_checkpoint(args.load)
    except CheckpointError as e:
        p.error(f"--load {e}")
    if ckpt.get("mode") != "text":
        p.error(f"--load {args.load!r} holds a {ckpt['model']!r} model trained on a word list; generate continues "
                "text with a model of `train --text`")
    vocab = Vocab(list(ckpt["vocab"]))
    try:
        args.prefix_ids = vocab.encode(args.prefix)
    except CorpusError:
        missing = sorted({ch for ch in args.prefix if ch not in vocab.stoi})
        shown = "".join(vocab.itos) if len(vocab) <= 120 else f"{len(vocab)} characters"
        p.error(f"--prefix: the characters {missing} are not in the checkpoint's vocabulary ({shown!r})")
    args.checkpoint, args.vocab = ckpt, vocab
    return args


def generate(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.checkpoint
    model = M.TextRNN(**ckpt["config"], seed=None)
    model.load_state_dict(ckpt["state_dict"])
    g = torch.Generator().manual_seed(args.seed)
    ids = model.predict(args.prefix_ids, args.num_preds, temperature=args.temperature, generator=g)
    return args.prefix + args.vocab.decode(ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = generate(args)
    print(text.replace("\\", "\\\\").replace("\n", "\\n"))
    return 0
