"""Frozen-encoder evaluation (`sscxr probe`): linear and k-NN probes on fixed features, as SSL papers do.

Each feature source (a pre-trained encoder, a randomly initialised encoder of the same architecture,
the raw pixels area-downsampled to K x K) is run once over every cache row any split needs; then, for
each labelled fraction and subset seed, the labelled training rows are drawn with
`sscxr.tasks.labels.select_rows` (the very subsets `sscxr finetune classify.labelled_fraction=F
classify.subset_seed=S` trains on), shared by every source, and each probe is fitted on them:

- linear: StandardScaler + class-balanced logistic regression, C chosen on validation AUC-ROC;
- k-NN: cosine similarity, class-balanced weighted votes, k chosen on validation AUC-ROC.

Thresholds are chosen on the validation predictions and frozen before any test set is scored; test
rows never fit anything. Every (fraction, seed, row) cell is written when it finishes (predictions
CSVs in `write_predictions` format, then a cell JSON), so an interrupted probe resumes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler, normalize
from timm.models.vision_transformer import VisionTransformer

from sscxr.data.cache import ImageCache
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.distributed import resolve_device
from sscxr.errors import CheckpointError, ConfigError, DataError
from sscxr.evaluation.classification import ThresholdRule, choose_threshold, evaluate_arrays
from sscxr.evaluation.predict import SplitSpec, Targets, class_targets, open_split, write_predictions
from sscxr.evaluation.runner import operating_point_flags, slug
from sscxr.metrics import predict as predict_classes
from sscxr.models.loading import Normalization, read_export_meta
from sscxr.models.vit import VIT_PRESETS, ViTConfig, build_vit, vit_config_from_dict
from sscxr.tasks.common import load_encoder_start, resolve_init_path
from sscxr.tasks.labels import LabelTask, select_rows
from sscxr.utils import atomic_write_json, atomic_write_text, display_path

__all__ = [
    "C_GRID",
    "FEATURE_KINDS",
    "FORMAT",
    "FORMAT_VERSION",
    "KNN_KS",
    "RANDOM_SEED",
    "FeatureSource",
    "KnnProbe",
    "LinearProbe",
    "ProbeOptions",
    "below_chance_flag",
    "encoder_features",
    "encoder_source",
    "extract_features",
    "fit_knn_probe",
    "fit_linear_probe",
    "knn_scores",
    "load_frozen_encoder",
    "parse_fractions",
    "parse_seeds",
    "pixel_features",
    "pixel_source",
    "random_source",
    "report_markdown",
    "row_span_basis",
    "run_probe",
    "small_validation_flag",
    "validation_auc",
    "write_report",
]

log = logging.getLogger(__name__)

FORMAT = "sscxr-probe"
# 2: each row carries its operating-point flags; 3: linear probes fitted in the span of the training rows
# (`row_span_basis`: the exact optimum, which lbfgs over all features had stopped short of at large C).
# Cells of an earlier version are recomputed.
FORMAT_VERSION = 3
FEATURE_KINDS = ("avg4", "avg", "cls", "grid4")
C_GRID: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-4, 2.01, 0.5))
KNN_KS = (1, 3, 5, 10, 20, 50)
RANDOM_SEED = 0  # the random encoder's initialisation seed (recorded in probe.json)
MIN_VALIDATION = 20  # below this many images / patients in a class, validation choices are noisy
_TOL = 1e-6  # lbfgs tolerance of the linear probe: near the optimum even at large C (sklearn's is 1e-4)
_MAX = 65535.0
# Reference rows first: every report must show what the pixels and a random encoder already reach.
_ORDER = {"pixels": 0, "random": 1}


@dataclass(frozen=True)
class ProbeOptions:
    """Everything `run_probe` needs besides the sources and the data (all recorded in probe.json).

    features: "avg4", "avg" or "cls" (see `encoder_features`); knn: add k-NN rows for encoders;
    threshold: binary operating-point rule, chosen on validation; n_boot, boot_seed: patient-bootstrap
    intervals of the test metrics; c_grid: C values of the linear probe; ks, temperature: k values and
    vote temperature of the k-NN probe; max_iter: lbfgs iterations; batch_size, device: extraction.
    """

    features: str = "avg4"
    knn: bool = True
    threshold: ThresholdRule = field(default_factory=lambda: ThresholdRule("youden"))
    n_boot: int = 500
    boot_seed: int = 0
    c_grid: tuple[float, ...] = C_GRID
    ks: tuple[int, ...] = KNN_KS
    temperature: float = 0.07
    max_iter: int = 5000
    batch_size: int = 64
    device: str | None = None

    def __post_init__(self) -> None:
        if self.features not in FEATURE_KINDS:
            raise ConfigError(f"--features {self.features!r}: choose one of {', '.join(FEATURE_KINDS)}")
        if self.n_boot < 0 or self.batch_size < 1 or self.max_iter < 1 or not self.temperature > 0:
            raise ConfigError(
                f"probe options: n_boot ({self.n_boot}) must be >= 0, batch_size ({self.batch_size}) and "
                f"max_iter ({self.max_iter}) >= 1, temperature ({self.temperature}) > 0"
            )
        if not self.c_grid or not self.ks or min(self.c_grid) <= 0 or min(self.ks) < 1:
            raise ConfigError(f"probe options: C grid {self.c_grid} must be > 0, k grid {self.ks} >= 1")


# ------------------------------------------------------------------------------------------ features
def _read(cache: ImageCache, idx: np.ndarray, size: int) -> torch.Tensor:
    """(B, 1, size, size) float32 in [0, 1] of cache rows `idx`, resized when the cache's size differs."""
    x = torch.from_numpy(cache.images[idx].astype(np.float32) / np.float32(_MAX))[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def encoder_features(encoder: VisionTransformer, x: torch.Tensor, kind: str = "avg4") -> torch.Tensor:
    """Frozen features of standardised images.

    Args:
        encoder: timm ViT with a class token.
        x: (B, 1, S, S) standardised images.
        kind: "avg4": the last 4 blocks' (all blocks' if fewer) final-normed patch tokens, each
            mean-pooled, concatenated; "avg": the last block's; "cls": the final-normed class token;
            "grid4": the mean of the last 4 blocks' final-normed patch tokens (GMML's reconstruction
            features) average-pooled on the patch grid to 4 x 4 cells, flattened: it keeps *where* in
            the chest a feature is, which a global mean throws away (raw-pixel probes keep it too).

    Returns:
        (B, F): F = min(4, depth) * D for "avg4", min(4, grid)^2 * D for "grid4", D otherwise.
    """
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"--features {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    n = min(4, len(encoder.blocks)) if kind in ("avg4", "grid4") else 1
    outs = encoder.forward_intermediates(
        x, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
    )  # [(patch tokens (B, N, D), prefix tokens (B, 1, D)), ...] of the last n blocks
    if kind == "cls":
        return outs[-1][1][:, 0]
    if kind == "grid4":
        tokens = torch.stack([patch for patch, _ in outs]).mean(dim=0)  # (B, N, D)
        b, n_tok, d = tokens.shape
        g = round(n_tok**0.5)
        grid = tokens.transpose(1, 2).reshape(b, d, g, g)
        return F.adaptive_avg_pool2d(grid, min(4, g)).flatten(1)
    return torch.cat([patch.mean(dim=1) for patch, _ in outs], dim=1)


def extract_features(
    encoder: VisionTransformer,
    cache: ImageCache,
    indices: np.ndarray,
    norm: Normalization,
    kind: str = "avg4",
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """`encoder_features` of cache rows, images standardised with `norm`. Returns (N, F) float32."""
    dev = resolve_device(device)
    encoder = encoder.eval().to(dev)
    size = int(encoder.patch_embed.img_size[0])
    # bf16 only where it is fast and supported; on CPU float32 is both faster and exact.
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    chunks = []
    with torch.inference_mode(), amp:
        for start in range(0, len(indices), batch_size):
            x = (_read(cache, indices[start : start + batch_size], size) - norm.mean) / norm.std
            chunks.append(encoder_features(encoder, x.to(dev), kind).float().cpu().numpy())
    width = chunks[0].shape[1] if chunks else 0
    return np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)


def pixel_features(
    cache: ImageCache, indices: np.ndarray, pixels: int, size: int, batch_size: int = 256
) -> np.ndarray:
    """Cache images (resized to `size` if needed) area-averaged to pixels x pixels. Returns (N, K*K)."""
    chunks = [
        F.adaptive_avg_pool2d(_read(cache, indices[s : s + batch_size], size), pixels).flatten(1).numpy()
        for s in range(0, len(indices), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, pixels * pixels), np.float32)


# ------------------------------------------------------------------------------------------- sources
@dataclass
class FeatureSource:
    """One feature extractor: rows "<name> linear" (and "<name> knn" when "knn" is in `probes`).

    extract(cache, indices (N,)) -> (N, F) features; info: what to record (architecture, weights,
    normalisation, seed); it is also part of the resume key.
    """

    name: str
    start: str
    encoder: str | None
    probes: tuple[str, ...]
    extract: Callable[[ImageCache, np.ndarray], np.ndarray]
    info: dict[str, Any]


def _encoder_config(weights: Path, arch: str) -> ViTConfig:
    """The ViT of a weight file: an export's JSON, a checkpoint's config, else the preset `arch` (timm)."""
    meta = read_export_meta(weights)
    try:
        if meta is not None:
            return vit_config_from_dict(meta["vit"])
        if weights.suffix in (".pt", ".pth"):
            with contextlib.suppress(CheckpointError):  # not an sscxr checkpoint: a timm / DeiT file
                return vit_config_from_dict(load_checkpoint(weights)["config"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read the ViT configuration it was made with ({e})") from e
    if arch not in VIT_PRESETS:
        raise ConfigError(f"--arch {arch!r}: choose one of {', '.join(VIT_PRESETS)}")
    return VIT_PRESETS[arch]


def load_frozen_encoder(
    path: str, img_size: int, cache_norm: Normalization, arch: str = "vit_small"
) -> tuple[VisionTransformer, ViTConfig, Normalization, dict[str, Any]]:
    """Build and load an encoder from an export, a pre-training run folder, a checkpoint or a timm file.

    The ViT is built at the cache's `img_size` (position embeddings are resampled when the weights were
    trained at another size). Normalisation: the export's, else the cache's statistics, as fine-tuning.

    Returns:
        (encoder, its config, normalisation, record of the load for probe.json).
    """
    weights = resolve_init_path(path)
    if read_export_meta(weights) is None and not weights.is_file():
        raise CheckpointError(
            f"{path}: no such encoder; give a GMML export (encoder.safetensors + encoder.json), a "
            "pre-training run folder, an sscxr checkpoint or a timm / DeiT weight file"
        )
    cfg = dataclasses.replace(_encoder_config(weights, arch), img_size=img_size, drop_path_rate=0.0)
    encoder = build_vit(cfg)
    record, report = load_encoder_start(encoder, "auto", str(weights), "probe")
    norm = report.normalization or cache_norm
    stat = weights.stat() if weights.is_file() else None
    record.update(
        vit=cfg.to_dict(),
        normalization=asdict(norm),
        normalization_from="export" if report.normalization else "cache",
        file={"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None,
    )
    return encoder, cfg, norm, record


def _vit_source(
    name: str, start: str, path: str | None, encoder: VisionTransformer, norm: Normalization,
    options: ProbeOptions, info: dict[str, Any],
) -> FeatureSource:  # fmt: skip
    def extract(cache: ImageCache, idx: np.ndarray) -> np.ndarray:
        o = options
        return extract_features(encoder, cache, idx, norm, o.features, o.batch_size, o.device)

    probes = ("linear", "knn") if options.knn else ("linear",)
    return FeatureSource(name, start, path, probes, extract, info)


def encoder_source(
    name: str, path: str, img_size: int, cache_norm: Normalization, options: ProbeOptions, arch: str
) -> tuple[FeatureSource, ViTConfig]:
    """A pre-trained encoder's source (see `load_frozen_encoder`) and its ViT config."""
    encoder, cfg, norm, record = load_frozen_encoder(path, img_size, cache_norm, arch)
    return _vit_source(name, name, record["path"], encoder, norm, options, record), cfg


def random_source(
    cfg: ViTConfig, cache_norm: Normalization, options: ProbeOptions, seed: int = RANDOM_SEED
) -> FeatureSource:
    """A randomly initialised encoder (timm's init, seeded), standardised with the cache statistics."""
    cfg = dataclasses.replace(cfg, drop_path_rate=0.0)
    # timm initialises from torch's global generator: fork it, so the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_vit(cfg)
    info = {"vit": cfg.to_dict(), "seed": seed, "normalization": asdict(cache_norm)}
    return _vit_source("random encoder", "random", None, encoder, cache_norm, options, info)


def pixel_source(pixels: int, size: int) -> FeatureSource:
    """Logistic regression on the cache images area-downsampled to pixels x pixels (the floor to beat)."""
    if not 1 <= pixels <= size:
        raise ConfigError(f"--pixels {pixels}: must be in 1..{size} (the cache's image size), or 0 for none")
    return FeatureSource(
        f"pixels {pixels}px", "pixels", None, ("linear",),
        lambda cache, idx: pixel_features(cache, idx, pixels, size), {"pixels": pixels, "size": size},
    )  # fmt: skip


# -------------------------------------------------------------------------------------------- probes
def validation_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC-ROC: of the positive class (binary), else macro one-vs-rest. `probs`: (N, C)."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(probs.shape[1])))


@dataclass
class LinearProbe:
    """A fitted linear probe: the training rows' scaler, the basis of their span the regression was
    fitted in (None: the features themselves), the logistic regression of the chosen C."""

    scaler: StandardScaler
    model: LogisticRegression
    C: float
    grid: dict[float, float]  # C -> validation AUC-ROC
    val_auc: float
    basis: np.ndarray | None = None  # (F, R) orthonormal columns

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(x)
        return z if self.basis is None else z @ self.basis

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, C) probabilities."""
        return self.model.predict_proba(self._inputs(x))

    @property
    def weights(self) -> np.ndarray:
        """(C', F) weights of the standardised features (C' = 1 for two classes), whatever the basis."""
        coef = self.model.coef_
        return coef if self.basis is None else coef @ self.basis.T


def row_span_basis(x: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis (F, R) of the span of the rows of x (N, F), or None when F <= N.

    An L2-penalised logistic regression's optimal weights are a combination of the training rows (its
    gradient is), so fitting it on the rows' R <= N coordinates in this basis is an exact
    reparametrisation: the same optimum, reached in a fraction of the time when F >> N (grid features:
    3,072 against a few hundred labelled images), and reached more closely, since lbfgs in all F
    dimensions stops early at large C.
    """
    n, f = x.shape
    if f <= n:
        return None
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    rank = int((s > s[0] * max(n, f) * np.finfo(x.dtype).eps).sum()) if s.size and s[0] > 0 else 0
    return vt[: max(rank, 1)].T


def fit_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = 5000,
) -> LinearProbe:
    """StandardScaler (fitted on the training rows only) + LogisticRegression(lbfgs, balanced classes).

    Each C of `c_grid` is fitted on the training rows and scored by validation AUC-ROC; the best C
    (ties: the smaller) is kept. With more features than training rows the regression is fitted in the
    span of the rows (`row_span_basis`): the same optimum, faster. Arrays: x (N, F), y (N,) class
    indices; every class in y_train.
    """
    present = np.unique(y_train)
    if not np.array_equal(present, np.arange(len(present))) or len(present) < 2:
        raise ValueError(f"y_train must hold every class 0..C-1 (C >= 2), got classes {present.tolist()}")
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    basis = row_span_basis(xt)
    if basis is not None:
        xt, xv = xt @ basis, xv @ basis
    best: tuple[float, float, LogisticRegression] | None = None
    grid: dict[float, float] = {}
    for c in sorted(c_grid):
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=_TOL, class_weight="balanced")
        with warnings.catch_warnings():
            # Large C on separable features may stop at max_iter; that C then simply scores what it scores.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xt, y_train)
        grid[c] = validation_auc(y_val, model.predict_proba(xv))
        if best is None or grid[c] > best[1]:
            best = (c, grid[c], model)
    if best is None:
        raise ConfigError("the C grid of the linear probe is empty")
    return LinearProbe(scaler, best[2], best[0], grid, best[1], basis)


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    k: int,
    n_classes: int,
    temperature: float = 0.07,
) -> np.ndarray:
    """Class-balanced, similarity-weighted k-NN class probabilities.

    Hand-written (scikit-learn's KNeighborsClassifier has no class-balanced weighting): each of the k
    most similar training rows votes exp(sim / temperature) (DINO) for its class; a class's votes are
    divided by its number of training rows, so a majority class does not win by its size alone; the
    class scores are normalised to sum to 1.

    Args:
        train_x: (N, F) L2-normalised training features; train_y: (N,) class indices.
        query_x: (M, F) L2-normalised query features.
        k: neighbours (<= N); ties in similarity go to the lower training row.

    Returns:
        (M, C) probabilities.
    """
    sim = query_x @ train_x.T  # (M, N) cosine similarities
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # (M, k)
    s = np.take_along_axis(sim, top, axis=1)
    w = np.exp((s - s[:, :1]) / temperature)  # shifted by the best: same ratios, no overflow
    votes = np.zeros((len(query_x), n_classes))
    np.add.at(votes, (np.arange(len(query_x))[:, None], train_y[top]), w)
    votes /= np.bincount(train_y, minlength=n_classes).clip(min=1)
    return votes / votes.sum(axis=1, keepdims=True)


