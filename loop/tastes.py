"""Scripted tastes on attributes read from the picture alone: for the scripted rater (demos, tests, benchmarks).

    loop rate --auto rate.preference=small_dark
    python -m loop.bench converge --tastes warm,small_dark,contrast,centred_big

The embedded model draws one shape on a plain background, so a few attributes can be read from the pixels:
the background's colour (the median of the border), the shape (the pixels far from that colour): its size
(share of the image), its colour and hue, its position (centroid), and its contrast with the background.

A taste scores some of them and is *indifferent* to the others: a loop that learns the taste, and not just the
few pictures it was shown, keeps the indifferent attributes as varied as the base model draws them. The bench
measures that as each indifferent attribute's per-prompt spread (see `spread`).
"""

from __future__ import annotations

import numpy as np

SHAPE_DISTANCE = 48.0  # RGB distance from the background colour beyond which a pixel belongs to the shape


def attributes(rgb) -> dict:
    """The picture's attributes: size (0..1, share of the pixels), extent (0..1, the shape's bounding box's
    longer side), cx, cy (0..1), bg_lum, shape_lum (0..255), contrast (RGB distance shape-background), o1, o2
    (the shape colour's opponent-colour coordinates: red-green, yellow-blue), warmth (mean R - mean B)."""
    a = np.asarray(rgb, dtype=np.float32)[..., :3]
    h, w = a.shape[:2]
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(a - bg, axis=-1) > SHAPE_DISTANCE
    size = float(mask.mean())
    if mask.any():
        ys, xs = np.nonzero(mask)
        cx, cy = float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(h, w)
        shape = a[mask].mean(axis=0)
    else:  # no shape to be seen: centred, the background's colour
        cx = cy = 0.5
        extent = 0.0
        shape = bg
    lum = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    r, g, b = shape
    return {
        "size": size,
        "extent": float(extent),
        "cx": cx,
        "cy": cy,
        "bg_lum": float(bg @ lum),
        "shape_lum": float(shape @ lum),
        "contrast": float(np.linalg.norm(shape - bg)),
        "o1": float((r - g) / np.sqrt(2)),
        "o2": float((r + g - 2 * b) / np.sqrt(6)),
        "warmth": float(a[..., 0].mean() - a[..., 2].mean()),
    }


# What each taste's spread is measured on: an attribute is one or more of the values above.
ATTRIBUTE_KEYS = {
    "hue": ("o1", "o2"),  # the shape's colour in the opponent plane: spread = how many colours it comes in
    "position": ("cx", "cy"),
    "size": ("size",),
    "background": ("bg_lum",),
}

# taste -> (score on ~ -200..200, as warm's; the attributes it is indifferent to). Scores are centred so that the
# rater's default cut-offs (UR >= 75, SSR >= 30, SR >= -20, R >= -90) give the base model a UR rate of about a
# quarter on the four default prompts.
TASTES = {
    # mean red - mean blue over the picture (the original scripted rater)
    "warm": (lambda t: t["warmth"], ("position",)),
    # a small shape on a dark ground; the shape's colour and place do not matter
    "small_dark": (lambda t: 400.0 * (0.30 - t["size"]) + 1.2 * (110.0 - t["bg_lum"]), ("hue", "position")),
    # a shape that stands out from its ground, whatever its colour, size or place
    "contrast": (lambda t: 1.6 * (t["contrast"] - 189.0) + 75.0, ("hue", "position", "size")),
    # a big shape in the middle; its colour and the ground's brightness do not matter
    "centred_big": (
        lambda t: 400.0 * (t["extent"] - 0.6) - 900.0 * np.hypot(t["cx"] - 0.5, t["cy"] - 0.5) + 62.0,
        ("hue", "background"),
    ),
}


def taste_score(rgb, taste: str) -> float:
    fn, _ = TASTES[taste]
    return float(fn(attributes(rgb)))


def indifferent(taste: str) -> tuple[str, ...]:
    return TASTES[taste][1] if taste in TASTES else ()


def spread(attrs: list[dict], attribute: str) -> float | None:
    """How varied one prompt's pictures are in one attribute: the root of the summed variances of its values
    (for hue, the spread of the shape's colour in the opponent plane; for position, of the centroid). None with
    fewer than two pictures."""
    if len(attrs) < 2:
        return None
    keys = ATTRIBUTE_KEYS[attribute]
    x = np.array([[t[k] for k in keys] for t in attrs], dtype=np.float64)
    return float(np.sqrt(x.var(axis=0).sum()))


def per_prompt_spread(attrs_by_prompt: dict[str, list[dict]], attribute: str) -> float | None:
    """spread within each prompt, averaged over the prompts: how varied one prompt's pictures are, not how
    different the prompts are from each other."""
    vals = [s for a in attrs_by_prompt.values() for s in [spread(a, attribute)] if s is not None]
    return float(np.mean(vals)) if vals else None
