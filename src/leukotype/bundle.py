"""Model bundles: a trained run as a self-contained, checked folder a lab can use.

A bundle folder holds

- ``bundle.json`` — what the model is: task (classes, a derived task's mapping), strategy,
  backbone and layer, the feature source (backbone parts with their weights reference and
  sha256, or the fine-tuned network), the preprocessing steps, the classifier, calibration,
  thresholds (low confidence, out of distribution), test-time augmentation, the run's test
  metrics with confidence intervals, and the config, seed and package versions that made it;
- ``classifier.skops`` (SVM pipeline) or ``head.safetensors`` (softmax head);
- ``network.safetensors`` — the trained layers of a fine-tuned network (tensors only);
- ``ood.safetensors`` — the out-of-distribution model of the training features;
- ``weights/<backbone>.<ext>`` — a copy of the backbone weights (user files always, ImageNet
  files only on request; otherwise the bundle names the file and its sha256);
- ``MODEL_CARD.md`` — intended use, training data, metrics, known limits;
- ``MANIFEST.sha256`` — ``<sha256>  <file>`` for every other file (``sha256sum -c`` reads it).

:func:`load_bundle` checks every sha256 before reading anything, and reads only JSON,
safetensors, and skops files restricted to the SVM pipeline's types: no code in a bundle is
ever executed. A bundle written by another leukotype or package version loads, and
:attr:`Bundle.differences` says what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukotype.errors import LeukotypeError
from leukotype.io import atomic_write, package_versions, write_json

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "leukotype-model-bundle"
#: Version of the folder layout and ``bundle.json`` schema; a newer one is refused.
BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
MANIFEST = "MANIFEST.sha256"
MODEL_CARD = "MODEL_CARD.md"
SVM_FILE = "classifier.skops"
HEAD_FILE = "head.safetensors"
NETWORK_FILE = "network.safetensors"
OOD_FILE = "ood.safetensors"
WEIGHTS_DIR = "weights"
#: The training data's validation settings a bundle records and predict applies to new images.
VALIDATION_KEYS = ("min_side", "max_pixels", "max_aspect_ratio", "allow_outside_paths")

#: Preprocessing operations this version applies, in the order recorded in ``bundle.json``.
#: New steps (cell-centred crop, stain normalisation) are added here and recorded before the
#: resize; a bundle naming a step this version lacks is refused with its name.
PREPROCESSING_OPS = (
    "decode_rgb",
    "transform",
    "resize_shorter",
    "center_crop",
    "to_tensor",
    "normalize",
)


# --------------------------------------------------------------------------------------------
# hashing and the manifest


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (posix relative paths) except the manifest."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            files.append(path.relative_to(folder).as_posix())
    return files


def write_manifest(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    lines = [f"{sha256_file(folder / rel)}  {rel}\n" for rel in _bundle_files(folder)]
    with atomic_write(folder / MANIFEST) as handle:
        handle.writelines(lines)
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict[str, str]:
    path = folder / MANIFEST
    if not path.is_file():
        raise LeukotypeError(
            f"{folder} is not a model bundle: it has no {MANIFEST} (export one with "
            "`snakemake export_model` or `leukotype export`)"
        )
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise LeukotypeError(f"{path}:{number}: malformed manifest line {line!r}")
        entries[rel] = digest
    return entries


def verify_bundle(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file against the manifest; raise naming each file that fails.

    A file that is listed but missing, or whose sha256 differs, fails; a file that is present
    but unlisted fails too (it was added after export and nothing vouches for it).
    """
    folder = Path(folder)
    entries = read_manifest(folder)
    problems = []
    for rel, expected in entries.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(
                f"{rel}: sha256 mismatch (manifest {expected[:16]}..., file {actual[:16]}...): "
                "the file was changed or corrupted after export"
            )
    for rel in sorted(set(_bundle_files(folder)) - set(entries)):
        problems.append(f"{rel}: not listed in {MANIFEST} (added after export)")
    if BUNDLE_JSON not in entries:
        problems.append(f"{BUNDLE_JSON}: not listed in {MANIFEST}")
    if problems:
        raise LeukotypeError(
            f"model bundle {folder} failed its integrity check; nothing was loaded:\n  "
            + "\n  ".join(problems)
            + "\nRe-export the bundle or copy it again from its source."
        )
    return entries


# --------------------------------------------------------------------------------------------
# tensors (safetensors: no code, no pickle)


