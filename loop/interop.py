"""Moving adapters and images between loop and the outside world.

    loop export --unit N --format kohya|diffusers [--out FILE]   a unit's LoRA as one .safetensors file
    loop export --set golden|TIER --out DIR                       rated images as a Hugging Face imagefolder
    loop import DIR|FILE [--tier UR] [--source TEXT]              outside images into golden/, optionally rated
    loop export-model --unit N --out FILE.safetensors            a unit merged into its base, one checkpoint file

The kohya file is what AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load: `lora_unet_*` / `lora_te_*` module
names with `.lora_down.weight`, `.lora_up.weight` and `.alpha`. Those tools scale each module by
alpha / rank, so `.alpha` carries the training alpha (diffusers' own converter writes alpha = rank, which
would silently change the strength whenever train.alpha != train.rank).

Every file is written atomically; an exported set appears all at once (written into a temporary sibling,
then renamed); an imported image is copied into golden/ before its row is written, and its row and rating
are one transaction, so an interrupted import leaves nothing half-done.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from loop.config import TIERS
from loop.errors import LoopError
from loop.workspace import (
    IMPORT_PENDING,
    TMP_MARK,
    atomic_write,
    sha256_bytes,
    sync_golden,
    unit_name,
    writer_alive,
)

WEIGHTS = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"  # as loop.train writes it (not imported: training pulls in torch models)
FORMATS = ("diffusers", "kohya")
KEEP_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # stored byte for byte
CAPTION_EXTS = (".txt", ".caption")
# diffusers prefixes of the pipeline components a LoRA file can hold -> kohya prefixes (SD 1.x has one text encoder)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# -- export a unit's adapter -----------------------------------------------------------------------------------
def export_lora(ws, store, unit: int, fmt: str, out: Path | None = None, log=print) -> dict:
    """Write unit `unit`'s LoRA as one .safetensors file in `fmt` ("diffusers" or "kohya"); returns a summary."""
    fmt = (fmt or "").strip().lower()
    if fmt not in FORMATS:
        raise LoopError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if unit < 0:
        raise LoopError(f"unit must be 0 or more, got {unit}")
    if unit == 0:
        raise LoopError("unit 0 is the base model and has no adapter to export; export unit 1 or later")
    src = ws.checkpoint(unit) / WEIGHTS
    if not src.is_file():
        with_weights = _units_with_weights(ws)
        have = sorted({r["unit"] for r in store.units()} | set(with_weights))
        if have and unit - 1 not in have:  # round unit-1 cannot run yet: no such unit, and none just before it
            hint = (
                f"export one of the units with an adapter: {', '.join(map(str, with_weights))}"
                if with_weights
                else "no unit has an adapter yet; `loop run --round` trains the next one"
            )
            raise LoopError(f"unit {unit} does not exist (units: {', '.join(map(str, have))}); {hint}")
        raise LoopError(f"unit {unit} has no weights at {src}; train it with `loop run --round {unit - 1}`")

    default = f"{unit_name(unit)}_{fmt}.safetensors"
    out = Path(out).expanduser() if out is not None else ws.checkpoint(unit) / default
    if out.is_dir():
        # diffusers' own name in a folder of its own, so `pipe.load_lora_weights(folder)` finds it
        out = out / (WEIGHTS if fmt == "diffusers" and out.resolve() != src.parent.resolve() else default)
    if out.suffix.lower() != ".safetensors":
        raise LoopError(f"--out {out} should name a .safetensors file or an existing folder")
    if out.resolve() == src.resolve():
        raise LoopError(f"--out {out} is the unit's own weights file; choose another path")

    if fmt == "diffusers":
        data = src.read_bytes()  # the file as trained, metadata (rank, alpha) included
        tensors, meta = _read_safetensors(src)
        from loop.models import mixed_lora_names, peft_names

        named = peft_names(tensors) if mixed_lora_names(tensors) else tensors  # diffusers half skips two namings
        named = {_clip_text_model_level(k): v for k, v in named.items()}
        if list(named) != list(tensors):
            from safetensors.torch import save

            data = save(named, metadata=meta)
        summary = {"modules": len({_module_of(k) for k in tensors}), **_adapter_summary(ws, unit, meta)}
    else:
        data, summary = _kohya_bytes(ws, unit, src)
    atomic_write(out, data)
    shape = "".join(f", {k} {summary[k]}" for k in ("rank", "alpha") if summary.get(k) is not None)
    log(f"exported unit {unit} to {out} ({fmt}, {summary['modules']} modules{shape})")
    result = {"unit": unit, "format": fmt, "path": str(out), "bytes": len(data), **summary}
    _say_noise_prior(ws, unit, log)
    embeds = ws.checkpoint(unit) / EMBEDS
    if embeds.is_file():  # custom_diffusion's modifier token: its embedding row learnt too, and every caption had it
        result["embedding"] = _export_embedding(embeds, out, fmt, log)
    return result