@dataclass
class KnnProbe:
    """A k-NN probe: the training rows' scaler, their normalised features, the chosen k."""

    scaler: StandardScaler
    train_x: np.ndarray
    train_y: np.ndarray
    n_classes: int
    k: int
    temperature: float
    grid: dict[int, float]  # k -> validation AUC-ROC
    val_auc: float

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, C) probabilities."""
        q = normalize(self.scaler.transform(x))
        return knn_scores(self.train_x, self.train_y, q, self.k, self.n_classes, self.temperature)


def fit_knn_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = 0.07,
) -> KnnProbe:
    """Standardise (training rows' statistics), L2-normalise, choose k on validation AUC (ties: smaller).

    k values above the number of training rows are capped to it.
    """
    scaler = StandardScaler().fit(x_train)
    train = normalize(scaler.transform(x_train))
    y = np.asarray(y_train, dtype=np.int64)
    probe = KnnProbe(scaler, train, y, n_classes, 0, temperature, {}, -np.inf)
    best_k = None
    for k in sorted({min(int(k), len(train)) for k in ks if int(k) >= 1}):
        probe.k = k
        probe.grid[k] = validation_auc(y_val, probe.predict_proba(x_val))
        if best_k is None or probe.grid[k] > probe.val_auc:
            best_k, probe.val_auc = k, probe.grid[k]
    if best_k is None:
        raise ConfigError(f"the k grid of the k-NN probe has no positive k: {list(ks)}")
    probe.k = best_k
    return probe


# -------------------------------------------------------------------------------------------- guards
def small_validation_flag(
    y: np.ndarray, patients: np.ndarray, class_names: Sequence[str], minimum: int = MIN_VALIDATION
) -> dict[str, str] | None:
    """A "small_validation" flag when the validation minority class has < `minimum` images or patients."""
    counts = [(int((y == k).sum()), len(set(patients[y == k].tolist()))) for k in range(len(class_names))]
    k = min(range(len(counts)), key=lambda j: counts[j])
    n_img, n_pat = counts[k]
    if n_img >= minimum and n_pat >= minimum:
        return None
    return {
        "code": "small_validation",
        "message": f"the validation split's smallest class {class_names[k]!r} has {n_img} images from "
        f"{n_pat} patients (< {minimum}): the chosen C / k and thresholds are noisy; use a larger "
        "validation split if you can",
    }


def below_chance_flag(row: str, fraction: float, seed: int, val_auc: float) -> dict[str, str] | None:
    """A "below_chance" flag when a row's best validation AUC-ROC is <= 0.5 (features carry no signal)."""
    if val_auc > 0.5:
        return None
    return {
        "code": "below_chance",
        "message": f"{row} (fraction {fraction:g}, seed {seed}): best validation AUC-ROC "
        f"{val_auc:.3f} <= 0.5: its features carry no signal the probe can use",
    }


# ---------------------------------------------------------------------------------------------- grid
def parse_fractions(text: str) -> tuple[float, ...]:
    """Parse "0.01,0.1,1" -> (0.01, 0.1, 1.0): distinct values in (0, 1]. Raises ConfigError."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ConfigError(f"--fractions {text!r}: expected numbers separated by commas ({e})") from e
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if not values or bad or len(set(values)) != len(values):
        raise ConfigError(f"--fractions {text!r}: give distinct labelled fractions in (0, 1], e.g. 0.1,1")
    return values


def parse_seeds(text: str) -> tuple[int, ...]:
    """Parse "0,1,2" -> (0, 1, 2): distinct non-negative integers. Raises ConfigError."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas ({e})") from e
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ConfigError(f"--seeds {text!r}: give distinct non-negative subset seeds, e.g. 0,1,2")
    return values


