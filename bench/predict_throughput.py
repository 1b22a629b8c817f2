"""`leukotype predict` throughput against feature extraction alone, same images, same run.

A features -> SVM bundle (EfficientNet-Lite0 ImageNet features) is trained on a few images by
the workflow's own stages and exported; then the same new images are timed three ways:

- ``extraction``: ``features.extract_features`` alone (the baseline: what the workflow's
  extraction job does per image);
- ``predict_samples``: the bundle's ``Predictor.predict_samples`` (extraction + SVM + calibrated
  probabilities + OOD distance);
- ``predict_table``: the whole ``leukotype predict`` path (input gathering, validation of every
  file, prediction, flags, top-k).

``ratio`` is images/s of the row over images/s of ``extraction`` (1.0 = same throughput).

    python bench/predict_throughput.py             # 64 training, 128 predicted images
    python bench/predict_throughput.py --quick     # 40 training, 16 predicted images
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common  # noqa: E402

NAME = "predict_throughput"
BACKBONE = "efficientnet_lite0"


def make_bundle(train: pd.DataFrame, scratch: Path, threads: int) -> Path:
    """Validate -> split -> extract -> SVM -> evaluate -> export on ``train`` (workflow stages)."""
    from leukotype import paths, stages
    from leukotype.config import Run, validate_config
    from leukotype.export import export_run

    manifest = scratch / "train.csv"
    train[["abspath", "label"]].rename(columns={"abspath": "path"}).to_csv(manifest, index=False)
    results = scratch / "results"
    classes = sorted(train["label"].unique())
    cfg = validate_config({
        "results": str(results),
        "dataset": {"source": str(manifest), "name": "bench"},
        "tasks": [{"name": "cells", "column": "label", "classes": classes}],
        "validation": {"min_images_per_class": 2},
        "split": {"method": "holdout", "test_size": 0.25, "seed": 0},
        "augmentation": {"rotations": []},
        "models": [{"backbone": BACKBONE, "weights": "imagenet", "strategies": ["features_svm"]}],
        "svm": {"C": [1], "kernel": ["linear"], "cv_folds": 2},
        "features": {"batch_size": 32, "num_workers": 0},
        "evaluation": {"n_bootstrap": 10},
    })
    task, data = cfg["tasks"][0], results / "data"
    stages.run_validation(manifest, cfg["tasks"], cfg["validation"], data / "validated.tsv", data / "validation.json")
    stages.run_split(data / "validated.tsv", task, cfg["split"], data / "splits/cells.tsv")
    stages.run_augment(data / "splits/cells.tsv", cfg["augmentation"], data / "samples/cells.tsv")
    features = Path(paths.features_dir(str(results), BACKBONE))
    stages.run_extract(data / "validated.tsv", BACKBONE, ["pool"], "imagenet", None, None,
                       cfg["augmentation"], cfg["features"], features, threads=threads)
    run = Run("cells", "features_svm", BACKBONE, "pool", "holdout")
    run_dir = results / run.path
    stages.run_svm(data / "samples/cells.tsv", task, "holdout", [features], "pool", cfg["svm"],
                   run_dir / paths.SVM_MODEL, run_dir / paths.PREDICTIONS, run_dir / paths.CV_RESULTS,
                   threads=threads, out_calibration=run_dir / paths.CALIBRATION)
    stages.run_evaluate(run_dir / paths.PREDICTIONS, data / "samples/cells.tsv", task,
                        {**run.__dict__, "config": cfg}, cfg["evaluation"], run_dir / paths.METRICS,
                        run_dir / paths.CONFUSION, run_dir / paths.CONFUSION_PNG)
    return export_run(results, run, scratch / "bundle", config=cfg)


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--images", type=int, default=128, help="images to predict")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.images = 40, 16
    from leukotype.features import extract_features
    from leukotype.predict import Predictor, prediction_table
    from leukotype.weights import resolve_weights

    rows = []
    with common.workdir() as scratch, common.torch_threads(args.threads):
        # Alternate rows of the class-sorted table: both parts hold every class.
        images, source = common.image_table(args.data, 2 * max(args.train_images, args.images), scratch)
        train = images.iloc[0::2].head(args.train_images)
        new = images.iloc[1::2].head(args.images).reset_index(drop=True)
        bundle = make_bundle(train, scratch, args.threads)
        predictor = Predictor(bundle, device="cpu", threads=args.threads)
        samples = common.sample_table(new)
        weights = resolve_weights(BACKBONE, "imagenet")

        def extraction() -> None:
            extract_features(samples, BACKBONE, weights, ["pool"], scratch / "features", batch_size=32,
                             threads=args.threads, progress=False, device="cpu")

        timings = {
            "extraction": extraction,
            "predict_samples": lambda: predictor.predict_samples(samples),
            "predict_table": lambda: prediction_table(predictor, new["abspath"].tolist(), threads=args.threads),
        }
        extraction()  # warm-up: imports, first-call allocations
        seconds = {}
        for name, fn in timings.items():
            start = time.perf_counter()
            fn()
            seconds[name] = time.perf_counter() - start
        for name, value in seconds.items():
            rows.append({
                "benchmark": NAME, "measurement": name, "backbone": BACKBONE, "source": source,
                "n_images": len(new), "threads": args.threads, "seconds": value,
                "images_per_second": len(new) / value,
                "ratio": (len(new) / value) / (len(new) / seconds["extraction"]),
                "load_avg": common.load_avg(),
            })
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["measurement", "n_images", "seconds", "images_per_second", "ratio", "load_avg"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
