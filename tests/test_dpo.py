"""Issue 22: train.objective=dpo (Diffusion-DPO on pairs of rated images of the same prompt)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from loop.config import ModelConfig, load_config
from loop.errors import LoopError
from loop.generate import generate_ring
from loop.models import load_base
from loop.objectives import diffusion_dpo_loss, matched_pairs, per_item_error, preference_pairs
from loop.train import TrainData, add_lora, fit, preference_items, train_unit

QUIET = dict(log=lambda m: None)


def test_the_loss_prefers_a_model_that_denoises_the_winner_better_than_the_reference_does():
    ref_w, ref_l = torch.tensor([1.0]), torch.tensor([1.0])
    better, _ = diffusion_dpo_loss(torch.tensor([0.9]), torch.tensor([1.1]), ref_w, ref_l, beta=10)
    same, acc_same = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([1.0]), ref_w, ref_l, beta=10)
    worse, acc = diffusion_dpo_loss(torch.tensor([1.1]), torch.tensor([0.9]), ref_w, ref_l, beta=10)
    assert better < same < worse
    assert same == pytest.approx(torch.log(torch.tensor(2.0)).item())  # at the reference: -log sigmoid(0)
    assert acc.item() == 0 and acc_same.item() == 0
    # an attribute winners and losers share moves both errors alike: no gradient towards either
    err = torch.tensor([0.8, 0.8], requires_grad=True)
    loss, _ = diffusion_dpo_loss(err[:1], err[1:], ref_w, ref_l, beta=10)
    loss.backward()
    assert err.grad.sum().abs() < 1e-6


def test_pairs_are_images_of_one_prompt_far_enough_apart():
    rows = [
        {"prompt": "a", "tier": "UR"}, {"prompt": "a", "tier": "SSR"}, {"prompt": "a", "tier": "SR"},
        {"prompt": "a", "tier": "N"}, {"prompt": "b", "tier": "N"}, {"prompt": "a", "tier": None},
    ]  # fmt: skip
    assert sorted(preference_pairs(rows, 2)) == [(0, 2), (0, 3), (1, 3), (2, 3)]
    assert sorted(preference_pairs(rows, 1)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert preference_pairs(rows, 5) == []  # no two tiers are 5 apart
    # golden selected only the UR image: it is the only winner, SSR and SR can only lose
    rows = [dict(r, winner=r["tier"] == "UR") for r in rows]
    assert sorted(preference_pairs(rows, 2)) == [(0, 2), (0, 3)]


def test_matched_pairs_keep_each_winners_nearest_losers():
    # two winners; three losers, each near one winner or far from both
    lat = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.5, 0.0], [9.0, 10.0], [5.0, 5.0]]).reshape(5, 2, 1, 1)
    pairs = [(a, b) for a in (0, 1) for b in (2, 3, 4)]
    assert matched_pairs(pairs, lat, 0) == pairs  # 0: every pair
    assert sorted(matched_pairs(pairs, lat, 1)) == [(0, 2), (1, 3)]
    assert sorted(matched_pairs(pairs, lat, 2)) == [(0, 2), (0, 4), (1, 3), (1, 4)]
    assert sorted(matched_pairs(pairs, lat, 9)) == sorted(pairs)  # k beyond the losers: all of them


def _pair_data(pipe, n=4):
    """n winners and n losers of one prompt: two different families of latents, paired winner i with loser i."""
    g = torch.Generator().manual_seed(0)
    winners = torch.randn(n, 4, 16, 16, generator=g) * 0.5 + 1.0
    losers = torch.randn(n, 4, 16, 16, generator=g) * 0.5 - 1.0
    ids = pipe.tokenizer(["a circle"] * 2 * n + [""], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        embeds = pipe.text_encoder(ids.input_ids)[0]
    data = TrainData(latents=torch.cat([winners, losers]), embeds=embeds[:-1])
    data.empty = data.empty_embed = embeds[-1]
    data.pairs = torch.tensor([[i, n + i] for i in range(n)])
    return data


@torch.no_grad()
def _errors(unet, data, noise_sched, adapters: bool):
    """Mean denoising error on the winners and on the losers, at fixed noise and timesteps."""
    g = torch.Generator().manual_seed(123)
    x0 = data.latents.repeat(4, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(100, 900, (len(x0),), generator=g)
    xt = noise_sched.add_noise(x0, noise, t)
    (unet.enable_adapters if adapters else unet.disable_adapters)()
    try:
        err = per_item_error(unet(xt, t, encoder_hidden_states=data.embeds.repeat(4, 1, 1)).sample, noise)
    finally:
        unet.enable_adapters()
    n = len(data.latents) // 2
    err = err.view(4, 2 * n)
    return err[:, :n].mean().item(), err[:, n:].mean().item()


def test_dpo_changes_only_adapter_weights_and_moves_towards_winners_and_away_from_losers():
    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.objective=dpo", "train.steps=40", "train.lr=5e-3", "train.batch_size=8",
                            "train.dpo_beta=500"]).train  # fmt: skip
    unet = add_lora(pipe.unet, tc)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    data = _pair_data(pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    ref_w, ref_l = _errors(unet, data, sched, adapters=False)
    unet, _, loss = fit(unet, data, sched, tc, Accelerator(cpu=True), **QUIET)
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)[:5]
    unet.eval()
    new_w, new_l = _errors(unet, data, sched, adapters=True)
    # the unit denoises the winners better than the reference (the adapter switched off) does, the losers worse
    assert new_w < ref_w, (new_w, ref_w)
    assert new_l > ref_l, (new_l, ref_l)


def _rated_round(ws, cfg, tiers):
    """Round 0's images of the base model, rated with `tiers` in turn."""
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=len(tiers), **QUIET)
        rows = store.images(unit=0)
        store.rate_many([(r["id"], t) for r, t in zip(rows, tiers)], rater="test")
        items = [{"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"], "tier": "UR"}
                 for r, t in zip(rows, tiers) if t == "UR"]  # fmt: skip
    sel = ws.checkpoint(1) / "selection.json"
    sel.parent.mkdir(parents=True, exist_ok=True)
    import json

    sel.write_text(json.dumps({"images": items}))
    return items