def _say_noise_prior(ws, unit: int, log=print) -> None:
    """A unit with a noise prior (train.noise_prior) draws from moved initial noises in loop; no other tool reads
    that file, so an exported unit draws there as its adapter alone does."""
    if unit > 0 and (ws.checkpoint(unit) / "noise_prior.safetensors").is_file():
        log(f"unit {unit} also has a noise prior ({ws.rel(ws.checkpoint(unit) / 'noise_prior.safetensors')}), which "
            "other tools do not read: there the unit draws from the usual noise, as its adapter alone")  # fmt: skip


def _export_embedding(src: Path, out: Path, fmt: str, log=print) -> str:
    """The modifier token's embedding beside the LoRA file, as a textual-inversion file: diffusers' own
    ({token: vector}, for `pipe.load_textual_inversion(path)`) or AUTOMATIC1111's ({"emb_params": vector}, whose
    trigger word is the file's name; ComfyUI reads it as `embedding:NAME`). An SDXL unit's file has a row per text
    encoder, {"clip_l", "clip_g"}, which is AUTOMATIC1111's SDXL layout already, and is copied as it is."""
    from safetensors.torch import save

    from loop.families import SDXL_EMBED_KEYS, embedding_token

    tensors, meta = _read_safetensors(src)
    if sorted(tensors) == sorted(SDXL_EMBED_KEYS):
        token = embedding_token(list(tensors), meta)
        word = re.sub(r"[^A-Za-z0-9_]", "", token) or "token"
        dest = out.with_name(f"{out.stem}_{'embedding' if fmt == 'diffusers' else word}.safetensors")
        atomic_write(dest, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"token": token}))
        log(
            f"modifier token {token}: its SDXL embedding (clip_l, clip_g) is in {dest}; "
            + (
                "load each row with pipe.load_textual_inversion(state_dict['clip_l'], token=..., "
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) and clip_g into text_encoder_2/tokenizer_2"
                if fmt == "diffusers"
                else f"put it in AUTOMATIC1111's embeddings/ folder (ComfyUI: models/embeddings) and write "
                f"{dest.stem} in prompts where the unit was trained with {token}"
            )
        )
        return str(dest)
    token, vector = next(iter(tensors.items()))
    if fmt == "diffusers":
        dest = out.with_name(f"{out.stem}_embedding.safetensors")
        atomic_write(dest, save({token: vector.contiguous()}))
        log(
            f"modifier token {token}: its embedding is in {dest}; load it with pipe.load_textual_inversion(path) "
            f"and write {token} in prompts, as the unit was trained"
        )
    else:
        word = re.sub(r"[^A-Za-z0-9_]", "", token) or "token"
        dest = out.with_name(f"{out.stem}_{word}.safetensors")
        atomic_write(dest, save({"emb_params": vector.contiguous()}))
        log(
            f"modifier token {token}: its embedding is in {dest}; put it in AUTOMATIC1111's embeddings/ folder "
            f"(ComfyUI: models/embeddings) and write {dest.stem} in prompts where the unit was trained with {token}"
        )
    return str(dest)


def _units_with_weights(ws) -> list[int]:
    found = []
    for folder in (ws.root / "checkpoints").glob("unit_*"):
        tail = folder.name[len("unit_") :]
        if tail.isdigit() and (folder / WEIGHTS).is_file():
            found.append(int(tail))
    return sorted(found)


