"""Run Snakemake on this workflow from a test, and read what it planned."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, check: bool = True,
              env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`snakemake` on the repository's Snakefile in ``workdir`` (outputs land there)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += ["--cores", "2", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-12000:]}"
        )
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run as {rule: count}; {} when nothing is to be done."""
    text = result.stdout + result.stderr
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def bundle_round_trip(bundle_dir: Path, study: Path) -> None:
    """A bundle, loaded fresh, reproduces its run's test predictions from the image files:
    the same labels, and the same raw scores (SVM) and calibrated probabilities within 1e-6."""
    import json

    import numpy as np
    import pandas as pd

    from leukotype.bundle import load_bundle
    from leukotype.predict import Predictor

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path, sep="\t", keep_default_na=False, dtype={"group": str, "image_id": str})

    bundle = load_bundle(bundle_dir)
    run = bundle.spec["run"]
    expected = read(study / "results" / run["path"] / "predictions.tsv")
    validated = read(study / "results/data/validated.tsv")[["image_id", "abspath"]]
    samples = expected[["image_id", "transform"]].merge(validated, on="image_id", how="left")
    got = Predictor(bundle, device="cpu").predict_samples(samples)
    classes = bundle.classes
    assert got["pred"].tolist() == expected["pred"].tolist(), run["path"]
    if bundle.kind == "svm":  # raw decision scores as the workflow wrote them
        reference = expected[[f"score_{c}" for c in classes]].to_numpy()
        mine = got[[f"score_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-6, err_msg=run["path"])
    # probabilities: the workflow's (calibrated) prob_ columns, with the run's temperature
    probs = got[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs, expected[[f"prob_{c}" for c in classes]].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    calibration = json.loads((study / "results" / run["path"] / "calibration.json").read_text())
    assert bundle.temperature == calibration["temperature"]