def _sha(obj: Any) -> str:
    data = obj.tobytes() if isinstance(obj, np.ndarray) else json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


class _Bank:
    """Features of one source for every row any split needs, per cache: {cache root: (rows, (K, F))}."""

    def __init__(self, source: FeatureSource, wanted: Mapping[Path, tuple[ImageCache, np.ndarray]]) -> None:
        start = time.perf_counter()
        self.parts = {root: (idx, source.extract(cache, idx)) for root, (cache, idx) in wanted.items()}
        self.seconds = time.perf_counter() - start
        n = sum(len(i) for i, _ in self.parts.values())
        log.info("%s: features of %d images in %.2f s", source.name, n, self.seconds)

    def take(self, root: Path, indices: np.ndarray) -> np.ndarray:
        """(K, F) features of cache rows `indices` (all among the extracted rows) of the cache at `root`."""
        rows, feats = self.parts[root]
        pos = np.searchsorted(rows, indices).clip(max=len(rows) - 1)
        if not np.array_equal(rows[pos], indices):
            raise RuntimeError(
                f"{root}: features of rows {np.setdiff1d(indices, rows)[:5]}... were not extracted"
            )
        return feats[pos]


def _fit(kind: str, bank: _Bank, root: Path, train: Targets, val: Targets, n: int, o: ProbeOptions) -> Any:
    xt, xv = bank.take(root, train.indices), bank.take(root, val.indices)
    if kind == "linear":
        return fit_linear_probe(xt, train.y, xv, val.y, o.c_grid, o.max_iter)
    return fit_knn_probe(xt, train.y, xv, val.y, n, o.ks, o.temperature)


