"""Procedurally drawn coloured shapes with captions: the embedded model's training data.

Used by `python -m loop.tiny.train` (which builds the shipped weights) and by tests that need images.
Captions name each attribute only some of the time, so an under-specified prompt such as "a circle"
leaves colour, size and background to the seed: that spread is what a taste-driven loop can move.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Named colours (RGB). Warm and cold ones in roughly equal numbers so a "warm" preference has room to move.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 50),
    "pink": (240, 130, 190),
    "brown": (130, 80, 40),
    "green": (50, 170, 70),
    "cyan": (50, 200, 220),
    "blue": (40, 70, 220),
    "purple": (130, 60, 190),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES = ("small", "big")
WORDS = sorted({*PALETTE, *SHAPES, *SIZES, "a", "an", "on", "shape", "background", "with"})


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    cx: float
    cy: float
    jitter: tuple[int, int, int]

    def caption(self, rng: random.Random, p_keep: float = 0.6) -> str:
        """A caption that names each attribute with probability `p_keep` (the shape word always appears)."""
        words = ["a"]
        if rng.random() < p_keep * 0.5:
            words.append(self.size)
        if rng.random() < p_keep:
            words.append(self.color)
        words.append(self.shape if rng.random() < 0.85 else "shape")
        if rng.random() < p_keep:
            words += ["on", self.background]
        return " ".join(words)

    def full_caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on {self.background}"


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(list(PALETTE), 2)
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        background=background,
        size=rng.choice(SIZES),
        cx=rng.uniform(0.35, 0.65),
        cy=rng.uniform(0.35, 0.65),
        jitter=tuple(rng.randint(-20, 20) for _ in range(3)),
    )


def _shade(rgb: tuple[int, int, int], jitter: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(rgb, jitter))


def draw(scene: Scene, size: int = 32) -> Image.Image:
    """Render a scene, supersampled 4x for smooth edges."""
    s = size * 4
    img = Image.new("RGB", (s, s), _shade(PALETTE[scene.background], scene.jitter[::-1]))
    d = ImageDraw.Draw(img)
    r = s * (0.32 if scene.size == "big" else 0.18)
    cx, cy = scene.cx * s, scene.cy * s
    fill = _shade(PALETTE[scene.color], scene.jitter)
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(4, int(r * 0.35)))
    elif scene.shape == "square":
        d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def batch(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[Scene]]:
    """n images as uint8 HWC plus their scenes, deterministic in `seed`."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    arr = np.stack([np.asarray(draw(sc, size)) for sc in scenes])
    return arr, scenes
