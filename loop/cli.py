"""The `loop` command line (Typer). Each command parses, builds the config, and calls one stage function.

loop init DIR | run --round [N] | generate [--forever|--count K] | vary IMAGE | rate | train | export-lora |
export-model | export | import | status | promote N | config
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keeps optional-backend notices out of the way
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402

from loop.errors import LoopError  # noqa: E402
from loop.workspace import LAUNCHED_ENV  # noqa: E402  (set in the workers `--processes N` starts)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil one person's taste into a text-to-image model, one unit at a time.",
)
STATE = {"debug": False}

WorkspaceOpt = Annotated[Path, typer.Option("-w", "--workspace", help="workspace folder", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="config overrides, key=value", show_default=False)]
# status, import, export and export-lora read no config; they take overrides as every command does (DESIGN.md),
# so one wrapper can pass the same ones to all, and check them (with configs/loop.yaml), nothing more
CheckedOverrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="config overrides, key=value (checked; not used here)", show_default=False),
]


def _open_checked(workspace: Path, overrides: list[str] | None):
    from loop.workspace import Workspace

    if overrides:  # only then: without any, a broken configs/loop.yaml must not stop status, import or export
        return _open(workspace, overrides, model=False)[0]
    return Workspace.open(workspace)


UnitOpt = Annotated[Optional[int], typer.Option("--unit", help="unit number (default: the current unit)")]


def _quiet_libraries() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()  # "Loading pipeline components" bars; our own bars say what is happening
    tlog.disable_progress_bar()


def _echo(msg: str) -> None:
    # warnings (a skipped file, a left-out image) go to stderr, so `loop ... > log` keeps them on screen and a
    # script reading stdout gets only the results
    typer.echo(msg, err=str(msg).startswith("warning"))


def _open(workspace: Path, overrides: list[str] | None, model: bool = True):
    from loop.config import load_config
    from loop.models import check_base
    from loop.workspace import Workspace

    ws = Workspace.open(workspace)
    cfg = load_config(ws.root, overrides)
    if model:  # before a command records anything about a model that isn't there
        check_base(cfg.model.base, cfg.model.config)
    return ws, cfg


# these never import diffusers: start in a blink
MODEL_FREE = ("init", "import", "export", "status", "promote", "config")


@app.callback()
def main(ctx: typer.Context, debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    STATE["debug"] = debug
    if not debug and ctx.invoked_subcommand not in MODEL_FREE:
        _quiet_libraries()


@app.command()
def init(
    args: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="[DIR] (the folder to lay out) then key=value settings for its configs/loop.yaml", show_default=False
        ),
    ] = None,
    workspace: Annotated[
        Optional[Path], typer.Option("-w", "--workspace", help="the folder to lay out (as DIR)", show_default=False)
    ] = None,
    seed_images: Annotated[
        Optional[Path], typer.Option("--seed-images", help="1-5 of your images to start from (select.strategy=grow)")
    ] = None,
) -> None:
    """Lay out a workspace: configs/, generations/, checkpoints/, golden/, cache/ and loop.db."""
    from loop.config import load_config
    from loop.workspace import Workspace

    args = list(args or [])
    named = Path(args.pop(0)) if args and "=" not in args[0] else None
    if named is not None and workspace is not None and named.resolve() != workspace.resolve():
        raise LoopError(f"two folders given ({named} and -w {workspace}); give one")
    directory = named or workspace or Path(".")
    settings = args
    if settings:
        load_config(None, settings)  # a mistyped key is said before anything is laid out

    if seed_images is not None:  # checked before anything is laid out, so a bad one leaves no workspace behind
        from loop.interop import readable_images, source_files

        files, _ = source_files(seed_images, directory)
        readable = readable_images(files)
        if not readable:
            raise LoopError(f"no readable image in {seed_images}; give a folder with 1-5 PNG or JPEG images")
        if len(readable) > 5:
            _echo(
                f"warning: {len(readable)} seed images; grow starts from 1-5, and every one becomes a UR seed "
                "(ctrl-C now and give fewer if that was not meant)"
            )
    existed = Workspace(directory).db_path.is_file()
    if settings and (existed or (Path(directory) / "configs" / "loop.yaml").exists()):
        raise LoopError(  # a configs/loop.yaml there is the user's: init never rewrites it
            f"{directory} has a configs/loop.yaml already; init changes nothing in it. Put {' '.join(settings)} in "
            "that file, or give them to each command"
        )
    ws = Workspace.init(directory)
    if settings:
        from omegaconf import OmegaConf

        from loop.workspace import DEFAULT_YAML, atomic_write

        merged = OmegaConf.merge(OmegaConf.create(DEFAULT_YAML), OmegaConf.from_dotlist(settings))
        header = "".join(ln + "\n" for ln in DEFAULT_YAML.splitlines() if ln.startswith("#"))
        atomic_write(ws.root / "configs" / "loop.yaml", header + OmegaConf.to_yaml(merged))
        load_config(ws.root)  # what was written reads back
    if seed_images is not None:
        from loop.interop import import_images

        with ws.store() as store:
            r = import_images(ws, store, seed_images, "UR", "seed", log=_echo)
        if not r["imported"] and not r["duplicates"]:
            raise LoopError(f"no readable image in {seed_images}; give a folder with 1-5 PNG or JPEG images")
        _echo(f"{r['imported']} seed image(s) in golden/, rated UR; grow from them with select.strategy=grow")
    if existed and seed_images is None:  # init lays out what is missing and never touches what is there
        with ws.store() as store:
            trained = sum(1 for u in store.units() if u["unit"] > 0)
            images = store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        _echo(f"{ws.root} is a workspace already ({images} image(s), {trained} trained unit(s)); nothing in it "
              "was changed")  # fmt: skip
        return
    _echo(f"workspace ready at {ws.root}; edit configs/prompts.txt, then `loop run --round -w {directory}`")


@app.command()
def run(
    round_: Annotated[bool, typer.Option("--round", help="advance a round: generate, rate, select, train")] = False,
    auto_rate: Annotated[
        bool, typer.Option("--auto-rate", help="rate with the scripted rater (demos, tests)")
    ] = False,
    workspace: WorkspaceOpt = Path("."),
    args: Annotated[
        Optional[list[str]], typer.Argument(help="[N] then key=value overrides", show_default=False)
    ] = None,
) -> None:
    """Advance unit N to N+1 (N defaults to the current unit); resumable."""
    from loop.round import run_round
    from loop.workspace import work_lock

    if not round_:
        raise LoopError("say which: `loop run --round [N]` advances round N (the current one by default)")
    args = list(args or [])
    n = None
    if args and "=" not in args[0]:
        given = args.pop(0)
        try:
            n = int(given)
        except ValueError:
            raise LoopError(
                f"round number must be a whole number, got {given!r}; for example `loop run --round 0` "
                "(or `loop run --round` for the current round)"
            ) from None
        if n < 0:
            raise LoopError(f"round number must be 0 or more, got {n}")
    ws, cfg = _open(workspace, args)
    with work_lock(ws, "run --round"):
        result = run_round(ws, cfg, n, auto_rate_=auto_rate, log=_echo)
    if result.status == "waiting":
        _echo(result.message)
        raise typer.Exit(3)
    if result.ran:
        took = ", ".join(f"{p} {s:.1f}s" for p, s in result.seconds.items())
        new = result.round + 1
        with ws.store() as store:
            refused = store.unit(new) is not None and store.unit(new)["promoted"] == 0
            now = store.generating_unit()
        if refused:
            _echo(f"round {result.round} done ({took}): unit {new} was refused by the promotion gate (see above); "
                  f"unit {now} keeps generating, `loop promote {new}` overrides")  # fmt: skip
        else:
            _echo(f"round {result.round} done: unit {new} is ready ({took})")
    else:
        with ws.store() as store:
            now = store.current_unit()
        _echo(f"round {result.round} was already done; `loop run --round` goes on with round {now}")


@app.command()
def generate(
    forever: Annotated[
        bool, typer.Option("--forever", help="the prompt file as a ring, until Ctrl-C or SIGTERM")
    ] = False,
    count: Annotated[Optional[int], typer.Option("--count", help="K images from the ring, then stop")] = None,
    processes: Annotated[int, typer.Option("--processes", help="split the work between N processes (accelerate)")] = 1,
    workspace: WorkspaceOpt = Path("."),
    unit: UnitOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Generate from configs/prompts.txt: one pass (default), --count K images, or --forever.

    The ring re-reads the file before every prompt and keeps its position in loop.db, so edits need no
    restart and a restart continues where it stopped. Without --unit it follows the unit that generates (the
    newest one the promotion gate passed, or `loop promote` promoted), its images in the current round."""
    from loop.generate import generate as one_pass
    from loop.generate import generate_ring, process_share, stop_on_signals
    from loop.workspace import recover

    if forever and count is not None:
        raise LoopError("give --forever or --count K, not both")
    if count is not None and count <= 0:
        raise LoopError(f"--count must be a positive number of images, got {count}")
    if processes < 1:
        raise LoopError(f"--processes must be 1 or more, got {processes}")
    if processes > 1:
        _open(workspace, overrides)  # a config mistake is said once, here, not by every process
        rc = _launch(processes, ["generate"] + _without_processes(STATE.get("argv", sys.argv[1:])))
        STATE["launched"] = True  # the processes said what happened (an interrupt included)
        raise typer.Exit(rc)
    ws, cfg = _open(workspace, overrides)
    rank, world = process_share()
    with ws.store() as store, stop_on_signals(_echo) as stop:
        if rank == 0:
            recover(ws, store, _echo)
        store.ensure_base_unit(cfg.model.base)
        if unit is not None and store.unit(unit) is None:
            from loop.store import raise_missing_unit

            raise_missing_unit(store, unit)
        if forever or count is not None:
            out = generate_ring(ws, store, cfg, unit=unit, count=count, log=_echo, stop=stop)
            pos = out["position"]
            where = f"line {pos['lineno']} of {ws.prompts_path.name}, cycle {pos['cycle']}"
            what = "stopped cleanly" if out["stopped"] else "done"
            if out["stopped"] and count is not None:
                what = f"stopped cleanly before {count}"
            who = f"process {rank + 1} of {world}: " if world > 1 else ""  # each process says its own share
            _echo(f"{who}{what}: made {out['made']} image(s) with unit {out['unit']}; the ring is at {where}")
            if out["stopped"] and count is not None:
                _interrupted()  # --forever ends this way by design; --count K did not make its K
            return
        n = store.generating_unit() if unit is None else unit
        rnd = store.current_unit() if unit is None else None  # the round goes on with an older unit
        out = one_pass(ws, store, cfg, unit=n, round=rnd, log=_echo, stop=stop)
    what = "stopped cleanly; run the same command to finish the pass" if out["stopped"] else "done"
    who = f"process {rank + 1} of {world}: " if world > 1 else ""
    _echo(f"{who}{what}: made {out['made']} image(s) with unit {n} in {ws.rel(ws.generations(n))}")
    if out["stopped"]:
        _interrupted()


