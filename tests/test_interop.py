"""loop.interop: kohya/diffusers export of a unit, imagefolder export of rated images, importing outside images."""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loop.errors import LoopError
from loop.interop import export_lora, export_set, import_images

RANK, ALPHA = 4, 8  # alpha != rank, so an export that loses alpha changes the images
PROMPTS = ["a circle", "a square"]
SEEDS = [1, 2]


def make_unit(ws, text_encoder: bool = False, unit: int = 1):
    """A unit with random (non-zero) LoRA weights, saved the way training saves it."""
    from peft import LoraConfig

    from loop.config import load_config, to_yaml
    from loop.models import load_base
    from loop.train import add_lora, save_lora

    cfg = load_config(ws.root, [f"train.rank={RANK}", f"train.alpha={ALPHA}"])
    pipe = load_base(cfg.model)
    add_lora(pipe.unet, cfg.train)
    if text_encoder:
        pipe.text_encoder.add_adapter(
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        )
    torch.manual_seed(0)
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    folder = ws.checkpoint(unit)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(pipe.unet, folder, text_encoder=pipe.text_encoder if text_encoder else None)
    (folder / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    return folder / "pytorch_lora_weights.safetensors"


def render(pipe):
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(PROMPTS, num_inference_steps=2, generator=gens, output_type="np").images


def render_with(pipe, path: Path):
    """Images from `pipe` with the LoRA file at `path` loaded, then the pipeline back to its base weights."""
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    try:
        return render(pipe)
    finally:
        pipe.unload_lora_weights()


def same(a, b) -> bool:
    return np.allclose(a, b, atol=1e-4) or np.abs(a * 255 - b * 255).max() <= 1


# -- export a unit -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+te"])
def test_kohya_export_round_trip(ws, base_pipe, text_encoder):
    weights = make_unit(ws, text_encoder=text_encoder)
    logs = []
    with ws.store() as store:
        res = export_lora(ws, store, 1, "kohya", log=logs.append)
    kohya = Path(res["path"])
    assert kohya == ws.checkpoint(1) / "unit_001_kohya.safetensors"
    assert res["rank"] == RANK and res["alpha"] == ALPHA and res["text_encoder"] is text_encoder
    assert len(logs) == 1 and str(kohya) in logs[0] and f"rank {RANK}, alpha {ALPHA}" in logs[0]

    sd = load_file(kohya)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd), sorted(sd)[:5]
    assert any(k.startswith("lora_te_") for k in sd) is text_encoder
    modules = {k.split(".", 1)[0] for k in sd}
    assert len(sd) == 3 * len(modules)
    for m in modules:
        assert sd[f"{m}.alpha"].item() == ALPHA
        assert sd[f"{m}.lora_down.weight"].shape[0] == RANK
        assert f"{m}.lora_up.weight" in sd
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in sd
    # the text encoder's names as ComfyUI (comfy/lora.py, model_lora_keys_clip) and AUTOMATIC1111 (networks.py,
    # convert_diffusers_name_to_compvis) match them: lora_te_text_model_encoder_layers_N_<module>
    te = {m for m in modules if m.startswith("lora_te_")}
    pattern = r"lora_te_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    assert all(re.fullmatch(pattern, m) for m in te), sorted(te)[:3]
    assert len(te) == (4 * 2 if text_encoder else 0)  # q, k, v, out of each of the tiny encoder's 2 layers

    from loop.config import ModelConfig
    from loop.models import load_base

    pipe = load_base(ModelConfig())  # one pipeline, adapters loaded and unloaded in turn (base_pipe stays clean)
    base = render(base_pipe)
    from_diffusers = render_with(pipe, weights)
    assert same(render(pipe), base), "unloading should give the base model back"
    from_kohya = render_with(pipe, kohya)
    assert not same(from_diffusers, base), "the test unit should change the images"
    assert same(from_kohya, from_diffusers), np.abs(from_kohya - from_diffusers).max()

    # the same file with diffusers' own alpha (= rank) does change the images: alpha is what this test guards
    stock = ws.root / "stock.safetensors"
    save_file({k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in sd.items()}, stock)
    assert not same(render_with(pipe, stock), from_diffusers)
    if text_encoder:  # and the lora_te_ modules are loaded too: without them the images differ
        unet_only = ws.root / "unet_only.safetensors"
        save_file({k: v for k, v in sd.items() if k.startswith("lora_unet_")}, unet_only)
        assert not same(render_with(pipe, unet_only), from_diffusers)