def _test_summary(result: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """evaluate_arrays' result without curves (recomputable from the CSV), with the headline AUC-ROC."""
    key = (class_names[1], "auc_roc") if len(class_names) == 2 else ("all", "macro_auc_roc")
    auc = next((m["value"] for m in result["metrics"] if (m["class"], m["metric"]) == key), None)
    return {"auc_roc": auc, **{k: v for k, v in result.items() if k not in ("curves", "reliability")}}


# Named test sets: {name: (cache root, the rows the task uses, the cache)}.
_Tests = dict[str, tuple[Path, Targets, ImageCache]]


@dataclass
class _Data:
    cache: ImageCache
    task: LabelTask
    val: Targets
    tests: _Tests


def _run_cell(
    source: FeatureSource, kind: str, bank: _Bank, train: Targets, data: _Data, o: ProbeOptions, rel: Path,
    out: Path,
) -> dict[str, Any]:  # fmt: skip
    """Fit one probe, freeze its threshold on validation, then predict and score every test set."""
    names, root = list(data.task.class_names), data.cache.root
    probe = _fit(kind, bank, root, train, data.val, len(names), o)
    p_val = probe.predict_proba(bank.take(root, data.val.indices))
    choice = choose_threshold(o.threshold, names, None, data.val.y, p_val, val_name="validation")
    files = {"val": str(rel / "val.csv")}
    pred_val = predict_classes(p_val, choice.value)
    write_predictions(out / files["val"], data.cache, data.val, p_val, names, pred_val)
    tests, flags = {}, []
    for name, (troot, t, tcache) in data.tests.items():  # the threshold is frozen from here on
        p = probe.predict_proba(bank.take(troot, t.indices))
        files[name] = str(rel / f"{slug(name)}.csv")
        write_predictions(out / files[name], tcache, t, p, names, predict_classes(p, choice.value))
        res = evaluate_arrays(t.y, p, t.patients, names, choice.value, o.n_boot, seed=o.boot_seed)
        tests[name] = _test_summary(res, names)
        # The probe's threshold is frozen on validation as the fine-tuned rows' is, so a probe row's
        # operating point can be degenerate on a test set as theirs can: flag it the same way.
        flags += [{**f, "message": f"{name}: {f['message']}"} for f in operating_point_flags(res)]
    hyper = {"C": probe.C} if kind == "linear" else {"k": probe.k}
    return {
        "hyper": hyper,
        "val": {"auc_roc": probe.val_auc, "grid": {f"{k:g}": v for k, v in probe.grid.items()}},
        "threshold": asdict(choice),
        "tests": tests,
        "predictions": files,
        "flags": flags,
    }


def _labelled_csv(path: Path, cache: ImageCache, t: Targets, class_names: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "path", "patient", "label", "class"])
    for i, y, p in zip(t.indices, t.y, t.patients, strict=True):
        w.writerow([int(i), cache.rows[int(i)].path, p, cache.rows[int(i)].label, class_names[int(y)]])
    atomic_write_text(path, buf.getvalue())


