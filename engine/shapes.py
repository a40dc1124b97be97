"""The captioned-shapes world (the spec: docs/shapes_spec.md): palette, scenes, renderer, captions, analyzer.

One shape of one palette colour on a background of another. Everything is exact so that
models, tests and benchmarks agree: ``render`` draws a ``Scene``, ``caption`` names it,
``parse_caption`` reads a caption back, and ``analyze`` reads an image back into a
``Scene`` without any learned model (used to score generated images).
Pure numpy; no torch.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np

PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
KINDS = ("circle", "square", "triangle")
STAR = "star"  # the extension kind for fine-tuning demonstrations: no built-in model is trained on it
ALL_KINDS = KINDS + (STAR,)
# position name -> caption phrase; grid order (row-major: top, middle, bottom x left, centre, right)
WHERE = {
    "top left": "in the top left",
    "top centre": "at the top",
    "top right": "in the top right",
    "middle left": "on the left",
    "centre": "in the center",
    "middle right": "on the right",
    "bottom left": "in the bottom left",
    "bottom centre": "at the bottom",
    "bottom right": "in the bottom right",
}
POSITIONS = tuple(WHERE)
_PHRASE_TO_POSITION = {v: k for k, v in WHERE.items()}
SIZE_FRACTION = {"small": 0.25, "large": 0.45}
_CELL = (0.25, 0.5, 0.75)  # cell centres as a fraction of S
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)  # (8, 3)


@dataclass(frozen=True)
class Scene:
    size: str  # "small" | "large"
    colour: str  # palette name
    kind: str  # "circle" | "square" | "triangle"
    position: str  # one of POSITIONS, e.g. "top left", "centre"
    background: str  # palette name, different from colour

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, not {self.size!r}")
        if self.colour not in PALETTE or self.background not in PALETTE:
            raise ValueError(f"colours must be palette names {COLOURS}")
        if self.colour == self.background:
            raise ValueError("the shape's colour must differ from the background")
        if self.kind not in ALL_KINDS:
            raise ValueError(f"kind must be one of {ALL_KINDS}, not {self.kind!r}")
        if self.position not in WHERE:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")


def side_px(size: str, S: int) -> int:
    """Nominal side in pixels: round(0.25 S) or round(0.45 S)."""
    return round(SIZE_FRACTION[size] * S)


def centre_px(position: str, S: int) -> tuple[float, float]:
    """Nominal centre (cx, cy) in pixels."""
    i = POSITIONS.index(position)
    row, col = divmod(i, 3)
    return _CELL[col] * S, _CELL[row] * S


def _shape_mask(kind: str, n: int, cx: float, cy: float, side: float) -> np.ndarray:
    """Boolean (n, n) mask of the pixels whose centres lie inside the shape (coordinates in pixels)."""
    c = np.arange(n, dtype=np.float64) + 0.5
    x = c[None, :]
    y = c[:, None]
    h = side / 2.0
    left, right, top, bottom = cx - h, cx + h, cy - h, cy + h
    if kind == "square":
        return (x >= left) & (x < right) & (y >= top) & (y < bottom)
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if kind == "triangle":
        # upright: apex (cx, top); at height y the half-width grows linearly from 0 to h
        half = (y - top) / side * h
        return (y >= top) & (y < bottom) & (np.abs(x - cx) <= half)
    if kind == STAR:
        return _inside_polygon(star_vertices(cx, cy, h), x, y)
    raise ValueError(f"unknown kind {kind!r}")


def star_vertices(cx: float, cy: float, outer: float) -> np.ndarray:
    """The ten vertices of the spec's star: one point straight up, outer and inner (0.4 x) radii alternating,
    clockwise (y grows downwards)."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, 0.4 * outer)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _inside_polygon(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd rule for the pixel centres (x (1, n), y (n, 1)) against a closed polygon."""
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < at)
    return inside