def save_tensors(tensors: Mapping[str, Any], path: Path) -> None:
    """numpy arrays or torch tensors -> safetensors (numpy API: torch is not needed to read)."""
    from safetensors.numpy import save_file

    arrays = {}
    for name, value in tensors.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().contiguous().numpy()
        arrays[name] = np.ascontiguousarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path))


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------
# preprocessing record


def preprocessing_steps(backbone_spec: Any) -> list[dict[str, Any]]:
    """The recorded preprocessing of one single backbone (see ``PREPROCESSING_OPS``)."""
    return [
        {"op": "decode_rgb", "detail": "leukotype.images.load_rgb (alpha on white, 16-bit rescaled)"},
        {"op": "transform", "name": "identity"},
        {
            "op": "resize_shorter",
            "size": int(backbone_spec.resize_size),
            "interpolation": str(backbone_spec.interpolation.value),
            "antialias": True,
        },
        {"op": "center_crop", "size": int(backbone_spec.input_size)},
        {"op": "to_tensor", "range": [0.0, 1.0]},
        {"op": "normalize", "mean": [float(v) for v in backbone_spec.mean], "std": [float(v) for v in backbone_spec.std]},
    ]


def check_preprocessing(recorded: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Differences between a bundle's preprocessing and this version's for the same backbones.

    Unknown operations raise (the bundle needs a step this version cannot apply); other
    differences are returned as text.
    """
    from leukotype.backbones import get_spec

    differences = []
    for part, steps in recorded.items():
        unknown = [s.get("op") for s in steps if s.get("op") not in PREPROCESSING_OPS]
        if unknown:
            raise LeukotypeError(
                f"the bundle preprocesses {part!r} with step(s) {unknown} that this leukotype "
                f"version does not have (known: {list(PREPROCESSING_OPS)}); update leukotype"
            )
        current = preprocessing_steps(get_spec(part))
        if json.loads(json.dumps(current)) != json.loads(json.dumps(list(steps))):
            differences.append(
                f"preprocessing of {part}: bundle {json.dumps(steps)} vs this version "
                f"{json.dumps(current)}"
            )
    return differences


# --------------------------------------------------------------------------------------------
# writing


def write_bundle(
    out_dir: str | os.PathLike,
    spec: dict[str, Any],
    writers: Mapping[str, Callable[[Path], None]],
    model_card: str,
) -> Path:
    """Write a bundle: ``spec`` as bundle.json, each ``writers[name](path)``, the card, the
    manifest. Built in a temporary sibling folder and moved into place at the end, so a
    half-written bundle never appears under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for name, writer in writers.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            writer(target)
        spec = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, **spec}
        spec["files"] = sorted(writers)
        write_json(spec, staging / BUNDLE_JSON)
        (staging / MODEL_CARD).write_text(model_card, encoding="utf-8")
        write_manifest(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class Bundle:
    """A verified bundle: its spec, folder, and the differences to this installation."""

    folder: Path
    spec: dict[str, Any]
    differences: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def kind(self) -> str:
        """``svm`` or ``softmax``: the classifier on top of the features."""
        return str(self.spec["classifier"]["kind"])

    @property
    def validation(self) -> dict[str, Any]:
        """The validation settings the model's training data passed (``VALIDATION_KEYS``).

        A bundle from before ``max_aspect_ratio``/``allow_outside_paths`` were recorded takes
        them from the training config it embeds (which holds the schema's defaults)."""
        trained = self.spec.get("provenance", {}).get("config", {}).get("validation", {}) or {}
        merged = {**trained, **self.spec.get("validation", {})}
        merged.setdefault("max_aspect_ratio", None)
        merged.setdefault("allow_outside_paths", False)
        return {key: merged[key] for key in VALIDATION_KEYS}

    @property
    def temperature(self) -> float:
        return float(self.spec["calibration"]["temperature"])

    def path(self, name: str) -> Path:
        return self.folder / name

    def svm(self) -> Any:
        from leukotype.classify import load_model

        return load_model(self.path(self.spec["classifier"]["file"]))

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        return load_tensors(self.path(name))

    def ood(self) -> Any:
        from leukotype.ood import FeatureDensity

        entry = self.spec["ood"]
        return FeatureDensity.from_arrays(self.tensors(entry["file"]), entry["threshold"], entry["quantile"])


def version_differences(spec: Mapping[str, Any]) -> list[str]:
    """What differs between the versions that wrote a bundle and the ones installed now."""
    recorded = spec.get("provenance", {}).get("versions", {}) or {}
    current = package_versions()
    differences = []
    for name in sorted(set(recorded) | set(current)):
        then, now = recorded.get(name), current.get(name)
        if then != now and name in recorded:
            differences.append(f"{name}: bundle made with {then}, installed {now}")
    return differences


def load_bundle(folder: str | os.PathLike, check_versions: bool = True) -> Bundle:
    """Verify every sha256, then read ``bundle.json``; no code from the folder is executed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LeukotypeError(f"model bundle {folder} does not exist (expected a folder)")
    verify_bundle(folder)
    with open(folder / BUNDLE_JSON, encoding="utf-8") as handle:
        spec = json.load(handle)
    if spec.get("format") != BUNDLE_FORMAT:
        raise LeukotypeError(f"{folder / BUNDLE_JSON} is not a leukotype model bundle")
    version = int(spec.get("format_version", 0))
    if version > BUNDLE_FORMAT_VERSION:
        raise LeukotypeError(
            f"bundle {folder} has format version {version}; this leukotype reads up to "
            f"{BUNDLE_FORMAT_VERSION}: update leukotype (bundle made with leukotype "
            f"{spec.get('provenance', {}).get('versions', {}).get('leukotype')})"
        )
    differences = version_differences(spec) if check_versions else []
    differences += check_preprocessing(spec["preprocessing"])
    for line in differences:
        log.warning("bundle %s: %s", folder.name, line)
    return Bundle(folder=folder, spec=spec, differences=differences)


# --------------------------------------------------------------------------------------------
# model card


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _split_text(split: Mapping[str, Any]) -> str:
    keep = ("method", "test_size", "seed") if split.get("method") == "holdout" else ("method", "n_splits", "seed")
    return ", ".join(f"{k} {split[k]}" for k in keep if split.get(k) is not None)


def _backbone_sources(parts: list[Mapping[str, Any]]) -> list[str]:
    """One card line per backbone part: its source and citation (``catalog.BackboneInfo.source``)."""
    from leukotype import catalog

    return [
        f"- Backbone `{p['name']}`: {catalog.get(p['name']).source}."
        for p in parts
        if catalog.is_known(p["name"])
    ]


def _image_steps_text(record: Mapping[str, Any] | None) -> str:
    """The bundle's preprocessing variant in words (``leukotype.preprocessing``)."""
    if not record:
        return "none"
    steps = ", then ".join(
        s["step"] + "".join(f" {k} {v}" for k, v in s.items() if k != "step") for s in record["variant"]["steps"]
    )
    return f"variant `{record['variant']['name']}`: {steps} (fitted on training images only; applied by predict and explain)"


def _few_shot_fit_text(few: Mapping[str, Any]) -> str:
    weight = float(few.get("weight_per_shot", 1.0))
    text = "" if weight == 1.0 else f" (each weighing {weight:.3g} training rows, `shot_weight`)"
    if few.get("shot_method") == "augment":
        text += (", feature-augmented (`shot_method: augment`: a part shared by both labs and one of each"
                 " lab's own; this model is that lab's view)")
    return text


def _test_metrics_text(spec: Mapping[str, Any]) -> list[str]:
    """What the card's metrics table was measured on: the training data's test part, or for a
    few-shot model the adapted lab's cells it did not train on."""
    n_test = spec["metrics"].get("n_test", "n/a")
    few = spec.get("few_shot")
    if not few:
        return [f"On the {n_test} held-out test images of the training data's split (95% bootstrap "
                "confidence intervals over groups):"]
    shots = ", ".join(f"{c} {n}" for c, n in few["shots_per_class"].items())
    internal = (few.get("internal_metrics") or {}).get("accuracy")
    return [
        f"**Few-shot model for the lab of `{few['external']}`**: the SVM was refitted with {shots} of"
        f" that lab's labelled cells added to its training part{_few_shot_fit_text(few)}. The table is measured on the lab's"
        f" other {n_test} cells of the classes it shares with the task ({', '.join(few['shared_classes'])});"
        f" on the training data's test part (the same classes, {few['n_internal']} images) the refitted"
        f" model scores {_percent(internal)} accuracy. 95% bootstrap confidence intervals over groups:",
    ]


def model_card(spec: Mapping[str, Any]) -> str:
    """MODEL_CARD.md text from a bundle spec."""
    task, run, data = spec["task"], spec["run"], spec["training_data"]
    metrics, ci = spec["metrics"].get("metrics", {}), spec["metrics"].get("ci", {})
    synthetic = bool(data.get("synthetic"))
    rows = []
    for name, label in (
        ("accuracy", "Accuracy"),
        ("balanced_accuracy", "Balanced accuracy"),
        ("f1_macro", "Macro F1"),
        ("ece", "Expected calibration error"),
        ("brier", "Brier score"),
    ):
        if name in metrics:
            low, high = (ci.get(name) or [None, None])[:2]
            fmt = _percent if name not in {"brier"} else (lambda v: "n/a" if v is None else f"{float(v):.3f}")
            rows.append(f"| {label} | {fmt(metrics[name])} | {fmt(low)} – {fmt(high)} |")
    derive = task.get("derive")
    mapping = (
        "\n".join(f"  - {cls}: {', '.join(labels)}" for cls, labels in derive.items())
        if derive
        else "  (classes are the labels of column `" + str(task.get("column")) + "`)"
    )
    parts = spec["backbone"]["parts"]
    weights = "; ".join(
        f"{p['name']}: {p['weights']}"
        + (f" (sha256 {p['sha256'][:16]}…{', copied' if p.get('copied') else ', not copied'})" if p.get("sha256") else "")
        for p in parts
    )
    cal = spec["calibration"]
    ood = spec["ood"]
    lines = [
        f"# Model card: {task['name']} — {spec['display_name']}",
        "",
        "## Intended use",
        "",
        "**Research use only. This model is not a medical device and must not be used to diagnose,",
        "treat or exclude disease.** It can serve as a second opinion for trained hematology staff",
        "reviewing single-cell images like those it was trained on, and to study CNN classifiers.",
        "",
        "## Training data",
        "",
        f"- Dataset: {data['name']}" + (" — **SYNTHETIC** images generated by leukotype's demo; the"
                                          " model has never seen a real cell" if synthetic else ""),
        f"- {data['n_train_images']} training images ({data['n_train_samples']} samples with "
        f"augmentation {data['transforms']}), {data['n_test_images']} test images; split "
        f"`{run['fold']}` ({_split_text(data['split'])}), grouped by `group` so no group is in "
        "both parts.",
        f"- Classes ({len(spec['classes'])}): {', '.join(spec['classes'])}; mapping:",
        mapping,
        "",
        "## Model",
        "",
        f"- Strategy `{run['strategy']}`, backbone `{run['backbone']}`, layer `{run['layer']}`;"
        f" weights {weights}.",
        *_backbone_sources(parts),
        f"- Classifier: {spec['classifier']['description']}.",
        f"- Calibration: {cal['method']} (T = {cal['temperature']:.3g}); {cal['fitted_on']}.",
        f"- Low-confidence flag: top probability below {spec['thresholds']['low_confidence']:.2f}.",
        f"- Out-of-distribution flag: {ood['method']} distance above {ood['threshold']:.3g}"
        f" (the {100 * ood['quantile']:.0f}th percentile of out-of-fold training distances).",
        f"- Test-time augmentation: {'on, ' + ', '.join(spec['tta']['transforms']) if spec['tta']['enabled'] else 'off'}.",
        f"- Image preprocessing before the backbone's: {_image_steps_text(spec.get('image_steps'))}.",
        "",
        "## Test metrics",
        "",
        *_test_metrics_text(spec),
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
        *rows,
        "",
        "## Known limits",
        "",
        "- Metrics hold for images like the test part: the same lab, stain, scanner and framing."
        " On another lab's cells accuracy can drop far below them (CNN blood-cell classifiers are"
        " known to lose most of their accuracy across labs); check the out-of-distribution flag"
        " and validate on your own labelled images before relying on it.",
        "- The model only knows its classes; a cell of any other kind is still given one of them.",
        "- Probabilities are calibrated on the training data's distribution only.",
    ]
    if synthetic:
        lines.append("- Trained on SYNTHETIC demo images: it demonstrates the workflow and is useless on real cells.")
    lines += [
        "",
        "## Provenance",
        "",
        f"Made by leukotype {spec['provenance']['versions'].get('leukotype')} on "
        f"{spec['provenance'].get('created')}; seed {spec['provenance'].get('seed')}; the full config"
        " and package versions are in `bundle.json`. Every file's sha256 is in `MANIFEST.sha256`.",
        "",
    ]
    return "\n".join(lines)
