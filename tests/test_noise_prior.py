"""train.noise_prior: a unit draws from initial noises moved towards where the base draws liked pictures."""

import json

import numpy as np
import pytest
import torch

from loop import noise_prior
from loop.compare import render_unit
from loop.config import load_config
from loop.errors import LoopError
from loop.interop import export_lora
from loop.round import run_round
from loop.train import train_unit

RATED = ["generate.images_per_prompt=16", "generate.batch_size=16", "generate.steps=3", "train.steps=4",
         "train.batch_size=4", "rate.preference=warm", "rate.cutoffs=[30,0,-30,-60]"]  # fmt: skip


def test_the_initial_noise_is_the_one_diffusers_draws_for_each_seed():
    from diffusers.utils.torch_utils import randn_tensor

    seeds = [3, 500_000, 7]
    ours = noise_prior.initial_noise(seeds, (4, 16, 16))
    theirs = randn_tensor((3, 4, 16, 16), generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
    assert torch.equal(ours, theirs)


def test_the_direction_is_where_the_liked_noises_lie_and_the_shift_is_as_long_as_asked():
    z = noise_prior.initial_noise(list(range(400)), (4, 16, 16))
    feats = noise_prior.block_means(z, 4)
    assert feats.shape == (400, 64) and 0.8 < feats.std() < 1.2  # unit variance, whatever the latent's size
    liked = feats[:, 5] - feats[:, 40] > 0.5  # liked: one block of channel 0 high and one of channel 2 low
    prior = noise_prior.fit(z, list(liked), 4)
    d = prior["direction"].flatten()
    assert d.shape == (64,) and abs(float(d.norm()) - 1) < 1e-5
    assert d[5] > 0.5 and d[40] < -0.5 and d.abs().argsort()[-2:].tolist() in ([5, 40], [40, 5])
    assert prior["liked"] == int(liked.sum()) and prior["accuracy"] > 0.8
    for h in (16, 32):  # the same prior at any latent size: its norm is the strength, in the liked blocks
        s = noise_prior.shift(prior["direction"], 3.0, h, h)
        assert s.shape == (4, h, h) and abs(float(s.norm()) - 3.0) < 1e-4
        moved = noise_prior.block_means(s[None], 4)[0]
        assert moved[5] > 1.5 and moved[40] < -1.5
    with pytest.raises(ValueError, match="both kinds"):
        noise_prior.fit(z, [True] * 400, 4)
    odd = noise_prior.shift(prior["direction"], 1.5, 18, 20)  # a size the grid does not divide: as long
    assert odd.shape == (4, 18, 20) and abs(float(odd.norm()) - 1.5) < 1e-4


def test_a_damaged_prior_file_is_one_clear_message(tmp_path):
    (tmp_path / noise_prior.FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(LoopError, match="not a readable noise prior.*delete it"):
        noise_prior.load(tmp_path)
    assert noise_prior.load(tmp_path / "elsewhere") is None


def test_a_wrong_prior_setting_is_one_clear_message(tmp_path):
    with pytest.raises(LoopError, match="train.noise_prior_pool"):
        load_config(tmp_path, ["train.noise_prior=3", "train.noise_prior_pool=1"])
    with pytest.raises(LoopError, match="train.noise_prior"):
        load_config(tmp_path, ["train.noise_prior=-1"])


@pytest.mark.slow
def test_a_unit_with_a_prior_draws_its_pictures_from_moved_noises(ws):
    probes = [("a warm shape", 500_000 + k) for k in range(4)]
    cfg = load_config(ws.root, RATED + ["train.taste_pool=0", "train.noise_prior=4", "train.noise_prior_pool=12"])
    run_round(ws, cfg, auto_rate_=True, log=lambda m: None, stop_after="select")
    said = []
    with ws.store() as store:
        train_unit(ws, store, cfg, parent=0, log=said.append)
    out = ws.checkpoint(1)
    manifest = json.loads((out / "manifest.json").read_text())["noise_prior"]
    assert manifest["strength"] == 4 and manifest["pictures"] == 24 and 0 < manifest["liked"] < 24
    assert any(m.startswith(f"noise prior: {manifest['liked']} of 24 base pictures") for m in said), said
    assert any(m.startswith("noise prior: drawing 24 picture(s)") for m in said), said
    direction, strength = noise_prior.load(out)
    assert direction.shape == (4, 4, 4) and strength == 4.0
    with_prior = render_unit(ws, cfg, 1, probes)
    # other tools read the adapter alone: an export says the prior stays behind
    exported = []
    with ws.store() as store:
        export_lora(ws, store, 1, "kohya", ws.root / "unit1.safetensors", log=exported.append)
    assert any("noise prior" in m and "other tools do not read" in m for m in exported), exported

    # the same adapter without its prior draws other pictures from the same seeds, and the prior's file goes
    (out / noise_prior.FILE).rename(out / "kept")
    without = render_unit(ws, cfg, 1, probes)
    assert all(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 1 for a, b in zip(with_prior, without))
    assert noise_prior.load(out) is None