def test_dpo_trains_a_unit_on_every_rated_pair_and_says_so_in_the_manifest(ws):
    import json

    cfg = load_config(ws.root, ["generate.steps=3", "generate.images_per_prompt=4", "train.objective=dpo",
                                "train.steps=4", "train.batch_size=4"])  # fmt: skip
    selection = _rated_round(ws, cfg, ["UR", "N", "SR", "R", "UR", "N", "SSR", "SR"])
    with ws.store() as store:
        items = preference_items(store, cfg, 0, selection)
        # the selection's UR images win; the SSR image (golden did not select it) may only lose, and it is
        # one tier from UR: it makes no pair
        assert {it["id"] for it in items if it["winner"]} == {it["id"] for it in selection}
        assert "SSR" not in {it["tier"] for it in items}
        train_unit(ws, store, cfg, parent=0, **QUIET)
    manifest = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert manifest["objective"] == "dpo" and manifest["pairs"] > 0
    # what it learnt towards (what the gate and compare measure coverage against) is the selection, not the losers
    assert {it["id"] for it in manifest["images"]} == {it["id"] for it in selection}
    assert manifest["losers"] and {it["tier"] for it in manifest["losers"]} <= {"SR", "R", "N"}
    assert manifest["left_out"] == [] and manifest["unpaired"] == 0


def test_dpo_without_a_pair_trains_supervised_and_says_why(ws):
    import json

    cfg = load_config(ws.root, ["generate.steps=3", "train.objective=dpo", "train.steps=2"])
    selection = _rated_round(ws, cfg, ["UR", "SSR", "UR", "SSR"])  # no two images of one prompt 2 tiers apart
    said = []
    with ws.store() as store:
        assert preference_items(store, cfg, 0, selection) == []
        train_unit(ws, store, cfg, parent=0, log=said.append)
    assert any("dpo_min_gap" in line and "trains supervised" in line for line in said), said
    manifest = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert manifest["objective"] == "supervised" and "dpo_min_gap" in manifest["objective_note"]
    assert {it["id"] for it in manifest["images"]} == {it["id"] for it in selection} and manifest["pairs"] == 0


