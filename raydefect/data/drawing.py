"""Drawing one synthetic image: a texture, a defect of one class with its exact mask (`render`), for
`raydefect.data.synth`, which seeds, names and writes them. Defects are painted with hard edges towards a far-away
intensity, so the mask is exactly the set of pixels that changed."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from raydefect.errors import DataError

TEXTURES = ("brushed_metal", "weave", "noise", "gradient")
DEFECT_CLASSES = ("scratch", "spot", "crack", "missing_piece")
COLORS = ("gray", "rgb", "mixed")
NORMAL = "normal"

# Texture intensities stay inside [LO, HI] so painting towards 0 or 1 always changes every masked pixel.
_LO, _HI = 0.15, 0.85


@dataclass(frozen=True)
class Sample:
    """One synthetic image, the same image before its defect was painted, and the exact defect mask."""

    image: np.ndarray  # uint8, HxW (gray) or HxWx3 (rgb)
    clean: np.ndarray  # uint8, same shape: the background alone
    mask: np.ndarray  # bool HxW; all False for normal images
    defect_class: str  # "normal" or one of DEFECT_CLASSES
    texture: str


Size = int | tuple[int, int]


def image_wh(size: Size) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not (8 <= w <= 8192 and 8 <= h <= 8192):
        raise DataError(f"synthetic image size {w}x{h} is out of range; use 8..8192 pixels per side (e.g. 64)")
    return w, h


@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), cached per shape."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


# --- textures: float32 HxW in [_LO, _HI] --------------------------------------------------------------------------


def _normalised(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _box_wrap(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Circular moving average along `axis` (a box blur) via a cumulative sum."""
    b = a if axis == 1 else a.T
    n = b.shape[1]
    size = min(size, n)
    c = np.cumsum(np.concatenate([b[:, n - size :], b], axis=1), axis=1)
    out = (c[:, size:] - c[:, :n]) / size
    return out if axis == 1 else out.T


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Gaussian noise on a coarse grid, upsampled bicubically: blob-like noise at scale `cell` pixels."""
    gh, gw = max(2, round(h / cell)), max(2, round(w / cell))
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _brushed_metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    axis = int(rng.integers(2))  # brushing direction
    length = (w, h)[axis]
    fine = rng.standard_normal((h, w)).astype(np.float32)
    streaks = _normalised(_box_wrap(fine, max(3, length // 3), axis=1 - axis))
    y, x = _grid(h, w)
    sheen = np.cos((x if axis else y) / length * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, np.pi))
    base = rng.uniform(0.4, 0.6)
    return base + 0.05 * streaks + 0.015 * fine + 0.06 * sheen


def _weave(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    period = max(3.0, min(h, w) / rng.uniform(7.0, 12.0))
    y, x = _grid(h, w)
    x = x + rng.uniform(0, period)
    y = y + rng.uniform(0, period)
    over = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(bool)
    threads = np.where(over, np.cos(2 * np.pi * y / period), np.cos(2 * np.pi * x / period))
    base = rng.uniform(0.4, 0.6)
    return base + 0.09 * threads + 0.02 * rng.standard_normal((h, w)).astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    blobs = _normalised(_smooth_noise(rng, h, w, rng.uniform(2.0, 8.0) * min(h, w) / 64))
    fine = rng.standard_normal((h, w)).astype(np.float32)
    return rng.uniform(0.4, 0.6) + 0.07 * blobs + 0.02 * fine


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi)
    y, x = _grid(h, w)
    ramp = (x / w - 0.5) * np.cos(theta) + (y / h - 0.5) * np.sin(theta)
    return rng.uniform(0.4, 0.6) + rng.uniform(0.2, 0.4) * ramp + 0.015 * rng.standard_normal((h, w))


_TEXTURE_FNS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "weave": _weave,
    "noise": _noise,
    "gradient": _gradient,
}


# --- defect shapes: bool HxW masks --------------------------------------------------------------------------------


def _polyline_mask(points: np.ndarray, half_width: float, h: int, w: int) -> np.ndarray:
    """Pixels whose centre lies within `half_width` of a polyline (vectorised over the segment's bounding box)."""
    gy, gx = _grid(h, w)
    mask = np.zeros((h, w), dtype=bool)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        c0 = max(0, int(np.floor(min(x0, x1) - half_width - 1)))
        c1 = min(w, int(np.ceil(max(x0, x1) + half_width + 1)))
        r0 = max(0, int(np.floor(min(y0, y1) - half_width - 1)))
        r1 = min(h, int(np.ceil(max(y0, y1) + half_width + 1)))
        if c0 >= c1 or r0 >= r1:
            continue
        x, y = gx[r0:r1, c0:c1], gy[r0:r1, c0:c1]
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
        mask[r0:r1, c0:c1] |= np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) <= half_width
    return mask


def _scratch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    length = rng.uniform(0.45, 0.9) * s
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    t = np.linspace(-0.5, 0.5, 4)
    bend = rng.uniform(-0.08, 0.08) * s * (1 - (2 * t) ** 2)  # a gentle arc
    px = cx + t * length * np.cos(theta) - bend * np.sin(theta)
    py = cy + t * length * np.sin(theta) + bend * np.cos(theta)
    return _polyline_mask(np.stack([px, py], 1), max(0.75, rng.uniform(0.012, 0.025) * s), h, w)


