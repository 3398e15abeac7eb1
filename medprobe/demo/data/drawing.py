"""Drawing primitives shared by the renderers (all vectorised), and rendering at a requested size."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medprobe.demo.data.tasks import Render

# Renderers draw at most this many pixels on the long side; larger images are upsampled afterwards so that
# a 1400 px image costs about as much as a small one (its purpose is to exercise downsampling).
_MAX_RENDER_SIDE = 320


def render_at_size(render: Render, rng: np.random.Generator, size: tuple[int, int], params: dict) -> np.ndarray:
    """``render`` at ``size`` (height, width); above ``_MAX_RENDER_SIDE`` drawn smaller and upsampled."""
    h, w = size
    scale = max(h, w) / _MAX_RENDER_SIDE
    if scale <= 1.0:
        return render(rng, h, w, params)
    small = render(rng, max(8, round(h / scale)), max(8, round(w / scale)), params)
    channels = small[..., None] if small.ndim == 2 else small
    big = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(channels[..., c], dtype=np.float32)).resize((w, h), Image.BICUBIC)
            )
            for c in range(channels.shape[-1])
        ],
        axis=-1,
    )
    # Fine-grained noise at full resolution so that the large image is not just a blurred small one.
    big += rng.normal(0.0, 0.01, size=(h, w, 1)).astype(np.float32)
    return big[..., 0] if small.ndim == 2 else big


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """A smooth random field with features about ``cell`` px wide, zero mean and unit standard deviation."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def gaussian_spots(
    rng: np.random.Generator,
    h: int,
    w: int,
    count: int,
    sigma: float | tuple[float, float],
    mask: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian spots at random places (inside ``mask`` where given); an isolated spot peaks at its weight."""
    if count <= 0:
        return np.zeros((h, w), np.float32)
    ys = rng.integers(0, h, size=4 * count)
    xs = rng.integers(0, w, size=4 * count)
    if mask is not None:
        keep = mask[ys, xs] > 0.5
        ys, xs = ys[keep], xs[keep]
    ys, xs = ys[:count], xs[:count]
    acc = np.zeros((h, w), np.float32)
    np.add.at(acc, (ys, xs), 1.0 if weights is None else weights[: len(ys)])
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    return gaussian_filter(acc, (sy, sx), truncate=3.0) * np.float32(2 * np.pi * sy * sx)


def soft_inside(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a logistic edge ``softness`` px wide."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / max(softness, 1e-3), -30, 30)))


def ellipse_distance(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    """Approximate signed distance (px) to an ellipse with semi-axes ``a`` (x) and ``b`` (y)."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx
