"""Builders for the embedded tiny Stable-Diffusion-shaped pipeline.

`python -m loop.tiny.train` uses these to make and train the shipped weights; tests use `tiny_components()`
for random-init parts of the same shapes. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from loop.tiny.shapes import WORDS

MODEL_DIR = Path(__file__).parent / "model"
IMAGE_SIZE = 32  # pixels; the VAE halves it once, so latents are 4 x 16 x 16
TEXT_DIM = 64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (transformers 5 no longer exports it)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE vocabulary whose merges make every caption word a single token.

    Any UTF-8 text (Japanese, emoji) still tokenizes, byte by byte; the shape/colour words of the training
    captions become one token each, which makes the tiny text encoder far easier to train.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen_merges = set()
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            pair = (cur, nxt)
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
                vocab_list.append(cur + nxt)
            cur = cur + nxt
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "pad_token": "<|endoftext|>",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            },
            indent=2,
        )
    )


def load_tokenizer(folder: Path | None = None):
    from transformers import CLIPTokenizer

    folder = Path(folder or MODEL_DIR / "tokenizer")
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def tiny_components(tokenizer=None, seed: int = 0) -> dict:
    """Random-init components of the embedded model's exact shapes (what the train script starts from)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or load_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=TEXT_DIM * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_model(pipe, folder: Path) -> None:
    """Save a pipeline as the shipped model is saved: diffusers folders, then made readable by every version."""
    import torch

    pipe.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    make_portable(Path(folder))


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SDXL has two


def make_portable(folder: Path) -> None:
    """Rewrite a saved pipeline so that a plain `DiffusionPipeline.from_pretrained(folder)` loads it right with
    every diffusers and transformers version pyproject allows.

    - fp32 weights, and `float32` in the text encoder's config: transformers 5 loads a model in the dtype its
      config names, diffusers loads fp32, and an fp16 text encoder feeding an fp32 UNet fails with "mat1 and mat2
      must have the same dtype" (fp16 values widen to fp32 exactly, so the images do not change);
    - the text encoders' keys under `text_model.` (a projection's own keys aside): transformers 4.x's
      CLIPTextModel reads only that naming (keys without it come up randomly initialised), and 5.x reads both (it
      drops the prefix as it loads).
    """
    import torch
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(folder).glob("*/*.safetensors")):
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(path).items()}
        if path.parent.name in TEXT_ENCODERS:
            tensors = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                       for k, v in tensors.items()}  # fmt: skip
        save_file(tensors, path, metadata={"format": "pt"})
    for name in TEXT_ENCODERS:
        config_path = Path(folder) / name / "config.json"
        if not config_path.exists():
            continue
        config = json.loads(config_path.read_text())
        config.update(dtype="float32", torch_dtype="float32")  # transformers 5 reads `dtype`, 4.x `torch_dtype`
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def assemble(components: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


if __name__ == "__main__":
    write_tokenizer(MODEL_DIR / "tokenizer")
    print("wrote", MODEL_DIR / "tokenizer")
