"""python -m loop.bench round [--images 64] [--rounds 2]
python -m loop.bench rate [--images 10000] [--ratings 200]
python -m loop.bench generate [--images 64] [--steps 20] [--batch 16]
python -m loop.bench train [--images 32] [--steps 30] [--batch 8] [--reps 10]
python -m loop.bench strategies [--rounds 3] [--images 64] [--steps 300] [--noise 10] [--keep DIR] [--seed 0]
                              [--only converge,replace] [--seeds 0,1,2,3,4] [key=value ...]
python -m loop.bench taste [--tastes warm,small_dark,contrast,centred_big] [--images 1000] [--earlier 200]
python -m loop.bench converge [--tastes warm,small_dark,contrast,centred_big] [--strategies golden,converge]
                              [--seeds 0,1,2,3] [--rounds 3] [--images 64] [--eval 128] [--name NAME]
                              [--report] [key=value ...]
python -m loop.bench fit [--taste centred_big] [--seed 4] [--pool 128] [--pictures all|ur] [--hues 1] [key=value ...]
python -m loop.bench sdxl [--steps 20] [--images 4] [--train-steps 10] [--tiny]

Each benchmark prints a table, writes its figures to docs/bench/<name>.json (a flat object of numbers and
short strings) and rewrites its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _seeds(text: str) -> list[int]:
    """--seeds 0,1,2 -> [0, 1, 2] (one clear line if it isn't a list of distinct whole numbers)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {text}: give distinct whole numbers separated by commas, e.g. --seeds 0,1,2,3,4")
    return seeds


def _strategies(only: str | None) -> list[str] | None:
    """--only a,b -> ["a", "b"], checked against the benchmark's strategies (one clear line if a name is wrong)."""
    if not only:
        return None
    from loop.bench.strategies import STRATEGIES

    names = [n.strip() for n in only.split(",") if n.strip()]
    wrong = [n for n in names if n not in STRATEGIES]
    if wrong or not names:
        bad = ", ".join(wrong) or "(none)"
        raise SystemExit(f"--only {only}: unknown strategy {bad}; use {', '.join(STRATEGIES)}")
    return names


def _names(text: str, known: list[str], flag: str) -> list[str]:
    """a,b -> ["a", "b"], each one of `known` (one clear line if not)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    wrong = [n for n in names if n not in known]
    if wrong or not names:
        raise SystemExit(f"{flag} {text}: unknown {', '.join(wrong) or '(none)'}; use {', '.join(known)}")
    return names


def _check_overrides(overrides: list[str]) -> None:
    """A wrong key or value stops the study before it starts, in one line, not after an hour."""
    from loop.config import load_config
    from loop.errors import LoopError

    try:
        load_config(None, overrides)
    except LoopError as e:
        raise SystemExit(f"error: {e}") from None


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
    r = sub.add_parser("rate", help="the rating page in headless Chromium against a plain gr.Gallery page")
    r.add_argument("--images", type=int, default=10_000, help="tiny images in the round")
    r.add_argument("--ratings", type=int, default=200, help="keyboard ratings timed on our page")
    r.add_argument("--baseline-ratings", type=int, default=20, help="ratings timed on the gr.Gallery page")
    r.add_argument("--no-screenshots", action="store_true", help="skip docs/img/rate-grid.png and rate-detail.png")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("generate", help="loop generate against one pipe() call per image, same model and seeds")
    r.add_argument("--images", type=int, default=64)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--reps", type=int, default=2, help="alternating runs of each side; the best is kept")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("train", help="our trainer (cached encodings) against re-encoding every step")
    r.add_argument("--images", type=int, default=32)
    r.add_argument("--steps", type=int, default=30, help="steps per block")
    r.add_argument("--reps", type=int, default=10, help="blocks: the sides take turns; median ratio kept")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--out", default="docs")
    r = sub.add_parser("strategies", help="4 strategies and a replace ablation over several rounds, warm rater")
    r.add_argument("--rounds", type=int, default=3, help="trainings per strategy (units 0..rounds are rated)")
    r.add_argument("--images", type=int, default=64, help="images per round")
    r.add_argument("--steps", type=int, default=300, help="LoRA steps per unit")
    r.add_argument("--noise", type=float, default=10.0, help="the scripted rater's noise")
    r.add_argument("--keep", metavar="DIR", help="keep each strategy's workspace in DIR/<strategy> (default: discard)")
    r.add_argument("--seed", type=int, default=0, help="generate.seed and train.seed: another draw of the study")
    r.add_argument("--seeds", metavar="A,B", help="the study at each of these seeds, and the spread across them")
    r.add_argument("--only", metavar="A,B", help="run only these strategies (comma-separated; default: all)")
    r.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for every strategy, after its own (e.g. select.balance_rounds=true)",
    )
    r.add_argument("--out", default="docs")
    r = sub.add_parser("converge", help="scripted tastes over several rounds: UR rate and the variety kept")
    r.add_argument("--tastes", default="warm,small_dark,contrast,centred_big", help="comma-separated (loop.tastes)")
    r.add_argument("--strategies", default="golden,converge", help="comma-separated: golden, converge")
    r.add_argument("--seeds", default="0,1,2,3", help="generate.seed and train.seed of each run")
    r.add_argument("--rounds", type=int, default=3, help="trainings per run (units 0..rounds are measured)")
    r.add_argument("--images", type=int, default=64, help="images per round")
    r.add_argument("--eval", type=int, default=128, help="images per unit at the measuring seeds")
    r.add_argument("--name", dest="name_", help="this invocation's part: docs/bench/converge_<name>.json")
    r.add_argument("--keep", metavar="DIR", help="keep the workspaces in DIR (default: discard)")
    r.add_argument("--report", action="store_true", help="only merge the parts into converge.json and the doc")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("fit", help="one unit fine-tuned on the base's own pictures: the variety it keeps")
    r.add_argument("--taste", default="centred_big", help="the scripted taste (loop.tastes)")
    r.add_argument("--seed", type=int, default=4, help="train.seed")
    r.add_argument("--pool", type=int, default=128, help="base pictures per prompt")
    r.add_argument("--pictures", default="ur", choices=["all", "ur"], help="all of them, or those rated UR")
    r.add_argument("--hues", type=int, default=1, help="each picture also in this many colourings")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("taste", help="ratings to find 90% of a round's UR images, likely UR first vs default order")
    r.add_argument("--tastes", default="warm,small_dark,contrast,centred_big", help="comma-separated (loop.tastes)")
    r.add_argument("--images", type=int, default=1000, help="the round's unit-0 images")
    r.add_argument("--earlier", type=int, default=200, help="an earlier round's rated images the model starts from")
    r.add_argument("--refit", type=int, default=50, help="ratings between refits")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("shots", help="the Compare tab's screenshot for the README (docs/img/compare.png)")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("sdxl", help="SDXL-shaped random weights at 1024px, bf16, CUDA: generate/train speed, memory")
    r.add_argument("--steps", type=int, default=20, help="denoising steps per generated image")
    r.add_argument("--images", type=int, default=4, help="images generated (timed, after one warm-up)")
    r.add_argument("--train-steps", type=int, default=10, help="timed LoRA steps per setting (after 2 warm-up)")
    r.add_argument("--tiny", action="store_true", help="the same code on the embedded SDXL at 32px; writes nothing")
    r.add_argument("--out", default="docs")
    r = sub.add_parser("sd15-check", help="build the SD1.5-shaped random pipeline and run it once (any device)")
    r.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    if args.name == "shots":
        from loop.bench.shots import compare_screenshot

        compare_screenshot(args.out)
    elif args.name == "strategies":
        from loop.bench.strategies import bench_converge, bench_converge_seeds

        _check_overrides(args.overrides)
        if args.seeds:
            seeds = _seeds(args.seeds)
            bench_converge_seeds(seeds, rounds=args.rounds, images=args.images, steps=args.steps,
                                 noise=args.noise, out=args.out, only=_strategies(args.only),
                                 overrides=args.overrides)  # fmt: skip
            return 0
        bench_converge(
            rounds=args.rounds,
            images=args.images,
            steps=args.steps,
            noise=args.noise,
            out=args.out,
            keep=args.keep,
            seed=args.seed,
            only=_strategies(args.only),
            overrides=args.overrides,
        )
    elif args.name == "converge":
        from loop.bench import converge

        if args.report:
            converge.report(args.out)
            return 0
        _check_overrides(args.overrides)
        tastes = _names(args.tastes, converge.TASTE_NAMES, "--tastes")
        strategies = _names(args.strategies, list(converge.STRATEGIES), "--strategies")
        seeds = _seeds(args.seeds)
        name = args.name_ or converge.part_name(args.overrides, tastes, strategies, seeds)
        converge.bench_converge(tastes, strategies, seeds, rounds=args.rounds, images=args.images,
                                eval_images=args.eval, out=args.out, name=name, overrides=args.overrides,
                                keep=args.keep)  # fmt: skip
    elif args.name == "fit":
        from loop.bench import converge
        from loop.bench.fit import bench_fit

        _check_overrides(args.overrides)
        taste = _names(args.taste, converge.TASTE_NAMES, "--taste")[0]
        if args.hues < 1 or args.pool < 1:
            raise SystemExit("--pool and --hues: give whole numbers of 1 or more")
        bench_fit(taste, args.seed, args.pool, args.pictures, args.hues, args.overrides, out=args.out)
    elif args.name == "taste":
        from loop.bench import taste

        tastes = _names(args.tastes, taste.TASTE_NAMES, "--tastes")
        taste.bench_taste(tastes, images=args.images, earlier=args.earlier, refit=args.refit, out=args.out)
    elif args.name == "train":
        from loop.bench.train import bench_train

        bench_train(images=args.images, steps=args.steps, batch=args.batch, reps=args.reps, out=args.out)
    elif args.name == "generate":
        from loop.bench.generate import bench_generate

        bench_generate(images=args.images, steps=args.steps, batch=args.batch, reps=args.reps, out=args.out)
    elif args.name == "sdxl":
        from loop.bench.sdxl import bench_sdxl

        return bench_sdxl(steps=args.steps, images=args.images, train_steps=args.train_steps, out=args.out,
                          tiny=args.tiny)  # fmt: skip
    elif args.name == "sd15-check":
        from loop.bench.generate import sd15_check

        sd15_check(args.size)
    if args.name == "round":
        from loop.bench.round import bench_round

        bench_round(images=args.images, rounds=args.rounds, train_steps=args.train_steps, out=args.out)
    elif args.name == "rate":
        from loop.bench.rate import bench_rate

        bench_rate(
            images=args.images,
            ratings=args.ratings,
            baseline_ratings=args.baseline_ratings,
            out=args.out,
            shots=not args.no_screenshots,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
