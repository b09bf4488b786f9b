"""How each site acquires a chest X-ray: site styles and the simulated acquisition chain.

`SiteStyle` describes one site's exposure, tone curve, window, noise, blur, sharpening, collimation and
burned-in markers; `SITE_STYLES` holds the presets and `site_style` derives a style for any other site
name. `acquire` turns a phantom's attenuation map into that site's processed radiograph. The synthetic
cohort (`cohort.py`) uses these so that sites differ the way real scanners do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PEDIATRIC_SITE = "pediatric"  # the pediatric cohort's site: a style of its own, never a user site name

# How much one site's images vary from one acquisition to the next (patient size, exposure, processing):
# the exposure is drawn within +-30% of the site's, the tone curve's parameter within +-21% and the
# window's black and white levels with an SD of 0.03. Calibrated on two real single-hospital sets
# (Kermany's pediatric images, the Shenzhen sample): there, the SD between healthy images of the mean
# intensity is 0.052-0.062 and of the chest's median 0.062-0.066; these ranges give the phantoms
# 0.042-0.047 and 0.054-0.066 (docs/data.md; `benchmarks/phantom_realism.py` measures both). Generator
# version 1 drew a third of these ranges (`acquire(..., jitter=1/3)`), and its phantoms varied about
# half as much as real images.
EXPOSURE_JITTER = 0.3
CURVE_JITTER = 0.21
WINDOW_JITTER = 0.03


@dataclass(frozen=True)
class SiteStyle:
    """How one site acquires and post-processes its images.

    Args:
        exposure: attenuation scale before the detector's exponential response (higher = harsher).
        curve: tone curve, "gamma" or "sigmoid"; `curve_param` is the gamma or the sigmoid gain.
        window: output black and white levels.
        noise: quantum-noise std at mid grey; blur: detector blur sigma in pixels at 256 px.
        sharpen: unsharp-mask gain of the post-processing.
        collimation: "none", "sides", "top_bottom" or "frame"; `collimation_value` its grey level.
        marker: side-marker letter, "L" or "R", centred at `marker_xy` (fractions of width, height).
        text_xy: top-left corner of the burned-in text block.
    """

    exposure: float
    curve: str
    curve_param: float
    window: tuple[float, float]
    noise: float
    blur: float
    sharpen: float
    collimation: str
    collimation_value: float
    marker: str
    marker_xy: tuple[float, float]
    text_xy: tuple[float, float]


SITE_STYLES: dict[str, SiteStyle] = {
    "site_a": SiteStyle(
        1.3, "sigmoid", 5.0, (0.02, 0.97), 0.012, 0.6, 0.5, "none", 1.0, "R", (0.08, 0.08), (0.62, 0.93)
    ),
    "site_b": SiteStyle(
        1.6, "gamma", 1.3, (0.06, 0.92), 0.025, 0.9, 0.0, "sides", 0.95, "L", (0.9, 0.1), (0.04, 0.04)
    ),
    "site_c": SiteStyle(
        1.1, "gamma", 0.8, (0.0, 1.0), 0.018, 0.5, 1.0, "top_bottom", 0.9, "R", (0.1, 0.88), (0.6, 0.03)
    ),
    "site_d": SiteStyle(
        1.4, "sigmoid", 7.0, (0.1, 0.95), 0.03, 1.2, 0.3, "frame", 0.0, "L", (0.88, 0.86), (0.05, 0.9)
    ),
    PEDIATRIC_SITE: SiteStyle(
        1.2, "sigmoid", 4.0, (0.03, 0.96), 0.035, 0.8, 0.6, "frame", 0.92, "R", (0.1, 0.12), (0.55, 0.92)
    ),
}


def site_style(name: str) -> SiteStyle:
    """The style of a site: a preset for the default names; any other name gets a preset chosen and
    varied by a hash of the name, so custom site lists still differ from one another."""
    if name in SITE_STYLES:
        return SITE_STYLES[name]
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    base = list(SITE_STYLES.values())[int(rng.integers(len(SITE_STYLES)))]
    return dataclasses.replace(
        base,
        exposure=base.exposure * float(rng.uniform(0.85, 1.15)),
        noise=float(rng.uniform(0.01, 0.03)),
        blur=float(rng.uniform(0.5, 1.2)),
        marker_xy=(float(rng.choice([0.1, 0.9])), float(rng.choice([0.1, 0.88]))),
        text_xy=(float(rng.uniform(0.05, 0.6)), float(rng.choice([0.04, 0.9]))),
    )


def intensity_profile(image: np.ndarray) -> np.ndarray:
    """Five grey-level statistics of one radiograph, to compare how much images vary within a site.

    Args:
        image: `(H, W)` intensities in [0, 1], bright = dense.

    Returns:
        `(5,)` float64: the image's mean and SD, then the 5th, 50th and 95th percentiles of its central
        chest (rows 20-80%, columns 12.5-87.5%). The acquisition jitter was calibrated by matching the
        SD of these between the images of one site to real single-hospital sets
        (`benchmarks/phantom_realism.py`).
    """
    h, w = image.shape
    chest = image[h // 5 : 4 * h // 5, w // 8 : 7 * w // 8]
    return np.array([image.mean(), image.std(), *np.percentile(chest, [5, 50, 95])], dtype=np.float64)


# 5 x 7 bitmaps of the side-marker letters
_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _tone(x: np.ndarray, style: SiteStyle, factor: float) -> np.ndarray:
    """The site's tone curve (its parameter times `factor`), mapping [0, 1] onto [0, 1] monotonically."""
    p = style.curve_param * factor
    if style.curve == "gamma":
        return np.clip(x, 0.0, 1.0) ** p
    lo, hi = 1.0 / (1.0 + math.exp(p * 0.5)), 1.0 / (1.0 + math.exp(-p * 0.5))
    return (1.0 / (1.0 + np.exp(-p * (x - 0.5))) - lo) / (hi - lo)


