"""Synthetic "shapes" image-caption data: the embedded default's calibration and evaluation set.

Every sample is a pure function of ``(seed, index)``, so a subset is reproducible without storing
images, and the same generator serves calibration (image-caption pairs), zero-shot classification
(``"<colour> <shape>"`` classes) and retrieval (one caption per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 200),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")

CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
TEMPLATES: list[str] = ["a photo of a {c}.", "a drawing of a {c}.", "a {c}.", "an image of a {c}."]


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    caption: str
    label: int


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def make_sample(seed: int, index: int) -> ShapeSample:
    """Render sample ``index`` of the stream ``seed``: a jittered shape on a noisy background."""
    rng = np.random.default_rng([seed, index])
    colour_i = int(rng.integers(len(COLOURS)))
    shape_i = int(rng.integers(len(SHAPES)))
    size_i = int(rng.integers(len(SIZES)))
    pos_i = int(rng.integers(len(POSITIONS)))
    colour = list(COLOURS)[colour_i]
    shape = SHAPES[shape_i]

    background = rng.integers(40, 110, size=3)
    noise = rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")

    r = (9 if size_i == 0 else 16) + rng.uniform(-1.5, 1.5)
    quarter = IMAGE_SIZE / 4
    centres = {
        "top left": (quarter, quarter),
        "top right": (3 * quarter, quarter),
        "bottom left": (quarter, 3 * quarter),
        "bottom right": (3 * quarter, 3 * quarter),
        "centre": (2 * quarter, 2 * quarter),
    }
    cx, cy = centres[POSITIONS[pos_i]]
    cx += rng.uniform(-3, 3)
    cy += rng.uniform(-3, 3)
    fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[colour])
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)

    caption = f"a {SIZES[size_i]} {colour} {shape} in the {POSITIONS[pos_i]}"
    return ShapeSample(image=image, caption=caption, label=colour_i * len(SHAPES) + shape_i)


def vocabulary() -> list[str]:
    """Every word a caption, class name or template can contain (the embedded tokenizer's words)."""
    words: set[str] = set()
    texts = [f"a {s} {c} {sh} in the {p}" for s in SIZES for c in COLOURS for sh in SHAPES for p in POSITIONS]
    texts += [t.format(c=c) for t in TEMPLATES for c in CLASSNAMES]
    for text in texts:
        words.update(text.replace(".", " . ").split())
    return sorted(words)


def digest() -> str:
    """The generated data's identity: the generator is the data, so its source is what changes it."""
    import hashlib
    import inspect
    import sys

    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()