def test_diffusers_export_and_errors(ws, tmp_path):
    with ws.store() as store:
        with pytest.raises(LoopError, match="base model"):
            export_lora(ws, store, 0, "kohya", log=lambda m: None)
        with pytest.raises(LoopError, match=r"loop run --round 1"):
            export_lora(ws, store, 2, "kohya", log=lambda m: None)
        weights = make_unit(ws)
        with pytest.raises(LoopError, match="format"):
            export_lora(ws, store, 1, "ckpt", log=lambda m: None)

        res = export_lora(ws, store, 1, "diffusers", log=lambda m: None)
        out = ws.checkpoint(1) / "unit_001_diffusers.safetensors"
        assert res["path"] == str(out) and out.read_bytes() == weights.read_bytes()

        # --out an existing folder puts the default name in it; a file name is used as it is
        dest = tmp_path / "elsewhere"
        dest.mkdir()
        assert export_lora(ws, store, 1, "kohya", dest, log=lambda m: None)["path"] == str(
            dest / "unit_001_kohya.safetensors"
        )
        named = export_lora(ws, store, 1, "kohya", tmp_path / "mine.safetensors", log=lambda m: None)
        assert Path(named["path"]).is_file()
        with pytest.raises(LoopError, match="safetensors"):
            export_lora(ws, store, 1, "kohya", tmp_path / "mine.ckpt", log=lambda m: None)
    assert sorted(p.name for p in dest.iterdir()) == ["unit_001_kohya.safetensors"]  # no temporary left behind


def test_a_text_encoder_units_diffusers_export_loads_in_a_plain_pipeline(ws, base_pipe, tmp_path):
    """The diffusers export of a unit with a text-encoder LoRA loads through a plain pipeline's load_lora_weights
    (the file, or the folder it was exported into) and gives the unit's images as loop renders them. Its
    text-encoder keys keep CLIP's text_model level: without it, transformers 4.x (and diffusers 0.35 on it: "Cannot
    copy out of meta tensor") cannot place them; transformers 5 maps the level away."""
    from diffusers import DiffusionPipeline

    from loop.config import ModelConfig
    from loop.models import EMBEDDED, load_unit

    make_unit(ws, text_encoder=True)
    folder = tmp_path / "my_lora"
    folder.mkdir()
    with ws.store() as store:
        as_file = Path(export_lora(ws, store, 1, "diffusers", log=lambda m: None)["path"])
        in_folder = Path(export_lora(ws, store, 1, "diffusers", folder, log=lambda m: None)["path"])
    assert as_file == ws.checkpoint(1) / "unit_001_diffusers.safetensors"
    assert in_folder == folder / "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
    with safe_open(as_file, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert len(te) == 2 * 4 * 2 and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te), te[:2]
    assert "lora_adapter_metadata" in meta  # rank and alpha travel with it

    loops = render(load_unit(ModelConfig(), ws.checkpoint(1), 1))  # the unit as loop renders it
    assert not same(loops, render(base_pipe))
    for where in (as_file, folder):
        pipe = DiffusionPipeline.from_pretrained(str(EMBEDDED))  # plain: no dtype, no loop code
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(where))
        assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters()), "text-encoder LoRA not loaded"
        theirs = render(pipe)
        assert same(theirs, loops), (where, np.abs(theirs - loops).max())


