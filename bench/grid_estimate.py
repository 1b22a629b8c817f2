"""Wall-time estimate of the paper grid from measured per-job unit costs.

Unit costs are measured here, at ``--threads`` threads, with random weights (``weights: none``;
speed does not depend on the weight values) on a small sample of real images:

- ``extract/<backbone>``: seconds per sample of ``leukotype.features.extract_features``
  (excluding the one-off model build, listed separately as ``build/<backbone>``);
- ``trunk/<backbone>``: seconds per sample through a fine-tuning model's frozen trunk
  (``leukotype.finetune.finetuned_features``) -- what fine-tuning pays per sample and pass when
  it does NOT reuse the extracted features;
- ``head_epoch``: seconds per sample-epoch of training a linear head on cached features;
- ``paper_cnn_epoch``: seconds per sample-epoch of training the paper's CNN (64 px, from scratch);
- ``svm/<dim>``: ``leukotype.classify.fit_svm`` with the default grid (C 0.1/1/10 x linear/rbf,
  3 inner folds) on synthetic class-structured features at two training sizes; a power law
  through the two points extrapolates to other sizes;
- ``evaluate``: ``leukotype.metrics.evaluate_predictions`` with 1000 bootstrap resamples;
- ``job_start/<kind>``: a fresh interpreter importing what that kind of job script imports
  (``torch``: extraction and fine-tuning; ``svm``: SVM training, including skops for the model
  file; ``evaluate``: metrics and figures).

The grid (jobs x samples) comes from the config (``leukotype.config.study_runs``): every image is
extracted under every transform (identity + 3 rotations = 4 samples per image, per backbone);
a task's training part is 75 % (hold-out) or 80 % (5-fold) of its images x 4 transforms, its test
part the rest at identity. Every task is assumed to use all images (an upper bound). Fine-tuning
with policy ``head`` is costed two ways: reusing the extracted features (what the workflow does
when ``finetune_reuses_features``), and running the trunk itself (one pass over every sample of
the fold, ``leukotype.finetune.finetune_fold``: training, predictions and features then read
those activations).

    python bench/grid_estimate.py                 # 633 images; 10k and 100k extrapolated
    python bench/grid_estimate.py --quick
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from leukotype import catalog  # noqa: E402
from leukotype.backbones import build_model, get_spec  # noqa: E402
from leukotype.config import load_config, study_runs  # noqa: E402
from leukotype.features import extract_features  # noqa: E402
from leukotype.finetune import (  # noqa: E402
    FinetuneConfig,
    Samples,
    build_finetune_model,
    finetuned_features,
    train,
)

NAME = "grid_estimate"
N_TRANSFORMS = 4
EPOCHS = 20


# ------------------------------------------------------------------------------- unit costs


def extraction_unit(backbone: str, samples: pd.DataFrame, scratch: Path, threads: int) -> tuple[float, float]:
    """(seconds per sample excluding build, build seconds) for extract_features."""
    spec = get_spec(backbone)
    with common.torch_threads(threads):
        build = common.timed(lambda: build_model(spec, None, seed=0))
    wall = common.timed(lambda: extract_features(
        samples, backbone, None, [spec.default_layer], scratch / f"x_{backbone}",
        batch_size=32, num_workers=1 if len(samples) > 8 else 0, threads=threads, progress=False,
    ))
    return max(wall - build, 1e-9) / len(samples), build


def trunk_unit(backbone: str, samples: Samples, threads: int) -> float:
    """Seconds per sample through a head-policy fine-tuning model's frozen trunk."""
    with common.torch_threads(threads):
        model, prep = build_finetune_model(backbone, 5, "head", None, seed=0)
        finetuned_features(model, Samples(samples.image_ids[:2], samples.abspaths[:2],
                                          samples.transforms[:2]), prep, device="cpu")  # warm-up
        seconds = common.timed(lambda: finetuned_features(model, samples, prep, batch_size=30,
                                                          device="cpu"))
    return seconds / len(samples)