def _read_safetensors(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise LoopError(f"{path} is not a readable safetensors file ({e}); retrain the unit") from e
    return tensors, meta


# the children of CLIP's text transformer: transformers 5 flattened CLIPTextModel (no `text_model.` level), so a
# unit trained there names its text-encoder LoRA without it; transformers 4.x and the loaders built on it (diffusers
# 0.35 fails with "Cannot copy out of meta tensor", ComfyUI, AUTOMATIC1111) need it, and transformers 5 maps it away
CLIP_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _clip_text_model_level(key: str) -> str:
    """'text_encoder.encoder.layers.0...' -> 'text_encoder.text_model.encoder.layers.0...' (others unchanged)."""
    comp, _, path = key.partition(".")
    if comp in ("text_encoder", "text_encoder_2") and path.startswith(CLIP_TEXT_PARTS):
        return f"{comp}.text_model.{path}"
    return key


def _module_of(key: str) -> str:
    """'unet.x.to_q.lora_A.weight' / 'unet.x.to_q.lora.down.weight' -> 'unet.x.to_q'."""
    for mark in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.", ".lora_magnitude_vector"):
        if mark in key:
            return key.split(mark)[0]
    return key.rsplit(".", 1)[0]


def _adapter_configs(ws, unit: int, meta: dict) -> dict[str, dict]:
    """Per component ('unet', 'text_encoder'), the PEFT LoraConfig fields the adapter was trained with.

    From the weights file's own `lora_adapter_metadata` (written by save_lora_weights); for files without
    it, from the unit's config.yaml, then manifest.json (train.rank / train.alpha).
    """
    configs: dict[str, dict] = {}
    raw = meta.get("lora_adapter_metadata")
    if raw:
        try:
            flat = json.loads(raw)
        except json.JSONDecodeError:
            flat = {}
        for key, value in flat.items():
            comp, _, field = key.partition(".")
            if comp in COMPONENTS and field:
                configs.setdefault(comp, {})[field] = value
    if all(configs.get(c, {}).get("lora_alpha") is not None for c in COMPONENTS):
        return configs
    train = _unit_train_config(ws, unit)
    if train.get("alpha") is not None:
        fallback = {"lora_alpha": float(train["alpha"]), "r": train.get("rank")}
        for comp in COMPONENTS:
            if configs.get(comp, {}).get("lora_alpha") is None:
                configs[comp] = {**configs.get(comp, {}), **fallback}
    if not any(c.get("lora_alpha") is not None for c in configs.values()):
        raise LoopError(
            f"unit {unit}'s weights carry no LoRA alpha and {ws.checkpoint(unit)} has no config.yaml or "
            "manifest.json saying train.alpha; the strength cannot be exported faithfully"
        )
    return configs


def _unit_train_config(ws, unit: int) -> dict:
    folder = ws.checkpoint(unit)
    if (folder / "config.yaml").is_file():
        from omegaconf import OmegaConf

        try:
            train = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")).get("train") or {}
            if train.get("alpha") is not None:
                return train
        except Exception:  # a damaged config.yaml: try the manifest
            pass
    if (folder / "manifest.json").is_file():
        try:
            return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["config"]["train"] or {}
        except (ValueError, KeyError, TypeError):
            pass
    return {}


def _adapter_summary(ws, unit: int, meta: dict) -> dict:
    try:
        unet = _adapter_configs(ws, unit, meta).get("unet", {})
    except LoopError:
        return {"rank": None, "alpha": None}
    return {"rank": unet.get("r"), "alpha": unet.get("lora_alpha")}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module path or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _kohya_bytes(ws, unit: int, src: Path) -> tuple[bytes, dict]:
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save

    tensors, meta = _read_safetensors(src)
    configs = _adapter_configs(ws, unit, meta)
    if any(k.endswith(".alpha") for k in tensors) or any(k.startswith("lora_") for k in tensors):
        raise LoopError(f"{src} already looks like a kohya file; copy it as it is")

    # group the file's tensors per module, in PEFT naming (lora_A = down, lora_B = up)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        comp = key.split(".", 1)[0]
        if comp not in COMPONENTS:
            raise LoopError(f"{src} has a tensor {key!r} that belongs to no unet/text_encoder; cannot convert it")
        if "lora_magnitude_vector" in key or key.endswith("dora_scale"):
            raise LoopError(f"{src} is a DoRA adapter; kohya export supports plain LoRA only")
        if ".lora_A." in key or ".lora.down." in key or ".lora_linear_layer.down." in key:
            part = "A"
        elif ".lora_B." in key or ".lora.up." in key or ".lora_linear_layer.up." in key:
            part = "B"
        else:
            raise LoopError(f"{src} has a tensor {key!r} that is neither a LoRA down nor up weight")
        modules.setdefault(_module_of(key), {})[part] = value

    kohya: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    # SDXL: a second text encoder in the file, or a UNet-only LoRA of a unit trained on an SDXL base
    two_text_encoders = any(m.startswith("text_encoder_2.") for m in modules) or _unit_family(ws, unit) == "sdxl"
    for module, parts in sorted(modules.items()):
        if set(parts) != {"A", "B"}:
            raise LoopError(f"{src}: module {module} has no {'up' if 'A' in parts else 'down'} weight; retrain")
        comp, _, path = module.partition(".")
        conf = configs.get(comp) or {}
        if conf.get("lora_alpha") is None:
            raise LoopError(f"{src} has {comp} weights but no LoRA alpha for them; cannot export faithfully")
        rank = parts["A"].shape[0]
        alpha = float(_pattern_value(conf.get("alpha_pattern"), path, conf.get("lora_alpha")))
        # PEFT scales by alpha/r (alpha/sqrt(r) with rsLoRA); kohya loaders always use alpha/r
        scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
        kohya_alpha = scale * rank
        named = _clip_text_model_level(module)  # kohya's names keep CLIP's text_model level (see CLIP_TEXT_PARTS)
        peft = {f"{named}.lora_A.weight": parts["A"], f"{named}.lora_B.weight": parts["B"]}
        converted = convert_state_dict_to_kohya(peft)
        alpha_keys = [k for k in converted if k.endswith(".alpha")]
        if len(converted) != 3 or len(alpha_keys) != 1:
            raise LoopError(f"diffusers converted {module} into unexpected kohya keys {sorted(converted)}")
        for key, value in converted.items():
            if key.startswith("lora_te1_") and not two_text_encoders:
                key = "lora_te_" + key[len("lora_te1_") :]  # SD 1.x: kohya and A1111 say lora_te_
            if key.endswith(".alpha"):
                value = torch.tensor(kohya_alpha, dtype=torch.float32)
            kohya[key] = value.detach().to("cpu").contiguous()
        ranks.add(rank)
        alphas.add(kohya_alpha)

    if not kohya:
        raise LoopError(f"{src} holds no LoRA tensors; retrain the unit")
    rank = next(iter(ranks)) if len(ranks) == 1 else None
    alpha = next(iter(alphas)) if len(alphas) == 1 else None
    has_te = any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in kohya)
    version = _base_version(modules, two_text_encoders)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank if rank is not None else max(ranks)),
        "ss_network_alpha": _num(alpha if alpha is not None else max(alphas)),
        "ss_network_args": "{}",
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),  # what AUTOMATIC1111 reads (network.py, detect_version)
        "ss_training_comment": f"exported by loop from {unit_name(unit)}",
        "loop_unit": str(unit),
    }
    summary = {
        "modules": len(modules),
        "rank": rank,
        "alpha": alpha,
        "text_encoder": has_te,
        "tensors": len(kohya),
    }
    return save(kohya, metadata=metadata), summary