def _collimate(img: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """Unexposed borders outside the collimator blades (slightly tilted, widths vary per image)."""
    if style.collimation == "none":
        return img
    s = img.shape[0]
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    x, y = c[None, :], c[:, None]
    w = rng.uniform(0.025, 0.06, 4)
    t = rng.normal(0.0, 0.01, 4)
    edges = {
        "sides": [x - w[0] - t[0] * (y - 0.5), 1 - w[1] - x - t[1] * (y - 0.5)],
        "top_bottom": [y - w[2] - t[2] * (x - 0.5), 1 - w[3] - y - t[3] * (x - 0.5)],
    }
    edges["frame"] = edges["sides"] + edges["top_bottom"]
    inside = np.ones_like(img)
    for e in edges[style.collimation]:
        inside = np.minimum(inside, np.clip(0.5 + e * s / 1.5, 0.0, 1.0))
    return img * inside + style.collimation_value * (1.0 - inside)


def _stamp(img: np.ndarray, bitmap: np.ndarray, x0: int, y0: int, value: float) -> None:
    """Burn a binary bitmap into `img` (in place) with its top-left corner at (x0, y0), clipped."""
    h, w = bitmap.shape
    s = img.shape[0]
    x1, y1 = min(s, x0 + w), min(s, y0 + h)
    x0c, y0c = max(0, x0), max(0, y0)
    if x1 > x0c and y1 > y0c:
        patch = bitmap[y0c - y0 : y1 - y0, x0c - x0 : x1 - x0]
        img[y0c:y1, x0c:x1] = np.where(patch, value, img[y0c:y1, x0c:x1])


def _markers(img: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> None:
    """Burn in the side marker (a letter on a plate) and a few lines of text-like bars, in place."""
    s = img.shape[0]
    cell = max(1, round(s / 160))
    glyph = np.array([[ch == "1" for ch in row] for row in _GLYPHS[style.marker]])
    letter = np.kron(glyph, np.ones((cell, cell), dtype=bool))
    plate = np.ones((letter.shape[0] + 4 * cell, letter.shape[1] + 4 * cell), dtype=bool)
    jx, jy = rng.normal(0.0, 0.008, 2)
    x0 = round((style.marker_xy[0] + jx) * s - plate.shape[1] / 2)
    y0 = round((style.marker_xy[1] + jy) * s - plate.shape[0] / 2)
    _stamp(img, plate, x0, y0, 0.15)
    _stamp(img, letter, x0 + 2 * cell, y0 + 2 * cell, 1.0)
    bar_h = max(1, round(s / 110))
    for line in range(int(rng.integers(2, 4))):
        x = round(style.text_xy[0] * s)
        y = round(style.text_xy[1] * s) + line * 2 * bar_h
        for _ in range(int(rng.integers(3, 7))):
            length = max(2, round(rng.uniform(0.015, 0.06) * s))
            _stamp(img, np.ones((bar_h, length), dtype=bool), x, y, 0.95)
            x += length + max(1, bar_h)


def acquire(atten: np.ndarray, style: SiteStyle, rng: np.random.Generator, jitter: float = 1.0) -> np.ndarray:
    """Turn an attenuation map into a site's processed radiograph.

    Args:
        atten: `(S, S)` attenuation (phantom units).
        style: the site's acquisition.
        rng: per-image randomness (exposure and curve jitter, noise, collimation, markers).
        jitter: scale of the per-image variation of exposure, tone curve and window around the site's
            (1: `EXPOSURE_JITTER`, `CURVE_JITTER`, `WINDOW_JITTER`, calibrated on real sites; 0: none).

    Returns:
        `(S, S)` float32 in [0, 1], bright = dense.
    """
    s = atten.shape[0]
    px = s / 256.0  # blur widths are specified at 256 px so the look does not depend on the size
    mu = style.exposure * (1.0 + EXPOSURE_JITTER * jitter * rng.uniform(-1.0, 1.0))
    # detector response saturates in dense regions, which tames bone contrast over the abdomen
    x = (1.0 - np.exp(-mu * atten)) / (1.0 - math.exp(-mu * 1.4))
    noise = rng.standard_normal(atten.shape).astype(np.float32)
    x = x + style.noise * rng.uniform(0.8, 1.2) * np.sqrt(0.2 + np.clip(x, 0.0, 1.0)) * noise
    x = ndimage.gaussian_filter(x, style.blur * px)
    if style.sharpen > 0:
        x = x + style.sharpen * (x - ndimage.gaussian_filter(x, 6.0 * px))
    x = _tone(np.clip(x, 0.0, 1.0), style, 1.0 + CURVE_JITTER * jitter * rng.uniform(-1.0, 1.0))
    sd = WINDOW_JITTER * jitter
    lo, hi = style.window[0] + rng.normal(0, sd), style.window[1] + rng.normal(0, sd)
    x = lo + (hi - lo) * x
    x = _collimate(x, style, rng)
    _markers(x, style, rng)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
