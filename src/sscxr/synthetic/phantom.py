"""Chest X-ray phantoms: anatomy and pathology drawn as attenuation maps (acquisition is in `acquisition.py`).

Body frame. Shapes are vectorised implicit functions of body coordinates (u, v): u runs from the
patient's right (image left, u < 0) to the patient's left (u > 0), v from the neck (v near -1) down to
the upper abdomen (v near +1); the chest wall sits near |u| = 0.85. Each image maps its pixel grid into
this frame through its pose (scale, shift, rotation), so one anatomy can be re-posed for a follow-up.

Attenuation is in arbitrary units (about 1 for the soft-tissue path through the mediastinum); the lungs
are dark because their air removes attenuation. The lung mask is the visible lung field: the heart,
mediastinum and aortic knob are excluded (as in the JSRT / Montgomery masks), the retro-diaphragmatic
lung is not part of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

LABELS: tuple[str, ...] = ("healthy", "pneumonia", "covid-19")

Segment = tuple[float, float, float, float, float]  # u0, v0, u1, v1, width (body units)


@dataclass(frozen=True)
class Anatomy:
    """One individual's chest in body-frame units; pairs are (patient right, patient left).

    `heart` is (centre u, centre v, semi-axis a, semi-axis b, tilt in degrees); `ribs` is (v of the first
    posterior rib at the spine, spacing, count, width, droop of the lateral ends).
    """

    pediatric: bool
    scale: float
    shift: tuple[float, float]
    rotation: float
    chest_width: float
    apex: tuple[float, float]
    lung_width: tuple[float, float]
    dome_top: tuple[float, float]
    costophrenic: tuple[float, float]
    mediastinum: float
    heart: tuple[float, float, float, float, float]
    ribs: tuple[float, float, int, float, float]
    bone: float
    clavicle: tuple[float, float]
    spine_width: float
    breast: float
    thymus: float
    wobble: tuple[float, float, float, float]
    tissue: float
    vessel_seed: int


@dataclass(frozen=True)
class Pathology:
    """What disease to draw: `label` in LABELS, `severity` in [0, 1], `seed` for its own geometry."""

    label: str
    severity: float
    seed: int


@dataclass
class AnatomyMaps:
    """Rendered anatomy, all `(S, S)` float32: body coordinates, attenuation, soft lung fields per side
    (right, left), height inside the lung (0 apex .. 1 base), distance to the lateral lung border and
    the soft body outline."""

    u: np.ndarray
    v: np.ndarray
    atten: np.ndarray
    lungs: tuple[np.ndarray, np.ndarray]
    height: np.ndarray
    lateral_gap: np.ndarray
    body: np.ndarray
    eps: float

    @property
    def lung(self) -> np.ndarray:
        """Both lung fields, soft (0..1)."""
        return np.maximum(self.lungs[0], self.lungs[1])


def _sstep(x: np.ndarray, width: float) -> np.ndarray:
    """Linear ramp from 0 to 1 over `width` around x = 0: antialiased edges at any resolution."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def sample_anatomy(rng: np.random.Generator, pediatric: bool = False) -> Anatomy:
    """Draw one individual: size, pose, lung shape, inspiration depth, heart size, ribs, extras.

    Children get a relatively larger heart, a rounder and shorter thorax, higher domes, thinner, more
    horizontal and fainter ribs, no breast shadows and sometimes a thymus.
    """
    n = rng.normal
    insp = float(np.clip(n(0.0, 1.0), -2.0, 2.0)) * 0.04 - (0.07 if pediatric else 0.0)
    width = 0.74 + n(0.0, 0.03) + (0.03 if pediatric else 0.0)
    apex = -0.72 + n(0.0, 0.03) + (0.04 if pediatric else 0.0)
    dome = 0.22 + insp + n(0.0, 0.025)
    heart_size = float(np.clip(n(1.0, 0.08), 0.8, 1.25)) * (1.22 if pediatric else 1.0)
    ribs_first = apex + 0.06 + n(0.0, 0.015)
    return Anatomy(
        pediatric=pediatric,
        scale=float(rng.uniform(0.74, 0.86) if pediatric else rng.uniform(0.88, 1.0)),
        shift=(float(n(0.0, 0.025)), float(n(0.02, 0.03))),
        rotation=float(n(0.0, 2.0)),
        chest_width=width + 0.1,
        apex=(apex, apex + abs(n(0.0, 0.02))),
        lung_width=(width, width - 0.02 + n(0.0, 0.01)),
        dome_top=(dome, dome + 0.05 + n(0.0, 0.015)),
        costophrenic=(dome + 0.26 + n(0.0, 0.02), dome + 0.31 + n(0.0, 0.02)),
        mediastinum=0.1 + n(0.0, 0.01),
        heart=(0.08 + n(0.0, 0.02), dome + 0.02, 0.3 * heart_size, 0.32 * heart_size, -8.0 + n(0.0, 5.0)),
        ribs=(
            ribs_first,
            (0.115 if pediatric else 0.13) + n(0.0, 0.006),
            8 if pediatric else 10,
            (0.03 if pediatric else 0.04) + n(0.0, 0.003),
            (0.5 if pediatric else 1.0) * (1.0 + n(0.0, 0.1)),
        ),
        bone=float((0.6 if pediatric else 1.0) * rng.uniform(0.85, 1.15)),
        clavicle=(apex + 0.15 + n(0.0, 0.02), apex + 0.03 + n(0.0, 0.03)),
        spine_width=(0.05 if pediatric else 0.058) + n(0.0, 0.004),
        breast=0.0 if pediatric or rng.random() < 0.6 else float(rng.uniform(0.5, 1.0)),
        thymus=float(rng.uniform(0.5, 1.0)) if pediatric and rng.random() < 0.5 else 0.0,
        wobble=tuple(float(x) for x in rng.uniform([0.0, 0.0, 0.0, 0.0], [0.02, 6.3, 0.02, 6.3])),
        tissue=float(rng.uniform(0.9, 1.1)),
        vessel_seed=int(rng.integers(0, 2**31)),
    )


