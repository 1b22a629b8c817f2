"""The workflow runs through a real SLURM via snakemake-executor-plugin-slurm.

Two kinds of tests:
- profile checks (always run, a few seconds): `profiles/slurm/config.yaml` has every key a site
  needs, its resource expressions evaluate for each retry `attempt` with growing memory, and
  snakemake itself accepts the profile (dry run).
- cluster tests (marker `slurm`; skipped unless LEUKOTYPE_SLURM=1, and then failing if no cluster
  can be reached): the workflow is run once locally (`--cores 2`) and once with
  `--profile profiles/slurm` against the one-node cluster of `tests/slurm/cluster.sh`; the test
  asserts that every job went through sbatch (job ids from the plugin's logs, checked with
  `scontrol show job`), that no job asked for a GPU, that TORCH_HOME reached the jobs, that the
  allocator settings held inside the extraction job (its log's `job cpu:` line), and that both
  runs wrote identical results.

    sudo bash tests/slurm/cluster.sh start
    LEUKOTYPE_SLURM=1 pytest -q tests/test_slurm.py
    sudo bash tests/slurm/cluster.sh stop

Run as root, the fixture starts (and afterwards stops) the cluster itself when it is down.
The workflows exercised are `CASES` below: the tiny stand-in (tests/slurm/Snakefile) and the real
workflow on a shrunk configs/test.yaml; LEUKOTYPE_SLURM_CASES=tiny|real|tiny,real selects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_DIR = REPO_ROOT / "profiles" / "slurm"
CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_ENABLED = os.environ.get("LEUKOTYPE_SLURM", "") == "1"

#: The local test cluster's partition and a made-up account (no accounting database, so any
#: account name is accepted; the test checks it reaches the job).
LOCAL_PARTITION = "debug"
LOCAL_ACCOUNT = "leukotype-test"
#: Memory cap (MB) for the local one-node cluster: rule-specific values of the profile (16 GB for
#: feature extraction, say) are real-site values that a 2-CPU test node cannot schedule.
LOCAL_MAX_MEM_MB = 3000
#: Rules the real workflow gives their own resources (the profile must name them).
HEAVY_RULES = ("validate_images", "extract_features", "finetune", "train_svm")
#: Keys a site copies and edits; each must be present in the profile.
REQUIRED_PROFILE_KEYS = (
    "executor", "jobs", "default-resources", "set-resources", "retries", "latency-wait",
    "keep-going", "rerun-incomplete", "printshellcmds",
)
#: JSON keys and TSV columns whose values legitimately differ between a local and a SLURM run of
#: the same config (provenance records time and host; training histories record seconds per
#: epoch); they are dropped before comparing.
# The SVM's kernel-memory budget (and the reason text naming it) follows the mem_mb each job was
# given, which the localised profile sets differently from the local run; the solver it chose,
# the scores and the predictions are still compared. So do the processes of the scalable SVM's
# search (n_jobs: the job's threads), which by design do not change its model or scores.
VOLATILE_KEYS = frozenset(
    {"provenance", "time", "timestamp", "seconds", "elapsed_s", "duration_s", "host",
     "kernel_budget_mb", "solver_reason", "n_jobs"}
)


@dataclass(frozen=True)
class WorkflowCase:
    """A workflow run both locally and on SLURM.

    snakemake runs ``snakefile`` with ``--directory`` set to a fresh folder per run, so the two
    runs never mix, and with ``--configfile [configfile] overlay.yaml`` where the overlay (written
    by the test) shrinks the run. ``compare`` are glob patterns, relative to the run folder, of
    outputs that must be identical. ``slurm_rules`` must each have at least one SLURM job.
    ``gpu_rule`` asks for a GPU when ``gpu_overlay`` is added to the config, and only then.
    """

    id: str
    snakefile: Path
    configfile: Path | None
    overlay: dict
    compare: tuple[str, ...]
    slurm_rules: frozenset[str]
    gpu_rule: str
    gpu_overlay: dict


TINY = WorkflowCase(
    id="tiny",
    snakefile=REPO_ROOT / "tests" / "slurm" / "Snakefile",
    configfile=None,
    overlay={"n_parts": 2},
    compare=("results/**/*",),
    slurm_rules=frozenset({"make_part", "embed", "summarise"}),
    gpu_rule="embed",
    gpu_overlay={"gpus": 1},
)
# The real workflow on its test config, shrunk to one task and one backbone (every heavy rule,
# about a dozen jobs). It needs the real workflow to pass its own end-to-end test first.
REAL = WorkflowCase(
    id="real",
    snakefile=REPO_ROOT / "Snakefile",
    configfile=REPO_ROOT / "configs" / "test.yaml",
    overlay={
        "tasks": [{"name": "lineage", "column": "subtype", "classes": ["ALL", "AML"],
                   "derive": {"ALL": ["L1", "L2"], "AML": ["M2", "M3", "M5"]}}],
        "models": [{"backbone": "efficientnet_lite0", "weights": "imagenet",
                    "strategies": ["features_svm", "finetune"], "finetune": {"policy": "head"}}],
        "compute": {"threads": 1, "gpu": False},
    },
    compare=("results/data/**/*.tsv", "results/features/**/*", "results/runs/**/*.tsv",
             "results/runs/**/*.json", "results/runs/**/*.csv", "results/runs/**/*.npy",
             "results/tables/*.csv"),
    slurm_rules=frozenset({"validate_images", "extract_features", "finetune", "train_svm"}),
    gpu_rule="extract_features",
    gpu_overlay={"compute": {"threads": 1, "gpu": True}},
)
# Which cases the cluster tests run: both by default; LEUKOTYPE_SLURM_CASES=tiny for a quick check
# (about 1.5 min instead of about 8 on a busy 2-core machine).
CASES = [{"tiny": TINY, "real": REAL}[name] for name in os.environ.get("LEUKOTYPE_SLURM_CASES", "tiny,real").split(",")]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def load_profile(profile_dir: Path = PROFILE_DIR) -> dict:
    """The profile as a dict (the YAML snakemake reads)."""
    with open(profile_dir / "config.yaml") as handle:
        return yaml.safe_load(handle)


def eval_resource(value: object, attempt: int) -> object:
    """Evaluate a profile resource value as snakemake does for profiles/CLI (`attempt` known)."""
    if not isinstance(value, str):
        return value
    try:
        return eval(value, {"attempt": attempt, "__builtins__": {"min": min, "max": max}})
    except (NameError, SyntaxError):
        return value  # a plain string such as a partition name


def localise_profile(profile: dict, account: str, partition: str, max_mem_mb: int) -> dict:
    """The edits a user makes for a site, here for the one-node test cluster.

    Sets account and partition, caps every `mem_mb` at ``max_mem_mb`` (on first attempt),
    does not retry, shortens the plugin's first status check (jobs take seconds here), keeps the SLURM logs of
    successful jobs (the test reads job ids from them) and queries status with squeue (the test
    cluster has no accounting database for sacct).
    """
    local = json.loads(json.dumps(profile))  # deep copy of plain YAML data
    local["default-resources"]["slurm_account"] = account
    local["default-resources"]["slurm_partition"] = partition
    for resources in [local["default-resources"], *local.get("set-resources", {}).values()]:
        if "mem_mb" in resources and eval_resource(resources["mem_mb"], 1) > max_mem_mb:
            resources["mem_mb"] = f"{max_mem_mb // 2} * attempt"
    for resources in local.get("set-resources", {}).values():
        resources.pop("slurm_partition", None)  # a site's GPU partition: not on this cluster
    local["latency-wait"] = 5
    local["retries"] = 0  # fail fast: a job failing here is a bug, not a memory shortage
    local["slurm-init-seconds-before-status-checks"] = 1
    local["slurm-status-command"] = "squeue"
    local["slurm-keep-successful-logs"] = True
    return local


def write_profile(profile: dict, folder: Path) -> Path:
    """Write ``profile`` as ``folder/config.yaml``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.yaml", "w") as handle:
        yaml.safe_dump(profile, handle, sort_keys=False)
    return folder