def _unit_family(ws, unit: int) -> str:
    """The model family (loop.families) of the base a unit was trained on, from its manifest or config.yaml; "sd"
    where neither says or the base is not here to look at."""
    base = None
    try:
        base = json.loads((ws.checkpoint(unit) / "manifest.json").read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        pass
    if not base and (ws.checkpoint(unit) / "config.yaml").is_file():
        try:
            from omegaconf import OmegaConf

            base = OmegaConf.to_container(OmegaConf.load(ws.checkpoint(unit) / "config.yaml")).get("model") or {}
            base = base.get("base")
        except Exception:  # a damaged config.yaml: the weights decide
            base = None
    if not base:
        return "sd"
    try:
        from loop.families import family_of_base
        from loop.models import resolve_base

        return family_of_base(resolve_base(str(base)))
    except Exception:  # the base is gone (a deleted folder, a hub id not cached): the weights decide
        return "sd"


def _base_version(modules: dict, two_text_encoders: bool) -> str:
    """kohya's ss_base_model_version: AUTOMATIC1111 hides a LoRA tagged for another SD version than the loaded
    checkpoint. SD 2.x has a 1024-wide text encoder (and cross-attention context), SD 1.x 768, SDXL two encoders;
    any other width (the embedded model) is tagged sd_v1, which every SD 1.x-shaped model is."""
    if two_text_encoders:
        return "sdxl_base_v1-0"
    widths = {
        parts["A"].shape[1]
        for module, parts in modules.items()
        if parts["A"].dim() == 2 and module.endswith(("attn2.to_k", "attn2.to_v", "q_proj", "k_proj", "v_proj"))
    }
    return "sd_v2" if 1024 in widths else "sd_v1"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# -- export a set of rated images ------------------------------------------------------------------------------
def _tiers_for(which: str) -> tuple[str, ...]:
    name = (which or "").strip()
    if name.lower() == "golden":
        return ("UR",)
    if name.upper() in TIERS:
        return TIERS[: TIERS.index(name.upper()) + 1]
    raise LoopError(f"unknown set {which!r}; use golden or a tier ({', '.join(TIERS)}) meaning that tier and above")


def _custom_diffusion_captions(ws) -> dict[str, tuple[str, str]]:
    """sha256 -> (modifier token, caption) of the images a Custom Diffusion unit with a modifier token trained on
    (the latest such unit's, from the units' manifest.json): it trained on "<token> caption"."""
    found = {}
    for folder in sorted((ws.root / "checkpoints").glob("unit_*")):
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict) or not manifest.get("modifier_token"):
            continue
        token = manifest["modifier_token"]
        for item in manifest.get("images") or []:
            if isinstance(item, dict) and item.get("sha256"):
                found[item["sha256"]] = (token, item.get("caption") or "")
    return found


