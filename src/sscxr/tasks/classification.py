"""Classification fine-tuning as a Task for the one training engine (paper section 3.2).

The engine trains, validates on the validation split after each epoch and keeps `best.pt` by
`train.best_metric` (default `val/auc_roc`); at the end `export` writes the best weights (or the last
ones when there was no validation) as `model.safetensors` + `model.json` (`models/classifier.py`).
Only the splits named `data.train_split` and `data.val_split` are ever read, and neither may be a test
split: test sets are for `sscxr evaluate`, after the model is frozen.

Class balance is offered as loss weights, not as a balanced sampler: the engine owns the sampler (one
sharded, resumable order for every task), and inverse-frequency weights give the same expected
gradient without a second sampling code path.

Few labels (`docs/design.md`, "Fine-tuning with few labels"): the defaults pool the patch tokens
(`classify.pool: avg`), decay the lr layer-wise for pre-trained starts, weight the loss on unbalanced
data, train at least `train.min_steps` optimiser steps and offer a frozen encoder (`classify.mode:
frozen`) and LP-FT (`lp_ft`). Weak results are flagged (`sscxr.evaluation.guards`): each flag is
logged as a WARNING and written into `model.json` under "flags".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sscxr.config import DataConfig
from sscxr.data.datasets import CachedDataset
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.schedule import apply_layer_decay
from sscxr.errors import ConfigError
from sscxr.evaluation.guards import MIN_STEPS, Flag, check_best_metric, check_steps
from sscxr.metrics.accumulator import ClassificationAccumulator
from sscxr.metrics.classification import MetricValue
from sscxr.models.classifier import POOLS, ViTClassifier, export_classifier
from sscxr.models.loading import Normalization
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.base import Batch, StepOutput, Task, TrainedWeights, reduce_sum
from sscxr.tasks.common import INIT_MODES, load_encoder_start, open_cache, resolve_init_path
from sscxr.tasks.finetune_recipe import choose_recipe, validation_flags
from sscxr.tasks.labels import TASKS, LabelTask, resolve_task, select_rows
from sscxr.utils import derive_seed

__all__ = [
    "ClassSpec",
    "ClassificationTask",
    "ClassifyConfig",
    "FinetuneConfig",
    "build_finetuning",
    "init_encoder",
    "label_task_of",
    "resolve_init_path",
]

log = logging.getLogger(__name__)


@dataclass
class _ValLoss:
    total: float = 0.0
    count: float = 0.0


class ClassificationTask(Task):
    """Cross-entropy fine-tuning of a `ViTClassifier`; validation metrics from the metrics package.

    Args:
        model: the classifier (its `forward` takes [0, 1] images and standardises them).
        vit_cfg: the encoder's architecture (written into `model.json`).
        label_task: the class <-> label mapping.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        weights: (C,) class weights of the loss, or None.
        export_info: provenance merged into `model.json` (data, init report, command, ...).
        frozen_encoder: train the head only: every other parameter gets requires_grad False (so the
            engine's optimiser never sees it) and the encoder stays in eval mode (no dropout or
            drop-path), whatever `train()` is called with.
        layer_decay: layer-wise lr decay the task applies in `param_groups` (for
            `classify.pretrained_layer_decay`); leave None when `optim.layer_decay` is set, which the
            engine applies itself.
        flags: guard flags raised while building (written into `model.json` with those of `export`).

    Batches: "image" (B, 1, H, W) in [0, 1], "label" (B,) long, "index" (B,) long (cache row).
    """

    def __init__(
        self,
        model: ViTClassifier,
        vit_cfg: ViTConfig,
        label_task: LabelTask,
        label_smoothing: float = 0.0,
        weights: torch.Tensor | None = None,
        export_info: dict[str, Any] | None = None,
        frozen_encoder: bool = False,
        layer_decay: float | None = None,
        flags: Sequence[Flag] = (),
    ) -> None:
        super().__init__()
        if tuple(model.class_names) != label_task.class_names:
            raise ValueError(f"model classes {model.class_names} != task classes {label_task.class_names}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if weights is not None and weights.shape != (model.num_classes,):
            raise ValueError(f"weights must have shape ({model.num_classes},), got {tuple(weights.shape)}")
        self.model, self.vit_cfg, self.label_task = model, vit_cfg, label_task
        self.label_smoothing = float(label_smoothing)
        # Not persistent: the weights are derived from the data, and checkpoints stay model-only.
        self.register_buffer("class_weight", weights, persistent=False)
        self.export_info = dict(export_info or {})
        self.frozen_encoder, self.layer_decay, self.flags = bool(frozen_encoder), layer_decay, list(flags)
        if self.frozen_encoder:
            for name, p in model.encoder.named_parameters():
                p.requires_grad_(name.startswith("head."))
        threshold = model.thresholds.get("default") if model.num_classes == 2 else None
        self.accumulator = ClassificationAccumulator(model.class_names, threshold)
        self._val = _ValLoss()
        self.train()

    def train(self, mode: bool = True) -> ClassificationTask:
        """Set the training mode; a frozen encoder stays in eval mode (only the head's dropout follows)."""
        super().train(mode)
        if self.frozen_encoder:
            self.model.encoder.eval()
            self.model.encoder.head_drop.train(mode)
            self.model.encoder.head.train(mode)
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base groups (trainable parameters only), split by depth when `layer_decay` is set."""
        groups = super().param_groups(weight_decay)
        if self.layer_decay is None or self.layer_decay == 1.0:
            return groups
        return apply_layer_decay(groups, self.named_parameters(), self.layer_decay, self.layer_id)

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.model(batch["image"])
        target = batch["label"]
        loss = F.cross_entropy(
            logits.float(), target, weight=self.class_weight, label_smoothing=self.label_smoothing
        )
        acc = (logits.detach().argmax(dim=-1) == target).float().mean()
        return StepOutput(loss=loss, logs={"loss": loss.detach(), "acc": acc})

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> None:
        logits = self.model(batch["image"]).float()
        target = batch["label"]
        # Plain cross-entropy (no smoothing, no weights): comparable across runs and settings.
        self._val.total += float(F.cross_entropy(logits, target, reduction="sum"))
        self._val.count += float(target.numel())
        self.accumulator.update(batch["index"], target, logits.softmax(dim=-1))

    def compute_metrics(self) -> dict[str, float]:
        """auc_roc (binary: the positive class; else macro one-vs-rest), auc_pr, accuracy,
        balanced_accuracy, loss, sensitivity / specificity (binary) or per-class sensitivity and AUC.

        Undefined metrics are left out, with the reason logged. Collective: every rank calls it.
        """
        res = self.accumulator.compute()
        loss = reduce_sum(torch.tensor([self._val.total, self._val.count], dtype=torch.float64))
        values: dict[str, MetricValue] = {
            "auc_roc": res.macro_auc_roc,
            "auc_pr": res.macro_auc_pr,
            "accuracy": res.accuracy,
            "balanced_accuracy": res.balanced_accuracy,
        }
        if len(res.rows) == 2:
            values |= {"sensitivity": res.rows[1].sensitivity, "specificity": res.rows[1].specificity}
        else:
            for row in res.rows:
                values |= {f"{row.name}/sensitivity": row.sensitivity, f"{row.name}/auc_roc": row.auc_roc}
        out = {k: float(v.value) for k, v in values.items() if v.value is not None}
        for k, v in values.items():
            if v.value is None:
                log.warning("validation metric %s is undefined: %s", k, v.reason)
        if loss[1] > 0:
            out["loss"] = float(loss[0] / loss[1])
        return out

    def reset_metrics(self) -> None:
        self.accumulator.reset()
        self._val = _ValLoss()

    def _restore_best(self, trained: TrainedWeights) -> dict[str, Any]:
        """Load the best validation weights the engine hands over, if any; describe what is exported."""
        if trained.best is None:
            log.warning(
                "no best checkpoint (no validation set or no train.best_metric): exporting the last weights"
            )
            return {"weights": "last", "reason": "no best.pt"}
        self.load_state_dict(trained.best)
        return {
            "weights": "best",
            "selected_by": trained.metric,
            "mode": trained.mode,
            "value": trained.value,
            "step": trained.step,
            "epoch": trained.epoch,
            "split": self.export_info.get("splits", {}).get("val"),
        }

    def _export_flags(self, trained: TrainedWeights, chosen: dict[str, Any]) -> list[Flag]:
        """The guards that need the finished run: optimiser steps taken, best validation value."""
        flags = check_steps(trained.steps, MIN_STEPS)
        name = trained.metric
        val_counts = self.export_info.get("n_images", {}).get("val", {})
        if name and sum(val_counts.values()):  # no validation at all is flagged as small_validation
            chance = 0.5
            if "auc_pr" in name and len(val_counts) == 2:  # a random scorer's AUC-PR is the prevalence
                chance = list(val_counts.values())[1] / sum(val_counts.values())
            value = chosen.get("value") if chosen["weights"] == "best" else None
            flags += check_best_metric(name, value, chance)
        return flags

    def export(self, run_dir: Path, trained: TrainedWeights) -> None:
        """Write `run_dir/model.safetensors` + `model.json` from the best validation checkpoint.

        The guard flags of the finished run (too few steps, a best validation AUC at or below
        chance) are logged as warnings and added to those raised while building, under "flags".
        """
        run_dir = Path(run_dir)
        chosen = self._restore_best(trained)
        late = self._export_flags(trained, chosen)
        for flag in late:
            log.warning("%s: %s", flag.code, flag.message)
        info = {
            "task": self.label_task.name,
            "classes": self.label_task.to_dict(),
            "label_map": self.label_task.label_map,
            **self.export_info,
            "checkpoint": chosen,
            "flags": [f.to_dict() for f in [*self.flags, *late]],
        }
        weights, meta = export_classifier(self.model, self.vit_cfg, run_dir / "model", info)
        log.info("classifier exported: %s (+ %s), %s weights", weights, meta.name, chosen["weights"])


# ----------------------------------------------------------------------------------------------------
# Run configuration and building from a prepared cache
# ----------------------------------------------------------------------------------------------------

BALANCE_MODES = ("auto", "none", "loss_weights")
FINETUNE_MODES = ("finetune", "frozen", "lp_ft")


@dataclass
class ClassSpec:
    """One class of a user-defined task: its name and the manifest labels it gathers."""

    name: str = ""
    labels: list[str] = field(default_factory=list)


@dataclass
class ClassifyConfig:
    """What to fine-tune for and from what (`classify:` section of `sscxr finetune`).

    Attributes:
        task: a task of `sscxr.tasks.labels.TASKS`, or a name for `classes`.
        classes: user-defined classes, in output order (for 2, the second is the positive class);
            overrides the named task's mapping.
        init: "scratch", "sscxr" (a GMML export or pre-training run folder / checkpoint), "timm" (an
            external timm / DeiT file, e.g. ImageNet weights) or "auto" (scratch without `init_path`,
            else whatever the file is).
        init_path: the weights to start the encoder from.
        mode: "finetune" (train everything), "frozen" (train the head only, on the frozen encoder in
            eval mode) or "lp_ft" (fit a logistic regression on the frozen features of the training
            images into the head, then fine-tune everything: Kumar et al. 2022).
        pool: "avg" (mean of the final-norm patch tokens; default: GMML trains the patch tokens, not
            the class token) or "token" (the class token, DeiT).
        pretrained_layer_decay: layer-wise lr decay used for pre-trained starts (init not scratch)
            when `optim.layer_decay` is null; 0.75 is the BEiT / MAE fine-tuning value; null disables.
        lp_c: inverse L2 strength of LP-FT's logistic regression (on standardised features).
        drop_rate: dropout on the pooled features before the head.
        label_smoothing: cross-entropy label smoothing.
        class_balance: "auto" (loss weights when the largest / smallest training class ratio exceeds
            1.5, else none), "none" (flagged on such data) or "loss_weights" (inverse class frequency).
        labelled_fraction: share of each class's training patients to use (a small labelled subset).
        max_labelled_per_class: cap on training images per class (whole patients), or None.
        subset_seed: seed of the labelled-subset choice.
        threshold: binary decision threshold on P(positive class) stored with the model.
    """

    task: str = "covid_vs_noncovid"
    classes: list[ClassSpec] | None = None
    init: str = "scratch"
    init_path: str | None = None
    mode: str = "finetune"
    pool: str = "avg"
    pretrained_layer_decay: float | None = 0.75
    lp_c: float = 1.0
    drop_rate: float = 0.0
    label_smoothing: float = 0.0
    class_balance: str = "auto"
    labelled_fraction: float = 1.0
    max_labelled_per_class: int | None = None
    subset_seed: int = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.init not in INIT_MODES:
            raise ConfigError(f"classify.init must be one of {INIT_MODES}, got {self.init!r}")
        if self.init in ("sscxr", "timm") and not self.init_path:
            raise ConfigError(f"classify.init={self.init} needs classify.init_path (a file or run folder)")
        if self.init == "scratch" and self.init_path:
            raise ConfigError("classify.init=scratch ignores classify.init_path: drop it, or use init=auto")
        if self.class_balance not in BALANCE_MODES:
            raise ConfigError(
                f"classify.class_balance must be one of {BALANCE_MODES}, got {self.class_balance!r}"
            )
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"classify.mode must be one of {FINETUNE_MODES}, got {self.mode!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"classify.pool must be one of {POOLS}, got {self.pool!r}")
        ld = self.pretrained_layer_decay
        if ld is not None and not 0.0 < ld <= 1.0:
            raise ConfigError(f"classify.pretrained_layer_decay must be in (0, 1] or null, got {ld}")
        if not self.lp_c > 0:
            raise ConfigError(f"classify.lp_c must be > 0, got {self.lp_c}")
        if not 0.0 <= self.drop_rate < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("classify.drop_rate and classify.label_smoothing must be in [0, 1)")
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ConfigError(f"classify.labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.max_labelled_per_class is not None and self.max_labelled_per_class < 1:
            raise ConfigError("classify.max_labelled_per_class must be >= 1 or null")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"classify.threshold must be in [0, 1], got {self.threshold}")


def _paper_optim() -> OptimConfig:
    # Paper section 4.2: AdamW, lr 5e-4, weight decay 0.05 (constant); DeiT's 5 warm-up epochs, no clipping.
    # The paper fine-tunes with DeiT's code, whose lr 5e-4 is per 512 images of global batch
    # (lr = 5e-4 * batch / 512): blr 2.5e-4 per 256 here. Used as an absolute lr at batch 16 it is 32x
    # too high, and a ViT then does not even fit its training set.
    # Not the paper's: the warm-up is capped at 10% of the run, so a few-label run (2 steps per epoch)
    # does not spend most of its steps warming up.
    return OptimConfig(
        blr=2.5e-4,
        lr=None,
        min_lr=1e-6,
        warmup_epochs=5,
        warmup_max_fraction=0.1,
        weight_decay=0.05,
        weight_decay_end=None,
        clip_grad=None,
    )


def _paper_train() -> TrainConfig:
    # Not the paper's: at least 300 optimiser steps. With 1% of the labels (42 images), 100 epochs at
    # batch 64 would be none at all, and 10 epochs at batch 16 are 20 steps.
    return TrainConfig(
        epochs=100, min_steps=MIN_STEPS, batch_size=64, best_metric="val/auc_roc", best_mode="max"
    )


@dataclass
class FinetuneConfig:
    """Everything `sscxr finetune` needs (defaults: the paper's settings, plus the few-label safeguards:
    `train.min_steps` 300, the warm-up capped at 10% of the run, avg pooling, layer decay 0.75 for
    pre-trained starts, automatic class balance)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    optim: OptimConfig = field(default_factory=_paper_optim)
    train: TrainConfig = field(default_factory=_paper_train)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)