def _open_tests(
    tests: Sequence[tuple[str, SplitSpec]], cache: ImageCache, used: np.ndarray, task: LabelTask
) -> _Tests:
    """Open each named test set; refuse one that shares images with the training or validation rows."""
    out = {}
    for name, spec in tests:
        tcache, idx = open_split(spec)
        if tcache.root == cache.root and np.intersect1d(idx, used).size:
            raise DataError(
                f"{cache.root}: test set {name!r} ({spec}) shares {np.intersect1d(idx, used).size} images "
                "with the training / validation splits; name a split disjoint from both"
            )
        out[name] = (tcache.root, class_targets(tcache, idx, task.label_map), tcache)
    return out


def _wanted(
    cache: ImageCache, train: np.ndarray, val: np.ndarray, tests: _Tests
) -> dict[Path, tuple[ImageCache, np.ndarray]]:
    """Per cache, the sorted rows whose features some split needs (extracted once per source)."""
    caches = {cache.root: cache} | {root: c for root, _, c in tests.values()}
    rows = {root: [t.indices for r, t, _ in tests.values() if r == root] for root in caches}
    rows[cache.root] += [train, val]
    return {root: (caches[root], np.unique(np.concatenate(rows[root]))) for root in caches}


def _copy_cell(done: dict[str, Any], rel: Path, out: Path) -> dict[str, Any]:
    """A finished cell's results for another (fraction, seed) with the same labelled rows: files copied."""
    files = {}
    for name, path in done["predictions"].items():
        files[name] = str(rel / Path(path).name)
        atomic_write_text(out / files[name], (out / path).read_text())
    return {**{k: done[k] for k in ("hyper", "val", "threshold", "tests", "flags")}, "predictions": files}