def config_args(case: WorkflowCase, folder: Path, extra: dict | None = None) -> list[str]:
    """`--configfile` arguments: the case's config file, then its overlay (+ ``extra``)."""
    overlays = [case.overlay, *([extra] if extra else [])]
    paths = []
    if case.configfile:
        # A snapshot: both runs must read the same config even if the file is edited meanwhile.
        snapshot = folder / f"base_{case.configfile.name}"
        if not snapshot.exists():
            shutil.copyfile(case.configfile, snapshot)
        paths.append(str(snapshot))
    for number, overlay in enumerate(overlays):
        path = folder / f"overlay{number}.yaml"
        path.write_text(yaml.safe_dump(overlay, sort_keys=False))
        paths.append(str(path))
    return ["--configfile", *paths]


def snakemake(args: list[str], env: dict[str, str], timeout_s: int = 900) -> subprocess.CompletedProcess:
    """Run snakemake with this interpreter; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def assert_ok(result: subprocess.CompletedProcess, what: str) -> None:
    """Fail with the tail of snakemake's output if it did not succeed."""
    assert result.returncode == 0, f"{what} failed (rc={result.returncode}):\n{result.stderr[-6000:]}"


def workflow_env(torch_home: Path, slurm_conf: str | None) -> dict[str, str]:
    """Environment for a workflow run: TORCH_HOME set, no SLURM job context leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["TORCH_HOME"] = str(torch_home)
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


def output_files(run_dir: Path, patterns: tuple[str, ...]) -> dict[str, Path]:
    """Relative path -> file for every file matching ``patterns`` under ``run_dir``."""
    files = {}
    for pattern in patterns:
        for path in run_dir.glob(pattern):
            if path.is_file() and not path.name.startswith("."):  # e.g. .snakemake_timestamp
                files[str(path.relative_to(run_dir))] = path
    return files


def _drop_volatile(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def same_content(a: Path, b: Path, a_root: Path, b_root: Path) -> bool:
    """Files equal: .npy numerically, JSON without volatile keys, anything else as text, or bytes.

    Text may name its own run folder (absolute paths such as the `abspath` column), so each
    file's run folder is replaced by a placeholder before comparing.
    """
    if a.suffix == ".npy":
        import numpy as np

        return bool(np.array_equal(np.load(a), np.load(b)))
    try:
        a_text = a.read_text().replace(str(a_root.resolve()), "<RUN>")
        b_text = b.read_text().replace(str(b_root.resolve()), "<RUN>")
    except UnicodeDecodeError:
        return a.read_bytes() == b.read_bytes()
    if a.suffix == ".json":
        return _drop_volatile(json.loads(a_text)) == _drop_volatile(json.loads(b_text))
    if a.suffix == ".tsv":
        return _stable_columns(a_text) == _stable_columns(b_text)
    return a_text == b_text


def _stable_columns(tsv_text: str) -> list[list[str]]:
    """Rows of a TSV without its volatile columns (header included)."""
    rows = [line.split("\t") for line in tsv_text.splitlines()]
    if not rows:
        return rows
    keep = [i for i, name in enumerate(rows[0]) if name not in VOLATILE_KEYS]
    return [[row[i] for i in keep if i < len(row)] for row in rows]


def slurm_job_ids_from_logs(run_dir: Path) -> dict[str, str]:
    """SLURM job id -> rule name, from the plugin's `.snakemake/slurm_logs/rule_<name>/.../<id>.log`."""
    jobs = {}
    for log in (run_dir / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log"):
        rule_folder = log.relative_to(run_dir / ".snakemake" / "slurm_logs").parts[0]
        jobs[log.stem] = rule_folder.removeprefix("rule_")
    return jobs


def slurm_job_ids_from_output(text: str) -> set[str]:
    """SLURM job ids the plugin reported as submitted in snakemake's output."""
    return set(re.findall(r"has been submitted with SLURM jobid (\d+)", text))


def scontrol_job(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job -o` as a dict (the job stays visible for MinJobAge seconds, 3600 in
    tests/slurm/cluster.sh)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
        check=True, timeout=30,
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


# --------------------------------------------------------------------------------------------
# Profile checks (no cluster needed)
# --------------------------------------------------------------------------------------------
def test_profile_has_every_site_key() -> None:
    profile = load_profile()
    missing = [key for key in REQUIRED_PROFILE_KEYS if key not in profile]
    assert not missing, f"profiles/slurm/config.yaml lacks {missing}"
    assert profile["executor"] == "slurm"
    assert {"slurm_account", "slurm_partition", "runtime", "mem_mb"} <= set(profile["default-resources"])
    assert set(HEAVY_RULES) <= set(profile["set-resources"])
    assert profile["retries"] >= 1 and profile["keep-going"] and profile["rerun-incomplete"]


def test_profile_memory_grows_with_attempt() -> None:
    """mem_mb must be an `attempt` expression so a retried OOM job gets more memory."""
    profile = load_profile()
    groups = {"default": profile["default-resources"], **profile["set-resources"]}
    for name, resources in groups.items():
        mems = [eval_resource(resources["mem_mb"], attempt) for attempt in (1, 2, 3)]
        assert all(isinstance(m, int) and m > 0 for m in mems), (name, mems)
        assert mems[0] < mems[1] < mems[2], f"{name}: mem_mb does not grow with attempt: {mems}"
        assert isinstance(eval_resource(resources["runtime"], 1), int), name


def test_profile_does_not_request_gpus_by_default() -> None:
    """GPU requests are commented-out site options: the shipped profile is CPU-only."""
    profile = load_profile()
    for rule, resources in profile["set-resources"].items():
        assert not {"gpu", "gpu_model", "gres"} & set(resources), rule
        assert "--gres" not in str(resources.get("slurm_extra", "")), rule


def test_snakemake_accepts_profile(tmp_path: Path) -> None:
    """A dry run with the shipped profile parses it and evaluates the resources per job."""
    result = snakemake(
        ["--snakefile", str(TINY.snakefile), "--directory", str(tmp_path), "--profile",
         str(PROFILE_DIR), "--dry-run", *config_args(TINY, tmp_path)],
        env=workflow_env(tmp_path / "torch", None), timeout_s=120,
    )
    assert_ok(result, "dry run with profiles/slurm")
    text = result.stdout + result.stderr
    assert "slurm_partition=CHANGE_ME_partition" in text
    assert "mem_mb=2000" in text  # "2000 * attempt" at attempt 1
    assert "gpu=" not in text


# --------------------------------------------------------------------------------------------
# Cluster tests
# --------------------------------------------------------------------------------------------
def _cluster_status(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), "status"], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[str]:
    """SLURM_CONF of a running test cluster; skipped unless LEUKOTYPE_SLURM=1, then required."""
    if not SLURM_ENABLED:
        pytest.skip("SLURM tests are opt-in: set LEUKOTYPE_SLURM=1 (and start tests/slurm/cluster.sh)")
    env = dict(os.environ)
    conf = subprocess.run(["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True)
    slurm_conf = conf.stdout.strip().removeprefix("export SLURM_CONF=")
    started_here = False
    if _cluster_status(env).returncode != 0:
        if os.geteuid() != 0:
            pytest.fail(
                "LEUKOTYPE_SLURM=1 but the test cluster is not running: "
                f"`sudo bash {CLUSTER_SH.relative_to(REPO_ROOT)} start` first "
                f"({_cluster_status(env).stderr.strip()})"
            )
        t0 = time.monotonic()
        start = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True)
        if start.returncode != 0:
            pytest.fail(f"LEUKOTYPE_SLURM=1 but the test cluster did not start:\n{start.stderr[-4000:]}")
        print(f"\ncluster started (incl. any install) in {time.monotonic() - t0:.1f} s")
        started_here = True
    yield slurm_conf
    if started_here:
        subprocess.run(["bash", str(CLUSTER_SH), "stop"], check=True)


@dataclass
class Runs:
    """A local and a SLURM run of the same workflow case."""

    case: WorkflowCase
    base: Path
    local_dir: Path
    slurm_dir: Path
    slurm_output: str
    env: dict[str, str]
    torch_home: Path
    seconds: dict[str, float]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def runs(request: pytest.FixtureRequest, slurm_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Run the case locally and on the cluster (once per module; the tests only read)."""
    case: WorkflowCase = request.param
    base = tmp_path_factory.mktemp(f"slurm_{case.id}")
    torch_home = base / "torch_home"
    torch_home.mkdir()
    env = workflow_env(torch_home, slurm_cluster)
    common = ["--snakefile", str(case.snakefile), *config_args(case, base)]
    seconds = {}

    t0 = time.monotonic()
    local = snakemake([*common, "--directory", str(base / "local"), "--cores", "2"], env)
    seconds["local"] = time.monotonic() - t0
    assert_ok(local, f"local run of {case.id}")

    profile = write_profile(
        localise_profile(load_profile(), LOCAL_ACCOUNT, LOCAL_PARTITION, LOCAL_MAX_MEM_MB),
        base / "profile",
    )
    t0 = time.monotonic()
    slurm = snakemake([*common, "--directory", str(base / "slurm"), "--profile", str(profile)], env)
    seconds["slurm"] = time.monotonic() - t0
    assert_ok(slurm, f"SLURM run of {case.id}")
    print(f"\n[{case.id}] local run {seconds['local']:.1f} s, SLURM run {seconds['slurm']:.1f} s")
    return Runs(case, base, base / "local", base / "slurm", slurm.stdout + slurm.stderr, env, torch_home, seconds)


@pytest.mark.slurm
def test_every_job_went_through_sbatch(runs: Runs) -> None:
    from_logs = slurm_job_ids_from_logs(runs.slurm_dir)
    from_output = slurm_job_ids_from_output(runs.slurm_output)
    assert set(from_logs) == from_output, (from_logs, from_output)
    missing = runs.case.slurm_rules - set(from_logs.values())
    assert not missing, f"rules without a SLURM job: {sorted(missing)}"
    # Each job: completed on the test partition, with the profile's account and memory.
    for job_id, rule in from_logs.items():
        job = scontrol_job(job_id, runs.env)
        assert job["JobState"] == "COMPLETED", (job_id, rule, job["JobState"])
        assert (job["Partition"], job["Account"]) == (LOCAL_PARTITION, LOCAL_ACCOUNT), (job_id, rule)
        assert job["Comment"].startswith(f"rule_{rule}"), (job_id, rule, job["Comment"])
        assert int(job["MinMemoryNode"].removesuffix("M")) <= LOCAL_MAX_MEM_MB, (job_id, rule, job["MinMemoryNode"])


@pytest.mark.slurm
def test_jobs_ran_inside_their_allocation(runs: Runs) -> None:
    """Each rule's own log saw the SLURM_JOB_ID of the job the plugin submitted for it."""
    if runs.case.id != "tiny":
        pytest.skip("only the tiny workflow writes SLURM_JOB_ID into its logs")
    seen = {
        line.split("=", 1)[1].strip()
        for log in (runs.slurm_dir / "logs").rglob("*.log")
        for line in log.read_text().splitlines()
        if line.startswith("SLURM_JOB_ID=")
    }
    assert seen == set(slurm_job_ids_from_logs(runs.slurm_dir))


@pytest.mark.slurm
def test_no_job_asked_for_a_gpu(runs: Runs) -> None:
    job_ids = slurm_job_ids_from_logs(runs.slurm_dir)
    assert job_ids
    for job_id in job_ids:
        job = scontrol_job(job_id, runs.env)
        requested = " ".join(job.get(k, "") for k in ("TRES", "TresPerJob", "TresPerNode", "Gres"))
        assert "gpu" not in requested.lower(), (job_id, requested)
    assert "--gpus" not in runs.slurm_output and "--gres" not in runs.slurm_output


@pytest.mark.slurm
def test_results_equal_local_run(runs: Runs) -> None:
    local = output_files(runs.local_dir, runs.case.compare)
    slurm = output_files(runs.slurm_dir, runs.case.compare)
    assert local, "the local run produced nothing to compare"
    assert sorted(local) == sorted(slurm)
    differing = [
        rel for rel in local if not same_content(local[rel], slurm[rel], runs.local_dir, runs.slurm_dir)
    ]
    assert not differing, f"SLURM outputs differ from the local run: {differing}"


@pytest.mark.slurm
def test_torch_home_reaches_jobs(runs: Runs) -> None:
    if runs.case.id != "tiny":
        pytest.skip("only the tiny workflow echoes TORCH_HOME into an output")
    table = (runs.slurm_dir / "results" / "embed.tsv").read_text().splitlines()
    rows = dict(line.split("\t") for line in table)
    assert rows["torch_home"] == str(runs.torch_home)


@pytest.mark.slurm
def test_extraction_job_kept_freed_memory_inside_sbatch(runs: Runs) -> None:
    """The allocator settings (leukotype.allocator.keep_freed_memory) held inside the sbatch job
    as in the local one: each extraction job's log ends with its own line (log_job_cpu), for
    every sample it extracted. Only the flag is asserted: on a run this small the per-sample
    page faults are the process start's (torch's import), not the batches'; the numbers off
    against on, through SLURM, are bench/slurm_allocator.py's."""
    if runs.case.id != "real":
        pytest.skip("only the real workflow extracts features")
    from leukotype.allocator import read_job_cpu

    for run_dir in (runs.local_dir, runs.slurm_dir):
        logs = sorted((run_dir / "results" / "logs" / "extract_features").glob("*.log"))
        assert logs, f"no extract_features log in {run_dir}"
        for log in logs:
            usage = read_job_cpu(log.read_text())
            assert usage is not None, f"{log}: no 'job cpu:' line"
            assert usage.keep_freed_memory, (log, usage)
            index = run_dir / "results" / "features" / log.stem / "index.tsv"
            assert usage.samples == len(index.read_text().splitlines()) - 1, (log, usage)
            assert usage.user_s > 0 and 0 <= usage.sys_share < 1, (log, usage)


#: How a site asks for a GPU -> (what the sbatch call must contain, what it must not).
GPU_STYLES = {
    "gpus": ({}, "--gpus=1", "--gres"),
    "gres": ({"gres": "gpu:1", "gpu": 0}, "--gres=gpu:1", "--gpus"),
}


@pytest.mark.slurm
@pytest.mark.parametrize("style", sorted(GPU_STYLES))
def test_gpu_is_requested_when_configured(runs: Runs, style: str, tmp_path: Path) -> None:
    """With a GPU configured the GPU rule asks sbatch for one, which this GPU-less node refuses.

    ``gpus``: the config alone (resource gpu=1 -> --gpus=1). ``gres``: the profile's documented
    alternative for sites that want --gres (set-resources gres="gpu:1", gpu=0).
    """
    set_resources, expected, unexpected = GPU_STYLES[style]
    profile = localise_profile(load_profile(), LOCAL_ACCOUNT, LOCAL_PARTITION, LOCAL_MAX_MEM_MB)
    profile["keep-going"] = False
    profile["set-resources"].setdefault(runs.case.gpu_rule, {}).update(set_resources)
    profile_dir = write_profile(profile, tmp_path / "profile")
    run_dir = tmp_path / "run"
    shutil.copytree(runs.slurm_dir, run_dir, ignore=shutil.ignore_patterns(".snakemake"))
    result = snakemake(
        ["--snakefile", str(runs.case.snakefile),
         *config_args(runs.case, tmp_path, runs.case.gpu_overlay), "--directory", str(run_dir),
         "--profile", str(profile_dir), "--forcerun", runs.case.gpu_rule, "--until", runs.case.gpu_rule],
        runs.env, timeout_s=300,
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, "sbatch accepted a GPU job on a node without GPUs"
    calls = re.findall(r"^\s*(sbatch --parsable .*)$", text, flags=re.MULTILINE)
    assert calls, text[-3000:]
    assert all(expected in call and unexpected not in call for call in calls), calls
    assert all(f"--comment rule_{runs.case.gpu_rule}" in call for call in calls), calls