def _trigger(row) -> str:
    """The modifier token a Custom Diffusion unit put before the prompt it made this image from ("" for none)."""
    try:
        params = json.loads(row["params"] or "{}")
    except (ValueError, TypeError):
        return ""
    return str(params.get("trigger") or "") if isinstance(params, dict) else ""


def export_set(ws, store, which: str, out: Path, log=print) -> dict:
    """Write the images rated `which` (golden = UR; a tier = it and above) as a Hugging Face imagefolder.

    Each image's `text` is the caption to train it with: the one a Custom Diffusion unit trained on it with (its
    modifier token first), else the text the model was given (a Custom Diffusion unit's images: its token, then the
    prompt), else the prompt; `modifier_token` names that token (a trainer adds it to the tokenizer; export-lora
    gives its embedding), and `negative_prompt` is the image's own."""
    tiers = _tiers_for(which)
    out = Path(out).expanduser().resolve()
    if out == ws.root or ws.root in out.parents:  # into generations/ or golden/ it would pollute the workspace
        raise LoopError(f"--out {out} is inside the workspace {ws.root}; choose a folder outside the workspace")
    if out.exists() and not out.is_dir():
        raise LoopError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise LoopError(f"--out {out} is not empty; give a new or empty folder")

    order = {t: i for i, t in enumerate(TIERS)}
    rows = sorted((r for r in store.images() if r["tier"] in tiers), key=lambda r: (order[r["tier"]], r["id"]))
    label = "golden (UR)" if which.strip().lower() == "golden" else f"{'/'.join(tiers)}"
    if not rows:
        hint = "rate some images UR first" if tiers == ("UR",) else f"rate some images {tiers[-1]} or better first"
        raise LoopError(f"no images rated {label} to export; {hint} (`loop rate`, or `loop import DIR --tier UR`)")

    out.parent.mkdir(parents=True, exist_ok=True)
    # an export killed before its rename left its half-written folder here, outside the workspace where recovery
    # looks: the next export to the same place removes it (unless its writer is still running)
    for stale in out.parent.glob(f".{glob.escape(out.name)}{TMP_MARK}*"):
        if stale.is_dir() and not stale.is_symlink() and not writer_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
    written, missing, damaged = 0, 0, 0
    trained = _custom_diffusion_captions(ws)
    try:
        lines = []
        for r in rows:
            src = ws.root / r["path"]
            if not src.is_file():
                log(f"skipped image {r['id']}: {r['path']} is missing from the workspace")
                missing += 1
                continue
            try:
                data = src.read_bytes()
            except OSError as e:
                log(f"skipped image {r['id']}: {r['path']} cannot be read ({e.strerror or e})")
                damaged += 1
                continue
            if sha256_bytes(data) != r["sha256"]:  # changed or damaged since it was stored: not the rated image
                log(
                    f"skipped image {r['id']}: {r['path']} no longer matches its sha256 in the store "
                    "(changed or damaged on disk); restore it from a backup"
                )
                damaged += 1
                continue
            name = f"{r['sha256'][:16]}{Path(r['path']).suffix.lower() or '.png'}"
            (tmp / name).write_bytes(data)  # the bytes just checked, not the file again
            token, caption = trained.get(r["sha256"]) or (_trigger(r), r["prompt"] or "")
            lines.append(
                {
                    "file_name": name,
                    "text": f"{token} {caption}" if token else caption,
                    "negative_prompt": r["negative_prompt"] or "",
                    "modifier_token": token or None,
                    "tier": r["tier"],
                    "unit": r["unit"],
                    "seed": r["seed"],
                    "sha256": r["sha256"],
                    "source": r["source"],
                }
            )
            written += 1
        if not lines:
            raise LoopError(
                f"all {len(rows)} images rated {label} are missing from {ws.root} or damaged (see above); "
                "nothing exported"
            )
        body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        (tmp / "metadata.jsonl").write_text(body, encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above); a rename over it is not portable
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {written} image(s) rated {label} to {out} (load with datasets: imagefolder, data_dir={out})")
    return {
        "set": which,
        "tiers": list(tiers),
        "count": written,
        "missing": missing,
        "damaged": damaged,
        "path": str(out),
    }


