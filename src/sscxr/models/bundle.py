"""A model bundle: one folder (or one .zip) holding everything needed to use a trained model, and nothing
that needs unpickling.

    BUNDLE/
      bundle.json          format "sscxr-bundle", the components, the decision, every file's sha256
      classifier/          model.safetensors + model.json (architecture, normalisation, input size and
                           framing, class names, thresholds, training provenance)
      segmenter/           the same for the lung segmenter, when one was bundled
      evaluation.json      the `sscxr evaluate` results of the classifier, when given (with intervals)
      MODEL_CARD.md        generated: what the model does, how it was trained and evaluated, its limits

Every command that takes a model accepts a run folder or a bundle (`component_path`). A bundle's
classifier decides at the bundle's threshold (`decision_threshold` in model.json): the one an
evaluation chose on validation when the bundle was made with one, else the model's "default" (0.5).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sscxr import __version__
from sscxr.errors import CheckpointError
from sscxr.utils import atomic_write_json, atomic_write_text

__all__ = ["BUNDLE_FORMAT", "bundled_segmenter", "component_path", "is_bundle", "read_bundle", "write_bundle"]

BUNDLE_FORMAT = "sscxr-bundle"
BUNDLE_VERSION = 1
_MODEL_FILES = ("model.safetensors", "model.json")
# .zip bundle -> the temporary folder it was unpacked into and the bundle root inside it (once per
# process; TemporaryDirectory removes the folder when the process ends).
_EXTRACTED: dict[Path, tuple[tempfile.TemporaryDirectory[str], Path]] = {}


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """A bundle folder (holding bundle.json) or a .zip archive of one."""
    p = Path(path)
    return (p / "bundle.json").is_file() or (p.suffix == ".zip" and p.is_file())


def _unpack(archive: Path) -> Path:
    """The folder a .zip bundle is unpacked into (once per process; refuses paths leaving the folder)."""
    key = archive.resolve()
    if key in _EXTRACTED:
        return _EXTRACTED[key][1]
    folder = tempfile.TemporaryDirectory(prefix="sscxr-bundle-")
    target = Path(folder.name)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                dest = (target / name).resolve()
                if not dest.is_relative_to(target.resolve()):
                    raise CheckpointError(f"{archive}: member {name!r} would be written outside the bundle")
            zf.extractall(target)
    except zipfile.BadZipFile as e:
        folder.cleanup()
        raise CheckpointError(
            f"{archive}: not a readable .zip bundle ({e}); make it with `sscxr bundle`"
        ) from e
    except CheckpointError:
        folder.cleanup()
        raise
    folders = [p for p in target.iterdir() if p.is_dir()]
    root = target if (target / "bundle.json").is_file() else folders[0] if len(folders) == 1 else target
    _EXTRACTED[key] = (folder, root)
    return root


def read_bundle(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(bundle folder, bundle.json) of a bundle folder or .zip; files are checked against their hashes.

    Raises:
        CheckpointError: not a bundle, a foreign format, or a file missing or changed since bundling.
    """
    p = Path(path)
    root = _unpack(p) if p.suffix == ".zip" and p.is_file() else p
    index_path = root / "bundle.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: no readable bundle.json ({e}); make a bundle with `sscxr bundle`"
        ) from e
    if not isinstance(index, dict) or index.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{index_path}: not an sscxr bundle (format {index.get('format')!r})")
    if int(index.get("version", 0)) > BUNDLE_VERSION:
        raise CheckpointError(
            f"{index_path}: bundle version {index['version']}; this sscxr reads {BUNDLE_VERSION}"
        )
    for rel, digest in index.get("files", {}).items():
        file = root / rel
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(
                f"{path}: {rel} is {'missing' if not file.is_file() else 'changed since bundling'}; the "
                "bundle is incomplete or was modified: copy it again or re-create it with `sscxr bundle`"
            )
    return root, index