def head_epoch_unit(dim: int, n: int, threads: int) -> float:
    """Seconds per sample-epoch of SGD on a linear head over cached (n, dim) features."""
    with common.torch_threads(threads):
        features, labels = torch.randn(n, dim), torch.randint(0, 5, (n,))
        head = torch.nn.Linear(dim, 5)
        optimizer = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)

        def epoch() -> None:
            for index in torch.randperm(n).split(30):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(head(features[index]), labels[index]).backward()
                optimizer.step()

        return common.best_of(epoch, 3) / n


def paper_cnn_unit(samples: Samples, threads: int) -> float:
    """Seconds per sample-epoch of training the paper's CNN (ordinary path, images decoded)."""
    model, prep = build_finetune_model("paper_cnn", 5, "all", None, seed=0)
    cfg = FinetuneConfig(policy="all", epochs=2, batch_size=30, device="cpu", threads=threads)
    seconds = common.timed(lambda: train(model, samples, cfg, preprocess=prep))
    return seconds / (2 * len(samples))


def synthetic_features(n_images: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-structured Gaussian features, 4 correlated rows (transforms) per image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % 5  # balanced, so every class has enough groups
    centres = rng.normal(0, 1, (5, dim))
    images = centres[labels] * 0.3 + rng.normal(0, 1, (n_images, dim))
    rows = np.repeat(images, N_TRANSFORMS, axis=0) + rng.normal(0, 0.3, (n_images * N_TRANSFORMS, dim))
    return rows.astype(np.float32), np.repeat(labels, N_TRANSFORMS), np.repeat(np.arange(n_images), N_TRANSFORMS)


def svm_seconds(n_samples: int, dim: int, threads: int) -> float:
    from leukotype.classify import fit_svm

    X, y, groups = synthetic_features(max(2, n_samples // N_TRANSFORMS), dim)
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"], "gamma": ["scale"]}
    return common.timed(lambda: fit_svm(X, y.astype(str), groups, grid, cv_folds=3, seed=0, n_jobs=threads))


def evaluate_seconds(n_test: int) -> float:
    from leukotype.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    classes = ["L1", "L2", "M2", "M3", "M5"]
    true = rng.choice(classes, n_test)
    pred = np.where(rng.random(n_test) < 0.8, true, rng.choice(classes, n_test))
    table = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(n_test)],
                          "transform": "identity", "true": true, "pred": pred})
    for c in classes:
        table[f"score_{c}"] = rng.normal(size=n_test)
    meta = {"task": "subtype", "strategy": "features_svm", "backbone": "x", "layer": "y",
            "fold": "holdout"}
    return common.timed(lambda: evaluate_predictions(table, classes, meta, n_boot=1000, seed=0))


#: What each kind of job script imports before it does any work.
JOB_IMPORTS = {
    "torch": "import leukotype.smk, leukotype.stages, leukotype.features, leukotype.finetune",
    "svm": "import leukotype.smk, leukotype.stages, leukotype.classify, leukotype.feature_store, skops.io",
    "evaluate": "import leukotype.smk, leukotype.stages, leukotype.metrics, leukotype.report",
}


def job_start_seconds(kind: str) -> float:
    """Fresh interpreter + the imports of one kind of job (best of 2: the first warms the disk cache)."""

    def start() -> None:
        subprocess.run([sys.executable, "-c", JOB_IMPORTS[kind]], check=True)

    return common.best_of(start, 2)


def job_kind(job: dict) -> str:
    if job["unit"].startswith("svm/"):
        return "svm"
    return "evaluate" if job["unit"] == "evaluate" else "torch"


# ------------------------------------------------------------------------------ composition