def _interrupted() -> None:
    """Exit 130 (interrupted, as the README says) after a command said itself how far it got. The workers of
    `--processes N` end with 0: accelerate reports any other code as a crashed process; their launcher, which
    got the same Ctrl-C, exits 130."""
    if os.environ.get(LAUNCHED_ENV):
        return
    STATE["said"] = True
    raise typer.Exit(130)


def _without_processes(argv: list[str], command: str = "generate") -> list[str]:
    """The command's own arguments, without --processes N (the launched workers run one each)."""
    args = argv[argv.index(command) + 1 :] if command in argv else []
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out


def die_with_parent() -> None:
    """Have the kernel stop this process (SIGTERM) when its parent dies (Linux: prctl PR_SET_PDEATHSIG).

    `--processes N` runs loop -> accelerate launch (torchrun's agent) -> N workers. A `loop` killed with kill -9
    used to leave the agent and the workers running on their own, still generating or training (and recording a
    unit nobody waits for). With this in the agent (set as it starts) and in each worker, the kill reaches all
    of them: the agent stops its workers on SIGTERM, and a worker whose agent vanished stops by itself.
    Elsewhere than Linux this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _launch(processes: int, args: list[str]) -> int:
    """Run `python -m loop ARGS` in N processes through `accelerate launch` (torchrun underneath)."""
    import socket
    import subprocess

    with socket.socket() as s:  # a free port for the process group, so two launches don't collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "loop.launch",  # accelerate launch, quiet about a worker's failure (loop/launch.py)
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "loop", *args,
    ]  # fmt: skip
    _echo(f"launching {processes} processes: accelerate launch --num_processes {processes} -m loop {' '.join(args)}")
    return subprocess.call(cmd, env={**os.environ, LAUNCHED_ENV: "1"}, preexec_fn=die_with_parent)


@app.command()
def vary(
    image: Annotated[str, typer.Argument(help="an image: file path, sha256 prefix, or id")],
    n: Annotated[int, typer.Option("--n", help="how many variations")] = 4,
    strength: Annotated[
        Optional[float], typer.Option("--strength", help="0..1, how far from the parent (default generate.strength)")
    ] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="prompt (default: the parent's)")] = None,
    workspace: WorkspaceOpt = Path("."),
    unit: UnitOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """img2img variations of an image; each records its parent in the store and in its PNG."""
    from loop.generate import resolve_image, stop_on_signals
    from loop.generate import vary as make_variations
    from loop.workspace import recover

    ws, cfg = _open(workspace, overrides)
    with ws.store() as store, stop_on_signals(_echo) as stop:
        recover(ws, store, _echo)
        store.ensure_base_unit(cfg.model.base)
        parent = resolve_image(ws, store, image)
        u = store.generating_unit() if unit is None else unit
        if store.unit(u) is None:
            from loop.store import raise_missing_unit

            raise_missing_unit(store, u)
        rnd = store.current_unit() if unit is None else None  # the unit that generates draws for the current round
        ids = make_variations(
            ws, store, cfg, [parent], n, strength, unit=u, prompt=prompt, log=_echo, stop=stop, round=rnd
        )
        if not ids and not stop:
            raise LoopError(
                f"no variation of image {parent['id']} ({parent['path']}) was made (see the line above); "
                "restore or re-import the image, or vary another one"
            )
    if stop and len(ids) < n:
        _echo(f"stopped cleanly: made {len(ids)} of {n} variation(s) of image {parent['id']} "
              f"({parent['sha256'][:12]}) with unit {u}")  # fmt: skip
        _interrupted()
    _echo(f"made {len(ids)} variation(s) of image {parent['id']} ({parent['sha256'][:12]}) with unit {u}")


@app.command()
def rate(
    auto: Annotated[
        bool, typer.Option("--auto", help="scripted rater: a fixed colour preference (demos, tests)")
    ] = False,
    finish: Annotated[bool, typer.Option("--finish", help="close the rate phase of the current round")] = False,
    host: Annotated[str, typer.Option("--host", help="address to serve the page on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to serve the page on")] = 7860,
    listen: Annotated[
        bool, typer.Option("--listen", help="serve on every interface (0.0.0.0); needs --auth or --auth-file")
    ] = False,
    auth: Annotated[Optional[str], typer.Option("--auth", help="user:password required by every route")] = None,
    auth_file: Annotated[
        Optional[Path], typer.Option("--auth-file", help="file of user:password lines, one per rater")
    ] = None,
    workspace: WorkspaceOpt = Path("."),
    overrides: OverridesArg = None,
) -> None:
    """Serve the rating page (http://127.0.0.1:7860); --auto and --finish rate or close without it."""
    users = None
    if not (auto or finish):
        from loop.rate.page import is_loopback, parse_auth

        users = parse_auth(auth, auth_file)
        if listen and host == "127.0.0.1":
            host = "0.0.0.0"
        if (listen or not is_loopback(host)) and not users:
            raise LoopError(
                f"serving on {host} puts the page on the network; add --auth user:password or --auth-file FILE"
            )
        if not 0 < port < 65536:
            raise LoopError(f"--port must be between 1 and 65535, got {port}")
    from loop.workspace import recover

    ws, cfg = _open(workspace, overrides, model=False)
    with ws.store() as store:
        recover(ws, store, _echo)  # a rating killed mid-way may have left golden/ behind its ratings
        if auto or finish:
            from loop.rate.auto import auto_rate
            from loop.store import check_can_finish_rating, finish_rating, rating_summary

            n = store.current_unit()
            check_can_finish_rating(store, n)  # before the scripted rater rates anything
            if auto:
                out = auto_rate(ws, store, cfg.rate, n, log=_echo)
                left = f", left {out['skipped']} unreadable image(s) unrated" if out["skipped"] else ""
                _echo(
                    f"scripted rater ({cfg.rate.preference}) rated {out['rated']} image(s){left}: "
                    f"{rating_summary(store, n)}"
                )
            finish_rating(store, n)
            _echo(f"round {n}: rating closed ({rating_summary(store, n)}); `loop run --round` goes on")
            counts = store.tier_counts(round=n)
            if not any(c for t, c in counts.items() if t is not None):  # closed, but nobody looked at the round
                _echo(f"warning: none of round {n}'s {sum(counts.values())} image(s) is rated: unit {n + 1} learns "
                      "only from earlier rounds and imports (`loop rate` first, if that was not meant)")  # fmt: skip
            return
    from loop.rate.page import serve

    serve(ws, cfg, host=host, port=port, auth=users or None, log=_echo)


@app.command()
def train(
    processes: Annotated[int, typer.Option("--processes", help="DDP over N processes (accelerate launch)")] = 1,
    workspace: WorkspaceOpt = Path("."),
    unit: Annotated[
        Optional[int],
        typer.Option(
            "--unit", help="the parent N: trains unit N+1 from round N's selection (default: the current unit)"
        ),
    ] = None,
    overrides: OverridesArg = None,
) -> None:
    """Train unit N+1 from the selection of round N (default: the current unit), then gate it (promotion gate);
    resumes after a kill."""
    from loop.gate import gate_unit
    from loop.train import train_unit
    from loop.workspace import work_lock

    if processes < 1:
        raise LoopError(f"--processes must be 1 or more, got {processes}")
    if processes > 1:
        from loop.train import check_can_train

        ws = _open(workspace, overrides)[0]
        with ws.store() as store:  # a missing selection or unit is said once, here, not by every process
            check_can_train(ws, store, store.current_unit() if unit is None else unit)
        with work_lock(ws, "train"):  # the workers run under this one
            rc = _launch(processes, ["train"] + _without_processes(STATE.get("argv", sys.argv[1:]), "train"))
        STATE["launched"] = True  # the processes said what happened (an interrupt included)
        raise typer.Exit(rc)
    ws, cfg = _open(workspace, overrides)
    with work_lock(ws, "train"), ws.store() as store:
        n = store.current_unit() if unit is None else unit
        m = train_unit(ws, store, cfg, parent=n, log=_echo)
        if m:  # only the main process reports, and gates
            _echo(f"unit {n + 1} saved to {ws.rel(ws.checkpoint(n + 1))} (loss {m.get('final_loss')})")
            gate_unit(ws, store, cfg, n + 1, log=_echo)


@app.command("export-lora")
def export_lora_cmd(
    unit: Annotated[int, typer.Option("--unit", help="the unit whose adapter to export")],
    fmt: Annotated[str, typer.Option("--format", help="kohya (A1111, ComfyUI) or diffusers")] = "kohya",
    out: Annotated[Optional[Path], typer.Option("--out", help="file or folder (default: the unit's folder)")] = None,
    workspace: WorkspaceOpt = Path("."),
    overrides: CheckedOverrides = None,
) -> None:
    """Write a unit's LoRA as one .safetensors file other tools load."""
    from loop.interop import export_lora

    ws = _open_checked(workspace, overrides)
    with ws.store() as store:
        export_lora(ws, store, unit, fmt, out, log=_echo)  # its last line says what was written


@app.command("export-model")
def export_model_cmd(
    unit: Annotated[int, typer.Option("--unit", help="the unit to merge into its base (0: the base itself)")],
    out: Annotated[Path, typer.Option("--out", help="the .safetensors file to write (or a folder)")],
    dtype: Annotated[str, typer.Option("--dtype", help="float16 (as models are shared), float32 or bfloat16")] = (
        "float16"
    ),
    workspace: WorkspaceOpt = Path("."),
    overrides: OverridesArg = None,
) -> None:
    """Write a unit merged into its base as one checkpoint file (AUTOMATIC1111 / ComfyUI layout; loop reads it back
    as model.base)."""
    from loop.interop import export_model

    ws, cfg = _open(workspace, overrides, model=False)
    with ws.store() as store:
        export_model(ws, store, cfg, unit, out, dtype, log=_echo)


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option("--out", help="a new (or empty) folder")],
    which: Annotated[str, typer.Option("--set", help="golden (UR), or a tier: that tier and better")] = "golden",
    workspace: WorkspaceOpt = Path("."),
    overrides: CheckedOverrides = None,
) -> None:
    """Export rated images as a Hugging Face imagefolder (images + metadata.jsonl)."""
    from loop.interop import export_set

    ws = _open_checked(workspace, overrides)
    with ws.store() as store:
        export_set(ws, store, which, out, log=_echo)  # its last line says what was written


