"""Feature-extraction throughput against the machine's compute ceiling.

For each backbone, in one process and at one thread count:

- ``ceiling``: the machine's best fp32 matrix-product rate (``common.ceiling_gflops``: the
  MAXIMUM GFLOP/s over ``common.CEILING_SHAPES`` -- square 1024^3 and 2048^3, ResNet-101's
  layer3 conv as an im2col GEMM, a wide one -- and repeats) / the model's GFLOPs per image
  (``torch.utils.flop_counter.FlopCounterMode``, 2 flops per multiply-add). It is sampled
  before, between and after this backbone's runs and the MAXIMUM of the samples is used
  (``matmul_samples`` lists them): load from neighbours only lowers a sample. Where the CPU
  multiplies bf16 natively (``common.native_bf16``), the bf16 rows are compared with the best
  bf16 rate measured the same way (``ceiling_bf16_gflops``). A figure above 100 % of its
  ceiling would mean the ceiling is wrong;
- ``model_only``: the project's extractor (``leukotype.features.optimize_for_inference``:
  BatchNorm folded, oneDNN conv+ReLU/add fusion) on pre-decoded tensors (channels_last,
  inference mode, same batch size as extraction) -- the best the project's path could do;
- ``model_only_eager``: the same on the plain eager ``FeatureExtractor`` (the path before the
  optimisation; ``ratio`` = optimised / eager speed, ``max_rel_diff`` = max |difference| of the
  features / max |feature|);
- ``extraction``: ``leukotype.features.extract_features``, JPEG files on disk -> ``.npy`` on
  disk, with the workflow's defaults (batch 32, one decoding worker); ``steady`` excludes the
  one-off model construction and optimisation (``model_build``, ``model_optimize``: random init
  of a large net takes seconds, amortised over the thousands of samples of a real job);
- ``naive``: what a user would write -- batch 1, default memory format, gradients on;
- ``extraction_bf16``: ``precision="bf16"`` (bf16 weights in the optimised model);
  ``extraction_threads1``: one thread.

Then the accuracy part: ``efficientnet_lite0`` with its real ImageNet weights on real images
(all 800 PBC images by default, no rotations), fp32 vs bf16 features, SVM
(``leukotype.classify.fit_svm``) in 4-fold grouped cross-validation
(``leukotype.split.kfold_split``), so every image is predicted once from each precision's
features: accuracy per precision, the difference in points with a paired bootstrap 95 % CI,
and how many images' predictions differ.

    python bench/extraction_ceiling.py            # defaults, ~15-20 min on 2 busy cores
    python bench/extraction_ceiling.py --quick    # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess
from leukotype.features import extract_features, optimize_for_inference
from leukotype.images import load_rgb

NAME = "extraction_ceiling"
DEFAULT_BACKBONES = ("resnet101", "vgg16", "inception_v3", "efficientnet_lite0")
#: Rows that time a one-off step (seconds only): no images/s, no fraction of a ceiling.
ONE_OFF = ("model_build", "model_optimize")


def decoded_batch(spec, abspaths: list[str]) -> torch.Tensor:
    """Pre-decoded, preprocessed (N, 3, S, S) tensor (the model-only input)."""
    prep = preprocess(spec)
    return torch.stack([prep(load_rgb(p)) for p in abspaths])


def model_only_seconds(
    extractor: torch.nn.Module, images: torch.Tensor, batch_size: int, layer: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, torch.Tensor]:
    """Seconds for the extractor over ``images`` in batches (channels_last, inference mode),
    and the ``layer`` features (float32). Warm-up: two images (oneDNN primitive creation, the
    optimised convs' weight prepacking; the packed layout does not depend on the batch size)."""
    features = []
    with torch.inference_mode():
        extractor(images[: min(2, len(images))].to(dtype).contiguous(
            memory_format=torch.channels_last))

        def run() -> None:
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                out = extractor(batch.to(dtype).contiguous(memory_format=torch.channels_last))
                features.append(out[layer].float())

        seconds = common.timed(run)
    return seconds, torch.cat(features)


def naive_seconds(spec, model: torch.nn.Module, layer: str, abspaths: list[str]) -> float:
    """A user's loop: decode, preprocess, batch of one, default memory format, autograd on."""
    extractor = FeatureExtractor(spec, model, [layer]).eval()
    prep = preprocess(spec)
    extractor(prep(load_rgb(abspaths[0])).unsqueeze(0))  # warm-up, as for the others

    def run() -> None:
        features = []
        for path in abspaths:
            x = prep(load_rgb(path)).unsqueeze(0)
            features.append(extractor(x)[layer].detach().numpy())

    return common.timed(run)


def extraction_seconds(
    samples: pd.DataFrame, backbone: str, out_dir: Path, **kwargs
) -> float:
    return common.timed(
        lambda: extract_features(
            samples, backbone, None, [get_spec(backbone).default_layer], out_dir,
            progress=False, **kwargs,
        )
    )


def bench_backbone(
    backbone: str, images: pd.DataFrame, args, scratch: Path
) -> list[dict]:
    """All throughput rows for one backbone (see module doc)."""
    spec = get_spec(backbone)
    layer = spec.default_layer
    samples = common.sample_table(images)
    abspaths = samples["abspath"].tolist()
    n = len(samples)
    threads, batch = args.threads, args.batch_size
    rows: list[dict] = []

    def row(measurement: str, seconds: float, n_images: int, **extra) -> dict:
        record = {
            "benchmark": NAME, "backbone": backbone, "layer": layer,
            "measurement": measurement, "precision": extra.pop("precision", "fp32"),
            "threads": extra.pop("threads", threads), "batch_size": extra.pop("batch_size", batch),
            "num_workers": extra.pop("num_workers", args.num_workers), "n_images": n_images,
            "seconds": seconds,
            "images_per_s": (n_images / seconds if seconds > 0 and measurement not in ONE_OFF
                             else np.nan),
            "load_avg_1m": common.load_avg(), **extra,
        }
        rows.append(record)
        return record

    with common.torch_threads(threads):
        # --quick: one small shape, one short burst (a smoke test, not a ceiling)
        sizes = ({"shapes": ((256, 256, 256),), "repeats": 1, "seconds": 0.02} if args.quick
                 else {})
        monitor = common.RateMonitor(lambda: common.ceiling_gflops(threads, **sizes)[0])
        monitor.sample()
        bf16_monitor = None
        if not args.skip_bf16 and common.native_bf16():
            bf16_monitor = common.RateMonitor(
                lambda: common.ceiling_gflops(threads, torch.bfloat16, **sizes)[0])
        build_s = common.best_of(lambda: build_model(spec, None, seed=0), 1)
        model = build_model(spec, None, seed=0).eval()
        extractor = FeatureExtractor(spec, model, [layer]).eval()
        gflops = common.model_gflops(extractor, torch.zeros(1, 3, spec.input_size, spec.input_size))
        ceiling_row = row("ceiling", np.nan, n, gflops_per_image=gflops)
        row("model_build", build_s, 1)

        tensors = decoded_batch(spec, abspaths)
        extractor = extractor.to(memory_format=torch.channels_last)
        eager_s, eager_features = model_only_seconds(extractor, tensors, batch, layer)
        eager = row("model_only_eager", eager_s, n, num_workers=0)
        monitor.sample()
        holder: dict[str, torch.nn.Module] = {}
        # fp32 optimisation folds into copies: the eager extractor above stays as it was.
        optimize_s = common.timed(
            lambda eager=extractor: holder.setdefault("model", optimize_for_inference(eager, "cpu"))
        )
        optimized = holder.pop("model")
        row("model_optimize", max(optimize_s, 1e-9), 1)
        model_s, features = model_only_seconds(optimized, tensors, batch, layer)
        model_only = row("model_only", model_s, n, num_workers=0)
        eager["max_rel_diff"] = model_only["max_rel_diff"] = float(
            (features - eager_features).abs().max() / eager_features.abs().max()
        )
        del tensors, optimized, extractor, model
        monitor.sample()

        one_off = build_s + max(optimize_s, 0.0)
        wall = extraction_seconds(
            samples, backbone, scratch / f"{backbone}_fp32", batch_size=batch,
            num_workers=args.num_workers, threads=threads,
        )
        row("extraction_incl_build", wall, n)
        extraction = row("extraction", max(wall - one_off, 1e-9), n)
        monitor.sample()

        naive_n = max(2, min(n, args.naive_images))
        naive_model = build_model(spec, None, seed=0)
        naive = row("naive", naive_seconds(spec, naive_model, layer, abspaths[:naive_n]),
                    naive_n, batch_size=1, num_workers=0)
        del naive_model

        if not args.skip_bf16:
            wall_bf16 = extraction_seconds(
                samples, backbone, scratch / f"{backbone}_bf16", batch_size=batch,
                num_workers=args.num_workers, threads=threads, precision="bf16",
            )
            bf16 = row("extraction_bf16", max(wall_bf16 - one_off, 1e-9), n, precision="bf16")
            bf16["ratio"] = bf16["images_per_s"] / extraction["images_per_s"]
            bf16["baseline"] = "extraction"
            monitor.sample()
            if bf16_monitor is not None:
                bf16_monitor.sample()
                bf16_monitor.sample()

    matmul = monitor.value
    ceiling = matmul / gflops
    ceiling_row["seconds"] = n / ceiling
    ceiling_row["images_per_s"] = ceiling

    if not args.skip_threads1 and threads > 1:
        sub = samples.iloc[: max(2, n // 2)]
        with common.torch_threads(1):
            build1 = common.timed(lambda: build_model(spec, None, seed=0))
        wall1 = extraction_seconds(
            sub, backbone, scratch / f"{backbone}_t1", batch_size=batch,
            num_workers=args.num_workers, threads=1,
        )
        t1 = row("extraction_threads1", max(wall1 - build1 - optimize_s, 1e-9), len(sub),
                 threads=1)
        extraction["ratio_vs_threads1"] = extraction["images_per_s"] / t1["images_per_s"]

    for record in rows:
        record.setdefault("gflops_per_image", gflops)
        record["matmul_gflops"] = matmul
        record["matmul_kind"] = "fp32 GEMM, max over shapes {} x repeats, max of samples".format(
            ";".join("x".join(map(str, s)) for s in common.CEILING_SHAPES))
        record["matmul_samples"] = monitor.describe()
        record["ceiling_images_per_s"] = ceiling
        record["fraction_of_ceiling"] = record["images_per_s"] / ceiling
        if bf16_monitor is not None:
            record["ceiling_bf16_gflops"] = bf16_monitor.value
            record["ceiling_bf16_samples"] = bf16_monitor.describe()
        if record["precision"] == "bf16" and bf16_monitor is not None:
            # bf16 runs against the bf16 ceiling; fp32 would flatter them
            record["ceiling_images_per_s"] = bf16_monitor.value / gflops
            record["fraction_of_ceiling"] = record["images_per_s"] / record["ceiling_images_per_s"]
    model_only["ratio"] = model_only["images_per_s"] / ceiling
    model_only["baseline"] = "ceiling"
    eager["ratio"] = model_only["images_per_s"] / eager["images_per_s"]
    eager["baseline"] = "model_only / model_only_eager"
    extraction["ratio"] = extraction["images_per_s"] / model_only["images_per_s"]
    extraction["baseline"] = "model_only"
    extraction["speedup_vs_naive"] = extraction["images_per_s"] / naive["images_per_s"]
    naive["ratio"] = naive["images_per_s"] / extraction["images_per_s"]
    naive["baseline"] = "extraction"
    tail = ("model_build", "model_optimize")
    rows = [r for r in rows if r["measurement"] not in tail] + [
        r for r in rows if r["measurement"] in tail
    ]
    return rows


def paired_bootstrap_ci(
    a_correct: np.ndarray, b_correct: np.ndarray, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """95 % CI (points) of accuracy(b) - accuracy(a), resampling images with replacement."""
    diff = b_correct.astype(float) - a_correct.astype(float)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # chunks keep memory small
        idx = rng.integers(0, len(diff), size=(min(1000, n_boot - start), len(diff)))
        means[start : start + len(idx)] = diff[idx].mean(axis=1)
    low, high = np.percentile(100 * means, [2.5, 97.5])
    return float(low), float(high)


def svm_accuracy_rows(images: pd.DataFrame, args, scratch: Path, source: str) -> list[dict]:
    """fp32 vs bf16 efficientnet_lite0 (ImageNet) features -> SVM accuracy, k-fold CV.

    Every image is a test image once (grouped, stratified k-fold: ``leukotype.split``), so the
    comparison is paired over all images; identity transform only (no rotations).
    """
    from leukotype.classify import fit_svm
    from leukotype.feature_store import load_features
    from leukotype.split import kfold_split
    from leukotype.weights import resolve_weights

    backbone = "efficientnet_lite0"
    layer = get_spec(backbone).default_layer
    weights = resolve_weights(backbone, "imagenet")
    samples = common.sample_table(images)
    labels = samples["label"].to_numpy()
    groups = samples["image_id"].to_numpy()
    n_splits = int(min(args.accuracy_folds, pd.Series(labels).value_counts().min()))
    folds = kfold_split(labels, groups, n_splits=n_splits, seed=0)[0]
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"], "gamma": ["scale"]}
    rows, predictions, features = [], {}, {}
    for precision in ("fp32", "bf16"):
        out = scratch / f"acc_{precision}"
        seconds = common.timed(
            lambda out=out, precision=precision: extract_features(
                samples, backbone, weights, [layer], out, batch_size=32,
                num_workers=args.num_workers, threads=args.threads, precision=precision,
                progress=False,
            )
        )
        X = load_features([out], layer, samples[["image_id", "transform"]])
        features[precision] = X
        predicted = np.empty(len(labels), dtype=object)
        for fold in range(n_splits):
            test = folds == fold
            pipeline, _ = fit_svm(X[~test], labels[~test], groups[~test], grid, cv_folds=3,
                                  seed=0)
            predicted[test] = pipeline.predict(X[test])
        predictions[precision] = predicted
        rows.append({
            "benchmark": NAME, "backbone": backbone, "layer": layer,
            "measurement": "svm_accuracy", "precision": precision, "threads": args.threads,
            "batch_size": 32, "num_workers": args.num_workers,
            "n_images": len(samples), "n_test": len(samples), "cv_folds": n_splits,
            "transforms": "identity (no rotations)", "seconds": seconds,
            "images_per_s": len(samples) / seconds,
            "accuracy": float((predicted == labels).mean()),
            "weights": "imagenet", "data": source, "load_avg_1m": common.load_avg(),
        })
    fp32_ok = predictions["fp32"] == labels
    bf16_ok = predictions["bf16"] == labels
    low, high = paired_bootstrap_ci(fp32_ok, bf16_ok)
    full, half = features["fp32"], features["bf16"]
    rows[1].update({
        "accuracy_diff_points": 100 * (rows[1]["accuracy"] - rows[0]["accuracy"]),
        "accuracy_diff_ci95_low": low, "accuracy_diff_ci95_high": high,
        "n_predictions_differ": int((predictions["fp32"] != predictions["bf16"]).sum()),
        "n_only_fp32_correct": int((fp32_ok & ~bf16_ok).sum()),
        "n_only_bf16_correct": int((bf16_ok & ~fp32_ok).sum()),
        "feature_rel_diff": float(np.linalg.norm(half - full) / np.linalg.norm(full)),
        "ratio": rows[1]["images_per_s"] / rows[0]["images_per_s"],
        "baseline": "svm_accuracy fp32",
    })
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--images", type=int, default=64, help="images per throughput run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1, help="workflow default: 1")
    parser.add_argument("--naive-images", type=int, default=12)
    parser.add_argument("--accuracy-images", type=int, default=800,
                        help="images for the fp32/bf16 SVM accuracy part (0 skips it)")
    parser.add_argument("--accuracy-folds", type=int, default=4,
                        help="cross-validation folds of the accuracy part")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-threads1", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        # paper_cnn (64 px) keeps the smoke run to seconds; the accuracy part still uses
        # efficientnet_lite0's real weights, on 4 images per class (4 folds of 1).
        args.backbones, args.images, args.batch_size, args.naive_images = ["paper_cnn"], 4, 2, 2
        args.num_workers = 0
        args.accuracy_images = min(args.accuracy_images, 32)

    rows: list[dict] = []
    with common.workdir() as scratch:
        images, source = common.image_table(args.data, args.images, scratch)
        for backbone in args.backbones:
            print(f"[{NAME}] {backbone} ...", flush=True)
            for record in bench_backbone(backbone, images, args, scratch):
                record["data"] = source
                record["weights"] = "none"
                rows.append(record)
        if args.accuracy_images > 0:
            print(f"[{NAME}] fp32 vs bf16 SVM accuracy ...", flush=True)
            acc_images, acc_source = common.image_table(args.data, args.accuracy_images, scratch)
            rows.extend(svm_accuracy_rows(acc_images, args, scratch, acc_source))
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, [
        "backbone", "measurement", "precision", "threads", "n_images", "images_per_s",
        "fraction_of_ceiling", "fraction_of_square_ceiling", "ratio", "baseline", "max_rel_diff",
        "accuracy", "accuracy_diff_points", "accuracy_diff_ci95_low", "accuracy_diff_ci95_high",
        "n_predictions_differ",
    ])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
