"""The SVM stage at the sizes of the public datasets: exact vs scalable solver.

Data (``bench/scaling_data.py``): real EfficientNet-Lite0 features of the 800 shared PBC
images under the six lossless views (4,800 rows, 1,280 dimensions), and larger matrices drawn
from them by the generator stated there (same dimension, scale and class structure; their
accuracies describe the generator, not PBC).

1. ``accuracy_real``: exact vs scalable ``fit_svm`` (default grid: linear and rbf, C 0.1/1/10,
   3 grouped inner folds; ``--kernels rbf`` forces the RBF kernel) in 4-fold grouped outer
   cross-validation over the 800 real images (3,600 training rows per fold, every image a test
   image once, identity view): accuracy of each, difference in points with a paired bootstrap
   95 % CI over images; each solver's searches run in a child process (wall and CPU seconds,
   peak RSS).
2. ``size``: ``fit_svm`` at 7k, 24k, 50k and 200k derived training rows, one child process per
   (solver, size) that memory-maps the rows from disk as the workflow's feature store does:
   wall and CPU seconds of the fit (CPU = user + sys: on a shared machine the wall time says
   more about the neighbours), peak RSS (``VmHWM`` of the child itself) and RSS with the data loaded, the solver chosen and
   the held-out accuracy on 2,000 derived rows from other pairs of images. The exact solver
   runs where its kernel matrix fits (``--exact-max``, default 7k rows); at 7k both run.

    python bench/svm_scaling.py                 # ~30 min on 2 idle cores
    python bench/svm_scaling.py --sizes 7000 24000 --skip-accuracy
    python bench/svm_scaling.py --skip-sizes --kernels rbf --tag _rbf   # exact vs Nystroem RBF
    python bench/svm_scaling.py --quick         # smoke test (synthetic features, seconds)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import scaling_data

NAME = "svm_scaling"

CHILD = r"""
import json, resource, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from leukotype.classify import fit_svm, kernel_budget_mb
X = np.load(args["X"], mmap_mode="r")
y = np.load(args["y"]); g = np.load(args["g"])
Xt = np.load(args["Xt"]); yt = np.load(args["yt"])
rows = np.arange(len(X))
X_train = np.asarray(X[rows], dtype=np.float32)   # what load_features hands the SVM
def status(key):  # this process's own memory (ru_maxrss would keep the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
rss_data = status("VmRSS")
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
cpu_started = cpu()
started = time.perf_counter()
grid = None if args["full_grid"] else {"kernel": ["linear", "rbf"], "C": [1.0]}
if args["single"]:  # one fit, no search: time and memory of the solver itself
    grid = {"kernel": [args["single"]], "C": [1.0]}
pipeline, cv = fit_svm(X_train, y, g, grid, cv_folds=3, seed=0, n_jobs=args["threads"],
                       gram_mb=kernel_budget_mb(args["mem_mb"]), solver=args["solver"],
                       n_components=args["n_components"])
fit_s = time.perf_counter() - started
fit_cpu_s = cpu() - cpu_started
started = time.perf_counter()
pred = pipeline.predict(Xt)
predict_s = time.perf_counter() - started
best = cv[cv["selected"]].iloc[0]
print("RESULT " + json.dumps({
    "fit_seconds": fit_s, "fit_cpu_seconds": fit_cpu_s, "predict_seconds": predict_s, "n_test": len(yt),
    "accuracy": float((pred == yt).mean()), "solver": str(best["solver"]),
    "solver_reason": str(best["solver_reason"]), "kernel": str(best["kernel"]),
    "C": float(best["C"]), "cv_score": float(best.get("mean_test_score", float("nan"))),
    "peak_rss_mib": status("VmHWM"),
    "rss_with_data_mib": rss_data}))