@app.command("import")
def import_cmd(
    src: Annotated[Path, typer.Argument(help="a folder (searched recursively) or one image file")],
    tier: Annotated[Optional[str], typer.Option("--tier", help="rate every imported image this tier, e.g. UR")] = None,
    source: Annotated[str, typer.Option("--source", help="where the images come from (kept with each)")] = "import",
    workspace: WorkspaceOpt = Path("."),
    overrides: CheckedOverrides = None,
) -> None:
    """Bring outside images into the workspace (golden/); unreadable files are skipped, one line each."""
    from loop.interop import import_images

    ws = _open_checked(workspace, overrides)  # import_images checks --tier (any case, as --set) before it reads a file
    with ws.store() as store:
        r = import_images(ws, store, src, tier, source, log=_echo)
    if r["skipped"] and not r["imported"] and not r["duplicates"]:
        # a script that imports and then trains must not go on as if the set had grown
        raise LoopError(f"nothing was imported from {src}: all {r['skipped']} file(s) were unreadable (see above)")


@app.command()
def compare(
    units: Annotated[Optional[str], typer.Option("--units", help="e.g. 0..3 or 0,2,3 (default: all units)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the grid, plot and compare.json")] = None,
    workspace: WorkspaceOpt = Path("."),
    overrides: OverridesArg = None,
) -> None:
    """A fixed-seed probe grid across units (units as rows), per-unit statistics and plots."""
    from loop.compare import compare as run_compare
    from loop.compare import format_table

    ws, cfg = _open(workspace, overrides)
    if out is not None:
        _check_out_folder(Path(out).expanduser())  # before minutes of rendering, not after
    with ws.store() as store:
        store.ensure_base_unit(cfg.model.base)
        have = [r["unit"] for r in store.units()]
        chosen = parse_units(units, have)
        r = run_compare(ws, store, cfg, chosen, out, log=_echo)
    _echo(format_table(r))  # the table ends with where the grid and the plot are


