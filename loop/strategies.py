"""What the generate phase of a round adds for the `grow` and `longtail` strategies.

- grow: img2img variations (`select.variations` each) of every image in the current set, made by unit N.
- longtail: exploration images, `select.explore_share` of the round: prompts mutated or recombined from the
  prompt file, unusual seeds, unusual CFG, and samples of the base model (unit 0). Each is marked
  `exploration: true` (and its kind) in its row's params and in its PNG.

Both are resumable: the jobs are a deterministic function of the round, so a rerun makes only what is missing.
"""

from __future__ import annotations

import random

from loop.config import LoopConfig
from loop.generate import Job, Renderer, vary
from loop.prompts import read_prompts
from loop.select import choose, is_exploration  # noqa: F401 (is_exploration re-exported)
from loop.store import Store
from loop.workspace import Workspace

EXPLORE_KINDS = ("mutate", "recombine", "seed", "cfg", "base")
# words the embedded model knows beyond the shapes, used to mutate prompts
EXTRA_WORDS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "big", "small"]


def grow_variations(ws: Workspace, store: Store, cfg: LoopConfig, n: int, log=print, unit: int | None = None) -> int:
    """Variations of each image of the current set for round n, by `unit` (default n: the unit that generates
    round n), up to `select.variations` per image."""
    if cfg.select.variations <= 0:
        return 0
    unit = n if unit is None else unit
    sc = cfg.select
    todo: dict[int, list] = {}  # variations still wanted -> the images that want that many
    budget = sc.variations_max or None
    items = sorted(choose(ws, store, sc, n), key=lambda it: -it["id"])  # the images added last first
    have = {  # made this round already: a rerun resumes
        it["id"]: sum(1 for c in store.children(it["id"]) if c["unit"] == unit and c["round"] == n) for it in items
    }
    planned = sum(have.values())  # made already this round: they count against the cap
    for item in items:
        want = sc.variations - have[item["id"]]
        if budget is not None:
            want = min(want, budget - planned)
        if want > 0:
            todo.setdefault(want, []).append(store.image(item["id"]))
            planned += want
    if planned > 500 and not sc.variations_max:
        log(f"grow: {planned} variations this round (the set grows each round); select.variations_max=N caps them")
    made = 0
    for want, parents in todo.items():  # one model load and one progress bar per group, not per image
        made += len(vary(ws, store, cfg, parents, want, unit=unit, log=log, round=n))
    log(f"grow: {made} variation(s) of the set")
    return made


def exploration_jobs(lines, cfg: LoopConfig, count: int, round: int, native: int) -> list[tuple[str, Job]]:
    """`count` exploration jobs, the same for the same round (so a rerun resumes)."""
    rng = random.Random(7919 * (round + 1))
    g = cfg.generate
    words = sorted({w for ln in lines for w in ln.text.split()} | set(EXTRA_WORDS))
    jobs = []
    for k in range(count):
        kind = EXPLORE_KINDS[k % len(EXPLORE_KINDS)]
        line = rng.choice(lines)
        prompt, seed, cfg_scale = line.text, rng.randrange(10**6, 10**9), g.cfg
        if kind == "mutate":
            parts = prompt.split()
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(words))
            prompt = " ".join(parts)
        elif kind == "recombine":
            other = rng.choice(lines).text.split()
            half = prompt.split()
            prompt = " ".join(half[: max(1, len(half) // 2)] + other[len(other) // 2 :])
        elif kind == "cfg":
            cfg_scale = rng.choice([max(0.0, g.cfg * 0.25), g.cfg * 2.5])
        jobs.append(
            (
                kind,
                Job(
                    prompt=prompt,
                    negative=g.negative_prompt,
                    seed=seed,
                    steps=g.steps,
                    cfg=cfg_scale,
                    width=g.width or native,
                    height=g.height or native,
                    lineno=line.lineno,
                ),
            )  # fmt: skip
        )
    return jobs


def explore(ws: Workspace, store: Store, cfg: LoopConfig, n: int, log=print, unit: int | None = None) -> int:
    """Exploration images for round n: explore_share of the round's images (the pass makes the rest), by `unit`
    (default n: the unit that generates round n) and, for the "base" kind, unit 0."""
    share = cfg.select.explore_share
    if share <= 0:
        return 0
    lines, _ = read_prompts(ws.prompts_path)
    passed = store.db.execute(
        "SELECT COUNT(*) FROM images WHERE round = ? AND parent_id IS NULL AND "
        "COALESCE(json_extract(params, '$.exploration'), 0) = 0",
        (n,),
    ).fetchone()[0]
    count = max(1, round(share / (1 - share) * passed))
    unit = n if unit is None else unit
    renderers = {unit: Renderer(ws, store, cfg, unit, round=n)}  # unit 0 ("base" kind) is loaded when first needed
    made, kinds = 0, {}
    for kind, job in exploration_jobs(lines, cfg, count, n, renderers[unit].native):
        u = 0 if kind == "base" else unit
        if u not in renderers:
            renderers[u] = Renderer(ws, store, cfg, u, round=n)
        r = renderers[u]
        if store.made_seeds(u, job.prompt, [job.seed]):
            continue
        image = r.render([job])[0]
        r.write(job, image, exploration=True, explore=kind)
        made += 1
        kinds[kind] = kinds.get(kind, 0) + 1
    what = ", ".join(f"{k} {kinds[k]}" for k in EXPLORE_KINDS if k in kinds)  # only the kinds made this time
    log(f"longtail: {made} exploration image(s)" + (f" ({what})" if what else ""))
    return made
