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
   zero extract_features and zero finetune jobs;
5. Snakemake's own floor for the same DAG: a generated same-shape Snakefile (``FLOOR_SNAKEFILE``:
   the same rules, wildcards, input functions and output/log/benchmark files, literal lists, no
   config handling, imports, params or resources) is dry-run fresh (``floor_dry_run``), again
   with ``script:`` instead of ``shell:`` (``floor_script_dry_run``: Snakemake reads a rule's
   script for every job), and after ``--touch --forceall`` (``floor_no_change_rerun``). The
   ``dry_run`` and ``no_change_rerun`` rows carry ``vs_floor`` (wall) and ``cpu_vs_floor``
   (user+system CPU, steadier on a shared machine) against it.

Also timed, for scale: ``snakemake --version`` (CLI start) and ``import leukotype.weights`` vs
``import leukotype.config`` in a fresh interpreter (what parsing the Snakefile imports).

    python bench/workflow_overhead.py             # paper grid, 5-fold, 3 repeats per timing
    python bench/workflow_overhead.py --quick     # configs/test.yaml grid, 1 repeat
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

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


class Timed(NamedTuple):
    seconds: float  # wall clock
    output: str  # stdout + stderr
    cpu_seconds: float  # user + system CPU of the command (less sensitive to a loaded machine)


def run(args: list[str], cwd: Path) -> Timed:
    """Run a command in ``cwd`` and time it. Failure raises with the output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{output[-3000:]}")
    return Timed(seconds, output, cpu)


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


FLOOR_SNAKEFILE = """\
# Same-shape stand-in of the leukotype DAG (generated by bench/workflow_overhead.py): the same
# rules, wildcards, constraints, input functions and output/log/benchmark files, but literal
# lists instead of config handling, no imports, and no script/params/resources/conda. Never
# run (only dry-run and --touch): what it costs is Snakemake's own floor for this DAG.
R = {results!r}
TASKS = {tasks!r}
FOLDS = {folds!r}
RUNS = {runs!r}
WEIGHTS = {weights!r}
FT_FEATURES = {ft_features!r}
SVM_FEATURES = {svm_features!r}
METRICS = {metrics_name!r}
STAGED = {staged!r}


wildcard_constraints:
    task="|".join(TASKS),
    fold="|".join(FOLDS),
    backbone={backbones!r},
    strategy="features_svm|finetune|finetune_svm",
    svm_strategy="features_svm|finetune_svm",
    layer=r"[A-Za-z0-9_]+",


rule all:
    input:
        [f"{{R}}/tables/{{t}}.{{e}}" for t in TASKS for e in ("csv", "md", "tex")],
        [f"{{R}}/figures/{{t}}_{{f}}.png" for t in TASKS for f in ("accuracy", "confusion")],
        f"{{R}}/tables/all_runs.tsv",


rule demo_data:
    output:
        manifest=f"{{R}}/demo_data/manifest.csv",
        images=directory(f"{{R}}/demo_data/images"),
    log:
        f"{{R}}/logs/demo_data.log",
    shell:
        "true"


rule validate_images:
    input:
        dataset={dataset!r},
    output:
        table=f"{{R}}/data/validated.tsv",
        summary=f"{{R}}/data/validation.json",
    log:
        f"{{R}}/logs/validate_images.log",
    benchmark:
        f"{{R}}/benchmarks/validate_images.tsv"
    shell:
        "true"


rule fetch_weights:
    output:
        STAGED,
    log:
        f"{{R}}/logs/fetch_weights.log",
    shell:
        "true"


rule split:
    input:
        validated=f"{{R}}/data/validated.tsv",
    output:
        table=f"{{R}}/data/splits/{{{{task}}}}.tsv",
    log:
        f"{{R}}/logs/split/{{{{task}}}}.log",
    shell:
        "true"


rule augment:
    input:
        split=f"{{R}}/data/splits/{{{{task}}}}.tsv",
    output:
        samples=f"{{R}}/data/samples/{{{{task}}}}.tsv",
    log:
        f"{{R}}/logs/augment/{{{{task}}}}.log",
    shell:
        "true"