# -- import outside images -------------------------------------------------------------------------------------
def import_images(ws, store, src: Path, tier: str | None, source: str, log=print) -> dict:
    """Copy the images under `src` (a folder, recursively, or one file) into golden/, with rows and ratings."""
    if tier is not None:
        tier = tier.strip().upper()
        if tier not in TIERS:
            raise LoopError(f"--tier {tier!r} is not a tier; use one of {', '.join(TIERS)}")
    label = (source or "").strip() or "import"
    files, rel_to = source_files(src, ws.root)

    imported = skipped = duplicates = retiered = uncaptioned = 0
    for f in files:
        name = f.relative_to(rel_to).as_posix()
        try:
            data = f.read_bytes()
        except OSError as e:
            log(f"skipped {name}: cannot read it ({e.strerror or e})")
            skipped += 1
            continue
        checked = _check_image(data)
        if isinstance(checked, str):
            log(f"skipped {name}: {checked}")
            skipped += 1
            continue
        data, ext, width, height, fmt, png_caption, converted = checked
        sha = sha256_bytes(data)
        found = store.image_by_sha(sha)
        if found:
            duplicates += 1
            if tier is not None and store.tier_of(found[0]["id"]) is None:
                # already here but unrated: the tier asked for applies to it, as an event like a new import's
                store.rate(found[0]["id"], tier, rater="import")
                sync_golden(ws, store, found[0]["id"])  # a UR generated image joins golden/
                log(f"{name}: already here as image {found[0]['id']} ({found[0]['path']}), unrated: rated {tier}")
                retiered += 1
            elif tier is not None and store.tier_of(found[0]["id"]) != tier:
                # a rating people made (or an earlier import's) is not overwritten by an import; say so
                log(f"{name}: already here as image {found[0]['id']}, rated {store.tier_of(found[0]['id'])}; "
                    f"--tier {tier} not applied (re-rate it on the rating page)")  # fmt: skip
            continue
        caption, caption_from = _sidecar_caption(f)
        if caption is None:
            caption, caption_from = (png_caption, "png parameters") if png_caption else ("", None)
        # resolve golden/ only, never the file name: a link planted at golden/<sha16>.png must not be written through
        dest = ws.inside("golden") / f"{sha[:16]}{ext}"  # refuses a golden/ that resolves outside the workspace
        if dest.is_symlink():
            dest.unlink()  # atomic_write then puts a real file in its place
        wrote = not (dest.is_file() and sha256_bytes(dest.read_bytes()) == sha)  # else left by an interrupted import
        pending = IMPORT_PENDING + ws.rel(dest)
        if wrote:
            # the journal first: a kill after the rename and before the row leaves a copy that recovery may remove
            # because this entry names it; a file in golden/ that no entry names is never removed (see recover)
            store.set_state(pending, {"sha256": sha, "pid": os.getpid(), "at": time.time()})
            atomic_write(dest, data)
        params = {"original_name": f.name, "original_path": str(f), "format": fmt, "caption_from": caption_from}
        if converted:
            params["converted"] = converted  # stored as the PNG people see: what was changed
        try:
            with store.tx():  # row and rating together
                image_id = store.add_image(
                    sha256=sha,
                    path=ws.rel(dest),
                    prompt=caption,
                    params=params,
                    source=label,
                    width=width,
                    height=height,
                )
                if tier is not None:
                    store.rate(image_id, tier, rater="import")
                store.drop_state(pending)  # with the row: recorded now
        except BaseException:
            if wrote:
                dest.unlink(missing_ok=True)  # no file without its row
                store.drop_state(pending)
            raise
        imported += 1
        uncaptioned += not caption
    rated = f", rated {tier}" if tier else ""
    now = f" ({retiered} of them unrated until now: rated {tier})" if retiered else ""
    log(
        f"imported {imported} image(s) into {ws.root / 'golden'}{rated}; "
        f"{duplicates} already there{now}, {skipped} skipped (not readable images)"
    )
    if uncaptioned:
        # a unit trains on each image with its caption; the empty one is what classifier-free guidance's
        # unconditional branch (and train.uncond_preservation) uses, so these teach the look without words
        log(
            f"warning: {uncaptioned} imported image(s) have no caption (no NAME.txt or NAME.caption beside them, "
            "no PNG parameters): they train with the empty caption. To caption an image, put NAME.txt beside "
            "it before importing"
        )
    out = {"imported": imported, "skipped": skipped, "duplicates": duplicates}
    if retiered:  # (only then: callers compare the plain counts)
        out["retiered"] = retiered
    return out


