"""PNG files with their metadata, and the cheap image features the scripted rater uses.

Each PNG carries an A1111-style `parameters` text chunk (so AUTOMATIC1111, ComfyUI and friends read the
prompt and settings) and a `loop` chunk with everything loop knows, as JSON. Because the PNG is
self-describing, a file whose database row was lost in a crash can be re-adopted from the file alone.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

SAMPLER_NAMES = {"dpm++": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "ddpm": "DDPM"}


def schedule_type(config, sampler: str = "dpm++") -> str:
    """AUTOMATIC1111's `Schedule type` (1.9+, modules/sd_schedulers.py's labels) for the noise levels a diffusers
    scheduler with this config steps through as loop's `sampler`. An infotext without the field reads as
    "Automatic", which for DPM++ 2M means Karras: not what diffusers' DPMSolverMultistepScheduler draws unless
    use_karras_sigmas is set. Diffusers' "trailing" and "linspace" spacings step evenly in time from the last
    training timestep, as A1111's "SGM Uniform" does; "leading" (steps_offset 1) is A1111's "DDIM" schedule,
    except for DPM++ 2M, which steps by 1000 // (steps + 1) there, nearest to "SGM Uniform"."""
    config = dict(config or {})
    for flag, label in (
        ("use_karras_sigmas", "Karras"),
        ("use_exponential_sigmas", "Exponential"),
        ("use_beta_sigmas", "Beta"),
    ):
        if config.get(flag):
            return label
    leading = config.get("timestep_spacing", "linspace") == "leading"
    return "DDIM" if leading and sampler != "dpm++" else "SGM Uniform"


# one `Key: value` of A1111's settings line; a value with a comma, colon or newline is JSON-quoted
# (modules/infotext_utils.py: re_param_code, and quote() in processing.py's create_infotext)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# extra-network tags in A1111 prompts (<lora:name:0.8>): they name files to load, not what the image shows
EXTRA_NETWORK_TAG = re.compile(r"<(?:lora|lyco|lycoris|hypernet):[^>]*>", re.IGNORECASE)


def _quote(value) -> str:
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def a1111_prompt(parameters: str) -> str:
    """The prompt of an A1111 `parameters` text, split off as A1111's parse_generation_parameters does it: the
    lines before a `Negative prompt:` line, and before a last line of settings (one with three or more
    `Key: value` pairs). Its lines are joined with spaces, and extra-network tags are dropped: it becomes a
    training caption."""
    lines = str(parameters or "").strip().split("\n")
    if len(A1111_PARAM.findall(lines[-1])) >= 3:
        lines = lines[:-1]
    prompt = []
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt.append(line.strip())
    text = EXTRA_NETWORK_TAG.sub("", " ".join(prompt))
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, <lora:x:1>, b" -> "a, , b" -> "a, b"
    return re.sub(r"\s+", " ", text).strip(" ,")


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111 writes: prompt, negative prompt, then one line of settings."""
    prompt = meta.get("prompt", "")
    lines = [f"{meta['trigger']} {prompt}" if meta.get("trigger") else prompt]  # the text the model was given
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    settings = [
        f"Steps: {meta.get('steps')}",
        f"Sampler: {_quote(SAMPLER_NAMES.get(meta.get('sampler'), meta.get('sampler')))}",
        *([f"Schedule type: {meta['schedule_type']}"] if meta.get("schedule_type") else []),  # (A1111 1.9+)
        f"CFG scale: {meta.get('cfg')}",
        *([f"Rescale CFG: {meta['guidance_rescale']}"] if meta.get("guidance_rescale") else []),  # (Forge's label)
        f"Seed: {meta.get('seed')}",
        f"Size: {meta.get('width')}x{meta.get('height')}",
        f"Model: {_quote(meta.get('model'))}",
    ]
    if meta.get("strength") is not None:  # img2img, as A1111 writes it
        settings.append(f"Denoising strength: {meta['strength']}")
    if meta.get("unit") is not None:
        settings.append(f"Loop unit: {meta['unit']}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def png_bytes(image: Image.Image, meta: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_itxt("loop", json.dumps(meta, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_meta(path: Path) -> dict | None:
    """The `loop` JSON chunk of a PNG, or None if the file has none or cannot be read."""
    try:
        with Image.open(path) as im:
            raw = im.info.get("loop") if im.format == "PNG" else None
        return json.loads(raw) if raw else None
    except Exception:
        return None


PLAIN_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")  # 8-bit modes every reader converts to RGB correctly
ORIENTATION = 0x0112  # the EXIF tag


def oddities(im: Image.Image) -> list[str]:
    """What a plain `im.convert("RGB")` would get wrong about an opened image: [] when nothing."""
    out = []
    if getattr(im, "n_frames", 1) > 1:
        out.append(f"first of {im.n_frames} frames")
    if im.getexif().get(ORIENTATION, 1) not in (1, None):
        out.append("EXIF orientation applied")
    if im.mode not in PLAIN_MODES:
        out.append(f"{im.mode} to 8-bit RGB")
    return out


def to_rgb(im: Image.Image, alpha: bool = False) -> Image.Image:
    """An opened image as people see it: its first frame, EXIF orientation applied, 8 bits per channel, RGB
    (RGBA with `alpha` if it has transparency). 16-bit pixels are scaled down, not clipped to white."""
    from PIL import ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I (32-bit int), F (float): one channel, deep
        x = np.asarray(im, dtype=np.float64)
        peak = float(x.max()) if x.size else 0.0
        if im.mode == "F" and peak <= 1.0:
            x = x * 255.0  # float images are usually 0..1
        elif im.mode.startswith("I;16") or peak > 255:
            x = x / 257.0  # 16-bit range: 65535 -> 255
        im = Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    return im.convert("RGBA" if alpha and has_alpha else "RGB")


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(to_rgb(im))


# The opponent-colour basis (rows orthonormal): red-green, yellow-blue, and the grey axis (lightness).
OPPONENT = np.array([[1, -1, 0], [1, 1, -2], [1, 1, 1]], dtype=np.float64)
OPPONENT /= np.linalg.norm(OPPONENT, axis=1, keepdims=True)


def rotate_hue(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Every colour of the picture turned by `degrees` about the grey axis: the same picture in other colours. A
    rotation, so each pixel keeps its lightness (mean of R, G, B) and every two colours keep their distance, so a
    figure stands out from its ground as much as before (up to clipping at 0 and 255). Why not PIL's HSV hue: HSV
    changes lightness and distances with the hue, so a figure would grow or shrink against its ground."""
    t = np.deg2rad(degrees)
    turn = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    m = OPPONENT.T @ turn @ OPPONENT
    out = np.asarray(rgb, dtype=np.float64)[..., :3] @ m.T
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def preference_score(rgb: np.ndarray, preference: str) -> float:
    """The scripted rater's taste, on 0..255 pixel values: higher is better. The colour statistics are here; the
    multi-attribute tastes (small_dark, contrast, centred_big) are in loop.tastes."""
    from loop.tastes import TASTES, taste_score  # a leaf module: numpy only

    if preference in TASTES and preference != "warm":
        return taste_score(rgb, preference)
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0].mean(), x[..., 1].mean(), x[..., 2].mean()
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    return float({"warm": r - b, "cool": b - r, "bright": lum, "dark": 255.0 - lum}[preference])