rule extract_features:
    input:
        validated=f"{{R}}/data/validated.tsv",
        weights=lambda w: WEIGHTS[w.backbone],
    output:
        directory({features_dir!r}),
    log:
        f"{{R}}/logs/extract_features/{{{{backbone}}}}.log",
    benchmark:
        f"{{R}}/benchmarks/extract_features/{{{{backbone}}}}.tsv"
    shell:
        "true"


rule finetune:
    input:
        samples=f"{{R}}/data/samples/{{{{task}}}}.tsv",
        validated=f"{{R}}/data/validated.tsv",
        weights=lambda w: WEIGHTS[w.backbone],
        features=lambda w: FT_FEATURES[w.backbone],
    output:
        model={ft_model!r},
        history={ft_history!r},
        curve={ft_curve!r},
        predictions={ft_predictions!r},
        features=directory({ft_features_dir!r}),
    log:
        f"{{R}}/logs/finetune/{{{{task}}}}/{{{{backbone}}}}/{{{{fold}}}}.log",
    benchmark:
        f"{{R}}/benchmarks/finetune/{{{{task}}}}/{{{{backbone}}}}/{{{{fold}}}}.tsv"
    shell:
        "true"


def svm_features(w):
    if w.svm_strategy == "features_svm":
        return SVM_FEATURES[w.backbone]
    return [{ft_features_dir!r}.format(task=w.task, backbone=w.backbone, fold=w.fold)]


rule train_svm:
    input:
        samples=f"{{R}}/data/samples/{{{{task}}}}.tsv",
        features=svm_features,
    output:
        model={svm_model!r},
        predictions={svm_predictions!r},
        cv_results={svm_cv!r},
    log:
        f"{{R}}/logs/train_svm/{{{{task}}}}/{{{{svm_strategy}}}}/{{{{backbone}}}}/{{{{layer}}}}/{{{{fold}}}}.log",
    benchmark:
        f"{{R}}/benchmarks/train_svm/{{{{task}}}}/{{{{svm_strategy}}}}/{{{{backbone}}}}/{{{{layer}}}}/{{{{fold}}}}.tsv"
    shell:
        "true"


rule evaluate:
    input:
        predictions={predictions!r},
        samples=f"{{R}}/data/samples/{{{{task}}}}.tsv",
    output:
        metrics={metrics!r},
        confusion={confusion!r},
        confusion_png={confusion_png!r},
    log:
        f"{{R}}/logs/evaluate/{{{{task}}}}/{{{{strategy}}}}/{{{{backbone}}}}/{{{{layer}}}}/{{{{fold}}}}.log",
    shell:
        "true"


rule summarise_task:
    input:
        metrics=lambda w: [f"{{R}}/{{run}}/{{METRICS}}" for run in RUNS if run.split("/")[1] == w.task],
    output:
        csv=f"{{R}}/tables/{{{{task}}}}.csv",
        md=f"{{R}}/tables/{{{{task}}}}.md",
        tex=f"{{R}}/tables/{{{{task}}}}.tex",
        accuracy=f"{{R}}/figures/{{{{task}}}}_accuracy.png",
        confusion=f"{{R}}/figures/{{{{task}}}}_confusion.png",
    log:
        f"{{R}}/logs/summarise/{{{{task}}}}.log",
    shell:
        "true"


rule collect_runs:
    input:
        metrics=[f"{{R}}/{{run}}/{{METRICS}}" for run in RUNS],
        validation=f"{{R}}/data/validation.json",
    output:
        runs=f"{{R}}/tables/all_runs.tsv",
        study=f"{{R}}/study.json",
    log:
        f"{{R}}/logs/collect_runs.log",
    shell:
        "true"