def source_files(src: Path, root: Path) -> tuple[list[Path], Path]:
    """The files an import of `src` reads (a folder recursively, caption files left out, or one file) and the
    folder their names are relative to. LoopError for a source that does not exist, a folder without files, or
    a folder that is the workspace `root`, lies inside it or holds it (the import would read the workspace)."""
    src = Path(src).expanduser()
    if not src.exists():
        raise LoopError(f"{src} does not exist; give a folder of images or an image file")
    src, root = src.resolve(), Path(root).resolve()
    if not src.is_dir():
        return [src], src.parent
    if src == root or root in src.parents or src in root.parents:
        where = "is" if src == root else "is inside" if root in src.parents else "holds"
        raise LoopError(f"{src} {where} the workspace {root}; import from a folder outside the workspace")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() not in CAPTION_EXTS)
    if not files:
        raise LoopError(f"no image files found in {src}; give a folder with PNG, JPEG or WebP images")
    return files, src


def readable_images(files: list[Path]) -> list[Path]:
    """The files that import would take (fully decodable images)."""
    out = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if not isinstance(_check_image(data), str):
            out.append(f)
    return out


def _check_image(data: bytes):
    """(bytes to store, ext, width, height, format, png caption, conversions) for a fully decodable image; else
    the reason it was skipped, saying what to do. PNG, JPEG and WebP in plain 8-bit modes are stored byte for
    byte; anything a plain RGB conversion would get wrong (EXIF rotation, 16-bit, CMYK, several frames) and
    every other format PIL reads is stored as a PNG of what people see (loop.images.to_rgb)."""
    import re
    import warnings

    from PIL import Image, ImageFile

    from loop.images import a1111_prompt, oddities, to_rgb

    if not data:
        return "empty file (0 bytes); copy it again from where it came from"
    truncated_ok, max_pixels = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file must fail here, whatever another library set
    Image.MAX_IMAGE_PIXELS = max_pixels or 1024 * 1024 * 1024 // 4 // 3  # and the bomb guard stays on (PIL's default)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large but allowed: just load it
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                caption = ""
                if fmt == "PNG":
                    caption = a1111_prompt(str(im.info.get("parameters") or ""))
                odd = oddities(im)
                if fmt in KEEP_FORMATS and not odd:
                    return data, KEEP_FORMATS[fmt], im.width, im.height, fmt, caption, []
                frame = to_rgb(im, alpha=True)
                buf = io.BytesIO()
                frame.save(buf, format="PNG")
                return buf.getvalue(), ".png", frame.width, frame.height, fmt, caption, odd
    except Image.DecompressionBombError as e:
        sizes = re.findall(r"\d+", str(e))
        what = f"{sizes[0]} pixels, over PIL's limit of {sizes[1]}" if len(sizes) >= 2 else "over PIL's limit"
        return f"too many pixels to be a safe image ({what}); scale it down first"
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ValueError...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "cannot identify image file" in msg:
            return "not an image PIL can read; give PNG, JPEG, WebP, GIF, BMP or TIFF files"
        return f"not a readable image ({msg}); it may be cut off or damaged: copy or export it again"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated_ok, max_pixels


