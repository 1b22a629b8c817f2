"""The allocator fix (``leukotype.allocator``) through SLURM: glibc's defaults vs the package's.

The real workflow's ``features_svm`` path (the study of ``bench/full_path.py``: task
``cell_type`` over the 8 PBC classes, EfficientNet-Lite0 ImageNet, rotations, default config)
on ``--images`` real PBC images, run with ``snakemake --profile profiles/slurm`` on the local
one-node cluster of ``tests/slurm/cluster.sh`` (the profile localised as ``tests/test_slurm.py``
does: partition ``debug``, a memory cap, squeue for status), twice, each in a fresh folder:
``LEUKOTYPE_KEEP_FREED_MEMORY=0`` (glibc's defaults), then ``=1`` (the package's settings).
Every job is an ``sbatch`` job; the variable reaches it through the plugin's ``--export=ALL``.

The cluster has no accounting database (no ``sacct``), so the extraction job's numbers come
from the job itself: the line ``leukotype.allocator.log_job_cpu`` writes at the end of its log
(whether the settings were applied in that process, user and sys CPU seconds of the job and
its joined decoding worker, minor page faults per sample). The job's wall time, CPU and peak
RSS from Snakemake's benchmark file (as ``full_path.py`` reads them) and the run's accuracy are
recorded beside them. A run whose flag is not what its setting asks fails the script (after
the rows are written): that is the check that the setting reached the ``sbatch`` job.

Rows (one per setting) -> ``bench/results/slurm_allocator.csv``, with the machine
(``bench/common.py``). The two runs are sequential on the same CPUs, so their ratios (sys
share, faults per sample) carry the result; absolute seconds depend on the load recorded.

    sudo bash tests/slurm/cluster.sh start     # or run as root: started (and stopped) here
    python bench/slurm_allocator.py            # 400 images: ~5 min on 2 idle cores
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import common  # noqa: E402
import full_path  # noqa: E402
import test_slurm as slurm  # noqa: E402  (the test's profile localisation, env and job ids)

NAME = "slurm_allocator"
RULE = "extract_features"
#: Memory cap for the localised profile (MB): above the extraction job's ~1.7 GiB peak.
MAX_MEM_MB = 8000


def cluster_up(env: dict[str, str]) -> bool:
    """Whether the test cluster answers (``cluster.sh status``)."""
    return subprocess.run(["bash", str(slurm.CLUSTER_SH), "status"], env=env,
                          capture_output=True, text=True).returncode == 0


def manifest_of(images: pd.DataFrame, path: Path) -> Path:
    """A manifest ``path,label`` of ``images`` by absolute path (the images stay where they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images.assign(path=images["abspath"])[["path", "label"]].to_csv(path, index=False)
    return path


def run_setting(setting: str, manifest: Path, run_dir: Path, slurm_conf: str, max_mem_mb: int) -> dict:
    """One SLURM run of the study with ``LEUKOTYPE_KEEP_FREED_MEMORY=setting``; its row."""
    from leukotype.allocator import DISABLE_ENV, read_job_cpu

    if run_dir.exists():  # a fresh results folder every time
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    results = run_dir / "results"
    config = full_path.run_config(manifest, results, run_dir / "config.yaml", name=manifest.stem)
    # the manifest lists the images where they are (--data), outside its own folder
    study = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**study, "validation": {"allow_outside_paths": True}}, sort_keys=False))
    profile = slurm.write_profile(
        slurm.localise_profile(slurm.load_profile(), slurm.LOCAL_ACCOUNT, slurm.LOCAL_PARTITION, max_mem_mb),
        run_dir / "profile",
    )
    (run_dir / "torch_home").mkdir()
    env = slurm.workflow_env(run_dir / "torch_home", slurm_conf)
    env[DISABLE_ENV] = setting
    env["PYTHONPATH"] = str(common.REPO_ROOT / "src")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(common.REPO_ROOT / "Snakefile"),
           "--directory", str(run_dir), "--configfile", str(config), "--profile", str(profile)]
    load_before = common.load_avg()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    (run_dir / "snakemake.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed ({done.returncode}), log in {run_dir}:\n{done.stderr[-4000:]}")
    jobs = slurm.slurm_job_ids_from_logs(run_dir)
    (log,) = sorted((results / "logs" / RULE).glob("*.log"))
    usage = read_job_cpu(log.read_text())
    if usage is None:
        raise SystemExit(f"{log}: no 'job cpu:' line")
    bench = full_path.benchmark_rows(results).set_index("rule").loc[RULE]
    svm = full_path.svm_facts(results)
    return {
        "benchmark": NAME, "setting": f"{DISABLE_ENV}={setting}",
        "samples": usage.samples, "keep_freed_memory_applied": usage.keep_freed_memory,
        "user_s": usage.user_s, "sys_s": usage.sys_s, "sys_share": round(usage.sys_share, 4),
        "minor_faults": usage.minor_faults, "faults_per_sample": round(usage.faults_per_sample, 1),
        "extract_wall_s": bench["s"], "extract_cpu_s_benchmark": bench["cpu_time"],
        "extract_max_rss_mib": bench["max_rss"],
        "slurm_jobs": len(jobs), "slurm_extract_job": ";".join(j for j, r in jobs.items() if r == RULE),
        "workflow_wall_s": round(wall, 1), "mem_cap_mb": max_mem_mb, "nice": os.nice(0),
        "load_avg_before_1m": load_before,
        "svm_selected": svm["svm_selected"], "accuracy": svm["accuracy"],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--max-mem-mb", type=int, default=MAX_MEM_MB)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="working folder (default $TMPDIR/leukotype_bench/slurm_allocator)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 80)
    run_root = args.run_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "leukotype_bench" / NAME
    env = dict(os.environ)
    started_here = False
    if not cluster_up(env):
        if os.geteuid() != 0:
            raise SystemExit(f"the test cluster is down: sudo bash {slurm.CLUSTER_SH} start")
        subprocess.run(["bash", str(slurm.CLUSTER_SH), "start"], check=True)
        started_here = True
    conf = subprocess.run(["bash", str(slurm.CLUSTER_SH), "env"], capture_output=True, text=True, check=True)
    slurm_conf = conf.stdout.strip().removeprefix("export SLURM_CONF=")
    try:
        images, source = common.image_table(args.data, args.images, run_root)
        manifest = manifest_of(images, run_root / f"images_{len(images)}.csv")
        rows = []
        for setting in ("0", "1"):
            row = run_setting(setting, manifest, run_root / f"keep_{setting}", slurm_conf, args.max_mem_mb)
            rows.append({"images": len(images), "data": source, **row})
    finally:
        if started_here:
            subprocess.run(["bash", str(slurm.CLUSTER_SH), "stop"], check=True)
    path = common.write_results(rows, NAME, args.out)
    common.print_table(rows, ["setting", "keep_freed_memory_applied", "user_s", "sys_s", "sys_share",
                              "faults_per_sample", "extract_wall_s", "accuracy"])
    print(f"wrote {path}")
    wrong = [r["setting"] for r in rows if r["keep_freed_memory_applied"] != r["setting"].endswith("=1")]
    if wrong:
        raise SystemExit(f"the setting did not reach the sbatch job: {wrong}")
    return path


if __name__ == "__main__":
    main()
