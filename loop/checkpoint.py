"""Single-file checkpoints, as AUTOMATIC1111, ComfyUI and Civitai keep models: one as `model.base`, and a unit
merged into its base written as one.

    loop generate model.base=models/my_model.safetensors [model.config=<diffusers folder>]
    loop export-model --unit N --out my_model.safetensors

A single file holds the weights in the original (CompVis LDM / Stability SGM) layout:

    model.diffusion_model.*                         the UNet
    first_stage_model.*                             the VAE
    cond_stage_model.transformer.text_model.*       CLIP ViT-L, SD 1.x
    conditioner.embedders.0.transformer.text_model.*    CLIP ViT-L, SDXL
    conditioner.embedders.1.model.*                 OpenCLIP ViT-bigG, SDXL (fused q/k/v, text_projection transposed)

diffusers reads that layout (`from_single_file`) but needs the architecture's configs to build the models, and
offline they must be on disk: loop looks in `model.config`, then in the file's own metadata (loop's export writes
them there), then in the Hugging Face cache. The converters below go the other way, diffusers names to original
names, computed from each model's config (block counts are not SD 1.5's fixed ones), for `export-model`.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from loop.errors import LoopError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# where each text encoder goes, per family
SD_TEXT = {"text_encoder": "cond_stage_model.transformer."}
SDXL_TEXT = {
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
SDXL_KEY = "conditioner.embedders.1.model."
CONFIGS_KEY = "loop.diffusers"  # metadata: the diffusers configs (and tokenizer files), {relative path: text}
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE = (".safetensors", *PICKLED)


# -- names: diffusers -> original -----------------------------------------------------------------------------
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled text + size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str, names: dict) -> str:
    head, _, tail = rest.partition(".")
    if head not in names:
        raise KeyError(head)
    return f"{names[head]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """The original (openaimodel.UNetModel) name of a diffusers UNet2DConditionModel weight.

    Down block i, layer j is input block 1 + i*(L+1) + j (resnet at .0, transformer at .1) and its downsampler
    closes the level at input block (i+1)*(L+1); up block i, layer j is output block i*(L+1) + j, its upsampler
    the last module of output block i*(L+1) + L (.1 after a resnet alone, .2 after a transformer)."""
    per = config["layers_per_block"] + 1
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * per + j
        return f"input_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * per + j
        return f"output_blocks.{n}.0.{_resnet(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        after = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        return f"output_blocks.{i * per + per - 1}.{after}.conv.{m[2]}"
    raise KeyError(key)


_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config: dict) -> str:
    """The original (ldm Encoder/Decoder) name of a diffusers AutoencoderKL weight; the decoder's levels count
    down (diffusers' up_blocks.0 is the original up.{n-1})."""
    n = len(config["block_out_channels"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[2] in _VAE_ATTN:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    raise KeyError(key)


def unet_to_original(sd: dict, config: dict, prefix: str = UNET) -> dict:
    if not isinstance(config["layers_per_block"], int):
        raise LoopError(
            f"the UNet has layers_per_block={config['layers_per_block']} (differing per level), which the original "
            "single-file layout cannot name; export it with `loop export-lora` instead"
        )
    return _renamed(sd, lambda k: unet_key(k, config), prefix, "UNet")


def vae_to_original(sd: dict, config: dict, prefix: str = VAE) -> dict:
    out = _renamed(sd, lambda k: vae_key(k, config), prefix, "VAE")
    for key, value in out.items():  # the mid-block attention is 1x1 convolutions there, linear layers here
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def clip_to_original(sd: dict, prefix: str) -> dict:
    """CLIP ViT-L (transformers' CLIPTextModel) as the original keeps it: transformers 4.x's names under `prefix`
    (transformers 5 drops the `text_model.` level of CLIPTextModel; the file always has it)."""
    out = {}
    for key, value in sd.items():
        rest = key.removeprefix("text_model.")
        if not re.match(r"(embeddings|encoder|final_layer_norm)\.", rest):
            raise LoopError(f"the text encoder has a weight {key!r} the original CLIP layout has no place for")
        if rest != "embeddings.position_ids":  # a buffer, not a weight
            out[f"{prefix}text_model.{rest}"] = value
    return out


_OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_original(sd: dict, prefix: str) -> dict:
    """OpenCLIP ViT-bigG (SDXL's second text encoder, a CLIPTextModelWithProjection) in open_clip's layout:
    q, k and v fused into one in_proj, the projection stored transposed and without `.weight`."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out, qkv = {}, {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[f"{prefix}token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[f"{prefix}positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[f"{prefix}ln_final.{key.split('.')[-1]}"] = value
        elif key == "text_projection.weight":
            out[f"{prefix}text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            qkv[(int(m[1]), m[3], m[2])] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.attn.out_proj.{m[2]}"] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(.+)", key):
            out[f"{prefix}transformer.resblocks.{m[1]}.{_OPEN_CLIP[m[2]]}.{m[3]}"] = value
        else:
            raise LoopError(f"the second text encoder has a weight {key!r} the OpenCLIP layout has no place for")
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in qkv}):
        parts = [qkv.pop((layer, kind, x)) for x in "qkv"]
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
    return out


def _renamed(sd: dict, name, prefix: str, what: str) -> dict:
    out = {}
    for key, value in sd.items():
        try:
            out[prefix + name(key)] = value
        except KeyError:
            raise LoopError(
                f"the {what} has a weight {key!r} the original single-file layout has no name for; "
                "export this unit with `loop export-lora` instead"
            ) from None
    return out


def pipeline_to_original(pipe) -> dict:
    """Every weight of an SD 1.x or SDXL pipeline under its original single-file name."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    te = pipe.text_encoder.config
    if not sdxl and getattr(te, "hidden_act", "quick_gelu") != "quick_gelu":
        raise LoopError(
            "this base's text encoder is OpenCLIP (Stable Diffusion 2.x), whose single-file layout keeps a layer "
            "diffusers drops; export-model writes SD 1.x and SDXL models: use `loop export-lora` for this unit"
        )
    out = unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config))
    out.update(vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config)))
    texts = SDXL_TEXT if sdxl else SD_TEXT
    out.update(clip_to_original(pipe.text_encoder.state_dict(), texts["text_encoder"]))
    if sdxl:
        out.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), texts["text_encoder_2"]))
    return out