def label_task_of(cfg: ClassifyConfig) -> LabelTask:
    """The `LabelTask` a classify config asks for."""
    if not cfg.classes:
        return resolve_task(cfg.task)
    # A built-in task's name must not label a different mapping in model.json and the reports.
    name = "custom" if cfg.task in TASKS else cfg.task
    return resolve_task(name, [(c.name, list(c.labels)) for c in cfg.classes])


def init_encoder(model: ViTClassifier, ccfg: ClassifyConfig, cache_norm: Normalization) -> dict[str, Any]:
    """Start the classifier's encoder as `ccfg.init` says and set its normalisation.

    sscxr exports bring their own normalisation (the statistics GMML trained with); everything else
    (scratch, timm / ImageNet weights, sscxr training checkpoints) uses the cache's own statistics
    (`../shared/GMML.md`: never ImageNet statistics on grey X-rays).

    Returns:
        What was done, for `model.json`: mode, path, source, the LoadReport's exact missing /
        unexpected keys and adaptations, and where the normalisation came from.
    """
    if ccfg.init == "scratch" or (ccfg.init == "auto" and not ccfg.init_path):
        model.set_normalization(cache_norm)
        return {"mode": "scratch", "normalization_from": "cache"}
    record, report = load_encoder_start(model.encoder, ccfg.init, str(ccfg.init_path), "classify")
    norm, norm_from = cache_norm, "cache"
    if report.normalization is not None:
        norm, norm_from = report.normalization, "export"
    model.set_normalization(norm)
    log.info(
        "encoder initialised from %s (%s): missing keys %s; unexpected keys %s; adapted: %s; "
        "normalisation from the %s (mean %.4g, std %.4g)",
        record["path"], report.source, report.missing, report.unexpected, report.adapted or "nothing",
        norm_from, norm.mean, norm.std,
    )  # fmt: skip
    return {
        **record,
        "normalization_from": norm_from,
        "pretraining": report.meta.get("extra", {}),
    }


