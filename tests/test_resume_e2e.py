"""Resume and k-fold proven at the workflow level, on one tiny k-fold study.

The same `snakemake` command is run until it succeeds while real jobs of it are killed:
1. `extract_features` gets SIGTERM mid-extraction: no partial feature file is left for a later
   job to read, and the rerun extracts the same features as an uninterrupted extraction;
2. `finetune` jobs get SIGTERM (what SLURM sends at the wall time) after their first epoch's
   checkpoint, then SIGKILL after a later one: each rerun resumes from the last checkpoint, the
   final model equals an uninterrupted run's bit for bit (CPU), and no finished result of
   another job is ever redone;
3. the finished study (split.method kfold, n_splits 2, n_repeats 2) shows mean, sd and the
   t-interval over the 4 folds in its table, equal to the values of the fold records.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_helpers import REPO

pytestmark = pytest.mark.e2e

CONFIG = {
    "results": "results",
    "dataset": {
        "source": "demo",
        "name": "resume test",
        "demo": {"n_patients_per_subtype": 2, "cells_per_patient": 2, "image_size": 64, "seed": 1},
    },
    "validation": {"min_side": 32, "min_images_per_class": 2},
    "tasks": [{"name": "cellular", "column": "element", "classes": ["nucleus", "cellula"]}],
    "split": {"method": "kfold", "n_splits": 2, "n_repeats": 2, "seed": 7},
    "augmentation": {"rotations": [180]},
    "models": [
        {"backbone": "efficientnet_lite0", "weights": "imagenet", "strategies": ["features_svm"]},
        {"backbone": "paper_cnn", "strategies": ["finetune"]},
    ],
    "features": {"batch_size": 8, "num_workers": 0},
    "svm": {"C": [1], "kernel": ["linear"], "cv_folds": 2},
    "finetune": {"epochs": 12, "batch_size": 4},
    "evaluation": {"n_bootstrap": 50},
    "compute": {"threads": 1},
}
FOLDS = ["r0f0", "r0f1", "r1f0", "r1f1"]
FEATURES = Path("results/features/efficientnet_lite0")
CHECKPOINTS = Path("results/checkpoints/cellular/paper_cnn")
#: Outputs whose files are never rewritten once a job finished them (logs are per attempt).
VOLATILE = ("results/logs", "results/benchmarks", "results/checkpoints")


def _command(workdir: Path, configfile: Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", "2"]


def _job_pids(parent: int, script: str) -> list[int]:
    """Running job processes of ``parent`` (snakemake) whose command line runs ``script``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                if script.encode() in handle.read():
                    pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _run_until(workdir: Path, configfile: Path, actions=(), timeout: float = 300) -> tuple[int, list[list[int]]]:
    """Run the workflow; each action ``(trigger, script, signal)`` fires once, when ``trigger()``
    is first true, sending the signal to every running job that runs ``script``. Returns
    snakemake's exit status and the pids each action signalled (output in workdir/snakemake.out)."""
    with open(workdir / "snakemake.out", "ab") as out:
        proc = subprocess.Popen(_command(workdir, configfile), cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    signalled: list[list[int]] = [[] for _ in actions]
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for done, (trigger, script, sig) in zip(signalled, actions):
            if not done and trigger():
                for pid in _job_pids(proc.pid, script):
                    os.kill(pid, sig)
                    done.append(pid)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError("snakemake did not finish in time")
    return proc.returncode, signalled


def _finished_files(workdir: Path) -> dict[str, int]:
    """mtime of every result file a finished job wrote (logs/checkpoints excluded)."""
    found = {}
    for path in (workdir / "results").rglob("*"):
        rel = path.relative_to(workdir).as_posix()
        if path.is_file() and not rel.startswith(VOLATILE) and not path.name.endswith(".tmp"):
            found[rel] = path.stat().st_mtime_ns
    return found


def _assert_nothing_redone(before: dict[str, int], after: dict[str, int]) -> None:
    changed = sorted(p for p, mtime in before.items() if after.get(p) != mtime)
    assert not changed, f"finished results were redone or removed: {changed[:5]}"


def _checkpoints(workdir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (workdir / CHECKPOINTS).glob("*/checkpoint.pt")}


def _validated() -> dict:
    from leukotype.config import validate_config

    return validate_config(yaml.safe_load(yaml.safe_dump(CONFIG)))


def _reference_model(workdir: Path, fold: str, tmp: Path) -> dict:
    """The same fine-tuning job run uninterrupted, in this process, from the same inputs."""
    import torch

    from leukotype.config import finetune_settings
    from leukotype.stages import FinetuneOutputs, run_finetune

    cfg = _validated()
    out = tmp / f"reference_{fold}"
    outputs = FinetuneOutputs(model=out / "model.pt", history=out / "history.tsv", curve=out / "curve.png",
                              predictions=out / "predictions.tsv", features=out / "features")
    run_finetune(workdir / "results/data/samples/cellular.tsv", workdir / "results/data/validated.tsv",
                 cfg["tasks"][0], "paper_cnn", fold, "none", None, finetune_settings(cfg, "paper_cnn"),
                 out / "checkpoint", outputs, threads=1)
    return torch.load(outputs.model, weights_only=True)


@pytest.fixture(scope="module")
def interrupted_study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume")
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG))
    started = time.monotonic()
    events = {}

    def unfinished(checkpoints: dict[str, int]) -> dict[str, int]:
        return {f: m for f, m in checkpoints.items()
                if not (workdir / f"results/runs/cellular/finetune/paper_cnn/softmax/{f}/model.pt").exists()}

    # 1. SIGTERM (SLURM at wall time) extract_features while it streams its feature matrix, and
    #    every running finetune job once a first epoch's checkpoint exists (so: mid-epoch 2).
    def extracting():
        return (workdir / FEATURES).is_dir() and any((workdir / FEATURES).glob(".pool.npy.*.tmp"))

    rc, (extract_pids, finetune_pids) = _run_until(workdir, configfile, [
        (extracting, "extract_features.py", signal.SIGTERM),
        (lambda: bool(_checkpoints(workdir)), "finetune.py", signal.SIGTERM),
    ])
    assert extract_pids and finetune_pids and rc != 0, "the jobs were not interrupted"
    events["after_extract_kill"] = {
        "final_feature_files": sorted(p.name for p in (workdir / FEATURES).glob("*") if not p.name.endswith(".tmp"))
        if (workdir / FEATURES).exists() else [],
        "svm_runs": sorted(str(p) for p in (workdir / "results/runs").rglob("features_svm/*/*/*/predictions.tsv")),
    }
    events["sigterm"] = unfinished(_checkpoints(workdir))
    before = _finished_files(workdir)

    # 2. The same command: SIGKILL every running finetune job once a checkpoint is newer.
    seen = _checkpoints(workdir)
    rc, (killed,) = _run_until(workdir, configfile, [
        (lambda: any(seen.get(f) != m for f, m in _checkpoints(workdir).items()), "finetune.py", signal.SIGKILL),
    ])
    assert killed and rc != 0, "no finetune job was killed"
    events["sigkill"] = unfinished(_checkpoints(workdir))
    after = _finished_files(workdir)
    _assert_nothing_redone(before, after)

    # 3. The same command once more: it finishes, redoing nothing that was finished.
    rc, _ = _run_until(workdir, configfile)
    assert rc == 0, (workdir / "snakemake.out").read_text()[-5000:]
    _assert_nothing_redone(after, _finished_files(workdir))
    events["seconds"] = time.monotonic() - started
    return workdir, events


