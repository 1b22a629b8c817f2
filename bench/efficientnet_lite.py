"""EfficientNet-Lite0 vs Lite1 vs Lite2 on PBC: accuracy of ImageNet features -> SVM, and speed.

For each backbone, its packaged ImageNet weights, fp32, no rotations (one view per image):

1. extraction of the ``pool`` features of every image with ``leukotype.features.
   extract_features`` (decode, resize, network; ``--threads`` torch threads), timed
   (``extract_seconds``, ``images_per_s``: one pass, sensitive to the machine's load);
   then speed proper: ``--rounds`` interleaved rounds (Lite0, Lite1, Lite2, Lite0, ...) each
   extracting ``--speed-images`` images, best round per backbone (``best_images_per_s``) and
   its ratio to Lite0's (``speed_vs_lite0``), so a load change hits every backbone alike;
2. 4-fold stratified cross-validation (image-level: PBC has no patient ids) of the workflow's
   SVM (``leukotype.classify.fit_svm``: linear kernel, C in {0.1, 1, 10} chosen by inner
   3-fold search on the training folds only): accuracy and balanced accuracy, mean and sd
   over the folds; the folds are the same for every backbone.

Writes ``bench/results/efficientnet_lite.csv``, one row per backbone, with the machine.

    python bench/efficientnet_lite.py             # ../shared/data/pbc, 800 images
    python bench/efficientnet_lite.py --quick     # 32 images, smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from leukotype.backbones import get_spec  # noqa: E402
from leukotype.classify import fit_svm  # noqa: E402
from leukotype.feature_store import load_features  # noqa: E402
from leukotype.features import extract_features  # noqa: E402
from leukotype.metrics import classification_metrics  # noqa: E402
from leukotype.split import kfold_split  # noqa: E402
from leukotype.weights import resolve_weights  # noqa: E402

NAME = "efficientnet_lite"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
GRID = {"C": [0.1, 1, 10], "kernel": ["linear"], "gamma": ["scale"]}


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-images", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.folds, args.batch_size, args.rounds, args.speed_images = 32, 2, 8, 1, 8

    rows = []
    with common.workdir() as scratch:
        images, source = common.image_table(args.data, args.images, scratch)
        samples = common.sample_table(images)
        labels = images["label"].to_numpy()
        classes = sorted(set(labels))
        folds = kfold_split(labels, images["image_id"].to_numpy(), n_splits=args.folds, seed=0)[0]
        for backbone in BACKBONES:
            spec = get_spec(backbone)
            out = scratch / backbone
            print(f"[{NAME}] {backbone}: extracting {len(samples)} images ...", flush=True)
            load = common.load_avg()
            start = time.perf_counter()
            extract_features(
                samples, backbone, resolve_weights(backbone, "imagenet"), ["pool"], out,
                batch_size=args.batch_size, num_workers=0, device="cpu", threads=args.threads,
                precision="fp32", progress=False,
            )
            seconds = time.perf_counter() - start
            speed = len(samples) / seconds
            X = load_features([out], "pool", samples[["image_id", "transform"]])
            accuracy, balanced = [], []
            for fold in range(args.folds):
                train, test = folds != fold, folds == fold
                pipeline, _ = fit_svm(X[train], labels[train], images["image_id"].to_numpy()[train],
                                      GRID, cv_folds=3, seed=0, n_jobs=args.threads)
                m = classification_metrics(labels[test], pipeline.predict(X[test]), classes)
                accuracy.append(m["accuracy"])
                balanced.append(m["balanced_accuracy"])
            rows.append({
                "backbone": backbone, "input_size": spec.input_size, "resize_size": spec.resize_size,
                "data": source, "n_images": len(images), "n_classes": len(classes),
                "precision": "fp32", "threads": args.threads, "batch_size": args.batch_size,
                "extract_seconds": round(seconds, 2), "images_per_s": round(speed, 2),
                "load_avg_1m": load,
                "folds": args.folds, "classifier": "linear SVM, C by inner 3-fold search",
                "accuracy_mean": round(float(np.mean(accuracy)), 4),
                "accuracy_sd": round(float(np.std(accuracy, ddof=1)), 4),
                "balanced_accuracy_mean": round(float(np.mean(balanced)), 4),
                "fold_accuracies": " ".join(f"{a:.4f}" for a in accuracy),
            })
            print(f"[{NAME}] {rows[-1]}", flush=True)
        subset = samples.head(args.speed_images)
        best = {backbone: 0.0 for backbone in BACKBONES}
        for round_ in range(args.rounds):
            for backbone in BACKBONES:
                start = time.perf_counter()
                extract_features(
                    subset, backbone, resolve_weights(backbone, "imagenet"), ["pool"],
                    scratch / f"speed-{backbone}-{round_}", batch_size=args.batch_size,
                    num_workers=0, device="cpu", threads=args.threads, precision="fp32",
                    progress=False,
                )
                best[backbone] = max(best[backbone], len(subset) / (time.perf_counter() - start))
        for row in rows:
            row["speed_rounds"] = f"{args.rounds} x {len(subset)} images, interleaved"
            row["best_images_per_s"] = round(best[row["backbone"]], 2)
            row["speed_vs_lite0"] = round(best[row["backbone"]] / best[BACKBONES[0]], 3)
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["backbone", "input_size", "best_images_per_s", "speed_vs_lite0",
                              "accuracy_mean", "accuracy_sd", "balanced_accuracy_mean"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