def _spot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    y, x = _grid(h, w)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    r1, r2 = (max(2.0, rng.uniform(0.05, 0.13) * s) for _ in range(2))
    phi = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
    v = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
    angle = np.arctan2(v, u)
    wobble = 1 + 0.18 * np.sin(int(rng.integers(2, 6)) * angle + rng.uniform(0, 2 * np.pi))
    return (u / r1) ** 2 + (v / r2) ** 2 <= wobble**2


def _crack(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    steps = int(rng.integers(5, 9))
    theta = rng.uniform(0, 2 * np.pi)
    pts = [np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])]
    for _ in range(steps):
        theta += rng.uniform(-0.7, 0.7)
        pts.append(pts[-1] + rng.uniform(0.05, 0.1) * s * np.array([np.cos(theta), np.sin(theta)]))
    half = max(0.75, rng.uniform(0.01, 0.02) * s)
    mask = _polyline_mask(np.array(pts), half, h, w)
    start = pts[len(pts) // 2]  # one branch from the middle
    angle = theta + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    branch = [start, start + rng.uniform(0.1, 0.2) * s * np.array([np.cos(angle), np.sin(angle)])]
    return mask | _polyline_mask(np.array(branch), half, h, w)


def _missing_piece(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    y, x = _grid(h, w)
    if rng.random() < 0.5:  # a corner broken off along a jagged line
        corner_x, corner_y = rng.choice([0.0, w]), rng.choice([0.0, h])
        theta = rng.uniform(0.2, 1.37)
        nx, ny = np.cos(theta) * (1 if corner_x == 0 else -1), np.sin(theta) * (1 if corner_y == 0 else -1)
        along = (x - corner_x) * -ny + (y - corner_y) * nx
        jag = 0.03 * s * np.sin(along / max(2.0, 0.06 * s) + rng.uniform(0, 2 * np.pi))
        return (x - corner_x) * nx + (y - corner_y) * ny + jag < rng.uniform(0.18, 0.35) * s
    # a bite out of one edge
    edge = int(rng.integers(4))
    pos = rng.uniform(0.25, 0.75)
    cx, cy = [(pos * w, 0.0), (pos * w, float(h)), (0.0, pos * h), (float(w), pos * h)][edge]
    r = rng.uniform(0.15, 0.28) * s
    angle = np.arctan2(y - cy, x - cx)
    return np.hypot(x - cx, y - cy) <= r * (1 + 0.12 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi)))


_DEFECT_FNS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "missing_piece": _missing_piece,
}


def _paint(rng: np.random.Generator, kind: str, tex: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Hard-edged, high-contrast paint: every masked pixel moves >= 0.6 * 0.15 towards its target."""
    out = tex.copy()
    if kind == "missing_piece":  # the dark background behind the part shows through
        out[mask] = 0.03 + 0.02 * rng.random()
        return out
    if kind == "crack":
        target = 0.0
    elif kind == "spot":
        target = float(rng.choice([0.0, 1.0], p=[0.7, 0.3]))
    else:
        target = float(rng.integers(2))
    strength = rng.uniform(0.6, 0.9)
    out[mask] = tex[mask] * (1 - strength) + target * strength
    return out


def _to_uint8(gray: np.ndarray, tint: np.ndarray | None) -> np.ndarray:
    img = gray if tint is None else gray[..., None] * tint
    return (img * 255.0 + 0.5).astype(np.uint8)


def _defect_mask(kind: str, rng: np.random.Generator, h: int, w: int, defect_size: int | None) -> np.ndarray:
    ds = min(h, w) if not defect_size or defect_size >= min(h, w) else int(defect_size)
    mask = _DEFECT_FNS[kind](rng, ds, ds) if ds < min(h, w) else _DEFECT_FNS[kind](rng, h, w)
    for _ in range(10):  # a shape that fell outside the frame is redrawn (deterministically)
        if mask.sum() >= 4:
            break
        mask = _DEFECT_FNS[kind](rng, ds, ds) if ds < min(h, w) else _DEFECT_FNS[kind](rng, h, w)
    if mask.shape == (h, w):
        return mask
    full = np.zeros((h, w), dtype=bool)
    y0, x0 = int(rng.integers(0, h - ds + 1)), int(rng.integers(0, w - ds + 1))
    full[y0 : y0 + ds, x0 : x0 + ds] = mask
    return full


def render(
    kind: str,
    rng: np.random.Generator,
    size: Size = 64,
    color: str = "mixed",
    textures: Sequence[str] = TEXTURES,
    defect_size: int | None = None,
) -> Sample:
    """Draw one image of `kind` ("normal" or a defect class) from `rng`.

    ``defect_size``: draw the defect as on an image of that side, placed anywhere in this one: camera-size images
    with small defects (``size=(1600, 1200), defect_size=128`` gives scratches and cracks 2-6 px wide)."""
    w, h = image_wh(size)
    texture = str(textures[int(rng.integers(len(textures)))])
    tex = np.clip(_TEXTURE_FNS[texture](rng, h, w), _LO, _HI).astype(np.float32)
    rgb = color == "rgb" or (color == "mixed" and rng.random() < 0.5)
    tint = rng.uniform(0.7, 1.0, 3).astype(np.float32) if rgb else None
    if tint is not None:
        tint /= tint.max()  # no channel above 1: painting never clips, so the mask stays exact
    if kind == NORMAL:
        clean = _to_uint8(tex, tint)
        return Sample(clean, clean, np.zeros((h, w), dtype=bool), NORMAL, texture)
    mask = _defect_mask(kind, rng, h, w, defect_size)
    painted = _paint(rng, kind, tex, mask)
    return Sample(_to_uint8(painted, tint), _to_uint8(tex, tint), mask, kind, texture)
