"""Issue 5: Custom Diffusion, text-encoder LoRA, from_parent, the encode cache, resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from loop.config import ModelConfig, load_config
from loop.errors import LoopError
from loop.generate import generate_ring
from loop.models import load_base, load_unit
from loop.train import (
    CD_TARGETS,
    EMBEDS,
    WEIGHTS,
    TrainData,
    add_lora,
    add_modifier_token,
    add_text_lora,
    fit,
    load_parent_adapter,
    save_lora,
    train_unit,
)

QUIET = dict(log=lambda m: None)
TRAIN = ["train.steps=6", "train.batch_size=2", "train.lr=1e-2", "train.checkpoint_every=0"]


def _images(pipe, prompt="a circle", seeds=(3, 4)):
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        out.append(pipe(prompt, num_inference_steps=4, guidance_scale=4.0, generator=g, output_type="np").images[0])
    return np.stack(out)


def _select(ws, cfg, n=4, unit=1, prompts="a circle\na square\n"):
    """Make n images with the base model and write them as unit `unit`'s selection."""
    ws.prompts_path.write_text(prompts, encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=n, **QUIET)
        rows = store.db.execute("SELECT * FROM images ORDER BY id").fetchall()
    items = [
        {"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"], "tier": "UR"} for r in rows
    ]
    sel = ws.checkpoint(unit) / "selection.json"
    sel.parent.mkdir(parents=True, exist_ok=True)
    sel.write_text(json.dumps({"images": items}))
    return items


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    after = module.state_dict()
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