def _cell_dir(fraction: float, seed: int) -> Path:
    return Path(f"f{fraction:g}") / f"s{seed}"


@dataclass
class _Cell:
    """One (fraction, seed, source, probe) of the grid, with its labelled training rows."""

    fraction: float
    seed: int
    train: Targets
    labelled: dict[str, Any]
    source: FeatureSource
    kind: str

    @property
    def name(self) -> str:
        return f"{self.source.name} {self.kind}"


@dataclass
class _Run:
    """State shared by the cells of one `run_probe` call."""

    data: _Data
    options: ProbeOptions
    out: Path
    base_key: dict[str, Any]
    wanted: dict[Path, tuple[ImageCache, np.ndarray]]
    banks: dict[str, _Bank] = field(default_factory=dict)
    memo: dict[str, dict[str, Any]] = field(default_factory=dict)  # resume key -> finished row
    computed: int = 0


def _base_key(data: _Data, splits: tuple[str, str], o: ProbeOptions) -> dict[str, Any]:
    """What every cell's result depends on, besides its source, kind and labelled rows (resume key)."""
    opts = {k: v for k, v in asdict(o).items() if k not in ("batch_size", "device")}
    return {
        "version": FORMAT_VERSION, "task": data.task.to_dict(), "manifest_hash": data.cache.manifest_hash,
        "splits": list(splits), "val_rows": _sha(data.val.indices), "options": opts,
        "tests": {n: [str(root), _sha(t.indices), c.manifest_hash] for n, (root, t, c) in data.tests.items()},
    }  # fmt: skip


def _plan(
    data: _Data, sources: Sequence[FeatureSource], fractions: Sequence[float], seeds: Sequence[int],
    splits: tuple[str, str], out: Path,
) -> list[_Cell]:  # fmt: skip
    """The grid; each (fraction, seed) draws its labelled rows once, with `select_rows`, for every source."""
    cells = []
    for fraction in fractions:
        for seed in seeds:
            idx, _, sub = select_rows(data.cache, data.task, *splits, fraction, None, seed)
            train = class_targets(data.cache, idx, data.task.label_map)
            path = out / "predictions" / _cell_dir(fraction, seed) / "labelled.csv"
            _labelled_csv(path, data.cache, train, data.task.class_names)
            info = {"n_images": sub["n_images"]["train"], "n_patients": len(set(train.patients.tolist())),
                    "rows_sha": _sha(train.indices), "rows": str(path.relative_to(out))}  # fmt: skip
            cells += [_Cell(fraction, seed, train, info, s, k) for s in sources for k in s.probes]
    return cells


