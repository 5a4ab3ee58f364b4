"""python -m mmops check | bench | train"""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("check", "bench", "train")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m mmops {{{'|'.join(commands)}}} [options]   (python -m mmops CMD --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        from .check import main as run
    elif cmd == "bench":
        from .bench import main as run
    else:
        from .train import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