def build_finetuning(
    cfg: FinetuneConfig, seed: int, command: str | None = None
) -> tuple[ClassificationTask, CachedDataset, CachedDataset | None]:
    """Build the classification task and its train / val datasets from a prepared cache.

    Every data-dependent choice (class balance, layer decay, LP-FT's head) is a pure function of the
    config and the cache, so a resumed run rebuilds the same task. Flags raised here (small
    validation split, unweighted loss on unbalanced data) are logged as warnings.

    Args:
        cfg: the resolved fine-tuning config.
        seed: base seed of the per-sample augmentation and of the head's initialisation.
        command: the command line, recorded in `model.json`.

    Returns:
        (task, train_set, val_set); val_set is None when the validation split has no usable image.
    """
    cache = open_cache(cfg.data.cache, cfg.model.img_size, cfg.data.allow_leakage)
    task_map = label_task_of(cfg.classify)
    c = cfg.classify
    train_idx, val_idx, data_info = select_rows(
        cache, task_map, cfg.data.train_split, cfg.data.val_split,
        c.labelled_fraction, c.max_labelled_per_class, c.subset_seed,
    )  # fmt: skip
    binary = len(task_map.class_names) == 2
    model = ViTClassifier(
        build_vit(cfg.model), task_map.class_names, c.drop_rate,
        thresholds={"default": c.threshold} if binary else {}, seed=derive_seed(seed, 1), pool=c.pool,
    )  # fmt: skip
    init_info = init_encoder(model, c, Normalization(*cache.stats))
    label_map = task_map.label_map
    train_set = CachedDataset(cache, train_idx, label_map, augment=cfg.data.augment, seed=seed)
    val_set = CachedDataset(cache, val_idx, label_map, augment=None, seed=seed) if val_idx.size else None
    if val_set is None:
        log.warning("the %r split has no image for this task: no validation, no best.pt", cfg.data.val_split)
    counts = list(data_info["n_images"]["train"].values())
    # LP-FT's probe sees the training images as they are: no augmentation.
    plain_train = CachedDataset(cache, train_idx, label_map, augment=None, seed=seed)
    pretrained = init_info["mode"] != "scratch"
    weights, task_decay, recipe, flags = choose_recipe(cfg, model, plain_train, counts, pretrained)
    flags += validation_flags(val_set, task_map.class_names)
    for flag in flags:
        log.warning("%s: %s", flag.code, flag.message)
    info = {
        "cache": str(cfg.data.cache),
        "manifest_hash": cache.manifest_hash,
        # How training images were framed (stretch / pad) and their cache side: what `sscxr predict`
        # repeats on image files so that new images look like the training images.
        "fit": cache.index["fit"],
        "cache_size": cache.size,
        **data_info,
        "init": init_info,
        **recipe,
        "seed": seed,
        "command": command,
    }
    task = ClassificationTask(
        model, cfg.model, task_map, c.label_smoothing, weights, info,
        frozen_encoder=c.mode == "frozen", layer_decay=task_decay, flags=flags,
    )  # fmt: skip
    return task, train_set, val_set
