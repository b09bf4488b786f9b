"""The data-dependent choices of classification fine-tuning: class balance, layer decay, LP-FT's head.

Each is a pure function of the config and the training data, computed once when the task is built,
so a resumed run rebuilds exactly the same task (and then loads its weights from the checkpoint).

- Class balance "auto": inverse-frequency loss weights when the largest / smallest training class
  count ratio exceeds `AUTO_BALANCE_RATIO` (1.5), else an unweighted loss.
- Layer-wise lr decay: pre-trained starts get `classify.pretrained_layer_decay` (0.75, the BEiT / MAE
  fine-tuning value) unless `optim.layer_decay` is set; the top of the network (head, final norm)
  keeps the full lr, and each block below gets 0.75 times the one above, so fine-tuning moves the
  pre-trained lower layers least.
- LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): a logistic regression
  fitted on the frozen encoder's pooled features becomes the linear head before fine-tuning starts,
  so the first gradient steps do not push a random head's error back into the pre-trained features.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Dataset

from sscxr.evaluation.guards import Flag, check_balance, check_validation
from sscxr.models.classifier import ViTClassifier
from sscxr.tasks.labels import class_weights

if TYPE_CHECKING:
    from sscxr.data.datasets import CachedDataset
    from sscxr.tasks.classification import FinetuneConfig

__all__ = [
    "AUTO_BALANCE_RATIO",
    "choose_recipe",
    "extract_features",
    "fit_linear_probe",
    "linear_probe_init",
    "resolve_class_balance",
    "resolve_layer_decay",
    "validation_flags",
]

log = logging.getLogger(__name__)

#: `class_balance: auto` weights the loss when the largest / smallest class count ratio exceeds this.
AUTO_BALANCE_RATIO = 1.5


def resolve_class_balance(setting: str, counts: Sequence[int]) -> tuple[str, torch.Tensor | None, float]:
    """The class balance actually used for `classify.class_balance` on training `counts`.

    Args:
        setting: "auto", "none" or "loss_weights".
        counts: training images per class (all > 0).

    Returns:
        (used: "none" | "loss_weights", (C,) float32 loss weights or None, largest / smallest ratio).
    """
    ratio = max(counts) / max(min(counts), 1)
    used = setting
    if setting == "auto":
        used = "loss_weights" if ratio > AUTO_BALANCE_RATIO else "none"
    weights = class_weights(counts) if used == "loss_weights" else None
    return used, weights, float(ratio)


def resolve_layer_decay(
    optim_layer_decay: float | None, pretrained_layer_decay: float | None, pretrained: bool, frozen: bool
) -> tuple[float | None, str]:
    """Which layer-wise lr decay applies, and where it comes from.

    Returns:
        (factor or None, source): source "optim.layer_decay" (the engine applies it),
        "classify.pretrained_layer_decay" (the task applies it: a pre-trained start with
        `optim.layer_decay` null, not frozen) or "none".
    """
    if optim_layer_decay is not None:
        return optim_layer_decay, "optim.layer_decay"
    if pretrained and not frozen and pretrained_layer_decay is not None:
        return pretrained_layer_decay, "classify.pretrained_layer_decay"
    return None, "none"


@torch.no_grad()
def extract_features(
    model: ViTClassifier, dataset: Dataset[Any], batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (what the head sees) of every sample of `dataset`, in order, in eval mode.

    Args:
        model: the classifier; put back on its device and in its training mode afterwards.
        dataset: samples with "image" (1, S, S) in [0, 1] and "label" (); unaugmented for LP-FT.
        batch_size: images per forward pass.
        device: where to run the encoder (float32, no autocast: the probe must see exact features).

    Returns:
        (features (N, D) float64, labels (N,) int64).
    """
    was_training = model.training
    home = next(model.parameters()).device
    model.eval().to(device)
    feats, labels = [], []
    n = len(dataset)  # type: ignore[arg-type]
    try:
        # A plain loop, not a DataLoader: creating a DataLoader iterator draws a seed from the global RNG,
        # which would shift the dropout / drop-path draws of the training that follows.
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            images = torch.stack([it["image"] for it in items]).to(device)
            feats.append(model.features(images).double().cpu())
            labels.append(torch.stack([it["label"] for it in items]))
    finally:
        model.to(home).train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, n_classes: int, balanced: bool, c: float = 1.0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A logistic regression on standardised features, folded into one linear map of the raw features.

    With standardisation `z = (x - mu) / sigma`, the logits `w z + b` equal `w' x + b'` where
    `w' = w / sigma` and `b' = b - sum(w * mu / sigma)`. A binary fit (one weight vector, logit of
    class 1) becomes two softmax logits `-(w x + b) / 2` and `+(w x + b) / 2`, whose softmax is the
    same sigmoid.

    Args:
        features: (N, D) pooled features.
        labels: (N,) class indices; every class in [0, n_classes) must occur.
        n_classes: C.
        balanced: sklearn's class_weight="balanced" (when the fine-tuning loss is weighted too).
        c: inverse regularisation strength of the (L2) logistic regression.

    Returns:
        (weight (C, D) float64, bias (C,) float64, info for model.json).
    """
    present = np.unique(labels)
    if present.tolist() != list(range(n_classes)):
        raise ValueError(f"every class 0..{n_classes - 1} needs a training image, got {present.tolist()}")
    scaler = StandardScaler().fit(features)
    clf = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=5000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(features), labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    coef, intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
    if n_classes == 2:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.array([-1.0, 1.0]) * intercept[0] / 2
    weight = coef / scaler.scale_
    bias = intercept - (coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    info = {
        "C": c,
        "class_weight": "balanced" if balanced else None,
        "n_images": int(labels.size),
        "train_accuracy": float(clf.score(scaler.transform(features), labels)),
        "n_iter": int(np.max(clf.n_iter_)),
        "converged": converged,
    }
    return weight, bias, info


def linear_probe_init(
    model: ViTClassifier,
    dataset: Dataset[Any],
    balanced: bool,
    c: float,
    batch_size: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """LP-FT's first stage: fit a logistic regression on the frozen features and write it into the head.

    Args:
        model: the classifier, its encoder already initialised; its head is overwritten.
        dataset: the labelled training images, without augmentation.
        balanced: class_weight="balanced" for the regression.
        c: its inverse regularisation strength.
        batch_size: images per feature-extraction pass.
        device: where to extract features; None = CUDA when available, else the CPU.

    Returns:
        What was fitted, for model.json.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    feats, labels = extract_features(model, dataset, batch_size, device or torch.device("cpu"))
    weight, bias, info = fit_linear_probe(feats, labels, model.num_classes, balanced, c)
    head = model.encoder.head
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).to(head.weight))
        head.bias.copy_(torch.from_numpy(bias).to(head.bias))
    log.info(
        "LP-FT: logistic regression (C %g, class_weight %s) on the frozen %s-pooled features of %d "
        "training images: training accuracy %.3f, %d iterations%s; written into the head",
        c, info["class_weight"], model.pool, info["n_images"], info["train_accuracy"], info["n_iter"],
        "" if info["converged"] else " (did not converge)",
    )  # fmt: skip
    return info