def test_custom_diffusion_changes_only_cross_attention_kv_and_the_new_token_row():
    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.method=custom_diffusion", "train.steps=4", "train.lr=1e-2"]).train
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    row = add_modifier_token(pipe.tokenizer, pipe.text_encoder, "<new1>", "shape")
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[row], table[pipe.tokenizer("shape", add_special_tokens=False).input_ids].mean(0))
    table.requires_grad_(True)
    unet = add_lora(pipe.unet, tc, CD_TARGETS)
    unet_before, te_before = _snapshot(unet), _snapshot(pipe.text_encoder)
    ids = pipe.tokenizer(["<new1> a circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    data = TrainData(latents=torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)), ids=ids)
    keep = (table.detach().clone(), row)
    unet, te, _ = fit(unet, data, DDPMScheduler.from_config(pipe.scheduler.config), tc, Accelerator(cpu=True),
                      text_encoder=pipe.text_encoder, keep_rows=keep)  # fmt: skip
    changed = _changed(unet_before, unet)
    assert changed and all("lora_" in k and ("attn2.to_k" in k or "attn2.to_v" in k) for k in changed), changed
    assert any("attn2.to_v" in k for k in changed) and not any("attn1" in k for k in changed)
    te_changed = _changed(te_before, te)
    assert {k.split("text_model.")[-1] for k in te_changed} == {"embeddings.token_embedding.weight"}
    diff = (te.get_input_embeddings().weight - te_before[te_changed.pop()]).abs()
    rows_moved = torch.nonzero(diff.sum(dim=1)).flatten().tolist()
    assert rows_moved == [row], "only the modifier token's row learns"


def test_text_encoder_lora_changes_only_adapter_weights():
    pipe = load_base(ModelConfig())
    tc = load_config(None, ["train.text_encoder_lora=true", "train.steps=3", "train.lr=1e-2"]).train
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    te = add_text_lora(pipe.text_encoder, tc)
    unet = add_lora(pipe.unet, tc)
    te_before = _snapshot(te)
    ids = pipe.tokenizer(["a circle"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    data = TrainData(latents=torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)), ids=ids)
    _, te, _ = fit(unet, data, DDPMScheduler.from_config(pipe.scheduler.config), tc, Accelerator(cpu=True),
                   text_encoder=te)  # fmt: skip
    changed = _changed(te_before, te)
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)


FRESH = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from pathlib import Path
    from loop.config import ModelConfig
    from loop.models import load_unit, unit_trigger
    folder = Path(sys.argv[1])
    pipe = load_unit(ModelConfig(), folder, 1)
    token = unit_trigger(folder)
    row = pipe.tokenizer.convert_tokens_to_ids(token)
    emb = pipe.text_encoder.get_input_embeddings().weight[row].detach().numpy()
    out = []
    for s in (3, 4):
        g = torch.Generator().manual_seed(s)
        out.append(pipe(f"{token} a circle", num_inference_steps=4, guidance_scale=4.0, generator=g,
                        output_type="np").images[0])
    np.savez(sys.argv[2], images=np.stack(out), emb=emb, token=np.array(token))
    """
)


def test_custom_diffusion_unit_reloads_in_a_fresh_process(ws, tmp_path):
    cfg = load_config(ws.root, ["generate.steps=4", "train.method=custom_diffusion", *TRAIN])
    _select(ws, cfg)
    with ws.store() as store:
        m = train_unit(ws, store, cfg, parent=0, **QUIET)
    folder = ws.checkpoint(1)
    assert m["modifier_token"] == "<new1>" and (folder / WEIGHTS).exists() and (folder / EMBEDS).exists()
    keys = load_file(folder / WEIGHTS).keys()
    assert keys and all("attn2.to_k" in k or "attn2.to_v" in k for k in keys)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "fresh.npz")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = np.load(tmp_path / "fresh.npz")
    assert str(fresh["token"]) == "<new1>"
    np.testing.assert_allclose(fresh["emb"], load_file(folder / EMBEDS)["<new1>"][0].numpy(), atol=1e-6)
    base = _images(load_base(ModelConfig()), "<new1> a circle")
    assert np.abs(fresh["images"] - base).mean() > 1e-3, "the unit's weights must reach the fresh process"
    here = _images(load_unit(ModelConfig(), folder, 1), "<new1> a circle")
    np.testing.assert_allclose(fresh["images"], here, atol=1e-4)
    # export-lora takes the token's embedding along, in each format's textual-inversion file, loadable as such
    from loop.interop import export_lora

    want = load_file(folder / EMBEDS)["<new1>"]
    with ws.store() as store:
        for fmt, token in (("diffusers", None), ("kohya", "unit_001_kohya_new1")):
            r = export_lora(ws, store, 1, fmt, out=tmp_path / f"unit_001_{fmt}.safetensors", log=lambda m: None)
            pipe = load_base(ModelConfig())
            pipe.load_textual_inversion(r["embedding"], token=token)
            word = token or "<new1>"
            row = pipe.tokenizer.convert_tokens_to_ids(word)
            got = pipe.text_encoder.get_input_embeddings().weight[row]
            torch.testing.assert_close(got, want[0].to(got.dtype), atol=1e-6, rtol=1e-5)


def test_from_parent_starts_from_the_parents_adapter(ws, tmp_path):
    tc = load_config(None, ["train.rank=4"]).train
    pipe = load_base(ModelConfig())
    unet = add_lora(pipe.unet, tc)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    save_lora(unet, tmp_path / "parent")
    want = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    child = load_base(ModelConfig())
    add_lora(child.unet, tc)
    load_parent_adapter(child, tmp_path / "parent", tc)
    got = {n: p for n, p in child.unet.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    other = load_base(ModelConfig())
    add_lora(other.unet, load_config(None, ["train.rank=2"]).train)
    from loop.errors import LoopError

    with pytest.raises(LoopError, match="from_parent"):
        load_parent_adapter(other, tmp_path / "parent", tc)


def test_second_round_encodes_only_new_images(ws):
    cfg = load_config(ws.root, ["generate.steps=4", *TRAIN])
    items = _select(ws, cfg, n=4)
    with ws.store() as store:
        first = train_unit(ws, store, cfg, parent=0, **QUIET)
    assert (first["cache_hits"], first["cache_misses"]) == (0, 4)
    weights = (ws.checkpoint(1) / WEIGHTS).read_bytes()
    with ws.store() as store:
        # `--unit N` names the parent: retraining a unit that exists would replace what its images came from
        with pytest.raises(LoopError, match="unit 1 already exists .*`--unit N` names the parent"):
            train_unit(ws, store, cfg, parent=0, **QUIET)
        with pytest.raises(LoopError, match="unit 7 does not exist"):
            train_unit(ws, store, cfg, parent=7, **QUIET)
    assert (ws.checkpoint(1) / WEIGHTS).read_bytes() == weights
    # round 1's selection: the same four plus two new ones
    with ws.store() as store:
        generate_ring(ws, store, cfg, unit=1, count=2, **QUIET)
        new = store.db.execute("SELECT * FROM images WHERE unit = 1").fetchall()
    items += [
        {"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"], "tier": "UR"} for r in new
    ]
    ws.checkpoint(2).mkdir(parents=True, exist_ok=True)
    (ws.checkpoint(2) / "selection.json").write_text(json.dumps({"images": items}))
    logs = []
    with ws.store() as store:
        second = train_unit(ws, store, cfg, parent=1, log=logs.append)
    assert (second["cache_hits"], second["cache_misses"]) == (4, 2)
    assert any("4 hit(s), 2 miss(es)" in m for m in logs)


def test_prior_preservation_makes_class_images_once(ws):
    cfg = load_config(ws.root, ["generate.steps=3", "train.prior_preservation=true", "train.class_images=2", *TRAIN])
    _select(ws, cfg, n=3, prompts="a circle --n 2\na square --n 2\n")
    logs = []
    with ws.store() as store:
        m = train_unit(ws, store, cfg, parent=0, log=logs.append)
    assert m["class_images"] == 4  # 2 prompts x 2
    assert any("making 4 class image(s)" in x for x in logs)
    assert len(list(ws.root.joinpath("cache", "class").rglob("*.png"))) == 4
    logs.clear()
    (ws.checkpoint(1) / "manifest.json").unlink()
    with ws.store() as store:
        store.db.execute("DELETE FROM units WHERE unit = 1")  # unit 1 undone, so it may be trained again
        train_unit(ws, store, cfg, parent=0, log=logs.append)
    assert not any("making" in x for x in logs), "class images are cached"


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
def test_resume_continues_from_the_checkpoint_and_matches_a_straight_run(ws, tmp_path, ema):
    from loop.workspace import Workspace

    over = ["generate.steps=3", "train.steps=12", "train.batch_size=2", "train.checkpoint_every=4", f"train.ema={ema}"]
    cfg = load_config(ws.root, over)
    _select(ws, cfg, n=3)
    with ws.store() as store:
        out = train_unit(ws, store, cfg, parent=0, stop_after=9, **QUIET)  # "killed" after step 9
    assert out == {"stopped_at": 9}
    steps = sorted(p.name for p in (ws.checkpoint(1) / ".training").glob("step_*"))
    assert steps == ["step_000008"]
    if not ema:  # status says where the next run resumes (round 0's train phase, begun and not finished)
        from loop.status import next_step

        with ws.store() as store:
            store.begin_phase(0, "train")
            for phase in ("generate", "rate", "select"):
                store.finish_phase(0, phase, {})
            said = next_step(store, ws)
        assert "train not finished (a checkpoint at step 8 is kept" in said, said
    logs = []
    with ws.store() as store:
        train_unit(ws, store, cfg, parent=0, log=logs.append)
    assert any("resuming training from step 8" in m for m in logs)
    assert not (ws.checkpoint(1) / ".training").exists(), "checkpoints are removed once the unit is saved"
    resumed = load_file(ws.checkpoint(1) / WEIGHTS)
    # the same training without the interruption
    other = Workspace.init(tmp_path / "other")
    cfg2 = load_config(other.root, over)
    _select(other, cfg2, n=3)
    with other.store() as store:
        train_unit(other, store, cfg2, parent=0, **QUIET)
    straight = load_file(other.checkpoint(1) / WEIGHTS)
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-5, rtol=1e-4)


def test_a_checkpoint_of_other_settings_is_said_and_replaced_not_a_crash_at_its_step(ws):
    over = ["generate.steps=3", "train.steps=10", "train.batch_size=2", "train.checkpoint_every=4"]
    cfg = load_config(ws.root, over)
    _select(ws, cfg, n=3)
    with ws.store() as store:
        assert train_unit(ws, store, cfg, parent=0, stop_after=5, **QUIET) == {"stopped_at": 5}
    # the person changes a train setting before running again: the step-4 checkpoint does not fit it
    cfg = load_config(ws.root, [*over, "train.lr=2e-4"])
    logs = []
    with ws.store() as store:
        assert train_unit(ws, store, cfg, parent=0, stop_after=5, log=logs.append) == {"stopped_at": 5}
    said = [m for m in logs if "was made with other train settings" in m]
    assert said and "starts over from step 0" in said[0] and not any("resuming" in m for m in logs)
    steps = sorted(p.name for p in (ws.checkpoint(1) / ".training").glob("step_*"))
    assert steps == ["step_000004"]  # the new one, where the old one was
    logs.clear()
    with ws.store() as store:
        train_unit(ws, store, cfg, parent=0, log=logs.append)  # and the new settings resume from it
    assert any("resuming training from step 4" in m for m in logs)
    assert (ws.checkpoint(1) / WEIGHTS).exists()


def test_kill_9_mid_training_then_run_again_resumes(ws):
    cfg = load_config(ws.root, ["generate.steps=3"])
    _select(ws, cfg, n=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "loop", "train", "--unit", "0", "-w", str(ws.root),
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
    # shorter now, so the test ends soon; the checkpoint's settings must match, so keep steps the same
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming training from step" in out.stdout + out.stderr
    step = int((out.stdout + out.stderr).split("resuming training from step ")[1].split()[0])
    assert step >= 10
    assert (ws.checkpoint(1) / "manifest.json").exists()


def test_two_process_training_saves_the_same_format_and_resumes_after_a_kill(ws, tmp_path):
    import shutil

    cfg = load_config(ws.root, ["generate.steps=3"])
    _select(ws, cfg, n=4)
    again = tmp_path / "again"
    shutil.copytree(ws.root, again)  # the same selection, for the run that gets killed
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def cmd(root):
        return [sys.executable, "-m", "loop", "train", "--processes", "2", "--unit", "0", "-w", str(root),
                "train.steps=40", "train.batch_size=2", "train.checkpoint_every=4"]  # fmt: skip

    out = subprocess.run(cmd(ws.root), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    m = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert m["processes"] == 2
    keys = set(load_file(ws.checkpoint(1) / WEIGHTS).keys())
    # the single-process file of the same method has the same keys
    pipe = load_base(ModelConfig())
    unet = add_lora(pipe.unet, load_config(None, []).train)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_lora(unet, d)
        assert keys == set(load_file(os.path.join(d, WEIGHTS)).keys())
    unit = _images(load_unit(ModelConfig(), ws.checkpoint(1), 1))
    assert np.abs(unit - _images(load_base(ModelConfig()))).mean() > 1e-3

    # the same training killed with kill -9: the `loop` process only, as a crash or an OOM kill would
    training = again / "checkpoints" / "unit_001" / ".training"
    proc = subprocess.Popen(cmd(again), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(training.glob("step_*")):
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # its workers end with it (they used to go on training, and record the unit, on their own)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the workers of a killed `loop train --processes 2` are still running")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (again / "checkpoints" / "unit_001" / "manifest.json").exists()
    (step,) = training.glob("step_*")
    # each process's part of the checkpoint is in it (the second's went to a folder never renamed into place)
    assert {"gen_0.pt", "gen_1.pt", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in step.iterdir()}
    out = subprocess.run(cmd(again), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert said.count("resuming training from step") == 1, said[-2000:]
    resumed, straight = load_file(again / "checkpoints" / "unit_001" / WEIGHTS), load_file(ws.checkpoint(1) / WEIGHTS)
    assert resumed.keys() == straight.keys()
    for k in straight:  # as if it had never been killed
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-5, rtol=1e-4)


def test_an_unreadable_selected_image_is_left_out_and_the_manifest_says_so(ws):
    cfg = load_config(ws.root, ["generate.steps=2", *TRAIN])
    items = _select(ws, cfg, n=3)
    bad = ws.root / items[1]["path"]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated after it was selected
    logs = []
    with ws.store() as store:
        m = train_unit(ws, store, cfg, parent=0, log=logs.append)
    assert any(items[1]["path"] in x and "left out of training" in x for x in logs)
    # the manifest names the images the unit learnt from, not the selection it was given
    assert [it["id"] for it in m["images"]] == [items[0]["id"], items[2]["id"]]
    assert m["left_out"] == [{"id": items[1]["id"], "sha256": items[1]["sha256"]}]
    on_disk = json.loads((ws.checkpoint(1) / "manifest.json").read_text())
    assert on_disk["images"] == m["images"] and on_disk["left_out"] == m["left_out"]


def test_the_unit_records_the_strategy_its_selection_was_made_with(ws):
    cfg = load_config(ws.root, ["generate.steps=3", "train.steps=2", "train.batch_size=2"])
    _select(ws, cfg, n=2)
    sel = ws.checkpoint(1) / "selection.json"
    sel.write_text(json.dumps({**json.loads(sel.read_text()), "strategy": "converge"}))  # select done as converge
    logs = []
    with ws.store() as store:  # then run on with select.strategy=golden (the default)
        m = train_unit(ws, store, cfg, parent=0, log=logs.append)
        row = store.unit(1)
    assert m["strategy"] == "converge" and row["strategy"] == "converge"
    assert json.loads((ws.checkpoint(1) / "manifest.json").read_text())["config"]["select"]["strategy"] == "converge"
    assert any("made with select.strategy=converge" in x and "applies from the next round" in x for x in logs)


WIDE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]  # attention and beyond


def _wide_unet(text_encoder=False):
    """The embedded pipeline with a LoRA on attention and non-attention modules (random, non-zero weights)."""
    tc = load_config(None, ["train.rank=4", "train.alpha=2", f"train.target_modules={WIDE}".replace("'", "")]).train
    pipe = load_base(ModelConfig())
    add_lora(pipe.unet, tc)
    if text_encoder:
        add_text_lora(pipe.text_encoder, tc)
    torch.manual_seed(0)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return pipe, tc


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample


@pytest.mark.parametrize("legacy", [False, True], ids=["saved-now", "saved-before-2026-12"])
def test_a_lora_beyond_attention_reloads_whole(ws, legacy):
    """A unit whose target_modules go beyond attention reloads every module, attention included: diffusers'
    PEFT->diffusers renaming (which units were saved through before) renamed only the attention layers, and its
    loader then skipped them. Files saved that way still load whole, and still continue with from_parent."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe, tc = _wide_unet(text_encoder=True)
    want = _unet_out(pipe.unet)
    folder = ws.checkpoint(1)
    if legacy:
        folder.mkdir(parents=True)
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        )
        keys = load_file(folder / WEIGHTS).keys()
        assert any(".lora.down." in k for k in keys) and any(".lora_A." in k for k in keys)  # both namings
    else:
        save_lora(pipe.unet, folder, text_encoder=pipe.text_encoder)
        assert all(".lora_A." in k or ".lora_B." in k for k in load_file(folder / WEIGHTS))
    base = _unet_out(load_base(ModelConfig()).unet)
    assert (want - base).abs().max() > 1e-2, "the test adapter should change the UNet"
    loaded = load_unit(ModelConfig(), folder, 1)
    torch.testing.assert_close(_unet_out(loaded.unet), want, atol=1e-5, rtol=1e-4)
    ids = pipe.tokenizer(["a circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0], atol=1e-5, rtol=1e-4)
    # from_parent copies every module of such a parent into the new adapter
    child = load_base(ModelConfig())
    add_lora(child.unet, tc)
    add_text_lora(child.text_encoder, tc)
    load_parent_adapter(child, folder, tc)
    torch.testing.assert_close(_unet_out(child.unet), want, atol=1e-5, rtol=1e-4)
