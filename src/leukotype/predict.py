"""Apply a model bundle to new images: validated inputs, calibrated probabilities, two flags.

Inputs are image files, folders (searched recursively; hidden files skipped) or manifests
(CSV/TSV with a ``path`` column, as for training). Every input goes through the training
data's validation with the settings the bundle was trained with (:attr:`Bundle.validation`:
``min_side``, ``max_pixels``, ``max_aspect_ratio``, and the rule that a manifest row may not
point outside the manifest's folder unless ``allow_outside_paths``): a file that fails gets a
row with ``status = rejected`` and its reason, and the others are predicted. Features are computed exactly as the workflow computed them (the same
extraction code and settings, batched, on a GPU when one is visible), so a bundle reproduces its
run's test predictions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukotype.bundle import Bundle, load_bundle
from leukotype.calibration import softmax
from leukotype.errors import LeukotypeError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv")
#: The bundle's training data was read without validation.allow_outside_paths, so predict
#: keeps that rule; the config key does nothing here.
PREDICT_OUTSIDE_HINT = (
    "the model was trained without validation.allow_outside_paths: put the image under the "
    "manifest's folder, or name it (or its folder) directly"
)
DEFAULT_TOP_K = 3


# --------------------------------------------------------------------------------------------
# inputs


def gather_inputs(inputs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """``input, path, abspath, root`` (and ``label`` where a manifest gives one) per input.

    ``root`` is the manifest's folder for a manifest row (its paths must stay inside it, as in
    training), empty otherwise. Nothing is dropped: a path that does not exist is kept
    (validation gives it its reason).
    """
    from leukotype.dataset import dataset_root, read_dataset

    rows: list[dict[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            rows += [{"input": str(item), "path": str(p), "abspath": str(p.resolve()), "root": ""} for p in found]
            if not found:
                log.warning("input folder %s holds no files", path)
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            table = read_dataset(path, labelled=False)  # new images: a 'path' column is enough
            label = "label" if "label" in table.columns else None
            for row in table.itertuples(index=False):
                entry = {"input": str(item), "path": row.path, "abspath": row.abspath, "root": str(dataset_root(path))}
                if label:
                    entry["label"] = str(getattr(row, label))
                rows.append(entry)
        else:
            rows.append({"input": str(item), "path": str(item), "abspath": str(path.resolve()), "root": ""})
    columns = ["input", "path", "abspath", "root"] + (["label"] if any("label" in r for r in rows) else [])
    frame = pd.DataFrame(rows, columns=columns)
    return frame.fillna("")


def validate_inputs(table: pd.DataFrame, validation: Mapping[str, Any], threads: int = 1) -> pd.DataFrame:
    """Add ``status`` (ok|rejected), ``reason`` and ``md5`` (of the bytes checked; empty for a
    file not read) to ``table`` (from :func:`gather_inputs`) with the training data's checks
    under ``validation`` (:attr:`Bundle.validation`); drops ``root``."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from leukotype.validate import FileCheck, check_file, outside_reason

    def check(abspath: str, root: str) -> FileCheck:
        if root and not validation["allow_outside_paths"]:
            outside = outside_reason(abspath, root, hint=PREDICT_OUTSIDE_HINT)
            if outside:  # not opened, as in training
                return FileCheck(reason=outside)
        return check_file(abspath, validation["min_side"], validation["max_pixels"], validation["max_aspect_ratio"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            checks = list(pool.map(check, table["abspath"], table["root"]))
    table = table.drop(columns=["root"])
    table["status"] = ["rejected" if c.reason else "ok" for c in checks]
    table["reason"] = [c.reason for c in checks]
    # the bytes that were checked: a caller that needs them (a reference source's study-copy
    # test) reads no file again, and a prediction row names the exact bytes it scored
    table["md5"] = [c.md5 or "" for c in checks]
    return table


# --------------------------------------------------------------------------------------------
# the model


class Predictor:
    """A loaded bundle ready to score images: features -> classifier -> calibrated softmax."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        device: str = "auto",
        batch_size: int | None = None,
        torch_home: str | os.PathLike | None = None,
        num_workers: int = 0,
        threads: int = 1,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.device = device
        self.torch_home = torch_home
        self.num_workers = num_workers
        self.threads = threads
        features = self.bundle.spec["features"]
        self.batch_size = int(batch_size or features.get("batch_size", 32))
        self._svm = self.bundle.svm() if self.bundle.kind == "svm" else None
        self._head = self.bundle.tensors(self.bundle.spec["classifier"]["file"]) if self.bundle.kind == "softmax" else None
        self.density = self.bundle.ood()
        self._network = None
        # the run's preprocessing variant (crop, stain normalisation), as its images had it
        from leukotype.preprocessing import preparer_from_record

        self.preparer = preparer_from_record(self.bundle.spec.get("image_steps"))

    def prepare(self, image: Any, abspath: str) -> Any:
        """A decoded image as the bundle's preprocessing variant left its training images."""
        return image if self.preparer is None else self.preparer(image, str(abspath))

    # ---------------------------------------------------------------- weights and networks
    def weights_path(self, part: dict[str, Any]) -> Path | None:
        """The checked weights file of one backbone part (the bundle's copy, else the staged one)."""
        from leukotype.errors import LeukotypeError as Error
        from leukotype.weights import file_sha256, resolve_weights

        if part["weights"] == "none":
            return None
        if part.get("copied"):
            return self.bundle.path(part["copied"])  # checked by the manifest
        if part["weights"] != "imagenet":
            raise Error(f"bundle names a weights file for {part['name']} but holds no copy of it")
        path = resolve_weights(part["name"], "imagenet", torch_home=self.torch_home)
        assert path is not None
        actual = file_sha256(path)
        if actual != part["sha256"]:
            raise Error(
                f"the ImageNet weights of {part['name']} at {path} have sha256 {actual}, but the "
                f"bundle was trained with {part['sha256']}; stage the file the bundle names "
                f"({part['file_name']}) or export the bundle with copy_weights"
            )
        return path

    def _check_random_backbone(self, part: dict[str, Any]) -> None:
        from leukotype.export import random_backbone_digest

        if random_backbone_digest(part["name"], part["seed"]) != part["state_sha256"]:
            raise LeukotypeError(
                f"the random-weight backbone {part['name']} (seed {part['seed']}) built by this "
                "torch version differs from the one the bundle was trained with; use the torch "
                f"version the bundle names ({self.bundle.spec['provenance']['versions'].get('torch')})"
            )

    def network(self) -> Any:
        """The fine-tuned network (frozen part from the weights reference, trained part from
        the bundle), built once."""
        if self._network is not None:
            return self._network
        import torch

        from leukotype.export import _state_digest
        from leukotype.finetune import build_finetune_model

        spec, source = self.bundle.spec, self.bundle.spec["features"]
        parts = spec["backbone"]["parts"]
        paths = {p["name"]: self.weights_path(p) for p in parts}
        weights = paths if len(parts) > 1 else paths[parts[0]["name"]]
        model, preprocess = build_finetune_model(
            spec["backbone"]["name"], len(self.bundle.classes), source["policy"], weights=weights, seed=source["seed"]
        )
        frozen = {f"frozen.{k}": v for k, v in model.frozen.state_dict().items()}
        if _state_digest(frozen) != source["frozen_sha256"]:
            raise LeukotypeError(
                "the frozen layers built from the bundle's weights reference differ from the ones "
                "the network was trained with (different weights file or torch version)"
            )
        trained = {k.removeprefix("trainable."): torch.from_numpy(v) for k, v in self.bundle.tensors(source["file"]).items()}
        model.trainable.load_state_dict(trained, strict=True)
        if self._head is not None:  # features -> SVM bundles use the network's features only
            model.head.load_state_dict({k: torch.from_numpy(v) for k, v in self._head.items()}, strict=True)
        self._network = (model.eval(), preprocess)
        return self._network

    # ---------------------------------------------------------------- features and scores
    def features(self, samples: pd.DataFrame) -> np.ndarray:
        """(N, D) classifier-input features of ``samples`` (``image_id, transform, abspath``)."""
        source = self.bundle.spec["features"]
        if source["kind"] == "finetuned_network":
            from leukotype.finetune import Samples, finetuned_features

            model, preprocess = self.network()
            return finetuned_features(
                model, Samples.from_frame(samples, prepare=self.preparer), preprocess, batch_size=self.batch_size,
                device=self.device, precision=source["precision"], num_workers=self.num_workers,
            )
        from leukotype.feature_store import load_features
        from leukotype.features import extract_features

        dirs = []
        with tempfile.TemporaryDirectory(prefix="leukotype-predict-") as tmp:
            for part in self.bundle.spec["backbone"]["parts"]:
                if part["weights"] == "none":
                    self._check_random_backbone(part)
                out = Path(tmp) / part["name"]
                extract_features(
                    samples, part["name"], self.weights_path(part), [source["layers"][part["name"]]], out,
                    batch_size=self.batch_size, num_workers=self.num_workers, device=self.device,
                    threads=self.threads, precision=source["precision"], progress=False,
                    seed=int(part.get("seed", 0)), optimize=bool(source["optimize"]),
                    prepare=self.preparer,
                )
                dirs.append(out)
            layers = set(source["layers"].values())
            layer = layers.pop() if len(layers) == 1 else None
            if layer is None:
                return np.concatenate([load_features([d], source["layers"][d.name], samples) for d in dirs], axis=1)
            return load_features(dirs, layer, samples[["image_id", "transform"]])

    def scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw scores (N, K) in class order, predicted labels): SVM decision scores or logits."""
        classes = self.bundle.classes
        if self._svm is not None:
            from leukotype.classify import decision_scores

            return decision_scores(self._svm, X, classes), np.asarray(self._svm.predict(X)).astype(str)
        logits = X.astype(np.float32) @ self._head["weight"].T.astype(np.float32) + self._head["bias"].astype(np.float32)
        return logits.astype(np.float64), np.asarray(classes)[logits.argmax(axis=1)]

    def predict_samples(self, samples: pd.DataFrame) -> pd.DataFrame:
        """``image_id, transform, pred, score_<c>, prob_<c>, ood_distance`` per sample.

        ``score_`` are the raw classifier scores (decision function or logits), ``prob_`` the
        calibrated probabilities; with test-time augmentation the caller averages views.
        """
        X = self.features(samples)
        raw, pred = self.scores(X)
        probs = softmax(raw, self.bundle.temperature)
        frame = samples[["image_id", "transform"]].reset_index(drop=True).copy()
        frame["pred"] = pred
        for k, cls in enumerate(self.bundle.classes):
            frame[f"score_{cls}"] = raw[:, k]
        for k, cls in enumerate(self.bundle.classes):
            frame[f"prob_{cls}"] = probs[:, k]
        frame["ood_distance"] = self.density.distance(X)
        return frame


# --------------------------------------------------------------------------------------------
# the table a user gets


def prediction_table(
    predictor: Predictor, inputs: Sequence[str | os.PathLike], top_k: int = DEFAULT_TOP_K, threads: int = 1
) -> pd.DataFrame:
    """One row per input image (rejected ones with their reason); see README for the columns."""
    spec = predictor.bundle.spec
    classes = predictor.bundle.classes
    table = validate_inputs(gather_inputs(inputs), predictor.bundle.validation, threads)
    table.insert(0, "image_id", [f"in{i:06d}" for i in range(len(table))])
    ok = table[table["status"] == "ok"]
    transforms = spec["tta"]["transforms"] if spec["tta"]["enabled"] else ["identity"]
    columns = ["pred", "confidence", "low_confidence", "ood_distance", "ood", "top_k", *[f"prob_{c}" for c in classes]]
    per_image = pd.DataFrame(columns=["image_id", *columns])
    if len(ok):
        views = ok[["image_id", "abspath"]].merge(pd.DataFrame({"transform": transforms}), how="cross")
        scored = predictor.predict_samples(views)
        prob_cols = [f"prob_{c}" for c in classes]
        # Test-time augmentation: probabilities and distances averaged over an image's views.
        per_image = scored.groupby("image_id", sort=False)[[*prob_cols, "ood_distance"]].mean()
        probs = per_image[prob_cols].to_numpy()
        order = np.argsort(-probs, axis=1, kind="stable")
        per_image["pred"] = np.asarray(classes)[order[:, 0]]
        if not spec["tta"]["enabled"]:  # the classifier's own label (an SVM's vote)
            per_image["pred"] = scored.set_index("image_id").loc[per_image.index, "pred"].to_numpy()
        per_image["confidence"] = probs.max(axis=1)
        per_image["low_confidence"] = per_image["confidence"] < spec["thresholds"]["low_confidence"]
        per_image["ood"] = per_image["ood_distance"] > spec["ood"]["threshold"]
        k = max(1, min(int(top_k), len(classes)))
        per_image["top_k"] = [
            ";".join(f"{classes[j]}:{row[j]:.3f}" for j in ranks[:k]) for row, ranks in zip(probs, order)
        ]
        per_image = per_image.reset_index()[["image_id", *columns]]
    result = table.merge(per_image, on="image_id", how="left")
    # Rejected rows: empty cells, not NaN or False (nothing was predicted for them).
    result[columns] = result[columns].astype(object).where(result["status"] == "ok", "")
    return result.drop(columns=["abspath", "image_id"])


def run_predict(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    device: str = "auto",
    batch_size: int | None = None,
    top_k: int = DEFAULT_TOP_K,
    torch_home: str | os.PathLike | None = None,
    threads: int = 1,
) -> pd.DataFrame:
    """Predict ``inputs`` with the bundle ``model`` and write the table to ``out`` (CSV/TSV)."""
    from leukotype.io import atomic_write

    if not inputs:
        raise LeukotypeError("no inputs given: name image files, folders or manifests")
    predictor = Predictor(model, device=device, batch_size=batch_size, torch_home=torch_home, threads=threads)
    for line in predictor.bundle.differences:
        log.warning("%s", line)
    table = prediction_table(predictor, inputs, top_k=top_k, threads=threads)
    sep = "\t" if str(out).endswith(".tsv") else ","
    with atomic_write(out, newline="") as handle:
        table.to_csv(handle, sep=sep, index=False)
    rejected = table[table["status"] != "ok"]
    log.info("%d images predicted, %d rejected", len(table) - len(rejected), len(rejected))
    for row in rejected.itertuples():
        log.warning("rejected %s: %s", row.path, row.reason)
    return table