def validation_flags(val_set: CachedDataset | None, class_names: Sequence[str]) -> list[Flag]:
    """`check_validation` on the validation set's images and patients per class (None: no validation)."""
    if val_set is None or val_set.labels is None:
        return check_validation({}, {})
    images = {n: int((val_set.labels == k).sum()) for k, n in enumerate(class_names)}
    patients = {
        n: len(set(val_set.patient_ids[val_set.labels == k].tolist())) for k, n in enumerate(class_names)
    }
    return check_validation(images, patients)


def choose_recipe(
    cfg: FinetuneConfig, model: ViTClassifier, train_rows: CachedDataset, counts: list[int], pretrained: bool
) -> tuple[torch.Tensor | None, float | None, dict[str, Any], list[Flag]]:
    """Apply the data-dependent choices of a run: class balance, layer decay, and LP-FT's head.

    Args:
        cfg: the run's config.
        model: the classifier, its encoder initialised (LP-FT overwrites its head).
        train_rows: the labelled training images without augmentation (LP-FT's probe data).
        counts: training images per class.
        pretrained: whether the encoder started from pre-trained weights.

    Returns:
        ((C,) loss weights or None, the layer decay the task applies (None when the engine applies
        `optim.layer_decay`, or none at all), what was chosen (for model.json), flags raised).
    """
    c = cfg.classify
    used, weights, ratio = resolve_class_balance(c.class_balance, counts)
    log.info(
        "class balance %s -> %s (training images per class %s, ratio %.2f:1)%s",
        c.class_balance, used, counts, ratio,
        "" if weights is None else f"; loss weights {[round(w, 4) for w in weights.tolist()]}",
    )  # fmt: skip
    flags = check_balance(counts, c.class_balance)
    frozen = c.mode == "frozen"
    decay, source = resolve_layer_decay(cfg.optim.layer_decay, c.pretrained_layer_decay, pretrained, frozen)
    if source == "classify.pretrained_layer_decay":
        log.info("layer-wise lr decay %g (classify.pretrained_layer_decay: pre-trained start)", decay)
    if frozen and not pretrained:
        log.warning("classify.mode=frozen on a scratch encoder: the head trains on random features")
    info: dict[str, Any] = {
        "mode": c.mode,
        "pool": c.pool,
        "class_balance": {"setting": c.class_balance, "used": used, "ratio": round(ratio, 4)},
        "class_weights": None if weights is None else weights.tolist(),
        "layer_decay": {"value": decay, "from": source},
    }
    if c.mode == "lp_ft":
        info["lp_init"] = linear_probe_init(
            model, train_rows, used == "loss_weights", c.lp_c, cfg.train.batch_size
        )
    task_decay = decay if source == "classify.pretrained_layer_decay" else None
    return weights, task_decay, info, flags