MAX_UNITS = 1000  # a longer --units range is a typo, not a comparison (each unit is a row of the grid)


def parse_units(spec: str | None, have: list[int]) -> list[int]:
    """ "0..3", "0,2,3" or None (every unit) -> unit numbers."""
    if not spec:
        return sorted(have)
    out: list[int] = []
    units_here = ", ".join(map(str, sorted(have))) or "0"
    try:
        for part in spec.split(","):
            if ".." in part:
                a, b = (int(x) for x in part.split("..", 1))
                if a > b:
                    raise LoopError(
                        f"--units {spec!r}: the range {part.strip()} runs backwards; give it low to high, "
                        f"like --units {b}..{a} (units here: {units_here})"
                    )
                if len(out) + b - a + 1 > MAX_UNITS:
                    raise LoopError(
                        f"--units {spec!r} names more than {MAX_UNITS} units; give the units to compare, "
                        f"like --units 0..3 (units here: {units_here})"
                    )
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise LoopError(f"--units {spec!r}: give a range like 0..3 or a list like 0,2,3") from None
    if len(out) > MAX_UNITS:
        raise LoopError(f"--units {spec!r} names more than {MAX_UNITS} units; give the units to compare")
    return out


def _check_out_folder(out: Path) -> None:
    """LoopError unless `out` is a folder that exists or can be made, and can be written."""
    p = Path(os.path.abspath(out))
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == p and not p.is_dir():
        raise LoopError(f"--out {out} is a file; give a folder (new or existing) for the results")
    if not probe.is_dir():
        raise LoopError(f"--out {out} cannot be made: {probe} is a file; give a folder for the results")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LoopError(f"--out {out}: {probe} is not writable by you; give a folder you can write")