def render(scene: Scene, S: int = 32, antialias: bool = False, shift: tuple = (0.0, 0.0),
           scale: float = 1.0) -> np.ndarray:
    """Draw ``scene`` as a uint8 (S, S, 3) image.

    ``shift`` (dx, dy) in pixels moves the centre, ``scale`` multiplies the side (augmentations);
    ``antialias`` draws at 4 S and box-downsamples.
    """
    f = 4 if antialias else 1
    n = S * f
    cx, cy = centre_px(scene.position, S)
    cx, cy = (cx + shift[0]) * f, (cy + shift[1]) * f
    side = side_px(scene.size, S) * scale * f
    mask = _shape_mask(scene.kind, n, cx, cy, side)
    fg = np.array(PALETTE[scene.colour], dtype=np.float64)
    bg = np.array(PALETTE[scene.background], dtype=np.float64)
    if f == 1:
        out = np.where(mask[:, :, None], fg, bg)
        return out.astype(np.uint8)
    cover = mask.reshape(S, f, S, f).mean(axis=(1, 3))[:, :, None]  # (S, S, 1) fraction covered
    out = bg + cover * (fg - bg)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.kind} {WHERE[scene.position]} on a {scene.background} background"


def parse_caption(text: str) -> Scene:
    """Read a caption of the grammar back into a Scene; ValueError on anything else."""
    words = text.strip().split()
    if len(words) < 9 or words[0] != "a" or words[-1] != "background" or words[-3] != "a" \
            or words[-4] != "on":
        raise ValueError(f"not a shapes caption: {text!r}")
    size, colour, kind = words[1:4]
    where = " ".join(words[4:-4])
    background = words[-2]
    if where not in _PHRASE_TO_POSITION:
        raise ValueError(f"unknown position phrase {where!r} in {text!r}")
    return Scene(size, colour, kind, _PHRASE_TO_POSITION[where], background)


def all_scenes() -> list[Scene]:
    return [Scene(s, c, k, p, b) for s, c, k, p, b in itertools.product(SIZES, COLOURS, KINDS, POSITIONS, COLOURS)
            if c != b]


def all_captions() -> list[str]:
    """All 3,024 captions, in a fixed order."""
    return [caption(s) for s in all_scenes()]


def sample_scene(rng: np.random.Generator) -> Scene:
    colour = COLOURS[rng.integers(len(COLOURS))]
    others = [c for c in COLOURS if c != colour]
    return Scene(SIZES[rng.integers(2)], colour, KINDS[rng.integers(3)], POSITIONS[rng.integers(9)],
                 others[rng.integers(len(others))])


def sample_training_example(rng: np.random.Generator, S: int = 32) -> tuple[np.ndarray, str]:
    """A random scene rendered with the spec's augmentations -> (uint8 (S, S, 3) image, caption).

    Shift up to 0.04 S in each axis, size change up to 10 %, anti-aliasing on half the time.
    """
    scene = sample_scene(rng)
    shift = tuple(rng.uniform(-0.04 * S, 0.04 * S, size=2))
    scale = float(rng.uniform(0.9, 1.1))
    image = render(scene, S, antialias=bool(rng.integers(2)), shift=shift, scale=scale)
    return image, caption(scene)


# ---------------------------------------------------------------- analyzer

