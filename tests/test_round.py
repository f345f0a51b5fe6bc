import json

import numpy as np
import pytest
import torch
from conftest import FAST

import loop.generate
from loop.cli import entry
from loop.config import TIERS, ModelConfig
from loop.models import load_unit
from loop.round import run_round
from loop.workspace import TMP_MARK, sha256_file

quiet = lambda m: None  # noqa: E731


@pytest.mark.slow
def test_whole_round_leaves_promised_files_and_rows(ws, cfg):
    res = run_round(ws, cfg, auto_rate_=True, log=quiet)
    assert res.status == "done" and res.ran == ["generate", "rate", "select", "train"]
    unit = ws.checkpoint(1)
    for name in ("pytorch_lora_weights.safetensors", "manifest.json", "config.yaml", "selection.json"):
        assert (unit / name).is_file(), name
    manifest = json.loads((unit / "manifest.json").read_text())
    assert manifest["parent"] == 0 and manifest["method"] == "lora" and manifest["strategy"] == "golden"
    assert manifest["base_model"] == "embedded" and manifest["steps"] == 8
    assert np.isfinite(manifest["final_loss"]) and manifest["duration_s"] > 0
    assert manifest["config"]["train"]["steps"] == 8
    assert "steps: 8" in (unit / "config.yaml").read_text()
    with ws.store() as store:
        rows = store.images(round=0)
        assert len(rows) == 8 and all(r["tier"] in TIERS for r in rows)
        ur = {r["sha256"] for r in rows if r["tier"] == "UR"}
        assert {i["sha256"] for i in manifest["images"]} == ur and ur
        assert len(list((ws.root / "golden").glob("*.png"))) == len(ur)  # UR collected, originals kept
        for r in rows:
            assert sha256_file(ws.root / r["path"]) == r["sha256"]
        assert all(store.phase_done(0, p) for p in ("generate", "rate", "select", "train"))
        assert store.current_unit() == 1 and store.unit(1)["parent"] == 0
    assert len(list(ws.generations(0).glob("*.png"))) == 8
    assert not list(ws.root.rglob(f"*{TMP_MARK}*"))

    # a fresh pipeline that loads unit 1 makes different images from unit 0 at the same seeds
    def img(unit):
        pipe = load_unit(ModelConfig(), ws.checkpoint(unit), unit)
        g = torch.Generator().manual_seed(0)
        return pipe("a circle", num_inference_steps=4, generator=g, output_type="np").images[0]

    assert np.abs(img(1) - img(0)).mean() > 1e-3


@pytest.mark.slow
def test_interrupted_round_resumes_without_redoing(ws, cfg, monkeypatch):
    # 1. a crash in the middle of generation: 3 images written, then Ctrl-C
    real, calls = loop.generate.png_bytes, {"n": 0}

    def flaky(image, meta):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(image, meta)

    monkeypatch.setattr(loop.generate, "png_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_round(ws, cfg, auto_rate_=True, log=quiet)
    monkeypatch.setattr(loop.generate, "png_bytes", real)
    with ws.store() as store:
        assert len(store.images()) == 3 and not store.phase_done(0, "generate")

    # 2. stop between phases: generate finishes (only the 5 missing images), then stop
    res = run_round(ws, cfg, auto_rate_=True, log=quiet, stop_after="rate")
    assert res.ran == ["generate", "rate"]
    with ws.store() as store:
        assert len(store.images()) == 8
        done_at = {p: store.phase(0, p)["finished_at"] for p in ("generate", "rate")}
        n_ratings = store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]

    # 3. the re-run starts at select; nothing finished is redone
    res = run_round(ws, cfg, auto_rate_=True, log=quiet)
    assert res.ran == ["select", "train"]
    with ws.store() as store:
        assert {p: store.phase(0, p)["finished_at"] for p in ("generate", "rate")} == done_at
        assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == n_ratings
        assert len(store.images()) == 8
    assert len(list(ws.generations(0).glob("*.png"))) == 8
    assert run_round(ws, cfg, 0, log=quiet).ran == []


@pytest.mark.slow
def test_round_waits_for_ratings_and_says_what_to_do(ws, capsys):
    rc = entry(["run", "--round", "-w", str(ws.root), *FAST])
    out = capsys.readouterr().out
    assert rc == 3
    assert "loop rate" in out and "0/8 rated" in out
    assert entry(["rate", "--auto", "-w", str(ws.root), *FAST]) == 0
    assert entry(["run", "--round", "-w", str(ws.root), *FAST]) == 0
    assert (ws.checkpoint(1) / "pytorch_lora_weights.safetensors").exists()
    capsys.readouterr()
    assert entry(["status", "-w", str(ws.root)]) == 0
    status = capsys.readouterr().out
    assert "lora" in status and "round 1: generate not started" in status


