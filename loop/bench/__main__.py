"""python -m loop.bench round [--images 64] [--rounds 2]

Each benchmark prints a table, writes its figures to docs/bench/<name>.json (a flat object of numbers and
short strings) and rewrites its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loop.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="name", required=True)
    r = sub.add_parser("round", help="seconds per phase of a whole round on the embedded model")
    r.add_argument("--images", type=int, default=64, help="images per round (spread over the prompts)")
    r.add_argument("--rounds", type=int, default=2, help="rounds to run (the rater's scores are reported per unit)")
    r.add_argument("--train-steps", type=int, default=300)
    r.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    if args.name == "round":
        from loop.bench.round import bench_round

        bench_round(images=args.images, rounds=args.rounds, train_steps=args.train_steps, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