@app.command()
def status(workspace: WorkspaceOpt = Path("."), overrides: CheckedOverrides = None) -> None:
    """Units and lineage, images and tiers per unit, UR rate, and what the current round waits for."""
    from loop.status import format_status

    _echo(format_status(_open_checked(workspace, overrides)))


@app.command()
def promote(
    unit: Annotated[int, typer.Argument(metavar="N", help="the unit that is to generate", show_default=False)],
    workspace: WorkspaceOpt = Path("."),
    overrides: CheckedOverrides = None,
) -> None:
    """Make unit N the one that generates, overriding the promotion gate (the override is recorded)."""
    from loop.gate import promote_unit

    ws = _open_checked(workspace, overrides)
    with ws.store() as store:
        row = store.unit(unit)
        over = "over the gate's refusal" if row is not None and row["promoted"] == 0 else "before the gate checked it"
        now = promote_unit(ws, store, unit)
    if now == unit:
        _echo(f"unit {unit} promoted {over}; it generates from now on")
    else:  # a newer unit generates already
        _echo(f"unit {unit} promoted {over}; unit {now}, newer, still generates")


@app.command("config")
def show_config(workspace: WorkspaceOpt = Path("."), overrides: OverridesArg = None) -> None:
    """Print the resolved config (defaults, configs/loop.yaml, then overrides)."""
    from loop.config import load_config, to_yaml

    where = Path(workspace)
    if not where.exists():
        raise LoopError(f"{where} does not exist; give a workspace folder with -w (or run `loop init {where}`)")
    if not where.is_dir():
        raise LoopError(f"{where} is not a folder; give a workspace folder with -w")
    root = where if (where / "configs").exists() else None
    if root is None:
        typer.echo(f"note: {where.resolve()} is not a loop workspace (no configs/); showing the defaults", err=True)
    _echo(to_yaml(load_config(root, overrides)).rstrip())