def test_empty_selection_says_counts_and_next_step(ws, cfg, capsys):
    from loop.errors import LoopError
    from loop.select import select

    with ws.store() as store:
        i = store.add_image(sha256="a" * 64, path="generations/unit_000/a.png", prompt="p", unit=0, round=0)
        store.rate(i, "SSR", "alice")
        with pytest.raises(LoopError) as e:
            select(ws, store, cfg.select, 0)
    msg = str(e.value)
    assert "SSR 1" in msg and "UR 0" in msg and "loop rate" in msg and "\n" not in msg


def test_golden_takes_only_ur_from_every_round(ws, cfg):
    from loop.select import select

    with ws.store() as store:
        ids = [
            store.add_image(sha256=f"{k:064x}", path=f"g/{k}.png", prompt=f"p{k}", unit=k % 2, round=k % 2)
            for k in range(6)
        ]
        for i, t in zip(ids, ["UR", "SSR", "UR", "N", "R", "UR"]):
            store.rate(i, t, "alice")
        store.rate(ids[2], "SSR", "bob")  # a later decision demotes image 2
        items = select(ws, store, cfg.select, 1)
    assert sorted(it["id"] for it in items) == [ids[0], ids[5]]
    assert {it["caption"] for it in items} == {"p0", "p5"}


def test_scripted_rater_noise_follows_the_pixels_not_the_file(tmp_path):
    """Two files with the same picture and different metadata (another strategy, unit or round) get the same
    score; another picture gets another noise draw."""
    from PIL import Image, PngImagePlugin

    from loop.config import load_config
    from loop.images import load_rgb, preference_score
    from loop.rate.auto import score

    rc = load_config(None, ["rate.noise=10"]).rate
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    paths = []
    for strategy in ("converge", "golden"):
        info = PngImagePlugin.PngInfo()
        info.add_text("loop", f'{{"strategy": "{strategy}"}}')
        paths.append(tmp_path / f"{strategy}.png")
        Image.fromarray(rgb).save(paths[-1], pnginfo=info)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    a, b = (score(load_rgb(p), rc) for p in paths)
    assert a == b and a != preference_score(rgb, "warm")  # the same noise, and there is noise
    other = rgb.copy()
    other[0, 0, 1] ^= 1  # green does not enter the warm score: only the noise can change
    assert preference_score(other, "warm") == preference_score(rgb, "warm")
    assert score(other, rc) != a
    assert score(rgb, load_config(None, ["rate.noise=0"]).rate) == preference_score(rgb, "warm")


@pytest.mark.slow
def test_a_unit_trained_while_its_round_was_open_closes_that_round(ws, cfg):
    # killed mid-select (selection.json written, the phase not recorded), then `loop train`, then `loop run
    # --round`: it used to start round 1 with round 0 left open, and a later `run --round 0` selected again
    # (taking round 1's images) and rewrote the selection next to a manifest that disagreed with it
    from loop.train import train_unit

    res = run_round(ws, cfg, auto_rate_=True, log=quiet, stop_after="select")
    assert res.ran == ["generate", "rate", "select"]
    with ws.store() as store:
        store.db.execute("UPDATE phases SET status = 'running' WHERE round = 0 AND phase = 'select'")
        store.db.commit()
        train_unit(ws, store, cfg, parent=0, log=quiet)  # what `loop train` does
    selection = (ws.checkpoint(1) / "selection.json").read_bytes()
    logs = []
    res = run_round(ws, cfg, auto_rate_=True, log=logs.append)
    assert res.round == 0 and res.ran == ["select", "train"]
    assert any("unit 1 was already made" in m for m in logs)
    with ws.store() as store:
        assert all(store.phase_done(0, p) for p in ("generate", "rate", "select", "train"))
        assert store.db.execute("SELECT closed_at FROM rounds WHERE round = 0").fetchone()[0] is not None
    assert (ws.checkpoint(1) / "selection.json").read_bytes() == selection  # not selected again
    assert run_round(ws, cfg, 0, log=quiet).ran == []
    assert run_round(ws, cfg, auto_rate_=True, log=quiet, stop_after="generate").round == 1  # on to round 1


@pytest.mark.slow
def test_ratings_closed_on_ring_buffer_images_are_not_followed_by_more_images(ws, cfg):
    # `loop generate` (the ring) made round 0's images, the person rated them and closed the ratings; `loop run
    # --round` then generated a round's worth more and trained past them, unseen
    from loop.generate import generate_ring
    from loop.rate.auto import auto_rate
    from loop.round import finish_rating

    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=4, log=quiet)
        auto_rate(ws, store, cfg.rate, 0, log=quiet)
        finish_rating(store, 0)
    logs = []
    res = run_round(ws, cfg, log=logs.append)
    assert res.ran == ["generate", "select", "train"]
    assert any("generate: skipped" in m for m in logs)
    with ws.store() as store:
        assert len(store.images(round=0)) == 4  # no more
        assert store.phase_done(0, "train")