"""


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """95 % percentile CI of mean(correct_b) - mean(correct_a), resampling images."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct_a), size=(n_boot, len(correct_a)))
    diffs = correct_b[idx].mean(axis=1) - correct_a[idx].mean(axis=1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


ACCURACY_CHILD = r"""
import json, resource, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from leukotype.classify import fit_svm
X = np.load(args["X"]); labels = np.load(args["y"]); groups = np.load(args["g"])
fold = np.load(args["fold"]); identity = np.load(args["identity"])
def status(key):  # this process's own memory
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
correct, chosen, seconds, cpu_seconds, reasons = [], [], 0.0, 0.0, []
for k in range(args["outer_folds"]):
    train = fold != k
    test = (fold == k) & identity
    cpu_started, started = cpu(), time.perf_counter()
    pipeline, cv = fit_svm(X[train], labels[train], groups[train], args["grid"], cv_folds=3,
                           seed=0, n_jobs=args["threads"], solver=args["solver"],
                           n_components=args["n_components"])
    seconds += time.perf_counter() - started
    cpu_seconds += cpu() - cpu_started
    correct.append(pipeline.predict(X[test]) == labels[test])
    best = cv[cv["selected"]].iloc[0]
    chosen.append(f"{best['kernel']}/C={best['C']:g}")
    reasons.append(str(best["solver_reason"]))
    print(f"outer fold {k} {args['solver']:8s} accuracy {correct[-1].mean():.4f} {chosen[-1]} "
          f"({cpu_seconds:.0f} CPU s so far)", file=sys.stderr, flush=True)
np.save(args["correct"], np.concatenate(correct))
print("RESULT " + json.dumps({"fit_seconds": seconds, "fit_cpu_seconds": cpu_seconds,
                              "selected": ";".join(chosen), "solver_reason": reasons[0],
                              "peak_rss_mib": status("VmHWM")}))
"""


def run_child(code: str, payload: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run one measurement in a fresh interpreter (its own peak RSS and CPU time): the child
    ``code`` gets ``payload`` as JSON; returns the finished process, its wall seconds and the
    1-minute load average before it started."""
    env = {**os.environ}
    env.setdefault("PYTHONPATH", str(common.REPO_ROOT / "src"))
    load = common.load_avg()
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], env=env,
                         capture_output=True, text=True)
    return out, time.perf_counter() - started, load


def accuracy_real(X, table, args, scratch: Path) -> list[dict]:
    """Part 1 (module doc): exact vs scalable on the real rows, 4-fold outer CV; each solver's
    four searches run in a child process of their own (its CPU seconds and peak RSS)."""
    from leukotype.split import kfold_split

    images = table.drop_duplicates("image_id")
    folds = kfold_split(images["label"].to_numpy(), images["image_id"].to_numpy(),
                        n_splits=args.outer_folds, seed=0)[0]
    fold = table["image_id"].map(dict(zip(images["image_id"], folds))).to_numpy()
    arrays = {"X": np.asarray(X, dtype=np.float32), "y": table["label"].to_numpy().astype(str),
              "g": table["group"].to_numpy().astype(str), "fold": fold.astype(np.int64),
              "identity": (table["transform"] == "identity").to_numpy()}
    for name, array in arrays.items():
        np.save(scratch / f"acc_{name}.npy", array)
    grid = None if not args.kernels else {"kernel": list(args.kernels), "C": [0.1, 1.0, 10.0]}
    grid_text = ("default (linear+rbf x C 0.1,1,10)" if grid is None
                 else f"{'+'.join(args.kernels)} x C 0.1,1,10 (kernel forced)")
    correct, result = {}, {}
    for solver in ("exact", "scalable"):
        child = {name: str(scratch / f"acc_{name}.npy") for name in arrays}
        child.update({"correct": str(scratch / f"acc_correct_{solver}.npy"), "solver": solver,
                      "grid": grid, "threads": args.threads, "outer_folds": args.outer_folds,
                      "n_components": args.n_components})
        out, wall, load = run_child(ACCURACY_CHILD, child)
        print(out.stderr[-3000:], file=sys.stderr)
        if out.returncode != 0:
            raise SystemExit(f"accuracy child failed for {solver}")
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        result[solver] = {**json.loads(line.removeprefix("RESULT ")), "process_seconds": wall,
                          "load_avg_1m": load, "load_avg_1m_after": common.load_avg()}
        correct[solver] = np.load(scratch / f"acc_correct_{solver}.npy")
    a, b = correct["exact"], correct["scalable"]
    lo, hi = paired_bootstrap(a, b)
    rows = []
    for solver, c in (("exact", a), ("scalable", b)):
        rows.append({"measurement": "accuracy_real", "solver": solver,
                     "data": f"real: {scaling_data.BACKBONE} features, 800 PBC images x 6 views",
                     "grid": grid_text, "kernels": "+".join(args.kernels) or "linear+rbf",
                     "n_train_rows": int((fold != 0).sum()), "n_test": len(c),
                     "outer_folds": args.outer_folds, "n_components": args.n_components,
                     "threads": args.threads, "accuracy": float(c.mean()), **result[solver]})
    rows[1].update({"accuracy_diff_points": 100 * float(b.mean() - a.mean()),
                    "diff_ci_lo_points": 100 * lo, "diff_ci_hi_points": 100 * hi,
                    "n_predictions_differ": int((a != b).sum())})
    return rows


def size_rows(X, table, args, scratch: Path, prior: list[dict]) -> list[dict]:
    """Part 2 (module doc): one child process per (solver, size)."""
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    # Test rows from pairs drawn with another seed: other mixtures of the same real images.
    Xt, yt, _ = scaling_data.derived_rows(X, labels, groups, args.n_test, seed=10**6)
    np.save(scratch / "Xt.npy", Xt)
    np.save(scratch / "yt.npy", yt)
    rows = []
    for n in args.sizes:
        Xd, yd, gd = scaling_data.derived_rows(X, labels, groups, n, seed=n)
        for name, array in (("X", Xd), ("y", yd), ("g", gd)):
            np.save(scratch / f"{name}.npy", array)
        del Xd
        for solver in ("exact", "scalable"):
            if solver == "exact" and n > args.exact_max:
                continue
            child = {"X": str(scratch / "X.npy"), "y": str(scratch / "y.npy"),
                     "g": str(scratch / "g.npy"), "Xt": str(scratch / "Xt.npy"),
                     "yt": str(scratch / "yt.npy"), "solver": solver,
                     "threads": args.threads, "mem_mb": args.mem_mb,
                     "n_components": args.n_components,
                     "full_grid": n <= args.full_grid_max,
                     "single": args.single_kernel if n > args.single_above else ""}
            out, wall, load = run_child(CHILD, child)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"child failed for {solver} at {n} rows")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            result = json.loads(line.removeprefix("RESULT "))
            rows.append({"measurement": "size", "solver": solver,
                         "data": "derived from the real rows (bench/scaling_data.py generator)",
                         "n_train_rows": n, "n_features": X.shape[1], "mem_mb": args.mem_mb,
                         "n_components": args.n_components, "threads": args.threads,
                         "grid": (f"one fit, {child['single']} C=1, no search" if child["single"]
                                  else "default (linear+rbf x C 0.1,1,10)" if child["full_grid"]
                                  else "linear+rbf x C 1 (--full-grid-max)"),
                         "process_seconds": wall, **result,
                         "bytes_per_row_data": X.shape[1] * 4,
                         "load_avg_1m": load, "load_avg_1m_after": common.load_avg()})
            print(f"{n:7d} rows {solver:8s} fit {result['fit_seconds']:7.1f} s  peak RSS "
                  f"{result['peak_rss_mib']:7.0f} MiB (data {result['rss_with_data_mib']:.0f})  "
                  f"accuracy {result['accuracy']:.4f}  {result['kernel']}/C={result['C']:g}  "
                  f"load {load}", flush=True)
            common.write_results(prior + rows, NAME + args.tag + "_partial", args.out)  # if killed
    return rows


def store_rows(cache: Path, n_images: int = 100_000, views: int = 4) -> list[dict]:
    """Bytes per sample of the feature store, measured on the real cached folder, and what a
    ``n_images`` x ``views`` run writes per backbone (float32 rows + index lines)."""
    from leukotype.backbones import BACKBONES

    folder = Path(cache) / scaling_data.BACKBONE
    n_rows = len(pd.read_csv(folder / "index.tsv", sep="\t"))
    npy = (folder / "pool.npy").stat().st_size
    index = (folder / "index.tsv").stat().st_size
    rows = [{"measurement": "feature_store", "backbone": scaling_data.BACKBONE, "layers": "pool",
             "n_rows": n_rows, "bytes_per_sample_matrix": npy / n_rows,
             "bytes_per_sample_index": index / n_rows, "source": "measured (cached run)"}]
    per_index = index / n_rows
    for name, spec in BACKBONES.items():
        if getattr(spec, "parts", None):
            continue  # combined backbones reuse their parts' folders
        dims = sum(spec.layers.values())
        per_sample = 4 * dims + per_index
        rows.append({"measurement": "feature_store", "backbone": name,
                     "layers": "+".join(spec.layers), "n_rows": n_images * views,
                     "bytes_per_sample_matrix": 4.0 * dims, "bytes_per_sample_index": per_index,
                     "gib_total": per_sample * n_images * views / 2**30,
                     "source": f"projected: {n_images} images x {views} views, float32, all layers"})
    return rows


def validation_rate(data: Path, threads: int = 2) -> dict:
    """Images/s of the workflow's validation stage (decode + checks + md5) on the real images."""
    from leukotype.config import task_from_dict
    from leukotype.dataset import read_dataset
    from leukotype.validate import validate_images

    table = read_dataset(data)
    task = task_from_dict({"name": "cells", "column": "label",
                           "classes": sorted(table["label"].unique())})
    load = common.load_avg()
    started = time.perf_counter()
    validated = validate_images(table, [task], threads=threads)
    seconds = time.perf_counter() - started
    return {"measurement": "validation_rate", "n_images": len(validated),
            "n_ok": int((validated["status"] == "ok").sum()), "threads": threads,
            "seconds": seconds, "images_per_s": len(validated) / seconds, "load_avg_1m": load}


def estimate_8000(rows: list[dict], extraction: dict) -> dict | None:
    """The features_svm path for 8,000 images (1,000 per class, 75/25 hold-out, rotations:
    6,000 x 4 training rows + 2,000 test rows = 26,000 extracted samples), COMPOSED from rates
    measured here: validation images/s, extraction samples/s of the cached real run, and the
    SVM stage at 24,000 rows. An estimate, not a run of that size (the images do not exist)."""
    val = next((r for r in rows if r["measurement"] == "validation_rate"), None)
    svm = [r for r in rows if r["measurement"] == "size" and r["n_train_rows"] == 24000]
    if val is None or not svm or not extraction.get("samples_per_s"):
        return None
    chosen = min(svm, key=lambda r: r["process_seconds"])  # the solver auto picks at 8 GB
    validate_s = 8000 / val["images_per_s"]
    extract_s = 26000 / extraction["samples_per_s"]
    # CPU seconds where measured: on a shared machine the wall time mostly measures neighbours
    cpu_s = chosen.get("fit_cpu_seconds")
    svm_s = cpu_s if cpu_s == cpu_s and cpu_s is not None else chosen["process_seconds"]
    return {"measurement": "estimate_8000_images", "n_images": 8000, "n_train_rows": 24000,
            "validate_seconds": validate_s, "extract_seconds": extract_s,
            "svm_seconds": svm_s, "svm_solver": chosen["solver"],
            "svm_grid": chosen.get("grid"),
            "total_minutes": (validate_s + extract_s + svm_s) / 60,
            "note": "estimate composed of measured rates (validation, extraction of the cached "
                    "real run, SVM fit CPU seconds at 24k derived rows for svm_grid); evaluate "
                    "and tables not included (seconds)"}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7000, 24000, 50000, 200000])
    parser.add_argument("--exact-max", type=int, default=7000,
                        help="largest size the exact solver is run at")
    parser.add_argument("--full-grid-max", type=int, default=10**9,
                        help="above this size search only C=1 (linear and rbf)")
    parser.add_argument("--single-above", type=int, default=10**9,
                        help="above this size fit one setting (--single-kernel, C=1), no search")
    parser.add_argument("--single-kernel", default="linear", choices=["linear", "rbf"])
    parser.add_argument("--mem-mb", type=int, default=8000,
                        help="the train_svm job's mem_mb (compute.mem_mb_svm default)")
    parser.add_argument("--n-components", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--outer-folds", type=int, default=4)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true", help="accuracy part only")
    parser.add_argument("--kernels", nargs="+", default=[], choices=["linear", "rbf"],
                        help="force the accuracy part's grid to these kernels (C 0.1/1/10); "
                             "default: the default grid (linear and rbf)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier svm_scaling CSV whose 24k-row SVM time the estimate uses")
    parser.add_argument("--tag", default="",
                        help="results go to svm_scaling<tag>.csv (e.g. _large for a second run)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for the real features (reused when present)")
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukotype-svm-scaling-") as tmp:
        scratch = Path(tmp)
        if args.quick:
            rng = np.random.default_rng(0)
            n_img, views = 80, 3
            centres = rng.normal(size=(4, 32)).astype(np.float32)
            lab = np.repeat(np.arange(n_img) % 4, views)
            X = centres[lab] + rng.normal(size=(n_img * views, 32)).astype(np.float32)
            table = pd.DataFrame({"image_id": np.repeat([f"i{i}" for i in range(n_img)], views),
                                  "transform": np.tile(["identity", "rot90", "rot180"], n_img),
                                  "label": np.array(list("abcd"))[lab]})
            table["group"] = table["image_id"]
            args.sizes, args.exact_max, args.n_components = [300], 300, 64
            args.n_test, args.outer_folds = 100, 2
            info = {"source": "synthetic (quick)"}
        else:
            X, table, info = scaling_data.real_features(args.data, args.cache or scratch / "cache")
        rows = []
        if not args.quick and args.skip_accuracy and not args.tag:  # the size run adds these
            rows += store_rows(args.cache or scratch / "cache")
            rows.append(validation_rate(args.data))
        if not args.skip_accuracy:
            rows += accuracy_real(X, table, args, scratch)
        if not args.skip_sizes:
            rows += size_rows(X, table, args, scratch, rows)
    extraction = {f"extraction_{k}": v for k, v in info.items() if k != "source"}
    known = list(rows)
    if args.reference:  # the 24k-row SVM rows of an earlier run (e.g. svm_scaling.csv)
        known += [r for r in pd.read_csv(args.reference).to_dict("records")
                  if r.get("measurement") == "size"]
    estimate = estimate_8000(known, info)
    if estimate:
        rows.append(estimate)
    rows = [{"benchmark": NAME, **row, "real_source": info.get("source"), **extraction}
            for row in rows]
    path = common.write_results(rows, NAME + args.tag, args.out)
    partial = Path(args.out) / f"{NAME}{args.tag}_partial.csv"
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