# -- the configs a file carries ---------------------------------------------------------------------------------
def pipeline_configs(pipe) -> dict[str, str]:
    """The diffusers folder of `pipe` without its weights ({relative path: text}): model_index.json, each model's
    config.json, the scheduler's config and the tokenizer files, enough for `from_single_file(config=...)`."""
    with tempfile.TemporaryDirectory(prefix="loop-configs-") as tmp:
        root = Path(tmp)
        pipe.save_config(root)
        for name, part in pipe.components.items():
            if part is None:
                continue
            if hasattr(part, "save_config"):  # diffusers models and schedulers
                part.save_config(root / name)
            elif hasattr(part, "config") and hasattr(part.config, "save_pretrained"):  # transformers models
                part.config.save_pretrained(root / name)
            elif hasattr(part, "save_pretrained"):  # tokenizers
                part.save_pretrained(root / name)
        return {
            p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".json", ".txt", ".model")
        }


def write_configs(files: dict[str, str], folder: Path) -> Path:
    for rel, text in files.items():
        path = (folder / rel).resolve()
        if folder.resolve() not in path.parents:  # a file's metadata names paths: never outside the folder
            raise LoopError(f"the checkpoint's embedded configs name a path outside their folder ({rel!r})")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def file_configs(path: Path) -> dict[str, str] | None:
    """The diffusers configs a single file carries in its metadata (loop's export writes them), or None."""
    meta = _header(path)[1]
    if CONFIGS_KEY not in meta:
        return None
    try:
        files = json.loads(meta[CONFIGS_KEY])
    except ValueError:
        return None
    return files if isinstance(files, dict) and "model_index.json" in files else None


