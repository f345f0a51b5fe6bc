"""The convergence benchmark's verdicts (pure functions of its figures) and its command-line checks."""

import pytest

from loop.bench.__main__ import _strategies
from loop.bench.strategies import SEED_MARGIN, STRATEGIES, targets


def figures(**over) -> dict:
    """Figures where every target is met: converge and golden triple their UR rate and keep their Vendi
    diversity, longtail has more novel hits, and both ablations end with far less seed diversity."""
    f = {}
    for name in STRATEGIES:
        f.update({f"{name}_ur_rate_unit0": 0.3, f"{name}_ur_rate_unit3": 0.9, f"{name}_diversity_unit0": 2.0,
                  f"{name}_diversity_unit3": 1.8, f"{name}_seed_diversity_unit0": 0.4,
                  f"{name}_seed_diversity_unit3": 0.2, f"{name}_novel_hits": 5})  # fmt: skip
    f["longtail_novel_hits"] = 9
    for name in ("replace", "replace_parent"):
        f[f"{name}_seed_diversity_unit3"] = 0.1
    f.update(over)
    return f


def test_all_targets_met():
    verdicts = targets(figures(), 3)
    assert len(verdicts) == 5 and all(v.endswith(": met") for v in verdicts)


def test_each_target_can_fail():
    assert "NOT met" in targets(figures(converge_ur_rate_unit3=0.5), 3)[0]  # 1.67x < 2x
    assert "NOT met" in targets(figures(golden_diversity_unit3=1.3), 3)[1]  # 65% < 70% of unit 0
    assert "NOT met" in targets(figures(longtail_novel_hits=5), 3)[2]  # a tie is not more
    # the ablation's seed diversity must end clearly below converge's: at the margin it does not count
    at_margin = figures(replace_seed_diversity_unit3=SEED_MARGIN * 0.2)
    assert "does NOT show a diversity loss" in targets(at_margin, 3)[3]
    assert "shows the diversity loss the default avoids: met" in targets(at_margin, 3)[4]  # replace_parent


def test_a_fall_after_the_peak_is_reported_beside_the_target():
    fell = targets(figures(converge_ur_rate_peak=1.0, converge_ur_rate_peak_unit=1), 3)[0]
    assert "peaked at 100.0% at unit 1 and fell back" in fell and fell.endswith(": met")  # 3x is still 3x
    kept = targets(figures(converge_ur_rate_peak=0.95, converge_ur_rate_peak_unit=2), 3)[0]
    assert "fell back" not in kept  # 5 points below the peak is noise at 64 images


def test_vendi_is_reported_but_does_not_decide_the_ablation():
    v = targets(figures(replace_diversity_unit3=2.5), 3)[3]  # Vendi rose, seed diversity fell
    assert "does NOT show a loss" in v and v.endswith("met")


def test_a_subset_checks_only_what_ran():
    f = {k: v for k, v in figures().items() if k.split("_")[0] in ("converge", "replace")}
    f = {k: v for k, v in f.items() if not k.startswith("replace_parent")}
    verdicts = targets(f, 3)
    assert [v.split(":")[0].split(" ")[0] for v in verdicts] == ["converge", "replace"]


def test_only_option():
    assert _strategies(None) is None
    assert _strategies("converge, replace") == ["converge", "replace"]
    with pytest.raises(SystemExit, match="unknown strategy convrge"):
        _strategies("convrge,replace")


def test_across_seeds_reports_the_spread_and_how_often_each_target_is_met():
    from loop.bench.strategies import across_seeds

    good = figures()
    stalled = figures(converge_ur_rate_unit3=0.45, converge_ur_rate_peak=0.9, converge_ur_rate_peak_unit=1)
    summary, rows = across_seeds({0: good, 4: stalled}, 3)
    assert summary["n_seeds"] == 2 and summary["seeds"] == "0 4"
    assert summary["converge_target_met_seeds"] == 1  # 1.5x at seed 4
    assert summary["golden_target_met_seeds"] == 2
    assert summary["replace_target_met_seeds"] == 2
    assert summary["converge_ur_ratio_min"] == 1.5 and summary["converge_ur_ratio_max"] == 3.0
    assert summary["converge_ur_ratio_median"] == 2.25
    assert summary["converge_fell_back_seeds"] == 1 and summary["golden_fell_back_seeds"] == 0
    assert summary["replace_seed_div_vs_converge_median"] == 0.5  # 0.1 against converge's 0.2
    assert "converge_seed_div_vs_converge_median" not in summary
    assert len(rows) == 2 * len(STRATEGIES)
    assert {r["seed"] for r in rows} == {0, 4}


def test_seeds_option():
    from loop.bench.__main__ import _seeds

    assert _seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(SystemExit, match="--seeds"):
            _seeds(bad)


def test_overrides_are_checked_before_the_study_starts():
    from loop.bench.__main__ import _check_overrides

    _check_overrides(["select.balance_rounds=true", "train.rank=4"])  # valid: nothing happens
    with pytest.raises(SystemExit, match="unknown config key select.balance_rnds"):
        _check_overrides(["select.balance_rnds=true"])
    with pytest.raises(SystemExit, match="train.rank"):
        _check_overrides(["train.rank=-1"])


def test_overrides_reach_every_strategy_after_its_own(tmp_path, monkeypatch):
    """run_strategy's config is the strategy's own settings, then the overrides (which win on a shared key)."""
    import loop.bench.strategies as bc

    seen = []

    def stop(ws, cfg, *a, **k):  # the first round's config is all this test needs
        seen.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bc, "run_round", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        bc.run_strategy("replace", tmp_path, 1, 2, 5, 0.0, log=lambda m: None,
                        overrides=["select.balance_rounds=true", "select.strategy=golden"])  # fmt: skip
    cfg = seen[0]
    assert cfg.select.balance_rounds and not cfg.select.accumulate  # the override and replace's own setting
    assert cfg.select.strategy == "golden"  # the override wins over the strategy's own