def _sidecar_caption(f: Path) -> tuple[str | None, str | None]:
    """The caption in a sibling `name.txt` (or name.caption, name.png.txt), whitespace collapsed to one line."""
    for cand in (f.with_suffix(".txt"), f.with_suffix(".caption"), f.with_name(f.name + ".txt")):
        if cand.is_file():
            try:
                text = cand.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            return " ".join(text.split()), cand.name
    return None, None


# -- writing a unit as one file ------------------------------------------------------------------------------------
DTYPES = ("float16", "float32", "bfloat16")  # export-model --dtype, as torch names them


def unit_base(ws, cfg, unit: int) -> tuple[str, str]:
    """(model.base, model.config) unit `unit` was trained on: its manifest's base, else the workspace's."""
    manifest = ws.checkpoint(unit) / "manifest.json"
    base, config = cfg.model.base, cfg.model.config
    if unit > 0 and manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError):
            recorded = None
        if recorded and recorded != base:
            base, config = recorded, ""  # model.config was for the workspace's base, not this one
    return base, config


def export_model(ws, store, cfg, unit: int, out: Path, dtype: str = "float16", log=print) -> dict:
    """Write unit `unit` merged into its base as one .safetensors checkpoint in the original layout (what
    AUTOMATIC1111 and ComfyUI load as a model, and loop as model.base); returns a summary.

    The file's metadata carries the diffusers configs (so diffusers and loop rebuild the architecture offline) and
    where it came from (unit, base, loop version)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from loop.checkpoint import CONFIGS_KEY, is_single_file, pipeline_configs, pipeline_to_original
    from loop.config import ModelConfig
    from loop.models import load_unit, unit_trigger

    # 1. the unit, and where to write it
    if dtype not in DTYPES:
        raise LoopError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if unit < 0:
        raise LoopError(f"unit must be 0 or more, got {unit}")
    folder = ws.checkpoint(unit)
    if unit > 0 and not (folder / "pytorch_lora_weights.safetensors").is_file():
        with_weights = _units_with_weights(ws)
        have = sorted({r["unit"] for r in store.units()} | set(with_weights))
        if unit not in have:
            hint = (
                f"units with weights: {', '.join(map(str, with_weights))}" if with_weights else "none is trained yet"
            )
            raise LoopError(f"unit {unit} does not exist ({hint}); `loop run --round` trains the next one")
        raise LoopError(f"unit {unit} has no weights at {folder}; train it with `loop run --round {unit - 1}`")
    token = unit_trigger(folder) if unit > 0 else ""
    if token:
        raise LoopError(
            f"unit {unit} learned a new word {token!r} (Custom Diffusion's modifier token), which a checkpoint file "
            f"cannot carry (its vocabulary is fixed); export its adapter with `loop export-lora --unit {unit}`"
        )
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{unit_name(unit)}.safetensors"
    if out.suffix.lower() != ".safetensors":
        raise LoopError(f"--out {out} should name a .safetensors file or an existing folder")
    base, config = unit_base(ws, cfg, unit)
    if is_single_file(base) and out.resolve() == Path(base).expanduser().resolve():
        raise LoopError(f"--out {out} is the base model itself (units trained on it need it); choose another path")

    # 2. merge the adapter into the base, in fp32 on the CPU
    pipe = load_unit(ModelConfig(base=base, config=config, device="cpu", dtype="float32"), folder, unit)
    if unit > 0:
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay

    # 3. original names, configs and provenance, one atomic write
    tensors = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in pipeline_to_original(pipe).items()}
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    try:
        loop_version = version("loop")
    except PackageNotFoundError:
        loop_version = "unknown"
    meta = {
        "format": "pt",
        CONFIGS_KEY: json.dumps(pipeline_configs(pipe), sort_keys=True),
        "loop.unit": str(unit),
        "loop.base": base,
        "loop.version": loop_version,
        # Stability AI's model spec, which AUTOMATIC1111 and ComfyUI show
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if sdxl
        else "https://github.com/CompVis/stable-diffusion",
        "modelspec.title": f"loop {unit_name(unit)} ({Path(ws.root).name})",
    }
    from safetensors.torch import save

    atomic_write(out, save(tensors, metadata=meta))
    size = out.stat().st_size
    log(f"exported unit {unit} merged into {base} to {out} ({len(tensors)} tensors, {dtype}, {size / 1e6:.1f} MB)")
    _say_noise_prior(ws, unit, log)
    return {"path": str(out), "unit": unit, "base": base, "tensors": len(tensors), "dtype": dtype, "bytes": size}
