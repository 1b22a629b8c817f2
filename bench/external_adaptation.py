"""Beyond preprocessing: unsupervised adaptation, fine-tuning and larger backbones, PBC -> JTSC.

The protocol of ``bench/external_recipes.py`` (its data, split, recipes, feature cache, SVM
and scoring are imported from it): PBC's five white-cell classes, the workflow's 75/25
hold-out (seed 42), ImageNet features -> the workflow's SVM grid; internal = the PBC test part,
external = JTSC's 299 images of four classes (the model answers over its five). One row per
experiment in ``bench/results/external_adaptation.csv``:

- ``svm`` experiments: a recipe, a backbone (EfficientNet-Lite0/1/2) and one unsupervised
  adaptation of the external features (the external labels are never read by any of them):
  ``none``; ``standardise`` (the external features centred and scaled by their own mean and
  sd, then put where the training features are: the SVM pipeline's StandardScaler sees the
  training statistics); ``coral`` (CORAL, Sun et al. 2016, at test time: in the scaler's
  space the external features are whitened with their own covariance and re-coloured with the
  training part's, both + I); ``balanced`` (mean alignment whose external mean is the mean of
  the predicted classes' means, 5 rounds of pseudo-labels, so the external class mix does not
  move the centre); ``prior`` (EM re-estimation of the external class prior on temperature-
  calibrated SVM probabilities, Saerens et al. 2002: a label-shift correction); ``bn``
  (BatchNorm statistics re-estimated on the external images under the recipe, then their
  features; the workflow's ``evaluation.adapt_batchnorm``), ``bn_standardise``, and
  ``bn_per_domain`` (AdaBN proper: the PBC features with BatchNorm statistics of the PBC
  training part, the SVM retrained on them, JTSC with its own). As a
  control, each feature-level adaptation is also applied to the PBC test part with its own
  statistics (``internal_self_adapted_accuracy``): a fix for another lab should not break the
  lab's own cells.
- ``finetune`` experiments: the package's fine-tuning (``leukotype.finetune``, Lite0,
  ``last_block``, the workflow's defaults) on the recipe's images, optionally with colour /
  stain augmentation views of the training part (``leukotype.preprocessing.ColourJitter``),
  other fine-tuning settings named in the experiment (``finetune_variant``: ``+probe``,
  LP-FT; ``+all``, every layer) and the workflow's rotations as training samples (``+rot``: then a second row,
  adaptation ``tta``, scores the mean softmax over each test image's four rotations); the
  chosen recipe with other seeds (``+seedK``: how far a row moves by chance) and, kind
  ``ensemble``, the mean softmax of those networks (``ENSEMBLES``; each member's test
  predictions are kept under ``--cache``).

Honest selection: JTSC is split once into two stratified random halves (seed 0, before any
result is seen). Every row reports both halves; the recipe is CHOSEN on the ``select`` half
(highest balanced accuracy, then accuracy) and REPORTED on the ``report`` half, with 95%
bootstrap CIs (column ``chosen``). External balanced accuracy is the mean recall over the four
classes JTSC has (bootstrap CI of the same quantity).

    .venv/bin/python bench/external_adaptation.py                       # everything (~1 h on 2 busy cores)
    .venv/bin/python bench/external_adaptation.py --experiments svm:crop15_wb_grey:efficientnet_lite0
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external_recipes as er  # noqa: E402
from common import machine_info  # noqa: E402

from leukotype.adaptation import adapt_batchnorm  # noqa: E402
from leukotype.augment import apply_transform  # noqa: E402
from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess  # noqa: E402
from leukotype.calibration import fit_svm_calibration, softmax  # noqa: E402
from leukotype.features import optimize_for_inference  # noqa: E402
from leukotype.io import atomic_path  # noqa: E402
from leukotype.weights import resolve_weights  # noqa: E402

CLASSES, EXTERNAL_CLASSES, SEED = er.CLASSES, er.EXTERNAL_CLASSES, er.SEED
SVM_ADAPTATIONS = ("none", "standardise", "coral", "balanced", "prior")
BN_ADAPTATIONS = ("bn", "bn_standardise")
#: colour / stain augmentation of the training part for fine-tuning (the recipes are grey, so
#: hue does nothing there; HED, brightness, contrast, blur and scale jitter still do)
STAIN_VIEWS = {"views": 2, "hed": 0.05, "brightness": 0.15, "contrast": 0.2, "blur": 1.0, "scale": 0.1,
               "hue": 0.0, "saturation": 0.0}
STRONG_COLOUR_VIEWS = {**STAIN_VIEWS, "hue": 0.5, "saturation": 0.5}
#: twice the stain, brightness and contrast ranges, more blur and scale jitter (closer to
#: Tellez et al. 2019's "strong" HED/brightness/contrast augmentation for stain invariance)
STRONG_STAIN_VIEWS = {**STAIN_VIEWS, "hed": 0.1, "brightness": 0.3, "contrast": 0.4, "blur": 2.0, "scale": 0.2}
STRONGER_STAIN_VIEWS = {**STAIN_VIEWS, "hed": 0.2, "brightness": 0.4, "contrast": 0.5, "blur": 3.0, "scale": 0.3}
#: the fine-tuning runs' settings (the rest: leukotype.finetune.FinetuneConfig's defaults, as
#: configs/pbc.yaml's Lite0 fine-tuning)
FINETUNE_SETTINGS = {"policy": "last_block", "seed": SEED, "device": "cpu"}
#: name -> (kind, recipe, backbone, views)
EXPERIMENTS: dict[str, tuple[str, str, str, dict[str, Any] | None]] = {
    "svm:none:efficientnet_lite0": ("svm", "none", "efficientnet_lite0", None),
    "svm:crop15_wb_grey:efficientnet_lite0": ("svm", "crop15_wb_grey", "efficientnet_lite0", None),
    "svm:crop15_wb_grey_stretch:efficientnet_lite0": ("svm", "crop15_wb_grey_stretch", "efficientnet_lite0", None),
    "svm:crop15_wb_macenko:efficientnet_lite0": ("svm", "crop15_wb_macenko", "efficientnet_lite0", None),
    "svm:crop15_macenko:efficientnet_lite0": ("svm", "crop15_macenko", "efficientnet_lite0", None),
    "svm:crop15_wb_grey:efficientnet_lite1": ("svm", "crop15_wb_grey", "efficientnet_lite1", None),
    "svm:crop15_wb_grey:efficientnet_lite2": ("svm", "crop15_wb_grey", "efficientnet_lite2", None),
    "finetune:crop15_wb_grey:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", None),
    "finetune:crop15_wb_grey+stain2:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", STAIN_VIEWS),
    # the best frozen-feature recipe (per-image contrast stretch) with the stain views
    "finetune:crop15_wb_grey_stretch+stain2:efficientnet_lite0": ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS),
    "finetune:crop15_wb_grey+stainstrong2:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", STRONG_STAIN_VIEWS),
    "finetune:crop15_wb_grey+stainstrong4:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", {**STRONG_STAIN_VIEWS, "views": 4}),
    "finetune:crop15_wb_grey_stretch+stainstrong2:efficientnet_lite0": ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STRONG_STAIN_VIEWS),
    "finetune:crop15_wb_grey+stainstronger2:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", STRONGER_STAIN_VIEWS),
    "finetune:crop15_wb+colour2:efficientnet_lite0": ("finetune", "crop15_wb", "efficientnet_lite0", STRONG_COLOUR_VIEWS),
    # colour kept (eosinophils' granules are a colour cue the grey recipes lose), the stain jittered
    "finetune:crop15_wb+stain2:efficientnet_lite0": ("finetune", "crop15_wb", "efficientnet_lite0", STAIN_VIEWS),
    # LP-FT (Kumar et al. 2022): the head starts as a linear probe on the pretrained features
    "finetune:crop15_wb_grey+stain2+probe:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", STAIN_VIEWS),
    "finetune:crop15_wb_grey_stretch+stain2+probe:efficientnet_lite0": ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS),
    # every layer trains (policy all), not only the last block: more of the network adapts
    # (28 min on 2 cores, so only with the chosen recipe)
    "finetune:crop15_wb_grey_stretch+stain2+all:efficientnet_lite0": ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS),
    # the paper's rotations as training samples too (configs/pbc.yaml's augmentation), and a
    # second row (adaptation "tta") scoring the softmax mean over the four rotations of each test image
    "finetune:crop15_wb_grey_stretch+stain2+rot:efficientnet_lite0": ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS),
    "finetune:crop15_wb_grey+stain2+rot:efficientnet_lite0": ("finetune", "crop15_wb_grey", "efficientnet_lite0", STAIN_VIEWS),
    # the chosen recipe again with other seeds (head init, batch order, calibration slice):
    # how far one fine-tuning row moves by chance, and (kind ensemble) their mean softmax
    **{f"finetune:crop15_wb_grey_stretch+stain2+seed{k}:efficientnet_lite0":
       ("finetune", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS) for k in (1, 2, 3)},
    # every lab's cell at one coarse resolution (resample: averaged down to a side-px square, so
    # PBC's sharp chromatin and granule texture, which JTSC's blurrier optics never show, cannot
    # decide the class); side 24 is where PBC's sharpness meets JTSC's, measured without labels
    **{f"{kind}:crop15_wb_grey_res{side}_stretch{suffix}:efficientnet_lite0":
       (kind, f"crop15_wb_grey_res{side}_stretch", "efficientnet_lite0", views)
       for side in (24, 32, 48)
       for kind, suffix, views in (("svm", "", None), ("finetune", "+stain2", STAIN_VIEWS))},
    "ensemble:crop15_wb_grey_stretch+stain2x4:efficientnet_lite0": ("ensemble", "crop15_wb_grey_stretch", "efficientnet_lite0", STAIN_VIEWS),
}
#: ensemble experiments: the fine-tuning experiments whose test softmax they average (each must
#: have run, in this run or an earlier one with the same --cache)
ENSEMBLES = {
    "ensemble:crop15_wb_grey_stretch+stain2x4:efficientnet_lite0": [
        "finetune:crop15_wb_grey_stretch+stain2:efficientnet_lite0",
        *(f"finetune:crop15_wb_grey_stretch+stain2+seed{k}:efficientnet_lite0" for k in (1, 2, 3)),
    ],
}
#: the rotations a ``+rot`` experiment adds to its training part (the workflow's
#: ``augmentation.rotations``), and over which its ``tta`` row averages
ROTATIONS = ("rot90", "rot180", "rot270")


def finetune_variant(name: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What a fine-tuning experiment's name says beyond its recipe and views (the one parser of
    the ``+`` suffixes): the settings on top of FINETUNE_SETTINGS (``+probe``: ``head_init:
    probe``; ``+all``: ``policy: all``; ``+seedK``: seed SEED + K) and the training rotations
    (``+rot``)."""
    options: dict[str, Any] = {}
    rotations: tuple[str, ...] = ()
    for suffix in name.split(":")[1].split("+")[1:]:
        if suffix == "probe":
            options["head_init"] = "probe"
        elif suffix == "all":
            options["policy"] = "all"
        elif suffix.startswith("seed"):
            options["seed"] = SEED + int(suffix[len("seed"):])
        elif suffix == "rot":
            rotations = ROTATIONS
    return options, rotations


