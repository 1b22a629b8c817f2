"""Fine-tuning fast path (cached frozen activations) vs ordinary training, same data and seed.

The paper's setting: SGD momentum 0.9, lr 1e-3, batch 30, 20 epochs, policy ``head`` (every
pretrained layer frozen, a new fully connected head trains); also ``last_block``. Both paths
train the same trainable layers from the same initial state on the same batches, so they should
agree to float noise; the ratio of their ``leukotype.finetune.train`` wall times is the speed-up,
and their hold-out accuracies (75/25, ``leukotype.split.holdout_split``) should agree.

    python bench/finetune_fastpath.py             # efficientnet_lite0 (ImageNet), 40 images
    python bench/finetune_fastpath.py --quick
    python bench/finetune_fastpath.py --backbone resnet101 --weights none --images 24
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from leukotype.finetune import FinetuneConfig, Samples, build_finetune_model, predict, train  # noqa: E402
from leukotype.split import holdout_split  # noqa: E402
from leukotype.weights import resolve_weights  # noqa: E402

NAME = "finetune_fastpath"
TRANSFORMS = ("identity", "rot90", "rot180", "rot270")


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


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet | none")
    parser.add_argument("--images", type=int, default=40, help="images (75%% train x 4 rotations)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--policies", nargs="+", default=["head", "last_block"])
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.policies = 16, 1, ["head"]

    weights = resolve_weights(args.backbone, args.weights)
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