def _nearest_colour(rgb: np.ndarray) -> str:
    d = ((_PALETTE_ARRAY - rgb[None, :]) ** 2).sum(axis=1)
    return COLOURS[int(np.argmin(d))]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks (small images: a plain flood fill)."""
    h, w = mask.shape
    label = np.zeros(mask.shape, dtype=np.int32)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n = len(comps) + 1
        label[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not label[yy, xx]:
                        label[yy, xx] = n
                        stack.append((yy, xx))
        comps.append(label == n)
    return comps


# half the smallest distance between two palette colours: "far from the background"
_MIN_PALETTE_DIST = min(np.linalg.norm(a - b) for a, b in itertools.combinations(_PALETTE_ARRAY, 2))
FAR = 0.5 * _MIN_PALETTE_DIST


def _bottom_notch(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> bool:
    """Whether the blob's lowest quarter is split at its centre column with shape on both sides: a star's two
    legs (a circle, square or triangle is filled at the bottom centre)."""
    y1, h = ys.max(), ys.max() - ys.min() + 1
    c = int(round(xs.mean()))
    rows = mask[y1 - max(1, h // 4) + 1:y1 + 1]
    return bool(not rows[:, c].any() and rows[:, :c].any() and rows[:, c + 1:].any())


def analyze(image, kinds: tuple = KINDS) -> Optional[Scene]:
    """Read an (S, S, 3) image (uint8 array or PIL image) back into a Scene, or None for "no shape".

    Steps of the spec: background from the border median; foreground = pixels far from it
    (refined to the pixels at least half-way from the background colour to the foreground
    colour, so anti-aliased edges count as in a 50 % coverage rasterisation); colour from the
    median foreground pixel; position from the centroid; size from the bounding box; kind from
    the fill ratio (square ~1.0, or ~0.9 with its box corners filled; else triangle when the top
    half of the box is much less filled than the bottom half, circle otherwise; with ``kinds`` including "star",
    the spec's extension, a blob with empty corners that stands on two legs reads as a star). Specks of fewer than S*S/512 pixels are ignored; two or more real blobs -> None.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] < 3 or img.shape[0] != img.shape[1]:
        raise ValueError("analyze expects a square (S, S, 3) RGB image")
    img = img[:, :, :3]
    S = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])  # (4S-4, 3)
    background = _nearest_colour(np.median(border, axis=0))
    bg = np.array(PALETTE[background], dtype=np.float64)
    dist = np.linalg.norm(img - bg, axis=2)
    if not (dist > FAR).any():
        return None
    # the colour from the clearly-foreground pixels (anti-aliased edges are blends)
    colour = _nearest_colour(np.median(img[dist > max(FAR, 0.6 * dist.max())], axis=0))
    if colour == background:
        return None
    fg = np.array(PALETTE[colour], dtype=np.float64)
    # coverage estimate: projection of each pixel on the bg -> fg segment
    cover = ((img - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))
    mask = cover >= 0.5
    blobs = [c for c in _components(mask) if c.sum() >= max(1, S * S // 512)]
    if len(blobs) != 1:
        return None
    mask = blobs[0]
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    col = int(np.argmin([abs(cx - f * S) for f in _CELL]))
    row = int(np.argmin([abs(cy - f * S) for f in _CELL]))
    position = POSITIONS[3 * row + col]
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    size = min(SIZES, key=lambda s: abs(max(w, h) - side_px(s, S)))
    # fill ratio on soft coverage (the blob and its 1-pixel rim): area / (longest column x longest row),
    # so a partly covered edge row or column (anti-aliasing, a generated shape's soft edge) does not
    # shrink it; square 1.0, circle ~0.79, triangle ~0.5
    rim = np.zeros_like(mask)
    padded = np.pad(mask, 1)
    for dy in range(3):
        for dx in range(3):
            rim |= padded[dy:dy + S, dx:dx + S]
    soft = np.clip(cover, 0.0, 1.0) * rim
    fill = soft.sum() / max(soft.sum(axis=0).max() * soft.sum(axis=1).max(), 1e-9)
    # a square fills the corners of its box, a circle leaves them empty
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    corners = (soft[y0, x0] + soft[y0, x1] + soft[y1, x0] + soft[y1, x1]) / 4
    # a triangle's top half is ~1/3 as filled as its bottom half; a circle's is as filled
    half = h // 2
    top = mask[ys.min():ys.min() + half].sum()
    bottom = mask[ys.max() + 1 - half:ys.max() + 1].sum()
    if STAR in kinds and corners < 0.2 and _bottom_notch(mask, ys, xs):  # a star stands on two legs
        kind = STAR
    elif fill > 0.95 or (fill > 0.85 and corners > 0.4):
        kind = "square"
    elif top < 0.61 * bottom:
        kind = "triangle"
    else:
        kind = "circle"
    return Scene(size, colour, kind, position, background)
