"""Fine-tuning fast path (cached frozen activations) vs ordinary training, same data and seed;
and the whole fine-tuning job with the frozen layers run once vs twice.

Part ``train`` (``finetune_fastpath.csv``): the paper's setting, SGD momentum 0.9, lr 1e-3,
batch 30, 20 epochs, policy ``head`` (every pretrained layer frozen, a new fully connected head
trains); also ``last_block``. Both paths train the same trainable layers from the same initial
state on the same batches, so they should agree to float noise; the ratio of their
``leukotype.finetune.train`` wall times is the speed-up, and their hold-out accuracies (75/25,
``leukotype.split.holdout_split``) should agree.

Part ``job`` (``finetune_fastpath_job.csv``): what one ``finetune`` job of the workflow does
for ``last_block`` on images with rotations -- build the model, train, predict the test part,
compute the fine-tuned features of every sample, write the files -- timed whole, two ways:
``two_pass`` (the previous release: ``train`` caches the training samples' frozen activations,
then predictions and features run the whole network from the images again,
``finetune.job.finetune_fold_from_images``) and ``one_pass`` (``finetune.finetune_fold``:
the frozen layers run once per sample of the job). The rows record whether model, predictions
and features are bit-identical, how often the frozen layers ran, and, per backbone, how many
bytes per sample the last block's input would take if extraction stored it (so that a
``last_block`` job decoded nothing) against the seconds per sample that would save.

    python bench/finetune_fastpath.py             # efficientnet_lite0 (ImageNet), both parts
    python bench/finetune_fastpath.py --part job --job-images 200 --job-epochs 5
    python bench/finetune_fastpath.py --quick
    python bench/finetune_fastpath.py --backbone resnet101 --weights none --images 24
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from leukotype.finetune import (  # noqa: E402
    FinetuneConfig,
    FoldSamples,
    Samples,
    build_finetune_model,
    finetune_fold,
    predict,
    save_finetuned,
    split_stages,
    train,
)
from leukotype.finetune.job import finetune_fold_from_images  # noqa: E402
from leukotype.finetune.outputs import write_features  # noqa: E402
from leukotype.io import write_tsv  # noqa: E402
from leukotype.split import holdout_split  # noqa: E402
from leukotype.weights import resolve_weights  # noqa: E402

NAME = "finetune_fastpath"
JOB_NAME = "finetune_fastpath_job"
TRANSFORMS = ("identity", "rot90", "rot180", "rot270")
#: Backbones whose last block's input size is reported (shapes from a meta-device forward).
STORE_BACKBONES = ("alexnet", "vgg16", "inception_v3", "resnet101", "efficientnet_lite0")
#: Samples of the full PBC data set with the paper's rotations (17,092 images x 4).
FULL_PBC_SAMPLES = 17_092 * 4


def run_once(backbone, weights, classes, train_samples, test_samples, cfg) -> dict:
    """Build a fresh model (same seed), train, predict the test part; timings and accuracy."""
    model, prep = build_finetune_model(backbone, len(classes), cfg.policy, weights, seed=cfg.seed)
    trained = {}

    def fit() -> None:
        trained["result"] = train(model, train_samples, cfg, preprocess=prep)

    seconds = common.timed(fit)
    outcome = trained["result"]
    predictions = predict(outcome.model, test_samples, prep, classes, batch_size=cfg.batch_size,
                          device="cpu")
    accuracy = float((predictions["pred"] == predictions["true"]).mean())
    return {
        "seconds": seconds,
        "cache_seconds": outcome.cache_seconds,
        "fast_path_used": outcome.fast_path,
        "final_train_loss": float(outcome.history["train_loss"].iloc[-1]),
        "accuracy": accuracy,
    }


def run_job(kind: str, backbone, weights, classes, fold: FoldSamples, cfg, out: Path) -> dict:
    """One whole fine-tuning job (build, train, predict, features, files); time and outputs."""
    job_fn = finetune_fold if kind == "one_pass" else finetune_fold_from_images
    held = {"frozen_samples": 0}

    def whole() -> None:
        model, prep = build_finetune_model(backbone, len(classes), cfg.policy, weights, seed=cfg.seed)

        def count(module, inputs, output) -> None:
            held["frozen_samples"] += len(output)

        model.frozen.register_forward_hook(count)
        job = job_fn(model, prep, fold, classes, cfg, checkpoint_dir=out / "checkpoint")
        save_finetuned(model, out / "model.pt")
        write_tsv(job.train.history, out / "history.tsv")
        write_tsv(job.predictions, out / "predictions.tsv")
        write_features(out / "features", job.feature_index, job.features)
        held["job"] = job

    seconds = common.timed(whole)
    job = held["job"]
    return {
        "seconds": seconds,
        "frozen_samples": held["frozen_samples"],
        "cache_seconds": job.train.cache_seconds,
        "accuracy": float((job.predictions["pred"] == job.predictions["true"]).mean()),
        "job": job,
    }


def warm_up(backbone, weights, fold: FoldSamples) -> None:
    """Read every image once (page cache) and run the network once, so the first timed job
    pays no cold-start cost the second does not."""
    import torch

    model, prep = build_finetune_model(backbone, 2, "last_block", weights, seed=0)
    every = fold.all()
    data = every.dataset(prep)
    for path in dict.fromkeys(every.abspaths):
        Path(path).read_bytes()
    with torch.inference_mode():
        model.eval()(torch.stack([data[i][0] for i in range(min(4, len(every)))]))


def jobs_identical(a, b) -> bool:
    """Model state, predictions and features equal bit for bit."""
    import numpy as np
    import torch

    states = zip(a.train.model.state_dict().values(), b.train.model.state_dict().values())
    return (
        all(torch.equal(x, y) for x, y in states)
        and a.predictions.equals(b.predictions)
        and np.array_equal(a.features, b.features)
    )


def last_block_input_bytes(backbone: str) -> tuple[int, int]:
    """(bytes per sample of the last block's input, of the penultimate features), float32."""
    import torch

    from leukotype import backbones

    spec = backbones.get_spec(backbone)
    with torch.device("meta"):  # shapes only: no weights are allocated or computed
        net = spec.builder(0).eval()
        frozen, trainable = split_stages(backbones.stages(spec, net), "last_block")
        h = frozen(torch.empty(1, 3, spec.input_size, spec.input_size))
        f = trainable(h)
    return h[0].numel() * 4, f[0].numel() * 4


def job_part(args, weights, scratch: Path) -> Path:
    images, source = common.image_table(args.data, args.job_images, scratch / "job_data")
    is_test = holdout_split(images["label"].to_numpy(), images["image_id"].to_numpy(),
                            test_size=0.25, seed=0)
    classes = sorted(images["label"].unique())
    fold = FoldSamples(
        train=Samples.from_frame(common.sample_table(images[~is_test], TRANSFORMS), classes),
        val=None,
        test=Samples.from_frame(common.sample_table(images[is_test]), classes),
    )
    cfg = FinetuneConfig(policy="last_block", epochs=args.job_epochs, batch_size=args.batch_size,
                         lr=1e-3, momentum=0.9, seed=0, device="cpu", threads=args.threads)
    n_samples = len(fold.all())
    warm_up(args.backbone, weights, fold)
    rows, outcomes = [], {}
    for kind in ("two_pass", "one_pass"):
        print(f"[{JOB_NAME}] {args.backbone} last_block job {kind} ...", flush=True)
        # The process runs at the job's thread count, as a Snakemake job does (OMP_NUM_THREADS
        # = the rule's threads), so both paths compute with the same kernels.
        with common.torch_threads(args.threads):
            outcomes[kind] = run_job(kind, args.backbone, weights, classes, fold, cfg, scratch / kind)
        outcome = {k: v for k, v in outcomes[kind].items() if k != "job"}
        rows.append({
            "benchmark": JOB_NAME, "backbone": args.backbone, "policy": "last_block",
            "measurement": kind, "epochs": args.job_epochs, "batch_size": args.batch_size,
            "threads": args.threads, "n_images": len(images),
            "n_train_samples": len(fold.train), "n_test": len(fold.test),
            "n_job_samples": n_samples, "transforms": "+".join(TRANSFORMS),
            "weights": args.weights, "data": source, "load_avg_1m": common.load_avg(),
            **outcome,
        })
    two, one = outcomes["two_pass"], outcomes["one_pass"]
    rows[-1].update({
        # samples of the parts' batches that are not batches of the whole job run again
        # (finetune.job.fold_activations), so that every value equals the two-pass path's
        "repeated_samples": one["frozen_samples"] - n_samples,
        "baseline": "two_pass",
        "ratio": two["seconds"] / one["seconds"],
        "seconds_saved": two["seconds"] - one["seconds"],
        "bit_identical": jobs_identical(one["job"], two["job"]),
    })
    # Would extraction storing the last block's input (so the job decodes nothing) pay off?
    seconds_per_sample = one["cache_seconds"] / n_samples
    for backbone in STORE_BACKBONES:
        block_bytes, feature_bytes = last_block_input_bytes(backbone)
        rows.append({
            "benchmark": JOB_NAME, "backbone": backbone, "policy": "last_block",
            "measurement": "store_last_block_input", "bytes_per_sample": block_bytes,
            "penultimate_bytes_per_sample": feature_bytes,
            "bytes_ratio_to_penultimate": block_bytes / feature_bytes,
            "gb_this_job": block_bytes * n_samples / 1e9,
            "gb_full_pbc_rotations": block_bytes * FULL_PBC_SAMPLES / 1e9,
            # measured for the benchmarked backbone only: the frozen pass the job would skip
            "seconds_saved_per_sample_per_job": (
                seconds_per_sample if backbone == args.backbone else float("nan")
            ),
        })
    path = common.write_results(rows, JOB_NAME, args.out)
    common.print_table(rows, ["backbone", "measurement", "n_job_samples", "seconds",
                              "cache_seconds", "frozen_samples", "repeated_samples", "ratio", "bit_identical",
                              "bytes_per_sample", "gb_full_pbc_rotations",
                              "seconds_saved_per_sample_per_job"])
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet | none")
    parser.add_argument("--images", type=int, default=40, help="images (75%% train x 4 rotations)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--policies", nargs="+", default=["head", "last_block"])
    parser.add_argument("--part", choices=["train", "job", "all"], default="all")
    parser.add_argument("--job-images", type=int, default=200,
                        help="images of the whole-job measurement (75%% train x 4 rotations)")
    parser.add_argument("--job-epochs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.policies = 16, 1, ["head"]
        args.job_images, args.job_epochs = 16, 1

    weights = resolve_weights(args.backbone, args.weights)
    path = None
    if args.part in ("job", "all"):
        with common.workdir() as scratch:
            path = job_part(args, weights, scratch)
    if args.part in ("train", "all"):
        path = train_part(args, weights)
    return path


def train_part(args, weights) -> Path:
    rows = []
    with common.workdir() as scratch:
        images, source = common.image_table(args.data, args.images, scratch)
        is_test = holdout_split(images["label"].to_numpy(), images["image_id"].to_numpy(),
                                test_size=0.25, seed=0)
        classes = sorted(images["label"].unique())
        train_table = common.sample_table(images[~is_test], TRANSFORMS)
        test_table = common.sample_table(images[is_test])
        train_samples = Samples.from_frame(train_table, classes)
        test_samples = Samples.from_frame(test_table, classes)
        for policy in args.policies:
            outcomes = {}
            for fast in (False, True):
                cfg = FinetuneConfig(policy=policy, epochs=args.epochs, batch_size=args.batch_size,
                                     lr=1e-3, momentum=0.9, seed=0, device="cpu",
                                     threads=args.threads, fast_path=fast)
                print(f"[{NAME}] {args.backbone} {policy} fast_path={fast} ...", flush=True)
                outcome = run_once(args.backbone, weights, classes, train_samples, test_samples, cfg)
                outcomes[fast] = outcome
                rows.append({
                    "benchmark": NAME, "backbone": args.backbone, "policy": policy,
                    "measurement": "fast_path" if fast else "ordinary", "epochs": args.epochs,
                    "batch_size": args.batch_size, "threads": args.threads,
                    "n_train_samples": len(train_samples), "n_test": len(test_samples),
                    "samples_per_s": args.epochs * len(train_samples) / outcome["seconds"],
                    "weights": args.weights, "data": source, "load_avg_1m": common.load_avg(),
                    **outcome,
                })
            rows[-1]["ratio"] = outcomes[False]["seconds"] / outcomes[True]["seconds"]
            rows[-1]["baseline"] = "ordinary"
            rows[-1]["accuracy_diff_points"] = 100 * (
                outcomes[True]["accuracy"] - outcomes[False]["accuracy"]
            )
            rows[-1]["train_loss_abs_diff"] = abs(
                outcomes[True]["final_train_loss"] - outcomes[False]["final_train_loss"]
            )
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["policy", "measurement", "n_train_samples", "seconds", "cache_seconds",
                              "accuracy", "ratio", "accuracy_diff_points", "train_loss_abs_diff"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