def component_path(path: str | os.PathLike[str], kind: str) -> Path | None:
    """The folder of a bundle's `kind` ("classifier" / "segmenter"), or None when `path` is no bundle.

    Raises:
        CheckpointError: a bundle without that component.
    """
    if not is_bundle(path):
        return None
    root, index = read_bundle(path)
    rel = index.get("components", {}).get(kind)
    if rel is None:
        raise CheckpointError(
            f"{path}: the bundle has no {kind} (it holds: {', '.join(index['components'])})"
        )
    return root / rel


def bundled_segmenter(path: str | os.PathLike[str]) -> str | os.PathLike[str] | None:
    """`path` itself when it is a bundle holding a segmenter (to load it from), else None: what every
    command that takes a classifier uses when no segmenter is given."""
    return path if is_bundle(path) and "segmenter" in read_bundle(path)[1]["components"] else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_folder(path: Path, kind: str) -> Path:
    """The folder holding model.safetensors + model.json of a run folder or of the files' base."""
    folder = path if path.is_dir() else path.parent
    missing = [n for n in _MODEL_FILES if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: no {kind} export ({', '.join(missing)} missing); give the run folder of a finished "
            f"`sscxr {'finetune' if kind == 'classifier' else 'segment train'}`"
        )
    return folder


def _evaluation_of(
    doc: Mapping[str, Any], meta: Mapping[str, Any], name: str | None
) -> tuple[str, list[dict[str, Any]]]:
    """(model name, its results) of an `sscxr evaluate` metrics.json: the model named, else the one whose
    recorded model.json is this classifier's (an evaluation records each model's model.json whole)."""
    models = doc.get("models", {})
    if name is None:
        names = [n for n, m in models.items() if m.get("config") == meta]
        if len(names) != 1:
            raise CheckpointError(
                f"the evaluation scored {sorted(models)}, {'none' if not names else 'several'} of them this "
                "model: name the one to bundle with --evaluation-model"
            )
        name = names[0]
    if name not in models:
        raise CheckpointError(f"--evaluation-model {name!r}: the evaluation holds {sorted(models)}")
    if models[name].get("config") not in (None, meta):
        raise CheckpointError(
            f"--evaluation-model {name!r}: the evaluation scored another model (its model.json differs from "
            "this run's); bundle the run it evaluated, or evaluate this one"
        )
    return name, [r for r in doc.get("results", []) if r.get("model") == name]