# ------------------------------------------------------------------------------ scoring


def select_halves(labels: Sequence[str], seed: int = 0) -> np.ndarray:
    """True = the ``select`` half: half of each class (rounded down), drawn once with ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    select = np.zeros(len(labels), dtype=bool)
    for c in sorted(set(labels)):
        rows = np.flatnonzero(labels == c)
        select[rng.permutation(rows)[: len(rows) // 2]] = True
    return select


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def scores(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int = 0) -> dict[str, float]:
    """Accuracy and balanced accuracy with percentile bootstrap CIs (images resampled)."""
    rng = np.random.default_rng(seed)
    acc, bal = [], []
    for _ in range(n_boot):
        k = rng.integers(0, len(y), len(y))
        acc.append(np.mean(y[k] == p[k]))
        bal.append(balanced_accuracy(y[k], p[k]))
    return {
        "accuracy": float(np.mean(y == p)),
        "accuracy_ci_low": float(np.quantile(acc, 0.025)), "accuracy_ci_high": float(np.quantile(acc, 0.975)),
        "balanced_accuracy": balanced_accuracy(y, p),
        "balanced_accuracy_ci_low": float(np.quantile(bal, 0.025)),
        "balanced_accuracy_ci_high": float(np.quantile(bal, 0.975)),
    }


def score_row(y_int, p_int, y_ext, p_ext, select, n_boot) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for prefix, (y, p) in {
        "internal": (y_int, p_int), "external": (y_ext, p_ext),
        "select": (y_ext[select], p_ext[select]), "report": (y_ext[~select], p_ext[~select]),
    }.items():
        row.update({f"{prefix}_{k}": v for k, v in scores(y, p, n_boot).items()})
    row["neutrophil_as_eosinophil"] = int(((y_ext == "neutrophil") & (p_ext == "eosinophil")).sum())
    row["predicted_neutrophil_share"] = float(np.mean(p_ext == "neutrophil"))
    confusion = pd.crosstab(pd.Series(y_ext, name="true"), pd.Series(p_ext, name="pred"))
    row["external_confusion"] = json.dumps({t: {q: int(v) for q, v in r.items() if v} for t, r in confusion.iterrows()})
    return row


# ------------------------------------------------------------------------------ adaptations


def standardise_domain(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``X`` (one domain's features) with its own mean and sd replaced by ``mean``/``scale``."""
    return (X - X.mean(axis=0)) / np.maximum(X.std(axis=0), 1e-12) * scale + mean


