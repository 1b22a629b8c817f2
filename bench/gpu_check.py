"""GPU check: run this first when a session is lent a device (< 5 minutes on one GPU).

One script, one CSV (``bench/results/gpu_check.csv``), every row with the machine columns of
``bench/common.py`` plus the GPU's name:

- ``features``: for every backbone family, CUDA extraction (``leukotype.features.
  extract_features``, the workflow's path) in fp32 and bf16 against the CPU's fp32 features of
  the same samples: max relative difference (max |gpu - cpu| / max |cpu|), and images/s on the
  device against images/s on the CPU in the same run (``ratio``);
- ``finetune_resume``: one epoch of ``last_block`` fine-tuning, stopped, then resumed from its
  checkpoint for a second epoch, against an uninterrupted two-epoch run (loss difference);
- ``scalable_svm``: ``fit_svm(solver="scalable")`` on GPU-extracted features against the same
  on CPU-extracted features (accuracy on a grouped hold-out);
- ``gpu_memory``: ``nvidia-smi`` memory used / total and torch's peak allocation.

Without a GPU (``--dry-run``, or no CUDA device visible) the same code runs tiny on the CPU
against itself, so the test suite (``tests/test_bench_smoke.py``) keeps it from rotting.

    python bench/gpu_check.py              # on a GPU machine
    python bench/gpu_check.py --dry-run    # CPU, seconds
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NAME = "gpu_check"
#: One backbone per family the workflow extracts (the combined one reuses its parts' features).
FAMILIES = ("alexnet", "vgg16", "resnet101", "inception_v3", "efficientnet_lite0", "paper_cnn")
DRY_FAMILIES = ("paper_cnn", "efficientnet_lite0")


def _features(samples, backbone: str, out: Path, device: str, precision: str,
              num_workers: int, threads: int, weights=None) -> tuple[np.ndarray, float]:
    from leukotype.backbones import get_spec
    from leukotype.feature_store import load_features
    from leukotype.features import extract_features

    layer = get_spec(backbone).default_layer
    started = time.perf_counter()
    extract_features(samples, backbone, weights, [layer], out, batch_size=32,
                     num_workers=num_workers, device=device, threads=threads,
                     precision=precision, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return load_features([out], layer, samples[["image_id", "transform"]]), seconds


def feature_rows(images, args, device: str, scratch: Path) -> list[dict]:
    rows = []
    cpu_samples = common.sample_table(images.head(args.cpu_images))
    dev_samples = common.sample_table(images.head(args.device_images), args.transforms)
    for backbone in args.backbones:
        cpu, cpu_s = _features(cpu_samples, backbone, scratch / f"{backbone}-cpu", "cpu",
                               "fp32", args.num_workers, args.threads)
        cpu_rate = len(cpu_samples) / cpu_s
        for precision in ("fp32", "bf16"):
            ref, _ = _features(cpu_samples, backbone, scratch / f"{backbone}-{precision}-ref",
                               device, precision, args.num_workers, args.threads)
            rel = float(np.abs(ref - cpu).max() / max(float(np.abs(cpu).max()), 1e-12))
            _, dev_s = _features(dev_samples, backbone, scratch / f"{backbone}-{precision}",
                                 device, precision, args.num_workers, args.threads)
            rate = len(dev_samples) / dev_s
            rows.append({"measurement": "features", "backbone": backbone, "device": device,
                         "precision": precision, "weights": "none (seed 0)",
                         "n_compared": len(cpu_samples), "max_rel_diff": rel,
                         "n_images": len(dev_samples), "images_per_s": rate,
                         "cpu_images_per_s": cpu_rate, "ratio": rate / cpu_rate,
                         "baseline": "cpu fp32 extraction, same run",
                         "load_avg_1m": common.load_avg()})
            print(f"{backbone:20s} {precision} max rel diff {rel:.2e}  {rate:8.1f} img/s "
                  f"({rate / cpu_rate:.1f}x cpu)", flush=True)
    return rows


def finetune_rows(images, args, device: str, scratch: Path) -> list[dict]:
    from leukotype.finetune import FinetuneConfig, Samples, build_finetune_model, train

    classes = sorted(images["label"].unique())
    table = common.sample_table(images.head(args.finetune_images))
    samples = Samples.from_frame(table, classes)
    cfg = FinetuneConfig(policy="last_block", epochs=2, batch_size=8, device=device,
                         seed=0, threads=args.threads)
    backbone = args.finetune_backbone

    def run(folder: str, max_epochs: int | None):
        model, prep = build_finetune_model(backbone, len(classes), "last_block", None, seed=0)
        return train(model, samples, cfg, preprocess=prep, checkpoint_dir=scratch / folder,
                     max_epochs_this_run=max_epochs)

    started = time.perf_counter()
    first = run("resumed", 1)
    one_epoch_s = time.perf_counter() - started
    resumed = run("resumed", None)
    straight = run("straight", None)
    loss = "train_loss"
    diff = float(abs(resumed.history[loss].iloc[-1] - straight.history[loss].iloc[-1]))
    row = {"measurement": "finetune_resume", "backbone": backbone, "device": device,
           "precision": "fp32", "policy": "last_block", "n_images": len(samples),
           "seconds": one_epoch_s, "stopped_after_epochs": len(first.history),
           "first_completed": bool(first.completed), "resumed_from_epoch":
           int(resumed.resumed_from_epoch), "resumed_completed": bool(resumed.completed),
           "epochs_in_history": len(resumed.history), "train_loss_abs_diff": diff,
           "ok": bool(not first.completed and resumed.completed and
                      resumed.resumed_from_epoch == 1 and len(resumed.history) == 2),
           "load_avg_1m": common.load_avg()}
    print(f"finetune last_block: 1 epoch {one_epoch_s:.1f} s, resumed from epoch "
          f"{row['resumed_from_epoch']}, loss diff vs straight run {diff:.2e}", flush=True)
    return [row]


def svm_rows(images, args, device: str, scratch: Path) -> list[dict]:
    from leukotype.classify import fit_svm
    from leukotype.errors import LeukotypeError
    from leukotype.split import holdout_split
    from leukotype.weights import resolve_weights

    try:  # real features where the packaged ImageNet weights are installed
        weights, weights_name = resolve_weights("efficientnet_lite0", "imagenet"), "imagenet"
    except LeukotypeError:
        weights, weights_name = None, "none (seed 0)"

    chosen = images.head(args.svm_images)
    samples = common.sample_table(chosen)
    labels = samples["label"].to_numpy()
    test = holdout_split(labels, samples["image_id"].to_numpy(), test_size=0.25, seed=0)
    rows = {}
    for where in ("cpu", device):
        X, _ = _features(samples, "efficientnet_lite0", scratch / f"svm-{where}", where,
                         "fp32", args.num_workers, args.threads, weights)
        started = time.perf_counter()
        pipeline, cv = fit_svm(X[~test], labels[~test], samples["image_id"].to_numpy()[~test],
                               {"kernel": ["linear", "rbf"], "C": [1.0]}, cv_folds=2,
                               solver="scalable", n_components=min(256, int((~test).sum())))
        rows[where] = {"accuracy": float((pipeline.predict(X[test]) == labels[test]).mean()),
                       "seconds": time.perf_counter() - started,
                       "solver": str(cv["solver"].iloc[0])}
    row = {"measurement": "scalable_svm", "backbone": "efficientnet_lite0", "device": device,
           "precision": "fp32", "weights": weights_name, "n_images": len(samples), "n_test": int(test.sum()),
           "accuracy": rows[device]["accuracy"], "cpu_accuracy": rows["cpu"]["accuracy"],
           "accuracy_diff_points": 100 * (rows[device]["accuracy"] - rows["cpu"]["accuracy"]),
           "seconds": rows[device]["seconds"], "solver": rows[device]["solver"],
           "load_avg_1m": common.load_avg()}
    print(f"scalable SVM on {device} features: accuracy {row['accuracy']:.3f} "
          f"(cpu features {row['cpu_accuracy']:.3f})", flush=True)
    return [row]


def memory_rows(device: str) -> list[dict]:
    row = {"measurement": "gpu_memory", "device": device}
    if device.startswith("cuda"):
        row["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["gpu_name"] = torch.cuda.get_device_name()
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.used,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            name, used, total, driver = [x.strip() for x in out.stdout.splitlines()[0].split(",")]
            row.update({"gpu_name": name, "nvidia_smi_used_mib": float(used),
                        "nvidia_smi_total_mib": float(total), "driver": driver})
    else:
        row["nvidia_smi"] = "not found"
    return [row]


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU against itself, tiny sizes (what the test suite runs)")
    parser.add_argument("--backbones", nargs="+", default=list(FAMILIES))
    parser.add_argument("--cpu-images", type=int, default=16, help="images compared with the CPU")
    parser.add_argument("--device-images", type=int, default=128)
    parser.add_argument("--transforms", nargs="+", default=["identity", "rot90", "rot180", "rot270"])
    parser.add_argument("--finetune-backbone", default="resnet101")
    parser.add_argument("--finetune-images", type=int, default=64)
    parser.add_argument("--svm-images", type=int, default=800)
    parser.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if args.quick or device == "cpu":
        args.dry_run = True
        args.backbones = [b for b in args.backbones if b in DRY_FAMILIES] or list(DRY_FAMILIES)
        args.cpu_images = args.device_images = 4
        args.transforms = ["identity"]
        args.finetune_backbone, args.finetune_images = "efficientnet_lite0", 8
        args.svm_images, args.num_workers = 48, 0
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="leukotype-gpu-check-") as tmp:
        scratch = Path(tmp)
        images, source = common.image_table(args.data, max(args.device_images, args.svm_images,
                                                           args.finetune_images), scratch)
        for part in (feature_rows, finetune_rows, svm_rows):
            rows += part(images, args, device, scratch)
        rows += memory_rows(device)
    total = time.perf_counter() - started
    for row in rows:
        row.update({"benchmark": NAME, "data": source, "dry_run": args.dry_run,
                    "threads": args.threads, "total_seconds": total})
    path = common.write_results(rows, NAME, args.out)
    print(f"wrote {path} ({total:.0f} s)")
    return path


if __name__ == "__main__":
    main()
