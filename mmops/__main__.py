"""The mmops command line: `python -m mmops COMMAND [options]`, or `mmops COMMAND [options]` (the console
script that `pip install` puts on the PATH)."""
import os
import sys
import textwrap

COMMANDS = {
    "check": "the cmp table (exact / approx / maxdiff): the makemore chain's manual backward vs autograd, and "
             "every fused op (cross-entropy, BatchNorm, RNN cell and sequence) vs its reference chain; exit "
             "code 1 if a row is not approximately equal",
    "bench": "forward+backward timings of the fused ops and training loops against PyTorch, candidates "
             "interleaved in one process; writes bench/results/",
    "train": "train a makemore model (mlp, deep, rnn) on a word list (default: embedded first names), with "
             "checkpoints, JSON summary, diagnostic plots, --nproc N or torchrun data parallelism; or, with "
             "--text [FILE], the d2l character RNN on running text (perplexity, tokens/s)",
    "generate": "continue a prefix with a text model saved by `train --text --save CKPT` (greedy or sampled)",
}


def _prog() -> str:
    return "mmops" if os.path.basename(sys.argv[0] or "") == "mmops" else "python -m mmops"


def usage() -> str:
    prog = _prog()
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: {prog} {{{','.join(COMMANDS)}}} [options]", "",
             "Fused PyTorch ops (cross-entropy, BatchNorm, RNN) for the makemore models, and their command line.",
             "", "commands:"]
    for c, text in COMMANDS.items():
        body = textwrap.wrap(text, 100 - width - 4)
        lines += [f"  {c:<{width}}  {body[0]}"] + [" " * (width + 4) + rest for rest in body[1:]]
    lines += ["", f"`{prog} COMMAND --help` lists the command's options with their defaults.",
              "The same commands run as `python -m mmops COMMAND` or, after pip install, `mmops COMMAND`."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"usage: {_prog()} {{{','.join(COMMANDS)}}} [options]\n{_prog()}: error: {what} (choose from "
              f"{', '.join(COMMANDS)}; {_prog()} --help describes them)", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from .check import main as run
    elif cmd == "bench":
        from .bench import main as run
    elif cmd == "generate":
        from .generate import main as run
    else:
        from .train import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