def _do_cell(cell: _Cell, run: _Run) -> tuple[dict[str, Any], bool]:
    """The cell's row: from its finished cell JSON (same key), a twin with the same rows, or computed."""
    parts = {"source": cell.source.info, "kind": cell.kind, "rows": cell.labelled["rows_sha"]}
    key = _sha({**run.base_key, **parts})
    path = run.out / "cells" / _cell_dir(cell.fraction, cell.seed) / f"{slug(cell.name)}.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored is not None and stored.get("key") == key:
        run.memo.setdefault(key, stored["row"])
        return stored["row"], True
    t0, rel = time.perf_counter(), Path("predictions") / _cell_dir(cell.fraction, cell.seed) / slug(cell.name)
    if key in run.memo:  # fraction 1: every seed has the same labelled rows, hence the same results
        core = _copy_cell(run.memo[key], rel, run.out)
    else:
        if cell.source.name not in run.banks:
            run.banks[cell.source.name] = _Bank(cell.source, run.wanted)
        core = _run_cell(cell.source, cell.kind, run.banks[cell.source.name], cell.train, run.data,
                         run.options, rel, run.out)  # fmt: skip
    row = {"name": cell.name, "start": cell.source.start, "kind": cell.kind, "encoder": cell.source.encoder,
           "fraction": cell.fraction, "seed": cell.seed, "labelled": cell.labelled, **core,
           "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    atomic_write_json(path, {"key": key, "row": row})
    run.memo.setdefault(key, row)
    run.computed += 1
    return row, False


def _flags(rows: Sequence[dict[str, Any]], val: Targets, class_names: Sequence[str]) -> list[dict[str, str]]:
    """The probe's own flags (validation size, below-chance rows), logged; the rows' operating-point
    flags stay on their rows (`row["flags"]`) and are logged here too."""
    flags = [small_validation_flag(val.y, val.patients, class_names)]
    flags += [below_chance_flag(r["name"], r["fraction"], r["seed"], r["val"]["auc_roc"]) for r in rows]
    for f in (f for f in flags if f is not None):
        log.warning("%s: %s", f["code"], f["message"])
    for r in rows:
        for f in r.get("flags") or ():
            log.warning("%s (fraction %g, seed %d): %s", r["name"], r["fraction"], r["seed"], f["message"])
    return [f for f in flags if f is not None]


def _document(
    run: _Run, sources: Sequence[FeatureSource], rows: list[dict[str, Any]], grid: dict[str, Any]
) -> dict[str, Any]:
    d, o = run.data, run.options
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "task": d.task.name,
        "class_names": list(d.task.class_names), "features": o.features, "cache": display_path(d.cache.root),
        "manifest_hash": d.cache.manifest_hash, **grid,
        "options": run.base_key["options"],
        "validation": {"n_images": int(d.val.y.size), "n_patients": len(set(d.val.patients.tolist())),
                       "counts": np.bincount(d.val.y, minlength=len(d.task.class_names)).tolist()},
        "tests": {n: {"cache": display_path(r), "n_images": int(t.y.size), "excluded": t.excluded}
                  for n, (r, t, _) in d.tests.items()},
        "sources": {s.name: {"start": s.start, "encoder": s.encoder, **s.info} for s in sources},
        "rows": rows, "flags": _flags(rows, d.val, d.task.class_names),
        "cells": {"computed": run.computed, "reused": len(rows) - run.computed},
    }  # fmt: skip


def _check_names(rows: Sequence[str], tests: Sequence[str]) -> None:
    """Row and test names become file names: they must stay distinct as slugs ("val" is taken)."""
    row_slugs, test_slugs = [slug(n) for n in rows], [slug(n) for n in tests]
    if not rows or len(set(row_slugs)) != len(rows):
        raise ConfigError(f"probe rows {list(rows)} must be distinct as file names; rename an --encoder")
    if not tests or len(set(test_slugs)) != len(tests) or "val" in test_slugs:
        raise ConfigError(
            f"test sets {list(tests)} must be at least one, distinct as file names and not 'val' "
            "(the validation predictions' file); rename a --test"
        )