def repose(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """The same individual at a follow-up: slightly different position, rotation and inspiration."""
    d = float(rng.normal(0.0, 0.02))
    return replace(
        anatomy,
        scale=anatomy.scale * float(rng.uniform(0.97, 1.03)),
        shift=(anatomy.shift[0] + float(rng.normal(0, 0.02)), anatomy.shift[1] + float(rng.normal(0, 0.02))),
        rotation=anatomy.rotation + float(rng.normal(0.0, 1.5)),
        dome_top=(anatomy.dome_top[0] + d, anatomy.dome_top[1] + d),
        costophrenic=(anatomy.costophrenic[0] + d, anatomy.costophrenic[1] + d),
    )


def body_grid(a: Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates `(u, v)`, each `(size, size)` float32, of the pixel centres under the pose of `a`."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x = (c[None, :] - a.shift[0]) / a.scale
    y = (c[:, None] - a.shift[1]) / a.scale
    t = np.deg2rad(a.rotation)
    return (np.cos(t) * x + np.sin(t) * y).astype(np.float32), (np.cos(t) * y - np.sin(t) * x).astype(
        np.float32
    )


def to_pixels(a: Anatomy, size: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `body_grid`: pixel (column, row) coordinates of body points."""
    t = np.deg2rad(a.rotation)
    x = (np.cos(t) * u - np.sin(t) * v) * a.scale + a.shift[0]
    y = (np.sin(t) * u + np.cos(t) * v) * a.scale + a.shift[1]
    return (x + 1.0) / 2.0 * size - 0.5, (y + 1.0) / 2.0 * size - 0.5


def _lung(a: Anatomy, u: np.ndarray, v: np.ndarray, i: int, eps: float) -> tuple[np.ndarray, ...]:
    """Soft lung field of one side (i = 0 right, 1 left), its height map and lateral-border distance.

    The lateral border is an ellipse quadrant (rounded apex, vertical lower chest wall), the medial border
    reaches the mediastinum within the upper third, and the base is a parabolic dome whose meeting with
    the chest wall makes the sharp costophrenic angle.
    """
    d = u if i else -u
    va, vcp, vtop, dmax = a.apex[i], a.costophrenic[i], a.dome_top[i], a.lung_width[i]
    s = np.clip((v - va) / (vcp - va), 0.0, 1.0)
    d_apex = 0.42 * dmax
    amp, phase = a.wobble[2 * i], a.wobble[2 * i + 1]
    d_lat = d_apex + (dmax - d_apex) * np.sqrt(1.0 - (1.0 - s) ** 2) + amp * np.sin(7.0 * s + phase)
    d_med = d_apex - (d_apex - a.mediastinum) * np.sqrt(1.0 - (1.0 - np.clip(s / 0.3, 0.0, 1.0)) ** 2)
    d_peak = 0.5 * dmax
    v_dome = vtop + (vcp - vtop) / (dmax - d_peak) ** 2 * (d - d_peak) ** 2
    inside = np.minimum(np.minimum(d - d_med, d_lat - d), np.minimum(v_dome - v, v - va))
    return _sstep(inside, eps), s, d_lat - d


def _ellipse(
    u: np.ndarray, v: np.ndarray, c: tuple[float, float], ab: tuple[float, float], tilt: float = 0.0
):
    """Normalised radius of a tilted ellipse (1 on its border)."""
    ct, st = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))  # python floats keep float32
    du, dv = u - c[0], v - c[1]
    p, q = ct * du + st * dv, ct * dv - st * du
    return np.sqrt((p / ab[0]) ** 2 + (q / ab[1]) ** 2)


def _landmarks(a: Anatomy) -> dict[str, tuple[float, float]]:
    """Mediastinal landmarks (body frame), placed relative to the right dome so they follow inspiration."""
    base = a.dome_top[0]
    return {
        "hilum_r": (-0.15, base - 0.4),
        "hilum_l": (0.15, base - 0.45),
        "carina": (0.01, base - 0.52),
        "knob": (0.075, base - 0.6),
        "trunk": (0.09, base - 0.38),
    }


def _body(a: Anatomy, u: np.ndarray, v: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Body outline (soft, 0..1) and soft-tissue attenuation: thorax, thicker in the middle, flaring
    into the shoulders, plus breast shadows."""
    shoulder = 0.18 / (1.0 + np.exp((v + 0.75) / 0.06))
    w = a.chest_width * (1.0 - 0.05 * (v - 0.2) ** 2) + shoulder
    outline = _sstep(w - np.abs(u), eps)
    depth = np.sqrt(np.clip(1.0 - (u / (a.chest_width + 0.05)) ** 2, 0.0, 1.0))
    tissue = 0.2 + 0.8 * depth
    for side in (-1, 1) if a.breast > 0 else ():
        r = _ellipse(u, v, (side * 0.45, a.costophrenic[1] - 0.15), (0.36, 0.26))
        # thickest just above the sharp lower fold, fading upwards into the lung
        fade = np.clip((v - a.costophrenic[1] + 0.37) / 0.3, 0.0, 1.0)
        tissue = tissue + 0.2 * a.breast * np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0)) ** 0.5 * fade
    return outline, a.tissue * outline * tissue


def _rib_family(d: np.ndarray, v: np.ndarray, a: Anatomy, anterior: bool, eps: float) -> np.ndarray:
    """All posterior (or anterior) ribs of one side at once.

    Ribs are parallel copies of one curve shifted in v, so `v - curve(d)` divided by the spacing is a
    phase whose fractional part gives the position across the nearest rib: one evaluation draws them all.
    """
    first, spacing, count, width, droop = a.ribs
    if anterior:  # from the chest wall down and in to the costal cartilage, which is not radio-opaque
        curve = 0.55 * (0.8 - d) - 0.3 * (0.8 - d) ** 2
        slope = -0.55 + 0.6 * (0.8 - d)
        start, span, width = first + 0.2, (0.22, a.chest_width), 0.8 * width
    else:  # from the spine out, slightly up, then down along the lateral chest wall
        curve = -0.3 * d + 1.3 * droop * d**3
        slope = -0.3 + 3.9 * droop * d**2
        start, span = first, (0.05, a.chest_width)
    phase = (v - curve - start) / (spacing * (1.0 + 0.04 * (v - start)))
    k = np.floor(phase + 0.5)
    across = (phase - k) * spacing / np.sqrt(1.0 + slope**2) / (0.5 * width)
    band = _sstep(1.0 - np.abs(across), 2.0 * eps / width) * (k >= 0) * (k < count - anterior)
    ends = _sstep(np.minimum(d - span[0], span[1] - d), 4.0 * eps)
    return band * ends * (0.55 + 0.45 * across**2) * (0.35 if anterior else 1.0)


def _clavicles(a: Anatomy, u: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Both clavicles: S-curved bands from the sternal end up and out to the shoulder."""
    d = np.abs(u)
    t = (d - 0.07) / 0.55
    centre = a.clavicle[0] + (a.clavicle[1] - a.clavicle[0]) * t + 0.03 * np.sin(2.0 * np.pi * t)
    half = (0.021 if a.pediatric else 0.027) * (1.0 + 0.25 * (1.0 - t))
    across = (v - centre) / half
    band = _sstep(1.0 - np.abs(across), 2.0 * eps / half)
    return band * _sstep(np.minimum(t, 1.0 - t), 0.06) * (0.6 + 0.4 * across**2)


def _spine(a: Anatomy, u: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Vertebral column: a band with vertebral bodies, darker disc spaces and brighter pedicles."""
    w = a.spine_width * (1.0 + 0.15 * (v + 1.0))
    period = a.ribs[1]
    phase = np.cos(2.0 * np.pi * (v - a.ribs[0]) / period)
    body = _sstep(w - np.abs(u), eps) * (0.75 + 0.25 * np.clip(phase * 3.0, -1.0, 1.0))
    pedicle = _sstep(1.0 - np.hypot((np.abs(u) - 0.7 * w) / (0.22 * w), phase - 1.0 / 0.3), 0.5)
    return body + 0.5 * pedicle


def _tree(
    rng: np.random.Generator,
    root: tuple[float, float],
    angles: list[float],
    side: int,
    length: float,
    width: float,
    depth: int,
) -> list[Segment]:
    """Branching tree of segments (vessels, bronchi): each branch forks in two, shorter and thinner."""
    out: list[Segment] = []
    stack = [(root[0], root[1], np.deg2rad(ang), length, width, depth) for ang in angles]
    while stack:
        u0, v0, ang, ln, wd, dp = stack.pop()
        u1, v1 = u0 + side * np.cos(ang) * ln, v0 + np.sin(ang) * ln
        out.append((u0, v0, float(u1), float(v1), wd))
        if dp > 1:
            for sign in (-1.0, 1.0):
                turn = np.deg2rad(rng.uniform(12.0, 35.0)) * sign
                stack.append((u1, v1, ang + turn, ln * rng.uniform(0.65, 0.85), wd * 0.72, dp - 1))
    return out


def draw_segments(a: Anatomy, size: int, segments: list[Segment]) -> np.ndarray:
    """Rasterise body-frame segments (value = relative width, so thick trunks attenuate more)."""
    img = Image.new("F", (size, size), 0.0)
    if not segments:
        return np.asarray(img, dtype=np.float32)
    draw = ImageDraw.Draw(img)
    seg = np.array(sorted(segments, key=lambda s: s[4]), dtype=np.float64)
    x0, y0 = to_pixels(a, size, seg[:, 0], seg[:, 1])
    x1, y1 = to_pixels(a, size, seg[:, 2], seg[:, 3])
    widths = np.maximum(1, np.round(seg[:, 4] * a.scale * size / 2.0)).astype(int)
    values = seg[:, 4] / seg[:, 4].max()
    for i in range(len(seg)):
        draw.line([(x0[i], y0[i]), (x1[i], y1[i])], fill=float(values[i]), width=int(widths[i]))
    return np.asarray(img, dtype=np.float32)


def _vessels(a: Anatomy, size: int) -> np.ndarray:
    """Bronchovascular markings: trees radiating from both hila, thinning towards the periphery."""
    rng = np.random.default_rng(a.vessel_seed)
    segs: list[Segment] = []
    lm = _landmarks(a)
    for side, key in ((-1, "hilum_r"), (1, "hilum_l")):
        angles = [float(x) for x in np.linspace(-75.0, 80.0, 6) + rng.normal(0.0, 8.0, 6)]
        segs += _tree(rng, lm[key], angles, side, 0.13, 0.02, 5)
    trees = ndimage.gaussian_filter(draw_segments(a, size, segs), 0.6 * size / 256)
    # faint parenchymal mottle, so that a small density change alone does not betray disease
    return trees + 0.12 * smooth_noise(rng, size, 24)


def _mediastinum(a: Anatomy, u: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Heart, aortic knob, pulmonary trunk and (children) thymus: soft tissue the lung fields stop at.

    The heart is a broad ellipse whose lower half hides below the domes, so its visible part is the
    D-shaped silhouette sitting on the diaphragm, bulging more to the patient's left.
    """
    hu, hv, ha, hb, tilt = a.heart
    lm = _landmarks(a)
    heart = _sstep(1.0 - _ellipse(u, v, (hu, hv), (ha, hb), tilt), eps / hb)
    # flat, overlapping bulges so the left mediastinal contour is wavy rather than a stack of balls
    knob = _sstep(1.0 - _ellipse(u, v, lm["knob"], (0.085, 0.075), 20.0), eps / 0.07)
    trunk = _sstep(1.0 - _ellipse(u, v, lm["trunk"], (0.06, 0.16), -25.0), eps / 0.06)
    out = np.maximum(np.maximum(heart, knob), trunk)
    if a.thymus > 0:
        centre = (0.04, lm["carina"][1] + 0.1)
        sail = _sstep(1.0 - _ellipse(u, v, centre, (0.12 + 0.08 * a.thymus, 0.15), -15.0), 0.1)
        out = np.maximum(out, sail)
    return out


def _extras(a: Anatomy, u: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Air outside the lungs (negative attenuation): trachea, main bronchi and the stomach bubble."""
    carina = _landmarks(a)["carina"][1]
    trachea = _sstep(0.028 - np.abs(u - 0.01), eps) * _sstep(carina - v, 0.02)
    bronchi = sum(
        _sstep(0.018 - np.abs((u - 0.01) * 0.8 - side * 0.6 * (v - carina)), eps)
        * _sstep(np.minimum(v - carina, carina + 0.12 - v), 0.02)
        for side in (-1, 1)
    )
    bubble = _sstep(1.0 - _ellipse(u, v, (0.33, a.dome_top[1] + 0.13), (0.1, 0.06)), 0.2)
    return -0.18 * (trachea + bronchi) - 0.2 * bubble


def render_anatomy(a: Anatomy, size: int) -> AnatomyMaps:
    """Draw the attenuation of a healthy chest and its lung fields at `size` x `size` pixels."""
    u, v = body_grid(a, size)
    eps = 3.0 / (size * a.scale)  # 1.5 pixels in body units: antialiased, resolution-independent edges
    right, s_r, gap_r = _lung(a, u, v, 0, eps)
    left, s_l, gap_l = _lung(a, u, v, 1, eps)
    medi = _mediastinum(a, u, v, eps)
    lungs = (right * (1.0 - medi), left * (1.0 - medi))
    lung = lungs[0] + lungs[1]
    outline, tissue = _body(a, u, v, eps)
    # air replaces a fraction of the path: lungs stay denser than the air around the body
    air = 0.6 * lung * (0.85 + 0.15 * np.where(u < 0, s_r, s_l))
    bones = sum(
        _rib_family(np.abs(u), v, a, ant, eps) * (np.sign(u) == side)
        for side in (-1, 1)
        for ant in (False, True)
    )
    bones = 0.09 * bones + 0.22 * _clavicles(a, u, v, eps) + 0.12 * _spine(a, u, v, eps)
    lm = _landmarks(a)
    hila = sum(_sstep(1.0 - _ellipse(u, v, lm[k], (0.06, 0.08)), 0.6) for k in ("hilum_r", "hilum_l"))
    vessels = _vessels(a, size) * np.clip(lung + hila, 0.0, 1.0)
    atten = tissue * (1.0 - air) + a.bone * bones + 0.12 * hila + 0.16 * vessels + _extras(a, u, v, eps)
    return AnatomyMaps(
        u=u,
        v=v,
        atten=atten.astype(np.float32),
        lungs=(lungs[0].astype(np.float32), lungs[1].astype(np.float32)),
        height=np.where(u < 0, s_r, s_l).astype(np.float32),
        lateral_gap=np.where(u < 0, gap_r, gap_l).astype(np.float32),
        body=outline.astype(np.float32),
        eps=eps,
    )


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise with features about size/cells pixels wide (same look at any size)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    # PIL's bicubic resize is an order of magnitude faster than scipy's zoom for this
    fine = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    return ((fine - fine.mean()) / (fine.std() + 1e-8)).astype(np.float32)


def sample_pathology(
    label: str, rng: np.random.Generator, severity: tuple[float, float], seed: int | None = None
) -> Pathology:
    """Draw the disease of one image: its severity in the configured range and a geometry seed (pass
    `seed` to keep a lesion's place across a patient's images while its severity changes)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    sev = 0.0 if label == "healthy" else float(rng.uniform(*severity))
    return Pathology(label=label, severity=sev, seed=int(rng.integers(0, 2**31)) if seed is None else seed)


def _pick(rng: np.random.Generator, maps: AnatomyMaps, weights: np.ndarray) -> tuple[float, float]:
    """Body coordinates of a pixel drawn with probability proportional to `weights`."""
    p = weights.ravel().astype(np.float64)
    idx = int(rng.choice(p.size, p=p / p.sum()))
    return float(maps.u.flat[idx]), float(maps.v.flat[idx])


def _pneumonia(a: Anatomy, maps: AnatomyMaps, rng: np.random.Generator, sev: float) -> np.ndarray:
    """Lobar consolidation: one dense, irregular region in one lung, mostly lower zone, with a sharp
    horizontal-fissure border in most right-upper-zone cases and sometimes air bronchograms."""
    side = 0 if rng.random() < 0.6 else 1
    zone = int(rng.choice(3, p=[0.15, 0.25, 0.6]))
    lung = maps.lungs[side] > 0.5
    band = (maps.height >= zone / 3.0) & (maps.height <= (zone + 1) / 3.0) & lung
    uc, vc = _pick(rng, maps, band if band.any() else lung)
    ra, rb = (0.17 + 0.12 * sev) * rng.uniform(0.8, 1.2), (0.14 + 0.1 * sev) * rng.uniform(0.8, 1.2)
    size = maps.u.shape[0]
    # a cluster of overlapping ellipses plus coarse noise: an irregular, ill-defined region, not a disc
    field = np.full_like(maps.u, -np.inf)
    for _ in range(int(rng.integers(3, 6))):
        c = (uc + rng.normal(0.0, 0.5 * ra), vc + rng.normal(0.0, 0.5 * rb))
        ab = (ra * rng.uniform(0.5, 0.9), rb * rng.uniform(0.5, 0.9))
        field = np.maximum(field, 1.0 - _ellipse(maps.u, maps.v, c, ab, rng.uniform(-40, 40)))
    region = _sstep(field + 0.3 * smooth_noise(rng, size, 10), 0.6)
    if zone == 0 and side == 0 and rng.random() < 0.7:  # only the right lung has a horizontal fissure
        region = region * _sstep(vc + 0.6 * rb - maps.v, maps.eps)
    dens = (0.3 + 0.35 * sev) * rng.uniform(0.85, 1.15)
    out = dens * region * (0.8 + 0.2 * smooth_noise(rng, size, 24))
    if rng.random() < 0.5:
        angles = [float(x) for x in rng.uniform(-40.0, 80.0, 3)]
        tree = draw_segments(
            a,
            size,
            _tree(rng, (uc - (side * 2 - 1) * 0.5 * ra, vc - 0.5 * rb), angles, side * 2 - 1, 0.08, 0.012, 3),
        )
        out = out * (1.0 - 0.45 * ndimage.gaussian_filter(tree, 0.5 * size / 256))
    return out


def _covid(maps: AnatomyMaps, rng: np.random.Generator, sev: float) -> np.ndarray:
    """Bilateral, peripheral, lower-zone patchy ground-glass: several faint blobs near the lateral lung
    border on both sides, textured so they look patchy rather than like smooth discs."""
    size = maps.u.shape[0]
    peripheral = np.exp(-np.clip(maps.lateral_gap, 0.0, None) / 0.1)
    lower = 1.0 / (1.0 + np.exp(-(maps.height - 0.45) / 0.12))
    acc = np.zeros_like(maps.u)
    for side in (0, 1):
        weights = (maps.lungs[side] > 0.5) * peripheral * lower + 1e-9 * (maps.lungs[side] > 0.5)
        for _ in range(int(rng.integers(1, 3)) + round(3 * sev)):
            uc, vc = _pick(rng, maps, weights)
            rad = rng.uniform(0.06, 0.13)
            r2 = ((maps.u - uc) ** 2 + (maps.v - vc) ** 2) / (2.0 * rad**2)
            acc += rng.uniform(0.5, 1.0) * np.exp(-r2)
    patchy = np.clip(0.55 + 0.45 * smooth_noise(rng, size, 20), 0.0, None)
    return (0.06 + 0.1 * sev) * np.minimum(acc, 1.3) * patchy


def pathology_map(a: Anatomy, maps: AnatomyMaps, pathology: Pathology) -> np.ndarray:
    """Extra attenuation of the disease, `(S, S)` float32, non-zero only inside the lung mask.

    Args:
        a: the anatomy `maps` was rendered from.
        maps: `render_anatomy(a, S)`.
        pathology: what to draw; its `seed` fixes the geometry, so the map is a pure function of inputs.
    """
    rng = np.random.default_rng(pathology.seed)
    if pathology.label == "healthy":
        out = np.zeros_like(maps.u)
    elif pathology.label == "pneumonia":
        out = _pneumonia(a, maps, rng, pathology.severity)
    else:
        out = _covid(maps, rng, pathology.severity)
    lung = maps.lung
    # soft fade at the border but strictly zero outside the (thresholded) lung mask
    return (out * lung * (lung > 0.5)).astype(np.float32)