"""


def write_floor_snakefile(config: Path, out: Path) -> Path:
    """A same-shape stand-in for the workflow's DAG (see ``FLOOR_SNAKEFILE``) under ``config``:
    the same jobs and files, listed literally (the config is resolved here, not at parse time)."""
    from leukotype import paths
    from leukotype.config import (
        extraction_backbones,
        finetune_feature_dirs,
        load_config,
        staged_weight_files,
        study_runs,
        svm_feature_dirs,
        weight_files,
    )
    from leukotype.split import fold_ids

    # Every path and input list comes from the package helpers the rule files use.
    cfg = load_config(config)
    results = cfg["results"]
    backbones = sorted({m["backbone"] for m in cfg["models"]} | set(extraction_backbones(cfg)))
    finetuned = {m["backbone"] for m in cfg["models"] if "finetune" in m["strategies"]}
    run_file = {
        key: paths.run_file(results, name)
        for key, name in [("predictions", paths.PREDICTIONS), ("metrics", paths.METRICS),
                          ("confusion", paths.CONFUSION), ("confusion_png", paths.CONFUSION_PNG)]
    }
    svm_file = {
        key: paths.run_file(results, name, strategy="{svm_strategy}")
        for key, name in [("svm_model", paths.SVM_MODEL), ("svm_predictions", paths.PREDICTIONS),
                          ("svm_cv", paths.CV_RESULTS)]
    }
    ft_file = {
        key: paths.finetune_file(results, name)
        for key, name in [("ft_model", paths.FINETUNED_MODEL), ("ft_history", paths.HISTORY),
                          ("ft_curve", paths.LEARNING_CURVE), ("ft_predictions", paths.PREDICTIONS)]
    }
    source = cfg["dataset"]["source"]
    text = FLOOR_SNAKEFILE.format(
        results=results, tasks=[t["name"] for t in cfg["tasks"]], folds=fold_ids(cfg["split"]),
        runs=[run.path for run in study_runs(cfg)],
        weights={b: weight_files(cfg, b) for b in backbones},
        ft_features={b: finetune_feature_dirs(cfg, b) for b in sorted(finetuned)},
        svm_features={b: svm_feature_dirs(results, "features_svm", "", b, "") for b in backbones},
        staged=staged_weight_files(cfg),
        backbones="|".join(re.escape(b) for b in backbones),
        features_dir=paths.features_dir(results), metrics_name=paths.METRICS,
        ft_features_dir=paths.finetuned_features_dir(results),
        **run_file, **svm_file, **ft_file,
        dataset=f"{results}/demo_data/manifest.csv" if source == "demo" else source)
    out.write_text(text)
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

    def row(measurement: str, runs: list[Timed] | list[float], **extra) -> dict:
        values = [r.seconds if isinstance(r, Timed) else r for r in runs]
        cpu = [r.cpu_seconds for r in runs if isinstance(r, Timed)]
        record = {"benchmark": NAME, "measurement": measurement, "config": args.config.name,
                  "split": "holdout" if args.holdout else "kfold5",
                  "seconds": min(values), "seconds_median": common.median(values),
                  "cpu_seconds": min(cpu) if cpu else None,
                  "repeats": len(values), "threads": args.threads,
                  "load_avg_1m": common.load_avg(), **extra}
        rows.append(record)
        return record

    def dry_runs(command: list[str], cwd: Path, repeats: int) -> list[Timed]:
        return [run([*command, "-n", "--quiet", "rules"], cwd) for _ in range(repeats)]

    with common.workdir() as scratch:
        config = write_config(args.config, scratch / "config.yaml", scratch, not args.holdout, None)
        base = [*smk, "-s", str(SNAKEFILE), "--configfile", str(config)]

        if not args.quick:  # start-up baselines, skipped in the smoke run
            row("snakemake_version", [run([*smk, "--version"], scratch) for _ in range(args.repeats)])
            for module in ("leukotype.config", "leukotype.weights"):
                row(f"import_{module}", [timed_import(module) for _ in range(args.repeats)])

        # Snakemake's own floor for this DAG: the same-shape stand-in (FLOOR_SNAKEFILE) in its
        # own folder, with its own weights folder, and with the project's default profile like
        # the real run. Its runs alternate with ours, so both see the same machine load.
        floor_dir = scratch / "floor"
        floor_dir.mkdir()
        floor_config = write_config(args.config, floor_dir / "config.yaml", floor_dir,
                                    not args.holdout, None)
        profile = ["--profile", str(common.REPO_ROOT / "profiles" / "default")]
        floor_snakefile = write_floor_snakefile(floor_config, floor_dir / "Snakefile")
        floor = [*smk, "-s", str(floor_snakefile), *profile]
        script_snakefile = floor_dir / "Snakefile_script"
        script_snakefile.write_text(floor_snakefile.read_text().replace(
            '    shell:\n        "true"', '    script:\n        "noop.py"'))
        (floor_dir / "noop.py").write_text("pass\n")
        floor_script = [*smk, "-s", str(script_snakefile), *profile]

        dry, floor_dry, floor_script_dry = [], [], []
        for _ in range(args.repeats):
            dry += dry_runs(base, scratch, 1)
            floor_dry += dry_runs(floor, floor_dir, 1)
            floor_script_dry += dry_runs(floor_script, floor_dir, 1)
        counts = job_counts(dry[0].output)
        dry_row = row("dry_run", dry, jobs_total=counts.get("total", 0),
                      extract_features_jobs=counts.get("extract_features", 0),
                      finetune_jobs=counts.get("finetune", 0),
                      train_svm_jobs=counts.get("train_svm", 0), target_seconds=5.0)
        floor_counts = job_counts(floor_dry[0].output)
        floor_dry_row = row("floor_dry_run", floor_dry, jobs_total=floor_counts.get("total", 0),
                            same_jobs=floor_counts == counts)
        row("floor_script_dry_run", floor_script_dry,
            jobs_total=job_counts(floor_script_dry[0].output).get("total", 0))

        touched = {}  # per folder: (touch run, number of outputs)
        for command, folder, extra in ((base, scratch, []), (floor, floor_dir, ["--forceall"])):
            summary = run([*command, "--summary"], folder).output
            n_outputs = make_outputs(summary[summary.index("output_file") :], folder)
            touch = run([*command, "--touch", *extra, "--cores", "1", "--quiet", "all"], folder)
            touched[folder] = touch, n_outputs
        row("touch_outputs", [touched[scratch][0]], n_outputs=touched[scratch][1])

        rerun, floor_rerun = [], []
        for _ in range(args.repeats):
            rerun += dry_runs(base, scratch, 1)
            floor_rerun += dry_runs(floor, floor_dir, 1)
        rerun_row = row("no_change_rerun", rerun,
                        jobs_total=job_counts(rerun[0].output).get("total", 0),
                        nothing_to_be_done=all("Nothing to be done" in r.output for r in rerun),
                        target_seconds=5.0)
        floor_rerun_row = row("floor_no_change_rerun", floor_rerun,
                              nothing_to_be_done=all("Nothing to be done" in r.output
                                                     for r in floor_rerun))
        for ours, floor_row in ((dry_row, floor_dry_row), (rerun_row, floor_rerun_row)):
            ours["floor_seconds"] = floor_row["seconds"]
            ours["vs_floor"] = ours["seconds"] / floor_row["seconds"]
            ours["cpu_vs_floor"] = ours["cpu_seconds"] / floor_row["cpu_seconds"]

        old = yaml.safe_load(config.read_text()).get("svm", {}) or {}
        changed_svm = {**old, "C": [1, 100]}
        changed = write_config(args.config, scratch / "config_svm.yaml", scratch,
                               not args.holdout, changed_svm)
        svm = run([*smk, "-s", str(SNAKEFILE), "--configfile", str(changed), "-n",
                   "--quiet", "rules"], scratch)
        counts = job_counts(svm.output)
        row("svm_change_dry_run", [svm], jobs_total=counts.get("total", 0),
            extract_features_jobs=counts.get("extract_features", 0),
            finetune_jobs=counts.get("finetune", 0), train_svm_jobs=counts.get("train_svm", 0),
            evaluate_jobs=counts.get("evaluate", 0))
        for folder in (scratch, floor_dir):
            shutil.rmtree(folder / ".snakemake", ignore_errors=True)

    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["measurement", "seconds", "seconds_median", "cpu_seconds",
                              "vs_floor", "cpu_vs_floor", "jobs_total",
                              "extract_features_jobs", "finetune_jobs", "train_svm_jobs",
                              "nothing_to_be_done"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