def run_probe(
    sources: Sequence[FeatureSource],
    cache: ImageCache,
    task: LabelTask,
    tests: Sequence[tuple[str, SplitSpec]],
    fractions: Sequence[float],
    seeds: Sequence[int],
    out_dir: str | Path,
    options: ProbeOptions | None = None,
    splits: tuple[str, str] = ("train", "val"),
    command: str = "",
    on_row: Callable[[dict[str, Any], bool], None] | None = None,
) -> dict[str, Any]:
    """Every probe of every source on the labelled subsets of every (fraction, seed); writes OUT.

    Args:
        sources: feature sources (reference rows, pixels then random, are put first).
        cache: the cache holding the training and validation splits.
        task: classes and their labels.
        tests: (name, CACHE:SPLIT) of each test set (any cache; disjoint from train and val).
        fractions, seeds: the grid; labelled rows = `select_rows(cache, task, *splits, fraction, None, seed)`.
        out_dir: OUT (probe.json, report.md, predictions/, cells/); finished cells are reused.
        options: probe settings; splits: (train split, validation split); command: recorded.
        on_row: called with each row and whether it was reused from a previous run.

    Returns:
        The probe.json document.
    """
    start, out = time.perf_counter(), Path(out_dir)
    sources = sorted(sources, key=lambda s: _ORDER.get(s.start, 2))
    _check_names([f"{s.name} {k}" for s in sources for k in s.probes], [name for name, _ in tests])
    all_train, val_idx, _ = select_rows(cache, task, *splits)
    if not val_idx.size:
        raise DataError(f"{cache.root}: split {splits[1]!r} has no image for task {task.name!r}; the probe "
                        "chooses C, k and thresholds on validation: give --val-split")  # fmt: skip
    val = class_targets(cache, val_idx, task.label_map)
    data = _Data(cache, task, val, _open_tests(tests, cache, np.union1d(all_train, val_idx), task))
    o = options or ProbeOptions()
    run = _Run(data, o, out, _base_key(data, splits, o), _wanted(cache, all_train, val_idx, data.tests))
    rows = []
    for cell in _plan(data, sources, fractions, seeds, splits, out):
        row, reused = _do_cell(cell, run)
        rows.append(row)
        if on_row is not None:
            on_row(row, reused)
    grid = {"splits": dict(zip(("train", "val"), splits, strict=True)), "fractions": list(fractions),
            "seeds": list(seeds), "command": command}  # fmt: skip
    doc = _document(run, sources, rows, grid)
    doc["seconds"] = {
        "features": {n: round(b.seconds, 3) for n, b in run.banks.items()},
        "probes": round(sum(r["seconds"] for r in rows), 3),
        "total": round(time.perf_counter() - start, 3),
    }
    atomic_write_json(out / "probe.json", doc)
    write_report(doc, out)
    return doc


# -------------------------------------------------------------------------------------------- report
def _mean_range(values: Sequence[float | None]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f}" if len(v) == 1 else f"{np.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})"


def _hyper(rows: Sequence[dict[str, Any]]) -> str:
    """The chosen hyper-parameters over seeds, e.g. "C: 0.01 ×3, 0.1 ×2"."""
    chosen: dict[str, list[str]] = {}
    for (name, value), n in sorted(Counter((k, v) for r in rows for k, v in r["hyper"].items()).items()):
        chosen.setdefault(name, []).append(f"{value:.3g}" + (f" ×{n}" if n > 1 else ""))
    return "; ".join(f"{name}: {', '.join(values)}" for name, values in chosen.items())


def report_markdown(doc: Mapping[str, Any]) -> str:
    """report.md: one table per fraction; mean test AUC-ROC over seeds (min–max), chosen C / k."""
    tests = list(doc["tests"])
    lines = [
        f"# Frozen-encoder probes: {doc['task']} ({', '.join(doc['class_names'])})", "",
        f"Features `{doc['features']}`; cache `{doc['cache']}`; seeds {', '.join(map(str, doc['seeds']))}; "
        f"threshold rule `{doc['options']['threshold']['kind']}` chosen on validation "
        f"({doc['validation']['n_images']} images). AUC-ROC of the positive class (macro one-vs-rest for "
        "more than 2 classes): mean over seeds (min–max). Reference rows (pixels, random encoder) first.",
    ]  # fmt: skip
    row_flags = [(r, f) for r in doc["rows"] for f in r.get("flags") or ()]
    if doc["flags"] or row_flags:
        lines += ["", "**Flags**", "", *[f"- `{f['code']}`: {f['message']}" for f in doc["flags"]]]
        for r, f in row_flags:
            lines.append(
                f"- `{f['code']}`: {r['name']} (fraction {r['fraction']:g}, seed {r['seed']}), {f['message']}"
            )
    for fraction in doc["fractions"]:
        rows = [r for r in doc["rows"] if r["fraction"] == fraction]
        head = ["Row", "labelled images", "val AUC-ROC", *[f"{t} AUC-ROC" for t in tests], "chosen"]
        lines += ["", f"## Labelled fraction {fraction:g}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for name in dict.fromkeys(r["name"] for r in rows):
            mine = [r for r in rows if r["name"] == name]
            n = sorted({sum(r["labelled"]["n_images"].values()) for r in mine})
            cells = [name, "–".join(map(str, (n[0], n[-1]) if len(n) > 1 else n))]
            cells.append(_mean_range([r["val"]["auc_roc"] for r in mine]))
            cells += [_mean_range([r["tests"][t]["auc_roc"] for r in mine]) for t in tests]
            lines.append("| " + " | ".join([*cells, _hyper(mine)]) + " |")
    return "\n".join(lines) + "\n"


def write_report(doc: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write `report_markdown(doc)` to OUT/report.md (atomically); returns its path."""
    path = Path(out_dir) / "report.md"
    atomic_write_text(path, report_markdown(doc))
    return path