def write_bundle(
    classifier: str | os.PathLike[str],
    out: str | os.PathLike[str],
    segmenter: str | os.PathLike[str] | None = None,
    evaluation: str | os.PathLike[str] | None = None,
    evaluation_model: str | None = None,
    archive: bool = False,
) -> Path:
    """Make a bundle from a fine-tuning run (and a segmentation run, and an evaluation).

    Args:
        classifier: a fine-tuning run folder (model.safetensors + model.json).
        out: the bundle folder to create (must not exist, or be an earlier bundle, which is replaced).
        segmenter: a `sscxr segment train` run folder to include.
        evaluation: an `sscxr evaluate` output folder (or its metrics.json) that scored the classifier:
            its results go into the card and evaluation.json, and the threshold it chose on validation
            (e.g. Youden's) becomes the bundle's decision threshold.
        evaluation_model: the classifier's name in that evaluation (default: matched by run folder).
        archive: also write `<out>.zip` (the folder stays).

    Returns:
        The bundle folder (or the .zip with `archive`).
    """
    out = Path(out)
    if out.exists() and not (out / "bundle.json").is_file():
        raise CheckpointError(f"{out}: exists and is not a bundle; choose a new folder for the bundle")
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        components = {"classifier": "classifier"}
        clf_dir = _model_folder(Path(classifier), "classifier")
        _copy_model(clf_dir, staging / "classifier")
        meta = json.loads((staging / "classifier" / "model.json").read_text())
        results: list[dict[str, Any]] = []
        decision = {"threshold": "default", "from": "the model's default threshold"}
        if evaluation is not None:
            eval_path = Path(evaluation)
            eval_path = eval_path / "metrics.json" if eval_path.is_dir() else eval_path
            doc = json.loads(eval_path.read_text())
            name, results = _evaluation_of(doc, meta, evaluation_model)
            chosen = doc["models"][name].get("threshold") or {}
            if len(meta["class_names"]) == 2 and chosen.get("value") is not None:
                rule = str(chosen.get("rule", "evaluation"))
                meta["thresholds"][rule] = float(chosen["value"])
                meta["decision_threshold"] = rule
                decision = {"threshold": rule, "from": f"`sscxr evaluate` ({chosen.get('chosen_on', '')})"}
                atomic_write_json(staging / "classifier" / "model.json", meta)
            record = {"model": name, "results": results, "test_sets": doc.get("test_sets", {})}
            atomic_write_json(staging / "evaluation.json", record)
        seg_meta = None
        if segmenter is not None:
            _copy_model(_model_folder(Path(segmenter), "segmenter"), staging / "segmenter")
            components["segmenter"] = "segmenter"
            seg_meta = json.loads((staging / "segmenter" / "model.json").read_text())
        config = clf_dir / "config.yaml"
        card = model_card(meta, results, seg_meta, config.read_text() if config.is_file() else None, decision)
        atomic_write_text(staging / "MODEL_CARD.md", card)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        index = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "sscxr_version": __version__,
            "components": components, "task": meta.get("task"), "class_names": meta["class_names"],
            "decision": decision,
            "files": {p.relative_to(staging).as_posix(): _sha256(p) for p in files},
        }  # fmt: skip
        atomic_write_json(staging / "bundle.json", index)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not archive:
        return out
    zip_path = out.with_name(out.name + ".zip")
    with zipfile.ZipFile(zip_path.with_suffix(".zip.tmp"), "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(out.rglob("*")):
            if p.is_file():
                zf.write(p, (Path(out.name) / p.relative_to(out)).as_posix())
    os.replace(zip_path.with_suffix(".zip.tmp"), zip_path)
    return zip_path


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in _MODEL_FILES:
        shutil.copyfile(src / name, dst / name)


def _metric(result: Mapping[str, Any], cls: str, name: str) -> str:
    for m in result.get("metrics", []):
        if m["class"] == cls and m["metric"] == name and m["value"] is not None:
            ci = "" if m.get("ci_low") is None else f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
            return f"{m['value']:.3f}{ci}"
    return "n/a"


def model_card(
    meta: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    segmenter: Mapping[str, Any] | None,
    config_yaml: str | None,
    decision: Mapping[str, Any],
) -> str:
    """The bundle's MODEL_CARD.md: task, inputs, training data and recipe, evaluation with intervals,
    limitations. Everything comes from the files bundled; nothing is invented."""
    names = list(meta["class_names"])
    vit = meta["vit"]
    subset = meta.get("labelled_subset") or {}
    init = meta.get("init") or {}
    lines = [
        f"# Model card: {meta.get('task', 'classifier')}",
        "",
        f"Made by sscxr {__version__}. Classes, in output order: {', '.join(names)}"
        + (f" (positive class: {names[1]})." if len(names) == 2 else "."),
        "",
        "## Use",
        "- `sscxr predict BUNDLE IMAGES... --out OUT` (DICOM or PNG/JPEG, files, folders, manifests);",
        "  `sscxr explain BUNDLE IMAGES... --out OUT` for attention heat maps; `sscxr serve BUNDLE`.",
        f"- Input: one grey channel, intensities in [0, 1], framed by `{meta.get('fit', 'stretch')}` to "
        f"{meta['img_size']} x {meta['img_size']} px; the model standardises with mean "
        f"{meta['normalization']['mean']:.4f}, std {meta['normalization']['std']:.4f} itself.",
        f"- Decision: {'arg-max' if len(names) != 2 else _decision_text(meta, decision)}.",
        "",
        "## Model",
        f"ViT (patch {vit['patch_size']}, width {vit['embed_dim']}, depth {vit['depth']}, "
        f"{vit['num_heads']} heads), "
        f"head on the {meta.get('pool', 'token')}-pooled tokens; encoder start: {init.get('mode', 'unknown')}"
        + (f" ({init['path']})" if init.get("path") else "")
        + (f"; fine-tuning mode {meta['mode']}" if meta.get("mode") else "")
        + ".",
        "",
        "## Training data",
        f"- Cache `{meta.get('cache', '?')}`, manifest hash `{meta.get('manifest_hash', '?')}` "
        "(sha256 of the manifest file, first 16 hex digits: check it against yours).",
    ]
    if subset:
        lines.append(
            f"- Labelled subset: {subset.get('images')} of {subset.get('of_images')} training images "
            f"({subset.get('patients')} of {subset.get('of_patients')} patients; fraction "
            f"{subset.get('fraction')}, draw {subset.get('seed')})."
        )
    if meta.get("n_images"):
        lines.append(f"- Images per class: {json.dumps(meta['n_images'])}.")
    if meta.get("checkpoint"):
        ck = meta["checkpoint"]
        lines.append(f"- Weights: the {ck.get('weights')} checkpoint by {ck.get('selected_by')} "
                     f"({ck.get('value'):.4f} at step {ck.get('step')}).")  # fmt: skip
    if meta.get("flags"):
        lines.append(
            "- Training warnings: " + "; ".join(f"{f['code']}: {f['message']}" for f in meta["flags"])
        )
    if meta.get("command"):
        lines += ["", "Training command:", "", "```", str(meta["command"]), "```"]
    lines += ["", "## Evaluation", ""]
    if results:
        pos = names[1] if len(names) == 2 else "all"
        auc = "auc_roc" if len(names) == 2 else "macro_auc_roc"
        pr = "auc_pr" if len(names) == 2 else "macro_auc_pr"
        lines += [
            "95% intervals from resampling test patients (`sscxr evaluate`).",
            "",
            "| test set | images | AUC-ROC | AUC-PR | sensitivity | specificity | accuracy | flags |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            # Binary: the positive class's sensitivity and specificity; 3+ classes: their macro means
            # (balanced accuracy is the mean per-class sensitivity).
            sens = (
                _metric(r, pos, "sensitivity") if len(names) == 2 else _metric(r, "all", "balanced_accuracy")
            )
            spec = (
                _metric(r, pos, "specificity") if len(names) == 2 else _metric(r, "all", "macro_specificity")
            )
            flags = ", ".join(f["code"] for f in r.get("flags", [])) or "none"
            lines.append(
                f"| {r['test_set']} | {r['n_images']} | {_metric(r, pos, auc)} | {_metric(r, pos, pr)} | "
                f"{sens} | {spec} | {_metric(r, 'all', 'accuracy')} | {flags} |"
            )
    else:
        lines.append("No evaluation was bundled (make the bundle with `--evaluation EVAL_DIR` to add one).")
    if segmenter is not None:
        extra = segmenter.get("extra", {})
        lines += [
            "",
            "## Lung segmenter",
            f"UNETR on a ViT (width {segmenter['vit']['embed_dim']}, depth {segmenter['vit']['depth']}), "
            f"{segmenter['img_size']} px, threshold {segmenter['threshold']}; trained on "
            f"{extra.get('n_train', '?')} images of `{extra.get('cache', '?')}` (manifest hash "
            f"`{extra.get('manifest_hash', '?')}`).",
        ]
    lines += [
        "",
        "## Limitations",
        "- A research model, not a medical device: it has not been validated for clinical use.",
        "- It has seen only the data above; expect other numbers on other sites, devices and ages "
        "(the evaluation's unseen-site and pediatric rows, where present, show how much).",
        "- Heat maps show where the model attends, not why it decides.",
    ]
    if config_yaml:
        lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _decision_text(meta: Mapping[str, Any], decision: Mapping[str, Any]) -> str:
    name = str(meta.get("decision_threshold", "default"))
    return (f"{meta['class_names'][1]} when its probability >= {meta['thresholds'][name]:.4f} "
            f"(threshold '{name}', from {decision.get('from', 'the model')})")  # fmt: skip