def test_kohya_alpha_from_config_when_metadata_missing(ws):
    """Weights saved without adapter metadata: alpha comes from the unit's config.yaml, not from the rank."""
    weights = make_unit(ws)
    save_file(load_file(weights), weights)  # same tensors, no metadata
    with safe_open(weights, "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})
    with ws.store() as store:
        res = export_lora(ws, store, 1, "kohya", log=lambda m: None)
        assert {v.item() for k, v in load_file(res["path"]).items() if k.endswith(".alpha")} == {ALPHA}
        (ws.checkpoint(1) / "config.yaml").unlink()
        with pytest.raises(LoopError, match="alpha"):
            export_lora(ws, store, 1, "kohya", log=lambda m: None)


def test_kohya_export_is_tagged_with_the_sd_version_automatic1111_filters_by(ws):
    """AUTOMATIC1111 hides LoRAs made for another SD version than the loaded model (ss_v2, ss_base_model_version):
    a unit of an SD 2.x-shaped base (1024-wide cross-attention context) says so; SD 1.x-shaped ones say sd_v1."""
    weights = make_unit(ws)
    with ws.store() as store:
        meta = safe_open(export_lora(ws, store, 1, "kohya", log=lambda m: None)["path"], "pt").metadata()
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
        with safe_open(weights, "pt") as f:
            keep = f.metadata()
        module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        wide = {f"{module}.lora_A.weight": torch.randn(RANK, 1024), f"{module}.lora_B.weight": torch.randn(320, RANK)}
        save_file(wide, weights, metadata=keep)
        meta = safe_open(export_lora(ws, store, 1, "kohya", log=lambda m: None)["path"], "pt").metadata()
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")


# -- export a set ------------------------------------------------------------------------------------------------
def _png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _add(ws, store, name, color, tier, unit=1, seed=0, prompt="a circle"):
    from loop.workspace import atomic_write, sha256_bytes

    data = _png(color)
    folder = ws.generations(unit) if unit is not None else ws.root / "golden"
    path = atomic_write(folder / name, data)
    image_id = store.add_image(
        sha256=sha256_bytes(data), path=ws.rel(path), prompt=prompt, unit=unit, seed=seed, width=8, height=8
    )
    if tier:
        store.rate(image_id, tier, rater="test")
    return image_id


def test_export_golden_set_loads_as_imagefolder(ws, tmp_path):
    import datasets

    with ws.store() as store:
        out = tmp_path / "golden_set"
        with pytest.raises(LoopError, match="rate some images UR first"):
            export_set(ws, store, "golden", out, log=lambda m: None)
        assert not out.exists()

        _add(ws, store, "a.png", (255, 0, 0), "UR", unit=1, seed=11)
        _add(ws, store, "b.png", (0, 255, 0), "UR", unit=2, seed=12, prompt="a square")
        _add(ws, store, "c.png", (0, 0, 255), "SSR", unit=2, seed=13)
        _add(ws, store, "d.png", (9, 9, 9), "N", unit=1, seed=14)
        _add(ws, store, "e.png", (7, 7, 7), None, unit=1, seed=15)
        _add(ws, store, "outside.png", (200, 200, 0), "UR", unit=None, seed=None, prompt="imported")
        undone = _add(ws, store, "f.png", (1, 2, 3), "UR", unit=1, seed=16)
        store.undo("test")  # f is no longer UR
        assert store.tier_of(undone) is None

        res = export_set(ws, store, "golden", out, log=lambda m: None)
        assert res["count"] == 3 and Path(res["path"]) == out
        ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))["train"]
        assert len(ds) == 3
        assert {"image", "text", "tier", "unit", "seed"} <= set(ds.column_names)
        assert set(ds["tier"]) == {"UR"}
        assert sorted(ds["text"]) == ["a circle", "a square", "imported"]
        assert sorted(ds["seed"], key=str) == sorted([11, 12, None], key=str)
        assert sorted(ds["unit"], key=str) == sorted([1, 2, None], key=str)
        assert all(im.size == (8, 8) for im in ds["image"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["golden_set", "hf", "ws"]  # no temp dir left

        # a tier means that tier and above
        ssr = export_set(ws, store, "SSR", tmp_path / "ssr", log=lambda m: None)
        lines = [json.loads(x) for x in (tmp_path / "ssr" / "metadata.jsonl").read_text().splitlines()]
        assert ssr["count"] == 4 and [x["tier"] for x in lines] == ["UR", "UR", "UR", "SSR"]

        # an existing empty folder is fine; a non-empty one is refused and left untouched
        empty = tmp_path / "empty"
        empty.mkdir()
        assert export_set(ws, store, "golden", empty, log=lambda m: None)["count"] == 3
        with pytest.raises(LoopError, match="not empty"):
            export_set(ws, store, "golden", out, log=lambda m: None)
        assert len(list(out.iterdir())) == 4
        with pytest.raises(LoopError, match="unknown set"):
            export_set(ws, store, "best", tmp_path / "x", log=lambda m: None)


def test_the_exported_set_captions_images_as_a_custom_diffusion_unit_trained_on_them(ws, tmp_path):
    """A trainer reading the set needs each image's caption as the unit learnt it: a Custom Diffusion unit trained on
    "<new1> a circle" and its images were made from "<new1> a circle", so that is their `text` (the token named in
    `modifier_token`), and the negative prompt they were made with is in its own column."""
    import datasets

    from loop.config import load_config
    from loop.generate import generate_ring
    from loop.train import train_unit

    quiet = dict(log=lambda m: None)
    train = ["train.method=custom_diffusion", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=0"]
    cfg = load_config(ws.root, ["generate.steps=2", "generate.negative_prompt=blue, dark", *train])
    ws.prompts_path.write_text("a circle\na square\n", encoding="utf-8")
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        generate_ring(ws, store, cfg, unit=0, count=3, **quiet)  # a circle, a square, a circle
        made = store.images()
        chosen = [{"id": r["id"], "sha256": r["sha256"], "path": r["path"], "caption": r["prompt"], "tier": "UR"}
                  for r in made[:2]]  # fmt: skip
        (ws.checkpoint(1) / "selection.json").parent.mkdir(parents=True)
        (ws.checkpoint(1) / "selection.json").write_text(json.dumps({"images": chosen}), encoding="utf-8")
        assert train_unit(ws, store, cfg, parent=0, **quiet)["modifier_token"] == "<new1>"
        generate_ring(ws, store, cfg, unit=1, count=2, **quiet)
        rows = store.images()
        for r in rows:
            store.rate(r["id"], "UR", rater="test")
        export_set(ws, store, "golden", tmp_path / "set", **quiet)

    lines = {x["sha256"]: x for x in map(json.loads, (tmp_path / "set" / "metadata.jsonl").read_text().splitlines())}
    assert len(lines) == 5
    trained_on, left, unit1 = made[:2], made[2], [r for r in rows if r["unit"] == 1]
    for r in trained_on:  # the caption unit 1 trained with
        assert (lines[r["sha256"]]["text"], lines[r["sha256"]]["modifier_token"]) == (
            f"<new1> {r['prompt']}",
            "<new1>",
        )
    assert (lines[left["sha256"]]["text"], lines[left["sha256"]]["modifier_token"]) == ("a circle", None)
    for r in unit1:  # the text unit 1 was given, as the PNG's parameters say
        with Image.open(ws.root / r["path"]) as im:
            given = im.info["parameters"].splitlines()[0]
        assert lines[r["sha256"]]["text"] == given == f"<new1> {r['prompt']}"
        assert lines[r["sha256"]]["modifier_token"] == "<new1>"
    assert {x["negative_prompt"] for x in lines.values()} == {"blue, dark"}

    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "set"), cache_dir=str(tmp_path / "hf"))["train"]
    assert {"text", "negative_prompt", "modifier_token"} <= set(ds.column_names)
    assert sorted(ds["modifier_token"], key=str) == sorted(["<new1>"] * 4 + [None], key=str)


# -- import ------------------------------------------------------------------------------------------------------
def test_import_keeps_good_images_and_skips_bad_ones(ws, tmp_path):
    src = tmp_path / "incoming"
    (src / "sub").mkdir(parents=True)
    good_png = _png((255, 0, 0), (12, 10))
    (src / "good.png").write_bytes(good_png)
    (src / "good.txt").write_text("  a red\nbox \n", encoding="utf-8")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 200)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    (src / "sub" / "photo.jpg").write_bytes(jpeg)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("not an image at all\n", encoding="utf-8")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, "PNG")
    (src / "trunc.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])

    logs = []
    with ws.store() as store:
        res = import_images(ws, store, src, "UR", "my photos", log=logs.append)
        assert res == {"imported": 2, "skipped": 3, "duplicates": 0}
        skipped = [m for m in logs if m.startswith("skipped ")]
        assert len(skipped) == 3
        for name in ("empty.png", "notes.png", "trunc.png"):
            assert sum(m.startswith(f"skipped {name}:") for m in skipped) == 1, skipped
        # the photo has no caption file and no PNG parameters: said once, with what to do
        assert [m for m in logs if m.startswith("warning:")] == [
            "warning: 1 imported image(s) have no caption (no NAME.txt or NAME.caption beside them, no PNG "
            "parameters): they train with the empty caption. To caption an image, put NAME.txt beside it before "
            "importing"
        ]

        rows = store.images()
        assert len(rows) == 2
        by_prompt = {r["prompt"]: r for r in rows}
        assert set(by_prompt) == {"a red box", ""}
        red, photo = by_prompt["a red box"], by_prompt[""]
        assert (red["width"], red["height"]) == (12, 10) and red["path"].endswith(".png")
        assert photo["path"].endswith(".jpg") and (photo["width"], photo["height"]) == (16, 16)
        for r in rows:
            assert r["unit"] is None and r["round"] is None and r["source"] == "my photos"
            assert r["tier"] == "UR" and r["path"].startswith("golden/")
        assert (ws.root / red["path"]).read_bytes() == good_png  # bytes kept as they are
        assert (ws.root / photo["path"]).read_bytes() == jpeg
        events = store.db.execute("SELECT image_id, tier, rater FROM ratings").fetchall()
        assert sorted(tuple(e) for e in events) == sorted((r["id"], "UR", "import") for r in rows)
        assert sorted(p.name for p in (ws.root / "golden").iterdir()) == sorted(Path(r["path"]).name for r in rows)

        # again: nothing new, the two counted as duplicates, the bad ones skipped again
        again = import_images(ws, store, src, "UR", "my photos", log=lambda m: None)
        assert again == {"imported": 0, "skipped": 3, "duplicates": 2}
        # again with another tier: their ratings stand, and each says so
        said = []
        import_images(ws, store, src / "good.png", "N", "my photos", log=said.append)
        assert store.tier_of(red["id"]) == "UR"
        assert any(m.startswith("good.png: already here as image") and "--tier N not applied" in m for m in said)
        assert len(store.images()) == 2
        assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 2
        assert len(list((ws.root / "golden").iterdir())) == 2


def test_import_single_png_with_a1111_caption_and_no_tier(ws, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a blue ring, soft light\nNegative prompt: blur\nSteps: 20, Seed: 5")
    f = tmp_path / "from_a1111.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(f, pnginfo=info)
    with ws.store() as store:
        with pytest.raises(LoopError, match="tier"):
            import_images(ws, store, f, "XR", "a1111", log=lambda m: None)
        with pytest.raises(LoopError, match="does not exist"):
            import_images(ws, store, tmp_path / "nope", None, "a1111", log=lambda m: None)
        res = import_images(ws, store, f, None, "a1111", log=lambda m: None)
        assert res == {"imported": 1, "skipped": 0, "duplicates": 0}
        (row,) = store.images()
        assert row["prompt"] == "a blue ring, soft light" and row["tier"] is None and row["source"] == "a1111"
        assert store.db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0
        assert json.loads(row["params"])["original_name"] == "from_a1111.png"


def test_recovery_drops_a_copy_an_import_was_killed_before_recording(ws, tmp_path):
    """kill -9 between the rename into golden/ and the row: the copy has no row and nothing to rebuild one from;
    the next command removes it (the original is still outside), and the same import brings it back. Only a copy
    the import's journal names: golden/ files no note names (copied in by hand, or kept from an earlier loop.db,
    with the very names imports give) are never removed."""
    import hashlib
    import os
    import subprocess

    from loop.workspace import IMPORT_PENDING, recover

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(src / "green.png")
    red, blue = (_png_bytes((200, 10, 30)), _png_bytes((10, 10, 200)))
    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        import_images(ws, store, src, "UR", "mine", log=lambda m: None)  # a recorded import: its copy stays
        assert store.states(IMPORT_PENDING) == []  # and its note is gone with the row
        data = (src / "green.png").read_bytes()
        kept = ws.root / "golden" / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
        assert kept.is_file()

        def left_behind(png, pid):  # what an import killed after the rename leaves: its note and its copy
            sha = hashlib.sha256(png).hexdigest()
            f = ws.root / "golden" / f"{sha[:16]}.png"
            f.write_bytes(png)
            store.set_state(IMPORT_PENDING + ws.rel(f), {"sha256": sha, "pid": pid, "at": 0})
            return f

        orphan = left_behind(red, dead.pid)
        running = left_behind(blue, os.getppid())  # an import still running: keeps its copy
        by_hand = ws.root / "golden" / f"{hashlib.sha256(b'x').hexdigest()[:16]}.png"
        by_hand.write_bytes(_png_bytes((1, 2, 3)))  # an import's kind of name, but no note: never touched
        mine = ws.root / "golden" / "my-notes.png"
        mine.write_bytes(red)
        logs = []
        recover(ws, store, logs.append)
        assert not orphan.exists() and kept.exists() and mine.exists() and by_hand.exists() and running.exists()
        assert any("an import was cut short" in m and orphan.name in m for m in logs)
        assert [k for k, _ in store.states(IMPORT_PENDING)] == [IMPORT_PENDING + ws.rel(running)]
        assert store.image_by_sha(hashlib.sha256(data).hexdigest())


def _png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_an_export_removes_the_half_written_folder_a_killed_export_left(ws, tmp_path):
    with ws.store() as store:
        store.ensure_base_unit("embedded")
        src = tmp_path / "src"
        src.mkdir()
        Image.new("RGB", (24, 24), (10, 20, 230)).save(src / "blue.png")
        import_images(ws, store, src, "UR", "mine", log=lambda m: None)
        out = tmp_path / "ds"
        stale = tmp_path / ".ds.tmp-999999999-abc"  # a dead writer's (no such pid)
        stale.mkdir()
        (stale / "half.png").write_bytes(b"x")
        other = tmp_path / ".other.tmp-999999999-abc"  # another export's: not ours to touch
        other.mkdir()
        export_set(ws, store, "golden", out, log=lambda m: None)
    assert not stale.exists() and other.exists() and (out / "metadata.jsonl").is_file()


SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: sd15"


@pytest.mark.parametrize(
    "parameters, caption",
    [
        (f"a red circle, soft light\nNegative prompt: blurry, ugly\n{SETTINGS}", "a red circle, soft light"),
        (f"masterpiece, a red circle,\non a blue field\n{SETTINGS}", "masterpiece, a red circle, on a blue field"),
        (f"Negative prompt: ugly, blurry\n{SETTINGS}", ""),  # no prompt: no caption, not the negative one
        (SETTINGS, ""),  # settings only
        (f"a cat, <lora:catstyle:0.8>, <LyCORIS:x:1> sitting\n{SETTINGS}", "a cat, sitting"),
        ("a prompt: with a colon, and no settings", "a prompt: with a colon, and no settings"),
        (f'a "quoted" fox\n{SETTINGS}, Model: "C:\\\\models, v2"', 'a "quoted" fox'),
    ],
    ids=["negative", "multi-line", "negative-only", "settings-only", "lora-tags", "no-settings", "quoted-setting"],
)
def test_an_a1111_png_gives_its_prompt_as_the_caption(ws, tmp_path, parameters, caption):
    folder = tmp_path / "in"
    folder.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "x.png", pnginfo=info)
    with ws.store() as store:
        import_images(ws, store, folder, "UR", "a1111", log=lambda m: None)
        (row,) = store.images()
    assert row["prompt"] == caption


def test_our_parameters_read_back_through_a1111s_parser():
    """A model path with a comma or colon is quoted as A1111 quotes it, so its settings line parses whole."""
    from loop.images import A1111_PARAM, a1111_parameters, a1111_prompt

    meta = {"prompt": "a ring, red", "negative_prompt": "blue", "steps": 8, "sampler": "euler", "cfg": 4.0,
            "seed": 3, "width": 32, "height": 32, "model": "C:/models/sd, v1.5", "unit": 2}  # fmt: skip
    text = a1111_parameters(meta)
    assert a1111_prompt(text) == "a ring, red"
    settings = {k: v.strip('"') for k, v in A1111_PARAM.findall(text.splitlines()[-1])}
    assert settings["Model"] == "C:/models/sd, v1.5" and settings["Seed"] == "3" and settings["Loop unit"] == "2"


# -- the infotext's schedule -------------------------------------------------------------------------------------
def _a1111_sigmas(alphas_cumprod, n: int, label: str) -> np.ndarray:
    """The n noise levels (before the final 0) AUTOMATIC1111 1.9+ steps through for a `Schedule type`, from the
    model's training sigmas (modules/sd_schedulers.py; k-diffusion's log-linear t_to_sigma and get_sigmas_karras)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    sigmas = np.sqrt((1 - ac) / ac)
    log_s, top = np.log(sigmas), len(sigmas) - 1

    def t_to_sigma(t):
        low, high = int(np.floor(t)), min(int(np.ceil(t)), top)
        w = t - low
        return float(np.exp((1 - w) * log_s[low] + w * log_s[high]))

    if label == "SGM Uniform":
        return np.array([t_to_sigma(t) for t in np.linspace(top, 0, n + 1)[:-1]])
    if label == "Karras":
        lo, hi = sigmas[0] ** (1 / 7), sigmas[-1] ** (1 / 7)
        return (hi + np.linspace(0, 1, n) * (lo - hi)) ** 7
    if label == "DDIM":
        return sigmas[1 :: max(len(sigmas) // n, 1)][::-1]
    raise ValueError(label)


# what differs in Stable Diffusion 1.5's scheduler_config.json from the embedded model's
SD15_SCHEDULER = {"timestep_spacing": "leading", "steps_offset": 1, "rescale_betas_zero_snr": False,
                  "prediction_type": "epsilon"}  # fmt: skip


@pytest.mark.parametrize(
    "sampler, overrides, label, exact",
    [
        ("dpm++", {}, "SGM Uniform", True),  # what loop draws with the embedded model (trailing spacing)
        ("euler", {}, "SGM Uniform", True),
        ("dpm++", {"use_karras_sigmas": True}, "Karras", True),
        ("euler", SD15_SCHEDULER, "DDIM", True),
        ("dpm++", SD15_SCHEDULER, "SGM Uniform", False),  # no exact A1111 twin: the nearest
    ],
)
def test_the_infotext_names_the_schedule_loop_drew_with(base_pipe, sampler, overrides, label, exact):
    """AUTOMATIC1111 1.9+ reads a missing `Schedule type` as Automatic, which for DPM++ 2M is Karras: the infotext
    names the schedule the scheduler really steps through (or the nearest A1111 has), checked against A1111's own
    formulas."""
    from types import SimpleNamespace

    from loop.images import a1111_parameters, schedule_type
    from loop.models import set_scheduler

    # the embedded model's scheduler config, with the overrides; set_scheduler touches only pipe.scheduler
    config = {**base_pipe.scheduler.config, **overrides}
    pipe = SimpleNamespace(scheduler=base_pipe.scheduler.__class__.from_config(config))
    set_scheduler(pipe, sampler)
    assert schedule_type(pipe.scheduler.config, sampler) == label
    for n in (4, 20):
        pipe.scheduler.set_timesteps(n)
        ours = pipe.scheduler.sigmas.double().numpy()[:n]
        errors = {
            other: np.abs(np.log(ours / _a1111_sigmas(pipe.scheduler.alphas_cumprod, n, other))).mean()
            for other in ("SGM Uniform", "Karras", "DDIM")
        }
        assert min(errors, key=errors.get) == label, errors  # (Karras: what A1111 draws without the field)
        if exact:
            assert np.allclose(ours, _a1111_sigmas(pipe.scheduler.alphas_cumprod, n, label), rtol=0.02), errors

    meta = {"prompt": "a ring", "steps": 20, "sampler": sampler, "schedule_type": label, "cfg": 4.0, "seed": 1,
            "width": 32, "height": 32, "model": "embedded"}  # fmt: skip
    settings = a1111_parameters(meta).splitlines()[-1]
    assert f", Schedule type: {label}, CFG scale: 4.0," in settings  # where A1111 writes it, right after Sampler