def entry(argv: list[str] | None = None) -> int:
    """Console-script entry: user errors print one line (traceback with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(LAUNCHED_ENV) and os.environ.get("LOCAL_RANK") is not None:
        die_with_parent()  # a worker of `--processes N`: ends with its launcher (see die_with_parent)
    STATE["argv"] = argv
    STATE["launched"] = False
    STATE["said"] = False
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="loop")
    except LoopError as e:
        if "--debug" in argv:
            raise
        typer.echo(f"error: {e}", err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        _say_interrupted()
        return 130
    except typer.Abort as e:
        if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):  # typer < 0.24: Ctrl-C comes as Abort
            _say_interrupted()
            return 130
        return 1
    except OSError as e:  # a path the system refused (a file where a folder should be, no permission, ...)
        if "--debug" in argv:
            raise
        typer.echo(f"error: {_os_message(e)}", err=True)
        return 2
    except Exception as e:  # click's usage errors (typer >= 0.24 vendors click: duck-typed, not click's classes)
        try:  # typer < 0.24 raises click's own Abort
            from click.exceptions import Abort
        except ImportError:
            Abort = typer.Abort
        if isinstance(e, Abort):
            if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
                _say_interrupted()
                return 130
            return 1
        if not (callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int)):
            raise
        msg = e.format_message().strip()
        if not msg or "\n" in msg:  # `loop` alone: the help text (rich prints it itself)
            e.show()
            return e.exit_code
        ctx = getattr(e, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        typer.echo(f"error: {msg.rstrip('.')}{hint}", err=True)
        return e.exit_code
    said = STATE.get("launched") or STATE.get("said")  # the processes, or the command itself, said it already
    if rc == 130 and not said:  # typer >= 0.24 turns Ctrl-C into a silent exit code 130
        _say_interrupted()
    return rc if isinstance(rc, int) else 0


INTERRUPTED = "interrupted; run the same command again to continue (finished work is kept)"


def _say_interrupted() -> None:
    # on a terminal, Ctrl-C usually lands mid progress bar (no newline yet): start a line of its own
    lead = "\n" if sys.stderr.isatty() else ""
    typer.echo(lead + INTERRUPTED, err=True)


def _os_message(e: OSError) -> str:
    """'<strerror>: <filename>', as the system says it, on one line."""
    what = e.strerror or str(e) or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else what.splitlines()[0]


def cli() -> None:
    sys.exit(entry())
