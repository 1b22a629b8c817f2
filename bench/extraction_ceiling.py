"""Feature-extraction throughput against the machine's compute ceiling.

For each backbone, in one process and at one thread count:

- ``ceiling``: fp32 matmul GFLOP/s measured here and now / the model's GFLOPs per image
  (``torch.utils.flop_counter.FlopCounterMode``, 2 flops per multiply-add);
- ``model_only``: the feature extractor on pre-decoded tensors (channels_last, inference mode,
  same batch size as extraction) -- the best the project's path could do;
- ``extraction``: ``leukotype.features.extract_features``, JPEG files on disk -> ``.npy`` on
  disk, with the workflow's defaults (batch 32, one decoding worker); ``steady`` excludes the
  one-off model construction (random init of a large net takes seconds, amortised over the
  thousands of samples of a real job);
- ``naive``: what a user would write -- batch 1, default memory format, gradients on;
- ``extraction_bf16``: bf16 autocast; ``extraction_threads1``: one thread.

Then the accuracy part: ``efficientnet_lite0`` with its real ImageNet weights on real images,
fp32 vs bf16 features, SVM (``leukotype.classify.fit_svm``) on a 75/25 hold-out
(``leukotype.split.holdout_split``).

    python bench/extraction_ceiling.py            # defaults, a few minutes on 2 cores
    python bench/extraction_ceiling.py --quick    # smoke test
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from leukotype.backbones import FeatureExtractor, build_model, get_spec, preprocess  # noqa: E402
from leukotype.features import extract_features  # noqa: E402
from leukotype.images import load_rgb  # noqa: E402

NAME = "extraction_ceiling"
DEFAULT_BACKBONES = ("resnet101", "vgg16", "inception_v3", "efficientnet_lite0")


def decoded_batch(spec, abspaths: list[str]) -> torch.Tensor:
    """Pre-decoded, preprocessed (N, 3, S, S) tensor (the model-only input)."""
    prep = preprocess(spec)
    return torch.stack([prep(load_rgb(p)) for p in abspaths])


def model_only_seconds(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Seconds for the extractor over ``images`` in batches (channels_last, inference mode)."""
    with torch.inference_mode():
        extractor(images[: min(2, len(images))].contiguous(memory_format=torch.channels_last))

        def run() -> None:
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                extractor(batch.contiguous(memory_format=torch.channels_last))

        return common.timed(run)


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
            "seconds": seconds, "images_per_s": n_images / seconds if seconds > 0 else np.nan,
            "load_avg_1m": common.load_avg(), **extra,
        }
        rows.append(record)
        return record

    with common.torch_threads(threads):
        build_s = common.best_of(lambda: build_model(spec, None, seed=0), 1)
        model = build_model(spec, None, seed=0).eval()
        extractor = FeatureExtractor(spec, model, [layer]).eval()
        gflops = common.model_gflops(extractor, torch.zeros(1, 3, spec.input_size, spec.input_size))
        matmul = common.matmul_gflops(threads)
        ceiling = matmul / gflops
        row("ceiling", n / ceiling, n, gflops_per_image=gflops, matmul_gflops=matmul,
            ceiling_images_per_s=ceiling)
        row("model_build", build_s, 1)

        tensors = decoded_batch(spec, abspaths)
        extractor = extractor.to(memory_format=torch.channels_last)
        model_s = model_only_seconds(extractor, tensors, batch)
        model_only = row("model_only", model_s, n, num_workers=0)
        del tensors

        wall = extraction_seconds(
            samples, backbone, scratch / f"{backbone}_fp32", batch_size=batch,
            num_workers=args.num_workers, threads=threads,
        )
        row("extraction_incl_build", wall, n)
        extraction = row("extraction", max(wall - build_s, 1e-9), n)

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
            bf16 = row("extraction_bf16", max(wall_bf16 - build_s, 1e-9), n, precision="bf16")
            bf16["ratio"] = bf16["images_per_s"] / extraction["images_per_s"]
            bf16["baseline"] = "extraction"

    if not args.skip_threads1 and threads > 1:
        sub = samples.iloc[: max(2, n // 2)]
        with common.torch_threads(1):
            build1 = common.timed(lambda: build_model(spec, None, seed=0))
        wall1 = extraction_seconds(
            sub, backbone, scratch / f"{backbone}_t1", batch_size=batch,
            num_workers=args.num_workers, threads=1,
        )
        t1 = row("extraction_threads1", max(wall1 - build1, 1e-9), len(sub), threads=1)
        extraction["ratio_vs_threads1"] = extraction["images_per_s"] / t1["images_per_s"]

    for record in rows:
        record.setdefault("gflops_per_image", gflops)
        record.setdefault("matmul_gflops", matmul)
        record.setdefault("ceiling_images_per_s", ceiling)
        record["fraction_of_ceiling"] = record["images_per_s"] / ceiling
    model_only["ratio"] = model_only["images_per_s"] / ceiling
    model_only["baseline"] = "ceiling"
    extraction["ratio"] = extraction["images_per_s"] / model_only["images_per_s"]
    extraction["baseline"] = "model_only"
    extraction["speedup_vs_naive"] = extraction["images_per_s"] / naive["images_per_s"]
    naive["ratio"] = naive["images_per_s"] / extraction["images_per_s"]
    naive["baseline"] = "extraction"
    rows = [r for r in rows if r["measurement"] not in ("model_build",)] + [
        r for r in rows if r["measurement"] == "model_build"
    ]
    return rows


def svm_accuracy_rows(images: pd.DataFrame, args, scratch: Path, source: str) -> list[dict]:
    """fp32 vs bf16 efficientnet_lite0 (ImageNet) features -> SVM hold-out accuracy."""
    from leukotype.classify import fit_svm
    from leukotype.feature_store import load_features
    from leukotype.split import holdout_split
    from leukotype.weights import resolve_weights

    backbone = "efficientnet_lite0"
    layer = get_spec(backbone).default_layer
    weights = resolve_weights(backbone, "imagenet")
    samples = common.sample_table(images)
    labels = samples["label"].to_numpy()
    is_test = holdout_split(labels, samples["image_id"].to_numpy(), test_size=0.25, seed=0)
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"], "gamma": ["scale"]}
    rows = []
    accuracy = {}
    for precision in ("fp32", "bf16"):
        out = scratch / f"acc_{precision}"
        seconds = common.timed(
            lambda: extract_features(
                samples, backbone, weights, [layer], out, batch_size=32,
                num_workers=args.num_workers, threads=args.threads, precision=precision,
                progress=False,
            )
        )
        X = load_features([out], layer, samples[["image_id", "transform"]])
        pipeline, _ = fit_svm(
            X[~is_test], labels[~is_test], samples["image_id"].to_numpy()[~is_test], grid,
            cv_folds=3, seed=0,
        )
        accuracy[precision] = float((pipeline.predict(X[is_test]) == labels[is_test]).mean())
        rows.append({
            "benchmark": NAME, "backbone": backbone, "layer": layer,
            "measurement": "svm_accuracy", "precision": precision, "threads": args.threads,
            "batch_size": 32, "num_workers": args.num_workers,
            "n_images": len(samples), "n_test": int(is_test.sum()), "seconds": seconds,
            "images_per_s": len(samples) / seconds, "accuracy": accuracy[precision],
            "weights": "imagenet", "data": source,
        })
    rows[1]["accuracy_diff_points"] = 100 * (accuracy["bf16"] - accuracy["fp32"])
    rows[1]["ratio"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    rows[1]["baseline"] = "svm_accuracy fp32"
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--images", type=int, default=64, help="images per throughput run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1, help="workflow default: 1")
    parser.add_argument("--naive-images", type=int, default=12)
    parser.add_argument("--accuracy-images", type=int, default=400,
                        help="images for the fp32/bf16 SVM accuracy part (0 skips it)")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-threads1", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        # paper_cnn (64 px) keeps the smoke run to seconds; the accuracy part still uses
        # efficientnet_lite0's real weights, on 3 images per class.
        args.backbones, args.images, args.batch_size, args.naive_images = ["paper_cnn"], 4, 2, 2
        args.num_workers = 0
        args.accuracy_images = min(args.accuracy_images, 24)

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
        "fraction_of_ceiling", "ratio", "baseline", "accuracy",
    ])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