def grid_jobs(cfg: dict, n_images: int, kfold: bool) -> list[dict]:
    """One entry per job type: count, samples per job, and which unit costs apply."""
    runs = study_runs(cfg)
    n_folds = 5 if kfold else 1
    train_frac = 0.8 if kfold else 0.75
    n_train = round(train_frac * n_images) * N_TRANSFORMS
    n_test = n_images - round(train_frac * n_images)
    extracted = sorted({part for r in runs if r.strategy == "features_svm"
                        for part in catalog.parts(r.backbone)})
    jobs = [{"job": f"extract_features/{b}", "count": 1, "samples": n_images * N_TRANSFORMS,
             "unit": f"extract/{b}", "fixed": f"build/{b}"} for b in extracted]
    finetuned = sorted({(r.task, r.backbone) for r in runs if r.strategy == "finetune"})
    backbones = sorted({b for _, b in finetuned})
    for b in backbones:
        count = sum(1 for _, bb in finetuned if bb == b) * n_folds
        if catalog.is_from_scratch(b):
            jobs.append({"job": "finetune/paper_cnn", "count": count,
                         "samples": n_train * EPOCHS, "unit": "paper_cnn_epoch",
                         "extra_samples": n_train + 2 * n_test, "extra_unit": "paper_cnn_infer"})
            continue
        dim = catalog.get(b).layers[catalog.penultimate_layer(b)]
        jobs.append({"job": f"finetune/{b} (reuses features)", "count": count,
                     "samples": n_train * EPOCHS, "unit": f"head_epoch/{dim}", "variant": "reuse"})
        jobs.append({"job": f"finetune/{b} (runs trunk)", "count": count,
                     "samples": n_train * EPOCHS, "unit": f"head_epoch/{dim}",
                     "extra_samples": n_train + n_test, "extra_unit": f"trunk/{b}",
                     "variant": "trunk"})
    svm_runs = [r for r in runs if r.strategy in ("features_svm", "finetune_svm")]
    dims: dict[int, int] = {}
    for r in svm_runs:
        if r.strategy == "features_svm":
            dim = catalog.get(r.backbone).layers[r.layer]
        else:
            dim = catalog.get(r.backbone).layers[catalog.penultimate_layer(r.backbone)]
        dims[dim] = dims.get(dim, 0) + 1
    for dim, count in sorted(dims.items()):
        jobs.append({"job": f"train_svm (dim {dim})", "count": count * n_folds, "samples": n_train,
                     "unit": f"svm/{dim}"})
    jobs.append({"job": "evaluate", "count": len(runs) * n_folds if kfold else len(runs),
                 "samples": n_test, "unit": "evaluate"})
    return jobs


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs" / "paper.yaml")
    parser.add_argument("--images", type=int, default=16, help="images per unit-cost measurement")
    parser.add_argument("--paper-images", type=int, default=633)
    parser.add_argument("--scales", type=int, nargs="+", default=[633, 10_000, 100_000])
    parser.add_argument("--svm-sizes", type=int, nargs=2, default=[600, 2400],
                        help="two training sizes (samples) for the SVM power law")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.svm_sizes, args.scales = 4, [80, 160], [633]

    cfg = load_config(args.config)
    cfg["split"] = {**cfg["split"], "method": "holdout"}  # folds are multiplied in grid_jobs
    if args.quick:
        cfg["models"] = [m for m in cfg["models"] if m["backbone"] in ("alexnet", "paper_cnn")]
    t = args.threads
    units: dict[str, float] = {}
    rows: list[dict] = []
    with common.workdir() as scratch:
        images, source = common.image_table(args.data, args.images, scratch)
        table = common.sample_table(images, ["identity", "rot90", "rot180", "rot270"]).head(
            max(4, args.images))
        samples = Samples.from_frame(table, sorted(table["label"].unique()))
        runs = study_runs(cfg)
        extract = sorted({p for r in runs if r.strategy == "features_svm"
                          for p in catalog.parts(r.backbone)})
        trunks = sorted({p for r in runs if r.strategy == "finetune" and not catalog.is_from_scratch(r.backbone)
                         for p in catalog.parts(r.backbone)})
        for b in extract:
            print(f"[{NAME}] extract {b} ...", flush=True)
            units[f"extract/{b}"], units[f"build/{b}"] = extraction_unit(b, table, scratch, t)
        for b in trunks:
            print(f"[{NAME}] trunk {b} ...", flush=True)
            units[f"trunk/{b}"] = trunk_unit(b, samples, t)
        for r in runs:
            if r.strategy == "finetune" and catalog.is_combined(r.backbone):
                units[f"trunk/{r.backbone}"] = sum(units[f"trunk/{p}"] for p in catalog.parts(r.backbone))
        print(f"[{NAME}] heads, paper_cnn, svm, evaluate ...", flush=True)
        for dim in sorted({4096, 2048, 5808}):
            units[f"head_epoch/{dim}"] = head_epoch_unit(dim, 2000 if not args.quick else 200, t)
        units["paper_cnn_epoch"] = paper_cnn_unit(samples, t)
        units["paper_cnn_infer"] = units["paper_cnn_epoch"] / 3  # forward only ~ 1/3 of a step
        svm_fit: dict[int, tuple[float, float]] = {}
        # --quick fits one dimension and uses it for all (the smoke run checks the plumbing).
        for dim in (4096,) if args.quick else (2048, 4096, 5808):
            (n1, n2) = args.svm_sizes
            s1, s2 = svm_seconds(n1, dim, 1), svm_seconds(n2, dim, 1)
            exponent = float(np.log(max(s2, 1e-6) / max(s1, 1e-6)) / np.log(n2 / n1))
            svm_fit[dim] = (s1 / n1**exponent, exponent)
            rows.append({"benchmark": NAME, "measurement": "unit", "unit": f"svm/{dim}",
                         "seconds": s2, "n": n2, "seconds_small": s1, "n_small": n1,
                         "exponent": exponent, "threads": 1})
        units["evaluate"] = evaluate_seconds(158)
        for kind in JOB_IMPORTS:
            units[f"job_start/{kind}"] = job_start_seconds(kind)
    per_job_units = ("build/", "evaluate", "job_start")
    for name, value in units.items():
        column = "seconds" if name.startswith(per_job_units) else "seconds_per_sample"
        rows.append({"benchmark": NAME, "measurement": "unit", "unit": name, column: value,
                     "threads": t, "weights": "none", "data": source, "load_avg_1m": common.load_avg()})

    def cost(job: dict) -> float:
        unit = job["unit"]
        if unit.startswith("svm/"):
            a, k = svm_fit.get(int(unit.split("/")[1]), svm_fit[4096])
            per_job = a * job["samples"] ** k
        elif unit == "evaluate":
            per_job = units["evaluate"]
        else:
            per_job = units[unit] * job["samples"]
        per_job += units.get(job.get("fixed", ""), 0.0)
        if "extra_unit" in job:
            per_job += units[job["extra_unit"]] * job["extra_samples"]
        return per_job + units[f"job_start/{job_kind(job)}"]

    for n_images in args.scales:
        for kfold in (False, True):
            scheme = "kfold5" if kfold else "holdout"
            jobs = grid_jobs(cfg, n_images, kfold)
            totals = {"reuse": 0.0, "trunk": 0.0}
            for job in jobs:
                per_job = cost(job)
                total = per_job * job["count"]
                variant = job.get("variant")
                for key in totals:
                    if variant in (None, key):
                        totals[key] += total
                rows.append({"benchmark": NAME, "measurement": "grid_job", "images": n_images,
                             "scheme": scheme, "job": job["job"], "count": job["count"],
                             "samples_per_job": job["samples"], "unit": job["unit"],
                             "seconds_per_job": per_job, "seconds_total": total,
                             "variant": variant or "both", "threads": t})
            for variant, total in totals.items():
                rows.append({"benchmark": NAME, "measurement": "grid_total", "images": n_images,
                             "scheme": scheme, "variant": variant, "seconds_total": total,
                             "hours_total": total / 3600, "threads": t})
    path = common.write_results(rows, NAME, args.out)
    common.print_table([r for r in rows if r["measurement"] == "unit"],
                       ["unit", "seconds_per_sample", "seconds", "exponent"])
    common.print_table([r for r in rows if r["measurement"] == "grid_total"],
                       ["images", "scheme", "variant", "hours_total"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
