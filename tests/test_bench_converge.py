"""The taste study's verdicts and merge (pure functions of its figures): python -m loop.bench converge."""

import json

import pytest

from loop.bench import converge


def _run(taste="small_dark", seed=0, ur=(0.2, 0.5, 0.5, 0.6), kept=0.9, gen=(0, 1, 2, 3)):
    """A run as run_one returns it, reduced to what figures_of reads."""
    spreads = {a: 1.0 for a in ("hue", "position", "size", "background")}
    measured = {u: {"ur_rate": r, "spread": dict(spreads)} for u, r in enumerate(ur)}
    for a in converge.indifferent(taste):
        measured[len(ur) - 1]["spread"][a] = kept
    return {"taste": taste, "strategy": "golden", "seed": seed, "generating": list(gen), "gates": [],
            "measured": measured, "coverage": {u: (0.9, 0.5) for u in range(1, len(ur))}, "seconds": 60}  # fmt: skip


def test_a_run_meets_its_targets_only_when_all_three_hold():
    assert converge.figures_of(_run())["met"]
    assert not converge.figures_of(_run(ur=(0.3, 0.5, 0.5, 0.55)))["met"]  # 1.83x < 2x
    f = converge.figures_of(_run(kept=0.7))
    assert not f["met"] and f["indifferent_kept"] == {"hue": 0.7, "position": 0.7}  # what small_dark ignores
    f = converge.figures_of(_run(ur=(0.2, 0.8, 0.6, 0.65)))  # unit 2 fell 20 points below unit 1
    assert not f["met"] and f["max_fall"] == pytest.approx(0.2) and f["peak"] == 0.8
    # a refused unit 3 (the gate kept unit 2): its own UR rate does not count, the generating unit's does
    f = converge.figures_of(_run(ur=(0.2, 0.5, 0.5, 0.1), gen=(0, 1, 2, 2)))
    assert f["final_unit"] == 2 and f["ur_final"] == 0.5


def test_the_prompt_that_lost_an_ignored_attribute_is_named_even_when_the_mean_passes():
    run = _run(kept=0.9)  # small_dark ignores hue and position; the mean over the prompts keeps 90%: met
    by_prompt = {"a circle": 1.0, "a square": 1.0, "a triangle": 1.0, "a ring": 1.0}
    for m in run["measured"].values():
        m["spread_by_prompt"] = {a: dict(by_prompt) for a in ("hue", "position", "size", "background")}
    last = run["measured"][3]["spread_by_prompt"]
    last["hue"].update({"a triangle": 0.4, "a ring": 1.2})  # one prompt lost its colours, another gained some
    last["position"]["a ring"] = 0.0  # a spread of 0 is a figure (one position), not a missing one
    f = converge.figures_of(run)
    assert f["met"]
    assert f["worst_prompt_kept"] == {"hue": {"prompt": "a triangle", "share": 0.4},
                                      "position": {"prompt": "a ring", "share": 0.0}}  # fmt: skip
    assert "worst_prompt_kept" in json.loads(json.dumps(f))  # the part is JSON
    kept = converge.run_row(f)["kept (indifferent)"]
    assert kept == "hue 90% (least: a triangle 40%), position 90% (least: a ring 0%)"
    assert converge.figures_of(_run())["worst_prompt_kept"] == {}  # parts measured before it: no figure


def test_the_summary_counts_only_todays_defaults_and_every_taste_and_strategy(tmp_path):
    good, bad = converge.figures_of(_run()), converge.figures_of(_run(seed=1, kept=0.5))
    today = {"overrides": "", "defaults": converge.defaults_fingerprint()}
    parts = {
        "a": {"settings": today, "runs": [good, bad]},
        "old": {"settings": {"overrides": "", "defaults": "0ld"}, "runs": [good, good]},  # older defaults
        "abl": {"settings": {"overrides": "train.objective=supervised"}, "runs": [good]},
    }
    flat, rows = converge.summary(parts)
    assert flat["small_dark_golden_seeds"] == 2 and flat["small_dark_golden_seeds_met"] == 1
    assert flat["warm_converge_seeds"] == 0 and flat["worst_seeds_met"] == 0  # a pair never run counts as 0
    assert len(rows) == 2
    # the report writes both files and keeps the prose around its section
    out = tmp_path / "docs"
    (out / "bench").mkdir(parents=True)
    for name, part in parts.items():
        (out / "bench" / f"converge_{name}.json").write_text(json.dumps({**part, "minutes": 1}))
    (out / "convergence.md").write_text("# prose before\n\n<!-- converge:generated -->\nold\n"
                                        "<!-- /converge:generated -->\n\nprose after\n")  # fmt: skip
    doc = converge.report(str(out))
    assert doc["small_dark_golden_seeds_met"] == 1
    assert json.loads((out / "bench" / "converge.json").read_text())["worst_seeds_met"] == 0
    md = (out / "convergence.md").read_text()
    assert md.startswith("# prose before") and md.rstrip().endswith("prose after") and "\nold\n" not in md
    assert "train.objective=supervised" in md and (out / "img" / "converge_tradeoff.png").exists()
    assert "img/converge_units.png" in md and (out / "img" / "converge_units.png").exists()


def test_the_command_line_refuses_an_unknown_taste_before_it_starts():
    from loop.bench.__main__ import main

    with pytest.raises(SystemExit, match="unknown sweet"):
        main(["converge", "--tastes", "warm,sweet"])


def test_every_unit_after_unit_0_is_a_point_of_its_taste_in_its_settings_family():
    run = converge.figures_of(_run(ur=(0.2, 0.5, 0.5, 0.6), kept=0.7))
    parts = {
        "a": {"settings": {"overrides": "", "defaults": converge.defaults_fingerprint()}, "runs": [run]},
        "p": {"settings": {"overrides": "train.start=from_parent train.dpo_reference=parent"}, "runs": [run]},
    }
    points = converge.unit_points(parts)["small_dark"]
    assert len(points) == 6  # units 1-3 of each part's run; unit 0 is the yardstick, not a point
    assert {f for _, _, f in points} == {"today's defaults", "dpo against the parent"}
    # unit 3: its UR over unit 0's and the least-kept of the attributes small_dark ignores
    assert (0.7, pytest.approx(3.0), "today's defaults") in points
    assert converge.unit_plot(converge.unit_points(parts)).startswith(b"\x89PNG")


def test_bench_fits_units_are_points_at_their_least_kept_indifferent_spread():
    entries = [
        {"taste": "centred_big", "ur": [0.25, 0.5], "kept": {"hue": 0.8, "background": 0.9, "size": 0.5}},
        {"taste": "small_dark", "ur": [0.2, 0.3], "kept": {"hue": 0.95}},  # position missing: no point
    ]
    points = converge.control_points(entries)
    assert points == {"centred_big": [(0.8, 2.0)]}  # size is what centred_big scores, not an indifferent attribute
    run = converge.figures_of(_run(ur=(0.2, 0.5, 0.5, 0.6), kept=0.7))
    parts = {"a": {"settings": {"overrides": "", "defaults": converge.defaults_fingerprint()}, "runs": [run]}}
    assert converge.unit_plot(converge.unit_points(parts), points).startswith(b"\x89PNG")