def _matrix_power(C: np.ndarray, power: float) -> np.ndarray:
    w, V = np.linalg.eigh(C)
    return (V * np.clip(w, 1e-12, None) ** power) @ V.T


def coral(Z: np.ndarray, Z_source: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """CORAL at test time: ``Z`` whitened with its own covariance (+ ridge I) and re-coloured
    with the source's (+ ridge I), its mean moved to the source's."""
    eye = ridge * np.eye(Z.shape[1])
    C_t, C_s = np.cov(Z, rowvar=False) + eye, np.cov(Z_source, rowvar=False) + eye
    return (Z - Z.mean(axis=0)) @ _matrix_power(C_t, -0.5) @ _matrix_power(C_s, 0.5) + Z_source.mean(axis=0)


def balanced_mean_alignment(Z, Z_source, y_source, predict, rounds: int = 5, min_members: int = 5):
    """Mean alignment robust to another class mix: the external centre is the mean of its
    predicted classes' means (classes with >= ``min_members`` predictions), the source centre
    the mean of its class means; pseudo-labels from ``predict`` are renewed ``rounds`` times."""
    y_source = np.asarray(y_source)
    centre_source = np.mean([Z_source[y_source == c].mean(axis=0) for c in np.unique(y_source)], axis=0)
    aligned, history = Z, []
    for _ in range(rounds):
        pred = np.asarray(predict(aligned))
        members = [c for c in np.unique(pred) if np.sum(pred == c) >= min_members]
        centre = np.mean([Z[pred == c].mean(axis=0) for c in members], axis=0)
        aligned = Z - centre + centre_source
        history.append({str(c): int(np.sum(pred == c)) for c in np.unique(pred)})
    return aligned, history


# ------------------------------------------------------------------------------ features


class BatchNormAdaptedExtractor:
    """Features of images after BatchNorm statistics are re-estimated on those same images, or
    on ``adapt_on`` (unlabelled; :func:`leukotype.adaptation.adapt_batchnorm`, then the
    workflow's optimised extractor), cached by content like :class:`external_recipes.Extractor`."""

    def __init__(self, cache: Path, backbone: str) -> None:
        self.backbone, self.cache = backbone, cache
        self.spec = get_spec(backbone)
        self.transform = preprocess(self.spec)

    def batches(self, images: Sequence[np.ndarray], batch: int) -> list[torch.Tensor]:
        return [torch.stack([self.transform(Image.fromarray(img)) for img in images[i:i + batch]])
                for i in range(0, len(images), batch)]

    def __call__(self, images: Sequence[np.ndarray], adapt_on: Sequence[np.ndarray] | None = None,
                 batch: int = 32) -> np.ndarray:
        digest = hashlib.sha256(f"{self.backbone}:pool:optimized:bn-adapted".encode())
        er.hash_images(digest, images)
        if adapt_on is not None:
            digest.update(b"statistics from:")
            er.hash_images(digest, adapt_on)
        path = self.cache / f"{digest.hexdigest()[:24]}.npy"
        if path.exists():
            return np.load(path)
        model = build_model(self.spec, resolve_weights(self.backbone, "imagenet"))
        net = FeatureExtractor(self.spec, model, ["pool"]).eval()
        tensors = self.batches(images, batch)
        adapt_batchnorm(net, tensors if adapt_on is None else self.batches(adapt_on, batch))
        net = optimize_for_inference(net)
        with torch.inference_mode():
            features = np.concatenate([net(x)["pool"].float().numpy() for x in tensors])
        np.save(path, features)
        return features


# ------------------------------------------------------------------------------ experiments


def prepared(data: dict[str, Any], recipe: str) -> tuple[list[np.ndarray], np.ndarray]:
    steps, views = er.RECIPES[recipe]
    if views:
        raise SystemExit(f"recipe {recipe!r} has SVM views; give views to a finetune experiment instead")
    images = data["pbc_images"] + data["ext_images"]
    masks = data["pbc_masks"] + data["ext_masks"]
    train = np.zeros(len(images), dtype=bool)
    train[: len(data["pbc"])] = ~data["is_test"]  # references fitted on the PBC training part only
    processed, _ = er.apply_recipe(steps, images, masks, train)
    return processed, train


def prior_adjusted(pipeline, X_train, y_train, g_train, X_ext) -> tuple[np.ndarray, list[float]]:
    """Saerens et al. 2002: EM on the external class prior, from probabilities calibrated on
    out-of-fold training scores; the training prior is the training part's class shares."""
    classes = list(pipeline.classes_)
    calibration = fit_svm_calibration(pipeline, X_train, y_train, g_train, classes, cv_folds=3, seed=SEED)
    probs = softmax(np.asarray(pipeline.decision_function(X_ext)), calibration["temperature"])
    train_prior = np.array([np.mean(np.asarray(y_train) == c) for c in classes])
    prior = train_prior.copy()
    for _ in range(200):
        posterior = probs * prior / train_prior
        posterior /= posterior.sum(axis=1, keepdims=True)
        new = posterior.mean(axis=0)
        if np.abs(new - prior).max() < 1e-8:
            break
        prior = new
    return np.asarray(classes)[posterior.argmax(axis=1)], prior.round(3).tolist()


def run_svm(name, data, extractors, n_boot, batchnorm: bool = True) -> list[dict[str, Any]]:
    _, recipe, backbone, _ = EXPERIMENTS[name]
    start = time.perf_counter()
    processed, _ = prepared(data, recipe)
    n_pbc = len(data["pbc"])
    features = extractors[backbone](processed)
    X_pbc, X_ext = features[:n_pbc].astype(np.float64), features[n_pbc:].astype(np.float64)
    tr, te = ~data["is_test"], data["is_test"]
    y_pbc = data["pbc"]["label"].to_numpy()
    X_train, y_train, g_train = X_pbc[tr], y_pbc[tr], data["groups"][tr]
    pipeline, setting = er.fit_search_svm(X_train, y_train, g_train)
    scaler = pipeline[0]
    y_ext = data["ext"]["label"].to_numpy()
    p_int = pipeline.predict(X_pbc[te])
    Z_train = scaler.transform(X_train)

    def adapt(adaptation: str, X: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Predictions for one domain's features ``X``, adapted with ``X``'s statistics only."""
        if adaptation == "none":
            return pipeline.predict(X), {}
        if adaptation == "standardise":
            return pipeline.predict(standardise_domain(X, scaler.mean_, scaler.scale_)), {}
        if adaptation == "coral":
            return pipeline.predict(scaler.inverse_transform(coral(scaler.transform(X), Z_train))), {}
        if adaptation == "balanced":
            Z, rounds = balanced_mean_alignment(scaler.transform(X), Z_train, y_train, pipeline[-1].predict)
            return pipeline[-1].predict(Z), {"rounds": rounds}
        if adaptation == "prior":
            pred, prior = prior_adjusted(pipeline, X_train, y_train, g_train, X)
            return pred, {"prior": prior}
        raise SystemExit(f"unknown adaptation {adaptation!r}")

    # each adaptation also applied to the PBC test part with ITS OWN statistics: a control
    # (a method that breaks one lab's own test cells is not a lab-shift fix)
    adapted = {a: (adapt(a, X_ext), adapt(a, X_pbc[te])[0]) for a in SVM_ADAPTATIONS}
    if batchnorm:
        X_bn = extractors[f"{backbone}:bn"](processed[n_pbc:]).astype(np.float64)
        adapted["bn"] = ((pipeline.predict(X_bn), {}), None)
        adapted["bn_standardise"] = ((pipeline.predict(standardise_domain(X_bn, scaler.mean_, scaler.scale_)), {}), None)
    rows = []
    if batchnorm:
        # AdaBN proper: EVERY domain's features with its own BatchNorm statistics. The SVM's
        # training features normally carry ImageNet's statistics, so adapting only the external
        # side (the rows above, the workflow's adapt_batchnorm) compares features normalised
        # two different ways. Here the PBC features get the PBC training part's statistics (its
        # test part included, as a test image of that lab would), the SVM is trained on them,
        # and JTSC keeps its own.
        pbc_train = [processed[k] for k in np.flatnonzero(tr)]
        X_pbc_bn = extractors[f"{backbone}:bn"](processed[:n_pbc], adapt_on=pbc_train).astype(np.float64)
        bn_pipeline, bn_setting = er.fit_search_svm(X_pbc_bn[tr], y_train, g_train)
        rows.append({
            "experiment": name, "kind": "svm", "recipe": recipe, "backbone": backbone, "adaptation": "bn_per_domain",
            "views": "", "classifier": f"svm {bn_setting}",
            "n_train_rows": len(X_train), "n_internal_test": int(te.sum()), "n_external": len(y_ext),
            **score_row(y_pbc[te], bn_pipeline.predict(X_pbc_bn[te]), y_ext, bn_pipeline.predict(X_bn), data["select"], n_boot),
            "internal_self_adapted_accuracy": np.nan,
            "adaptation_detail": json.dumps({"pbc_statistics": "PBC training part", "external_statistics": "JTSC"}),
            "seconds": round(time.perf_counter() - start, 1),
        })
    for adaptation, ((p_ext, extra), p_int_self) in adapted.items():
        rows.append({
            "experiment": name, "kind": "svm", "recipe": recipe, "backbone": backbone, "adaptation": adaptation,
            "views": "", "classifier": f"svm {setting}",
            "n_train_rows": len(X_train), "n_internal_test": int(te.sum()), "n_external": len(y_ext),
            **score_row(y_pbc[te], p_int, y_ext, p_ext, data["select"], n_boot),
            "internal_self_adapted_accuracy": float(np.mean(p_int_self == y_pbc[te])) if p_int_self is not None else np.nan,
            "adaptation_detail": json.dumps(extra), "seconds": round(time.perf_counter() - start, 1),
        })
    return rows


class InMemoryImages:
    """A ``prepare`` callable for :class:`leukotype.finetune.Samples`: the recipe's processed
    image (and its training views) instead of the decoded file."""

    def __init__(self, images: dict[tuple[str, str], np.ndarray]) -> None:
        self.images = images

    def __call__(self, image: Image.Image, abspath: str, transform: str) -> Image.Image:
        return Image.fromarray(self.images[(abspath, transform)])


def predictions_file(cache: Path, name: str) -> Path:
    """Where a fine-tuning experiment's test predictions (every transform, softmax) are kept."""
    return cache / "finetune_predictions" / f"{hashlib.md5(name.encode()).hexdigest()}.tsv"


def finetune_rows(name, recipe, backbone, views, data, predictions, rotations, detail, extra, n_boot):
    """The rows of one fine-tuned model (or ensemble): ``none`` scores the identity view, and
    with ``rotations`` a ``tta`` row scores the mean softmax over the image's rotations."""
    prob_columns = [f"prob_{c}" for c in CLASSES]
    pbc, ext = data["pbc"], data["ext"]
    y_pbc = pbc["label"].to_numpy()
    int_ids, ext_ids = list(pbc["image_id"][data["is_test"]]), [f"ext:{i}" for i in ext["image_id"]]
    rows = []
    for adaptation, transforms in (("none", ["identity"]), ("tta", ["identity", *rotations])):
        if adaptation == "tta" and not rotations:
            continue
        probabilities = predictions[predictions["transform"].isin(transforms)].groupby("image_id")[prob_columns].mean()
        pred = pd.Series(np.asarray(CLASSES)[probabilities.to_numpy().argmax(axis=1)], index=probabilities.index)
        rows.append({
            "experiment": name, "kind": name.split(":")[0], "recipe": recipe, "backbone": backbone,
            "adaptation": adaptation, "views": json.dumps(views, sort_keys=True) if views else "",
            "n_internal_test": int(data["is_test"].sum()), "n_external": len(ext),
            **score_row(y_pbc[data["is_test"]], pred.loc[int_ids].to_numpy(), ext["label"].to_numpy(),
                        pred.loc[ext_ids].to_numpy(), data["select"], n_boot),
            "adaptation_detail": json.dumps({**detail, "training_rotations": list(rotations),
                                             "tta_transforms": transforms if adaptation == "tta" else []}, sort_keys=True),
            **extra,
        })
    return rows


def run_ensemble(name, data, cache, n_boot) -> list[dict[str, Any]]:
    _, recipe, backbone, views = EXPERIMENTS[name]
    members = ENSEMBLES[name]
    missing = [m for m in members if not predictions_file(cache, m).exists()]
    if missing:
        raise SystemExit(f"{name}: run its members first (same --cache): {missing}")
    prob_columns = [f"prob_{c}" for c in CLASSES]
    tables = [pd.read_csv(predictions_file(cache, m), sep="\t", dtype={"image_id": str}).set_index(["image_id", "transform"])
              for m in members]
    mean = sum(t[prob_columns] for t in tables) / len(tables)  # aligned on (image, transform)
    mean = mean.reset_index()
    return finetune_rows(name, recipe, backbone, views, data, mean, (), {"members": members},
                         {"classifier": f"mean softmax of {len(members)} fine-tuned networks", "seconds": 0.0}, n_boot)


def run_finetune(name, data, threads, n_boot, cache: Path) -> list[dict[str, Any]]:
    from leukotype import preprocessing as pp
    from leukotype.finetune import FinetuneConfig, FoldSamples, Samples, build_finetune_model, finetune_fold

    _, recipe, backbone, views = EXPERIMENTS[name]
    start = time.perf_counter()
    processed, _ = prepared(data, recipe)
    pbc, ext = data["pbc"], data["ext"]
    n_pbc = len(pbc)
    paths = list(pbc["abspath"]) + list(ext["abspath"])
    images = {(p, "identity"): img for p, img in zip(paths, processed)}
    tr = ~data["is_test"]
    train_rows = [{"image_id": pbc["image_id"][k], "abspath": paths[k], "transform": "identity", "label": pbc["label"][k]}
                  for k in np.flatnonzero(tr)]
    if views:
        jitter = pp.ColourJitter.from_dict({**views, "seed": SEED})
        for k in np.flatnonzero(tr):
            for view in range(1, jitter.views + 1):
                params = pp.jitter_parameters(jitter, pbc["md5"][k], view)
                images[(paths[k], f"colour{view}")] = np.asarray(pp.colour_jitter(Image.fromarray(processed[k]), params))
                train_rows.append({"image_id": pbc["image_id"][k], "abspath": paths[k],
                                   "transform": f"colour{view}", "label": pbc["label"][k]})
    options, rotations = finetune_variant(name)
    for k in np.flatnonzero(tr):
        for rotation in rotations:
            train_rows.append({"image_id": pbc["image_id"][k], "abspath": paths[k], "transform": rotation,
                               "label": pbc["label"][k]})
    for k, path in enumerate(paths):
        for rotation in rotations:
            images[(path, rotation)] = np.asarray(apply_transform(Image.fromarray(processed[k]), rotation))
    test_rows = []
    for transform in ("identity", *rotations):
        test_rows += [{"image_id": pbc["image_id"][k], "abspath": paths[k], "transform": transform, "label": pbc["label"][k]}
                      for k in np.flatnonzero(data["is_test"])]
        test_rows += [{"image_id": f"ext:{ext['image_id'][k]}", "abspath": paths[n_pbc + k], "transform": transform,
                       "label": ext["label"][k]} for k in range(len(ext))]
    prepare = InMemoryImages(images)
    cfg = FinetuneConfig.from_mapping({**FINETUNE_SETTINGS, **options, "threads": threads})
    model, preprocess_fn = build_finetune_model(backbone, len(CLASSES), cfg.policy, resolve_weights(backbone, "imagenet"), cfg.seed)
    samples = FoldSamples(
        train=Samples.from_frame(pd.DataFrame(train_rows), CLASSES, prepare=prepare),
        val=None,
        test=Samples.from_frame(pd.DataFrame(test_rows), CLASSES, prepare=prepare),
    )
    job = finetune_fold(model, preprocess_fn, samples, CLASSES, cfg)
    with atomic_path(predictions_file(cache, name)) as tmp:  # an ensemble never reads half a file
        job.predictions.to_csv(tmp, sep="\t", index=False)
    extra = {"classifier": f"finetune {cfg.policy} {cfg.epochs} epochs lr {cfg.lr}", "n_train_rows": len(train_rows),
             "finetune_options": json.dumps(options, sort_keys=True) if options else "",
             "seconds": round(time.perf_counter() - start, 1)}
    return finetune_rows(name, recipe, backbone, views, data, job.predictions, rotations, job.train.head_init, extra, n_boot)


# ------------------------------------------------------------------------------ table


def write_table(rows: list[dict[str, Any]], previous: pd.DataFrame | None, out: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    if previous is not None:
        keep = ~previous.set_index(["experiment", "adaptation"]).index.isin(table.set_index(["experiment", "adaptation"]).index)
        table = pd.concat([previous[keep], table], ignore_index=True)
    baseline = table[(table["experiment"] == "svm:none:efficientnet_lite0") & (table["adaptation"] == "none")]
    base = float(baseline["internal_accuracy"].iloc[0]) if len(baseline) else float("nan")
    # chosen on the select half only (balanced accuracy, then accuracy); judged on the report half
    ranked = table.sort_values(["select_balanced_accuracy", "select_accuracy"], ascending=False)
    table["chosen"] = table.index == ranked.index[0]
    return er.finish_table(table, base, out)


def main(argv: list[str] | None = None) -> int:
    skip_bn = ("--skip-bn", {"action": "store_true", "help": "leave out the BatchNorm-adapted rows (they extract again)"})
    args, names = er.parse_choices(__doc__, argv, "external_adaptation.csv", "experiments", list(EXPERIMENTS), [skip_bn])
    torch.manual_seed(SEED)
    start = time.perf_counter()
    data = er.load_data(args.data, args.cache)
    data["select"] = select_halves(data["ext"]["label"].to_numpy(), seed=0)
    print(f"data and segmentation: {time.perf_counter() - start:.0f} s", flush=True)
    torch.set_num_threads(args.threads)
    extractors: dict[str, Any] = {}
    for name in names:
        kind, _, backbone, _ = EXPERIMENTS[name]
        if kind == "svm" and backbone not in extractors:
            extractors[backbone] = er.Extractor(args.cache, args.threads, backbone)
            extractors[f"{backbone}:bn"] = BatchNormAdaptedExtractor(args.cache, backbone)
    previous = pd.read_csv(args.out) if args.append and args.out.exists() else None
    rows: list[dict[str, Any]] = []
    for name in names:
        kind = EXPERIMENTS[name][0]
        if kind == "svm":
            new = run_svm(name, data, extractors, args.n_boot, not args.skip_bn)
        elif kind == "ensemble":
            new = run_ensemble(name, data, args.cache, args.n_boot)
        else:
            new = run_finetune(name, data, args.threads, args.n_boot, args.cache)
        for row in new:
            row["threads"] = args.threads
            row.update(machine_info())
            print(f"{name:48s} {row['adaptation']:15s} internal {row['internal_accuracy']:.3f}  "
                  f"external {row['external_accuracy']:.3f} (bal {row['external_balanced_accuracy']:.3f})  "
                  f"select bal {row['select_balanced_accuracy']:.3f}  report {row['report_accuracy']:.3f}  "
                  f"{row['seconds']} s", flush=True)
        rows.extend(new)
        write_table(rows, previous, args.out)  # after every experiment: a long run keeps what it did
    print(f"written {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
