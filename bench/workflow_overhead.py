"""Snakemake overhead on the paper grid: dry-run, no-change rerun, and what an SVM change reruns.

Steps, in a scratch folder with a temporary config (configs/paper.yaml with a 5-fold split, its
own results folder and its own ``torch_home``, so no real weight cache is touched):

1. ``snakemake -n`` on the fresh grid (timed; job table parsed);
2. the outputs are created cheaply: ``snakemake --summary`` lists every output file, empty files
   and folders are made for them, then ``snakemake --touch`` runs the DAG in touch mode, which
   sets consistent timestamps *and records the provenance metadata* (params, code, inputs) that
   later rerun decisions use -- ``--touch`` alone does not create missing outputs;
3. a no-change ``snakemake -n`` (timed; must schedule nothing);
4. ``snakemake -n`` with a different SVM grid: must schedule train_svm and evaluate jobs but
   zero extract_features and zero finetune jobs.

Also timed, for scale: ``snakemake --version`` (CLI start) and ``import leukotype.weights`` vs
``import leukotype.config`` in a fresh interpreter (what parsing the Snakefile imports).

    python bench/workflow_overhead.py             # paper grid, 5-fold, 3 repeats per timing
    python bench/workflow_overhead.py --quick     # configs/test.yaml grid, 1 repeat
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "workflow_overhead"
SNAKEFILE = common.REPO_ROOT / "Snakefile"


def snakemake_cmd() -> list[str]:
    """The snakemake next to this interpreter (the project's environment)."""
    local = Path(sys.executable).with_name("snakemake")
    return [str(local)] if local.exists() else [sys.executable, "-m", "snakemake"]


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    """Run a command in ``cwd``; (wall seconds, stdout+stderr). Failure raises with the output."""
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{output[-3000:]}")
    return seconds, output


def job_counts(output: str) -> dict[str, int]:
    """The first ``job  count`` table of a dry-run (empty when nothing is to be done)."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^job\s+count\s*$", line.strip()):
            for row in lines[i + 2 :]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                counts[parts[0]] = int(parts[1])
            break
    return counts


def make_outputs(summary: str, cwd: Path) -> int:
    """Create every output listed by ``snakemake --summary`` (empty files; folders for
    suffix-less directory outputs such as feature folders)."""
    table = pd.read_csv(pd.io.common.StringIO(summary), sep="\t", dtype=str)
    for name in table["output_file"]:
        path = cwd / name
        if path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return len(table)


def write_config(source: Path, out: Path, scratch: Path, kfold: bool, svm: dict | None) -> Path:
    cfg = yaml.safe_load(source.read_text())
    cfg["results"] = "results"
    cfg["torch_home"] = str(scratch / "torch_home")  # touch mode must never fake real weights
    if kfold:
        cfg["split"] = {**cfg.get("split", {}), "method": "kfold", "n_splits": 5}
    if svm is not None:
        cfg["svm"] = svm
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def timed_import(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=common.REPO_ROOT / "configs" / "paper.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--holdout", action="store_true", help="keep the config's split")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats, args.holdout = common.REPO_ROOT / "configs" / "test.yaml", 1, True

    smk = snakemake_cmd()
    rows: list[dict] = []

    def row(measurement: str, seconds: list[float] | float, **extra) -> dict:
        values = seconds if isinstance(seconds, list) else [seconds]
        record = {"benchmark": NAME, "measurement": measurement, "config": args.config.name,
                  "split": "holdout" if args.holdout else "kfold5",
                  "seconds": min(values), "seconds_median": common.median(values),
                  "repeats": len(values), "threads": args.threads,
                  "load_avg_1m": common.load_avg(), **extra}
        rows.append(record)
        return record

    with common.workdir() as scratch:
        config = write_config(args.config, scratch / "config.yaml", scratch, not args.holdout, None)
        base = [*smk, "-s", str(SNAKEFILE), "--configfile", str(config)]

        if not args.quick:  # start-up baselines, skipped in the smoke run
            row("snakemake_version", [run([*smk, "--version"], scratch)[0] for _ in range(args.repeats)])
            for module in ("leukotype.config", "leukotype.weights"):
                row(f"import_{module}", [timed_import(module) for _ in range(args.repeats)])

        dry = [run([*base, "-n", "--quiet", "rules"], scratch) for _ in range(args.repeats)]
        counts = job_counts(dry[0][1])
        row("dry_run", [s for s, _ in dry], jobs_total=counts.get("total", 0),
            extract_features_jobs=counts.get("extract_features", 0),
            finetune_jobs=counts.get("finetune", 0), train_svm_jobs=counts.get("train_svm", 0),
            target_seconds=5.0)

        _, summary = run([*base, "--summary"], scratch)
        summary = summary[summary.index("output_file") :]
        n_outputs = make_outputs(summary, scratch)
        touch_s, _ = run([*base, "--touch", "--cores", "1", "--quiet", "all"], scratch)
        row("touch_outputs", touch_s, n_outputs=n_outputs)

        rerun = [run([*base, "-n", "--quiet", "rules"], scratch) for _ in range(args.repeats)]
        nothing = all("Nothing to be done" in out for _, out in rerun)
        row("no_change_rerun", [s for s, _ in rerun], jobs_total=job_counts(rerun[0][1]).get("total", 0),
            nothing_to_be_done=nothing, target_seconds=5.0)

        old = yaml.safe_load(config.read_text()).get("svm", {}) or {}
        changed_svm = {**old, "C": [1, 100]}
        changed = write_config(args.config, scratch / "config_svm.yaml", scratch,
                               not args.holdout, changed_svm)
        seconds, out = run([*smk, "-s", str(SNAKEFILE), "--configfile", str(changed), "-n",
                            "--quiet", "rules"], scratch)
        counts = job_counts(out)
        row("svm_change_dry_run", seconds, jobs_total=counts.get("total", 0),
            extract_features_jobs=counts.get("extract_features", 0),
            finetune_jobs=counts.get("finetune", 0), train_svm_jobs=counts.get("train_svm", 0),
            evaluate_jobs=counts.get("evaluate", 0))
        shutil.rmtree(scratch / ".snakemake", ignore_errors=True)

    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["measurement", "seconds", "seconds_median", "jobs_total",
                              "extract_features_jobs", "finetune_jobs", "train_svm_jobs",
                              "nothing_to_be_done"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