def test_kill_9_mid_dpo_training_then_run_again_resumes(ws):
    cfg = load_config(ws.root, ["generate.steps=3"])
    _rated_round(ws, cfg, ["UR", "N", "SR", "R", "UR", "N", "SSR", "SR"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "loop", "train", "--unit", "0", "-w", str(ws.root), "train.objective=dpo",
           "train.steps=150", "train.batch_size=2", "train.checkpoint_every=10"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list((ws.checkpoint(1) / ".training").glob("step_*")):
            time.sleep(0.2)
        time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (ws.checkpoint(1) / "manifest.json").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "resuming training from step" in text
    assert int(text.split("resuming training from step ")[1].split()[0]) >= 10
    assert (ws.checkpoint(1) / "manifest.json").exists()


def test_dpo_against_the_parent_learns_in_default_keeps_the_parent_frozen_and_moves_past_it(tmp_path):
    """train.dpo_reference=parent: the reference forward is the parent's adapter, which never changes; the unit
    starts where the parent is and goes on towards the winners from there; the saved file is the unit's alone."""
    from safetensors.torch import load_file

    from loop.train.adapters import REFERENCE, add_reference_adapter, save_lora
    from loop.train.fit import reference_forward

    pipe = load_base(ModelConfig())
    over = ["train.objective=dpo", "train.steps=40", "train.lr=5e-3", "train.batch_size=8", "train.dpo_beta=500"]
    tc = load_config(None, [*over, "train.start=from_parent", "train.dpo_reference=parent"]).train
    unet = add_lora(pipe.unet, tc)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a parent that is not the base: its lora_B weights made non-zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_lora(unet, tmp_path / "parent")
    data = _pair_data(pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    parent_w, parent_l = _errors(unet, data, sched, adapters=True)
    base_w, _ = _errors(unet, data, sched, adapters=False)
    assert parent_w != base_w  # the parent differs from the base, so the test can tell which reference is used

    add_reference_adapter(pipe, tmp_path / "parent", tc)
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if f".{REFERENCE}." in n}
    assert frozen and not any(p.requires_grad for n, p in unet.named_parameters() if f".{REFERENCE}." in n)
    with reference_forward(unet):
        ref_w, ref_l = _errors(unet, data, sched, adapters=True)
    assert (ref_w, ref_l) == pytest.approx((parent_w, parent_l), rel=1e-5)  # the reference is the parent

    unet, _, _ = fit(unet, data, sched, tc, Accelerator(cpu=True), **QUIET)
    unet.eval()
    now = dict(unet.named_parameters())
    assert all(torch.equal(frozen[n], now[n]) for n in frozen)  # the parent never learns
    new_w, new_l = _errors(unet, data, sched, adapters=True)
    # past the parent: dpo's implicit reward (how much better than the reference it denoises) is higher on the
    # winners than on the losers, and it denoises the winners better than the parent did
    assert new_w - parent_w < new_l - parent_l and new_w < parent_w, (new_w, parent_w, new_l, parent_l)
    saved = load_file(save_lora(unet, tmp_path / "unit"))
    assert saved and not any(REFERENCE in k for k in saved)


def test_dpo_reference_parent_without_from_parent_is_refused_in_one_line():
    with pytest.raises(LoopError, match="set train.start=from_parent"):
        load_config(None, ["train.dpo_reference=parent"])
    with pytest.raises(LoopError, match="use one of base, parent"):
        load_config(None, ["train.dpo_reference=grandparent"])


def test_a_unit_trained_against_its_parent_starts_there_and_says_so(ws):
    """train.dpo_reference=parent through train_unit: unit 2 starts from unit 1's adapter, is preferred against it,
    and its file holds its own weights only."""
    import json
    import shutil

    from safetensors.torch import load_file

    from loop.train.adapters import WEIGHTS

    over = ["generate.steps=3", "generate.images_per_prompt=4", "train.objective=dpo", "train.steps=4",
            "train.batch_size=4", "train.taste_pool=0"]  # fmt: skip
    cfg = load_config(ws.root, [*over, "train.start=from_parent", "train.dpo_reference=parent"])
    _rated_round(ws, cfg, ["UR", "N", "SR", "R", "UR", "N", "SSR", "SR"])
    said = []
    with ws.store() as store:
        train_unit(ws, store, cfg, parent=0, log=said.append)
        assert not any("preferred against" in line for line in said)  # unit 1's parent is the base
        ws.checkpoint(2).mkdir(parents=True)
        shutil.copy(ws.checkpoint(1) / "selection.json", ws.checkpoint(2) / "selection.json")
        train_unit(ws, store, cfg, parent=1, log=said.append)
    assert any("preferred against unit_001" in line for line in said), said
    one, two = load_file(ws.checkpoint(1) / WEIGHTS), load_file(ws.checkpoint(2) / WEIGHTS)
    assert one.keys() == two.keys() and any(not torch.equal(one[k], two[k]) for k in one)
    manifest = json.loads((ws.checkpoint(2) / "manifest.json").read_text())
    assert manifest["objective"] == "dpo" and manifest["parent"] == 1
