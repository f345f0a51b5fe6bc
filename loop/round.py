"""A round: unit N generates, the images are rated, a training set is selected, and unit N+1 is trained and
gated.

    loop run --round [N] [--auto-rate]

Round N generates with the unit that generates (store.generating_unit(N)): unit N once the promotion gate passed
it, else the newest unit before it that passed (loop/gate.py); the rounds keep their numbers either way. The
train phase ends with the gate's verdict on the unit it made; a unit killed between its training and its verdict
is gated by the next `loop run --round` before anything else.

Every phase is recorded in loop.db. Re-running continues with the first unfinished phase and never redoes a
finished one; an interrupted phase resumes (generation skips images it already made, training starts again
from its selection). Without --auto-rate the round stops at the rate phase and says what to do.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field

from loop.config import LoopConfig
from loop.gate import gate_unit
from loop.generate import generate
from loop.rate.auto import auto_rate
from loop.select import select
from loop.store import (  # noqa: F401 (check_can_finish_rating, finish_rating: re-exported)
    PHASES,
    Store,
    check_can_finish_rating,
    finish_rating,
    raise_missing_unit,
    rating_summary,
)
from loop.strategies import explore, grow_variations
from loop.train import train_lora
from loop.workspace import Workspace, recover


@dataclass
class RoundResult:
    round: int
    status: str  # "done" | "waiting"
    ran: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    message: str = ""


def run_round(
    ws: Workspace,
    cfg: LoopConfig,
    n: int | None = None,
    auto_rate_: bool = False,
    log=print,
    stop_after: str | None = None,
) -> RoundResult:
    """Advance round n (default: the current unit) through its unfinished phases."""
    with ws.store() as store:
        recover(ws, store, log)
        store.ensure_base_unit(cfg.model.base)
        if n is None:
            n = store.current_unit()
            if n > 0 and _unit_made_round_open(store, n - 1):
                n -= 1  # unit n exists but round n-1 is not closed: close that round first
        if store.unit(n) is None:
            raise_missing_unit(store, n)
        check_from_parent(store, cfg, n)  # now, not after generating and rating a whole round
        if n > 0 and store.unit(n)["promoted"] is None:  # made by `loop train`, killed before its gate's verdict
            gate_unit(ws, store, cfg, n, log)
        store.start_round(n)
        result = RoundResult(round=n, status="done")
        for phase in PHASES:
            if store.phase_done(n, phase):
                continue
            t0 = time.time()
            store.begin_phase(n, phase)
            if phase == "generate" and store.phase_done(n, "rate"):
                # the ratings were closed on images `loop generate` made (the ring buffer) before this round's own
                # generate phase ran: images made now would go to select and train with nobody having seen them
                detail = {"made": 0, "skipped": "rating was closed already"}
                log(f"generate: skipped; round {n}'s rating was closed already, on the images it has")
            elif phase == "generate":
                g = store.generating_unit(n)
                if g != n:
                    log(f"generate: unit {n} was refused by the promotion gate; round {n} generates with unit {g}")
                detail = generate(ws, store, cfg, unit=g, round=n, log=log)
                detail["unit"] = g
                log(f"generate: {detail['made']} new image(s) in {ws.rel(ws.generations(g))}")
                if cfg.select.strategy == "grow":
                    detail["variations"] = grow_variations(ws, store, cfg, n, log, unit=g)
                elif cfg.select.strategy == "longtail":
                    detail["exploration"] = explore(ws, store, cfg, n, log, unit=g)
            elif phase == "rate":
                if auto_rate_:
                    detail = auto_rate(ws, store, cfg.rate, n, log=log)
                    detail["summary"] = rating_summary(store, n)
                    log(f"rate (scripted, {cfg.rate.preference}): {detail['summary']}")
                else:
                    result.status = "waiting"
                    result.message = (
                        f"Round {n} needs your ratings: {rating_summary(store, n)}. Run `loop rate` and open "
                        f"http://127.0.0.1:7860 (one key per image), press Finish rating, then run "
                        f"`loop run --round` again. (`loop rate --auto`: the scripted rater, for demos.)"
                    )
                    return result
            elif store.unit(n + 1) is not None:
                # select or train, with unit n+1 already made: killed after the unit was saved (its row is
                # written after its files, so it is complete), or trained by `loop train` while this round was
                # open. Recorded as done; selecting again now would take images made since, and disagree with
                # the manifest of what the unit learnt from
                shutil.rmtree(ws.checkpoint(n + 1) / ".training", ignore_errors=True)
                manifest = json.loads(store.unit(n + 1)["manifest"] or "{}")
                if phase == "select":
                    detail = {"images": len(manifest.get("images", [])), "strategy": manifest.get("strategy")}
                else:
                    detail = {"unit": n + 1, "final_loss": manifest.get("final_loss"), "steps": manifest.get("steps")}
                log(f"{phase}: unit {n + 1} was already made; recorded as done for round {n}")
                if phase == "train" and store.unit(n + 1)["promoted"] is None:  # killed before the gate's verdict
                    gate_unit(ws, store, cfg, n + 1, log)
                if phase == "train":
                    detail["promoted"] = store.unit(n + 1)["promoted"] == 1
            elif phase == "select":
                items = select(ws, store, cfg.select, n)
                detail = {"images": len(items), "strategy": cfg.select.strategy}
                log(f"select ({cfg.select.strategy}): {len(items)} image(s) for unit {n + 1}")
            else:
                manifest = train_lora(ws, store, cfg, parent=n, log=log)
                detail = {"unit": n + 1, "final_loss": manifest.get("final_loss"), "steps": manifest.get("steps")}
                log(f"train: unit {n + 1} saved to {ws.rel(ws.checkpoint(n + 1))} (loss {detail['final_loss']})")
                detail["promoted"] = gate_unit(ws, store, cfg, n + 1, log)["passed"]
            store.finish_phase(n, phase, detail)
            result.ran.append(phase)
            result.seconds[phase] = round(time.time() - t0, 2)
            if stop_after == phase:
                break
        return result


def check_from_parent(store: Store, cfg: LoopConfig, n: int) -> None:
    """train.start=from_parent continues unit n's adapter, so it needs that adapter's method and shape: a
    LoopError naming what differs, before the round starts (training would find it only at its end)."""
    from loop.errors import LoopError

    if cfg.train.start != "from_parent" or n == 0 or store.unit(n + 1) is not None:
        return
    parent = (json.loads(store.unit(n)["manifest"] or "{}").get("config") or {}).get("train") or {}
    tc = cfg.train
    keys = ("method", "rank", "target_modules", "text_encoder_lora")
    differ = [k for k in keys if k in parent and parent[k] != getattr(tc, k)]
    if tc.method == "custom_diffusion":  # its modules are fixed (attn2.to_k, attn2.to_v)
        differ = [k for k in differ if k != "target_modules"]
    if differ:
        theirs = " ".join(f"train.{k}={_plain_value(parent[k])}" for k in differ)
        ours = ", ".join(f"{k} {_plain_value(getattr(tc, k))}" for k in differ)
        raise LoopError(
            f"train.start=from_parent continues unit {n}'s adapter, made with {theirs} (asked: {ours}); "
            f"give {theirs}, or train.start=from_base"
        )


def _plain_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _unit_made_round_open(store: Store, n: int) -> bool:
    """Unit n+1 exists while round n, which `loop run --round` began, has phases not recorded as done."""
    phases = store.phases(n)
    if store.unit(n + 1) is None or not phases:
        return False
    return not all(p in phases and phases[p]["status"] == "done" for p in PHASES)