def test_interrupted_extraction_leaves_no_partial_features_and_reruns_equal(interrupted_study, tmp_path):
    from leukotype.io import read_tsv
    from leukotype.stages import run_extract

    workdir, events = interrupted_study
    # nothing under its final name for a later job to read, and no SVM ran on features
    assert events["after_extract_kill"] == {"final_feature_files": [], "svm_runs": []}
    cfg = _validated()
    run_extract(workdir / "results/data/validated.tsv", "efficientnet_lite0", ["pool"], "imagenet", None, None,
                cfg["augmentation"], cfg["features"], tmp_path / "reference")
    index = read_tsv(workdir / FEATURES / "index.tsv")
    assert index.equals(read_tsv(tmp_path / "reference" / "index.tsv"))
    np.testing.assert_allclose(np.load(workdir / FEATURES / "pool.npy"), np.load(tmp_path / "reference" / "pool.npy"),
                               rtol=1e-5, atol=1e-6)


def test_killed_finetune_jobs_resume_to_the_uninterrupted_model(interrupted_study, tmp_path):
    import torch

    workdir, events = interrupted_study
    resumed = sorted(set(events["sigterm"]) | set(events["sigkill"]))
    assert resumed, events
    for fold in resumed:
        log = (workdir / f"results/logs/finetune/cellular/paper_cnn/{fold}.log").read_text()
        assert "resuming fine-tuning from" in log, f"{fold} did not resume:\n{log[-2000:]}"
        epoch = int(log.split("after epoch ", 1)[1].split()[0])
        assert 1 <= epoch < CONFIG["finetune"]["epochs"]
        history = pd.read_csv(workdir / f"results/runs/cellular/finetune/paper_cnn/softmax/{fold}/history.tsv", sep="\t")
        assert history["epoch"].tolist() == list(range(1, CONFIG["finetune"]["epochs"] + 1))
    fold = resumed[0]
    model = torch.load(workdir / f"results/runs/cellular/finetune/paper_cnn/softmax/{fold}/model.pt", weights_only=True)
    reference = _reference_model(workdir, fold, tmp_path)
    assert model.keys() == reference.keys()
    for key in model:
        assert torch.equal(model[key], reference[key]), f"{fold}: {key} differs from the uninterrupted run"


def test_kfold_tables_show_mean_sd_and_interval_over_folds(interrupted_study):
    from scipy import stats

    workdir, events = interrupted_study
    table = pd.read_csv(workdir / "results/tables/cellular.csv").set_index("Technique")
    assert set(table.index) == {"Feature extraction", "Fine tuning"}
    assert (table["Folds"].astype(str) == "4").all()
    for technique, strategy, model in (("Feature extraction", "features_svm", "efficientnet_lite0/pool"),
                                       ("Fine tuning", "finetune", "paper_cnn/softmax")):
        records = [json.loads((workdir / f"results/runs/cellular/{strategy}/{model}/{fold}/metrics.json").read_text())
                   for fold in FOLDS]
        assert {r["precision"] for r in records} == {"fp32"}  # from the features' meta.json
        values = [r["metrics"]["accuracy"] for r in records]
        mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
        assert table.at[technique, "Accuracy"] == f"{100 * mean:.1f} ± {100 * sd:.1f}"
        half = stats.t.ppf(0.975, 3) * sd / math.sqrt(4)
        low, high = max(0.0, mean - half), min(1.0, mean + half)
        assert table.at[technique, "Accuracy 95% CI"] == f"[{100 * low:.1f}, {100 * high:.1f}]"
    runs = pd.read_csv(workdir / "results/tables/all_runs.tsv", sep="\t")
    assert sorted(runs["fold"]) == sorted(FOLDS * 2)
    print(f"interrupted k-fold study: {events['seconds']:.0f} s")
