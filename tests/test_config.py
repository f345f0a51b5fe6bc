import pytest

from loop.cli import entry
from loop.config import load_config
from loop.errors import LoopError


def test_defaults_then_yaml_then_overrides(ws):
    (ws.root / "configs" / "loop.yaml").write_text("train:\n  rank: 4\n  steps: 50\n")
    cfg = load_config(ws.root, ["train.steps=7"])
    assert cfg.train.rank == 4  # from the yaml
    assert cfg.train.steps == 7  # the override wins
    assert cfg.generate.steps == 20  # default


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.rnak=8"], ["unknown", "train.rnak", "8"]),
        (["train.rank=abc"], ["train.rank", "abc"]),
        (["train.rank=-3"], ["train.rank", "-3", "positive"]),
        (["generate.scheduler=warp"], ["generate.scheduler", "warp"]),
        (["select.strategy=everything"], ["select.strategy", "everything"]),
        # OmegaConf itself reads any number as a bool (2 -> true); a count given to a switch is refused
        (["select.balance_rounds=2"], ["select.balance_rounds", "2", "true or false"]),
        (["train.ema=maybe"], ["train.ema", "maybe", "true or false"]),
        (["generate.cfg=inf"], ["generate.cfg", "inf"]),
        (["generate.cfg=nan"], ["generate.cfg", "nan"]),
    ],
)
def test_bad_config_names_key_and_value(override, words):
    with pytest.raises(LoopError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_key_is_one_line_from_the_cli(ws, capsys):
    (ws.root / "configs" / "loop.yaml").write_text("generate:\n  stepz: 3\n")
    rc = entry(["run", "--round", "-w", str(ws.root)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "generate.stepz" in err and "3" in err and "loop.yaml" in err
    assert "Traceback" not in err


def test_override_without_equals_is_rejected(ws, capsys):
    rc = entry(["generate", "-w", str(ws.root), "train.rank"])
    assert rc == 2
    assert "key=value" in capsys.readouterr().err


def test_switches_take_yaml_words_and_refuse_counts(ws):
    cfg = load_config(None, ["train.ema=yes", "select.balance_rounds=1"])
    assert cfg.train.ema is True and cfg.select.balance_rounds is True
    assert load_config(None, ["train.ema=off"]).train.ema is False
    (ws.root / "configs" / "loop.yaml").write_text("select:\n  balance_rounds: 3\n")
    with pytest.raises(LoopError, match=r"select.balance_rounds=3 \(from .*loop.yaml\): not true or false"):
        load_config(ws.root)


def test_a_misspelt_section_gets_its_name_suggested(tmp_path):
    from loop.config import load_config
    from loop.errors import LoopError

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "loop.yaml").write_text("trian:\n  rank: 4\n")
    with pytest.raises(LoopError, match="unknown config key trian .*did you mean train\\?"):
        load_config(tmp_path)