# -- reading a single file as model.base --------------------------------------------------------------------------
def is_single_file(base: str) -> bool:
    return Path(base).expanduser().suffix.lower() in SINGLE_FILE and not Path(base).expanduser().is_dir()


def _header(path: Path) -> tuple[dict, dict]:
    """(name -> shape, metadata) from a safetensors file's header, reading no weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        why = str(e).splitlines()[0].strip() if str(e).strip() else type(e).__name__
        raise LoopError(f"model.base={str(path)!r} is not a readable safetensors file ({why[:200]})") from e


def check_single_file(base: str, config: str = "") -> str:
    """Fail at once, with what to do, on a single-file model.base loop cannot load; returns where the architecture's
    configs will come from ("model.config", "file" or the hub id)."""
    path = Path(base).expanduser()
    if path.suffix.lower() in PICKLED:
        raise LoopError(
            f"model.base={base!r} is a pickled checkpoint, and loading one runs whatever code it holds; convert it "
            "to .safetensors once (e.g. with a trusted tool), or give a .safetensors file or a diffusers folder"
        )
    if not path.is_file():
        raise LoopError(f"model.base={base!r}: no such file; give a .safetensors checkpoint, a diffusers folder, "
                        "a Hugging Face hub id, or `embedded`")  # fmt: skip
    shapes, meta = _header(path)
    if not any(k.startswith(UNET) for k in shapes):
        raise LoopError(
            f"model.base={base!r} holds no Stable Diffusion UNet (no {UNET}* weights): it may be a LoRA, a VAE or an "
            "embedding; give a whole-model checkpoint"
        )
    if config:
        return "model.config"
    if file_configs(path) is not None:
        return "file"
    repo = hub_config_repo(shapes)
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        family = "SDXL" if _is_sdxl(shapes) else "Stable Diffusion"
        raise LoopError(
            f"model.base={base!r} is a single-file {family} checkpoint, and building it offline needs its diffusers "
            f"configs, which neither the file nor the Hugging Face cache ({repo}) holds: set model.config to a "
            "diffusers folder of the same architecture (the model it was fine-tuned from), or run once online"
        )
    return repo


def _is_sdxl(names) -> bool:
    return any(k.startswith(SDXL_KEY) for k in names)


def hub_config_repo(shapes: dict) -> str:
    """The hub repo whose configs diffusers would use for a file with these weights (its own guess by key)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    return fetch_diffusers_config(meta)["pretrained_model_name_or_path"]


def load_single_file(base: str, config: str, dtype: torch.dtype):
    """A pipeline from a single-file checkpoint, its architecture from `config` (a diffusers folder or hub id), else
    the file's own metadata, else the Hugging Face cache."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from huggingface_hub import constants

    source = check_single_file(base, config)
    path = Path(base).expanduser()
    cls = StableDiffusionXLPipeline if _is_sdxl(_header(path)[0]) else StableDiffusionPipeline
    extra = (  # no invisible watermark (it would change the pixels a unit is compared by), no safety checker
        dict(add_watermarker=False)
        if cls is StableDiffusionXLPipeline
        else dict(safety_checker=None, requires_safety_checker=False)
    )
    with tempfile.TemporaryDirectory(prefix="loop-single-file-") as tmp:
        if source == "model.config":
            where = str(Path(config).expanduser()) if Path(config).expanduser().is_dir() else config
        elif source == "file":
            where = str(write_configs(file_configs(path), Path(tmp)))
        else:
            where = None  # diffusers finds its own default repo in the cache
        try:
            pipe = cls.from_single_file(
                str(path),
                config=where,
                torch_dtype=dtype,
                local_files_only=constants.HF_HUB_OFFLINE,
                feature_extractor=None,
                **extra,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoopError(
                f"model.base={base!r} could not be loaded with the configs from {where or source} ({first[:200]}); "
                "set model.config to a diffusers folder of the model's own architecture"
            ) from e
    return pipe
