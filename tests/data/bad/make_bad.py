"""The bad-input corpus: files a person really drops into loop, made here with PIL and numpy (no downloads).

    python tests/data/bad/make_bad.py OUTDIR     writes every item into OUTDIR and lists them
    make_corpus(outdir) -> {name: path}          the same, from a test

Images (the first three can't be read; the other five can, and import converts them):

    empty.png        zero bytes
    truncated.png    a valid PNG cut in half
    text.png         a text file saved as .png
    bomb.png         an IHDR declaring 100000x100000 pixels (valid CRCs): PIL's decompression-bomb guard
    cmyk.jpg         a CMYK JPEG
    gray16.png       a 16-bit grayscale PNG (mode I;16), a left-to-right ramp 0..65535
    exif6.jpg        a 40x20 JPEG whose EXIF orientation (6) says "rotate 90 degrees clockwise"
    animated.gif     three frames, red then green then blue

Prompt files (configs/prompts.txt): latin1_prompts.txt (a latin-1 line between valid lines) and
long_prompts.txt (a 1 MB line between valid lines). Configs (configs/loop.yaml): wrong_type.yaml
(`generate: {steps: many}`) and unknown_key.yaml (`generate: {stepz: 4}`). Command-line items are plain
strings in BAD_ARGS. A LoRA trained on another base model: other_base_lora/ is a checkpoints/unit_001
folder (pytorch_lora_weights.safetensors) whose module names match the embedded UNet but whose shapes don't.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# command-line values that can't be used: (what, argv after `loop -w WS`)
BAD_ARGS = {
    "negative_images_per_prompt": ["generate", "generate.images_per_prompt=-3"],
    "negative_count": ["generate", "--count", "-5"],
    "missing_model": ["generate", "model.base=/nonexistent/model"],
}

BAD_IMAGES = ("empty.png", "truncated.png", "text.png", "bomb.png")
ODD_IMAGES = ("cmyk.jpg", "gray16.png", "exif6.jpg", "animated.gif")
GOOD_PROMPTS = ("a circle", "a square")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A well-formed PNG header (valid CRCs) declaring width x height RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    buf = io.BytesIO()
    _noise(64, 64, 1).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (32, 24), (0, 200, 200, 0)).save(buf, format="JPEG", quality=95)  # a red
    return buf.getvalue()


def gray16_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (32, 1))  # 48 wide, 32 high
    im = Image.fromarray(ramp)  # mode I;16
    assert im.mode == "I;16", im.mode
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def exif6_jpeg() -> bytes:
    """40 wide, 20 high as stored: left half red, right half blue; orientation 6 shows it 20 wide, 40 high."""
    im = Image.new("RGB", (40, 20), (220, 30, 30))
    im.paste((30, 30, 220), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def latin1_prompts() -> bytes:
    return f"{GOOD_PROMPTS[0]}\n".encode() + "un café crème\n".encode("latin-1") + f"{GOOD_PROMPTS[1]}\n".encode()


def long_prompts() -> bytes:
    return f"{GOOD_PROMPTS[0]}\n".encode() + b"x" * (1 << 20) + f"\n{GOOD_PROMPTS[1]}\n".encode()


def other_base_lora(folder: Path) -> Path:
    """A LoRA saved as training saves it, from a UNet shaped like the embedded one but twice as wide."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from loop.train import save_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return save_lora(unet, folder)


IMAGES = {
    "empty.png": lambda: b"",
    "truncated.png": truncated_png,
    "text.png": lambda: b"this is a text file, not an image\n",
    "bomb.png": bomb_png,
    "cmyk.jpg": cmyk_jpeg,
    "gray16.png": gray16_png,
    "exif6.jpg": exif6_jpeg,
    "animated.gif": animated_gif,
}
TEXTS = {
    "latin1_prompts.txt": latin1_prompts,
    "long_prompts.txt": long_prompts,
    "wrong_type.yaml": lambda: b"generate:\n  steps: many\n",
    "unknown_key.yaml": lambda: b"generate:\n  stepz: 4\n",
}


def make_corpus(outdir: Path, lora: bool = True) -> dict[str, Path]:
    """Write every item into `outdir` (images under outdir/images); returns {name: path}."""
    outdir = Path(outdir)
    (outdir / "images").mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, make in IMAGES.items():
        out[name] = outdir / "images" / name
        out[name].write_bytes(make())
    for name, make in TEXTS.items():
        out[name] = outdir / name
        out[name].write_bytes(make())
    if lora:
        out["other_base_lora"] = other_base_lora(outdir / "other_base_lora").parent
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/bad/make_bad.py OUTDIR")
    for name, path in make_corpus(Path(sys.argv[1])).items():
        print(f"{name:22s} {path}")
