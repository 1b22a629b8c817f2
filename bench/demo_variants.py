"""What external sets and preprocessing variants add to the demo: jobs and wall time.

The demo (config.yaml) three ways, in ONE results folder, one after the other: without
external sets (the baseline, run from scratch), then as shipped (one synthetic external set:
only its jobs run), then as shipped plus preprocessing variants (only the variants' jobs and
the aggregations that list their runs run). For each step: the dry run's job count from
scratch (a fresh folder) and of the step itself, and the step's wall time at ``nice -n 15``
(the project's rule on a shared machine) with the 1-minute load average before and after, so
a row says how busy the machine was. The extra wall time of a step is its own row's wall_s;
absolute seconds depend on the load.

    python bench/demo_variants.py [--cores 2] [--dry-run-only]

Writes ``bench/results/demo_variants.csv``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, machine_info  # noqa: E402

#: The variants the "variants" case adds (README "Preprocessing variants").
VARIANTS = [
    {"name": "none"},
    {"name": "cropstain", "steps": [{"step": "crop", "margin": 0.15}, {"step": "stain", "method": "reinhard"}]},
    {"name": "colour", "steps": [{"step": "colour", "views": 4}]},
]


def case_configs() -> dict[str, dict]:
    shipped = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    baseline = copy.deepcopy(shipped)
    baseline["evaluation"]["external"] = []
    variants = copy.deepcopy(shipped)
    variants["preprocessing"] = VARIANTS
    return {"no_external": baseline, "shipped": shipped, "variants": variants}


def snakemake(workdir: Path, config: Path, cores: int, *args: str) -> subprocess.CompletedProcess:
    cmd = ["nice", "-n", "15", sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(config), "--cores", str(cores), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, check=True)


def job_count(workdir: Path, config: Path, cores: int) -> int:
    """Jobs a run would do now (0 when nothing is to be done; the `all` target not counted)."""
    dry = snakemake(workdir, config, cores, "-n", "--quiet", "rules")
    match = re.search(r"^total\s+(\d+)$", dry.stdout + dry.stderr, flags=re.M)
    return max(0, int(match.group(1)) - 1) if match else 0


def write_config(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "results": "results"}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--dry-run-only", action="store_true", help="job counts only, no timed runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "demo_variants.csv")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo-variants-") as tmp:
        shared, fresh = Path(tmp) / "study", Path(tmp) / "fresh"
        shared.mkdir()
        fresh.mkdir()
        for name, cfg in case_configs().items():
            config = write_config(Path(tmp), name, cfg)
            row = {
                **machine_info(),
                "case": name,
                "variants": ",".join(v["name"] for v in cfg.get("preprocessing") or [{"name": "none"}]),
                "external_sets": len(cfg["evaluation"]["external"]),
                "jobs_from_scratch": job_count(fresh, config, args.cores),
                "jobs_this_step": job_count(shared, config, args.cores),
                "cores": args.cores,
                "nice": 15,
            }
            if not args.dry_run_only:
                row["load_before_1m"] = round(os.getloadavg()[0], 2)
                start = time.perf_counter()
                snakemake(shared, config, args.cores)
                row["wall_s_this_step"] = round(time.perf_counter() - start, 1)
                row["load_after_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(row, flush=True)
            write_table(rows, args.out)  # after every step: a partial run keeps its rows


def write_table(rows: list[dict], out: Path) -> None:
    table = pd.DataFrame(rows)
    base = table.loc[table["case"] == "no_external"].iloc[0]
    table["jobs_vs_no_external"] = (table["jobs_from_scratch"] / base["jobs_from_scratch"]).round(2)
    if "wall_s_this_step" in table:
        table["extra_wall_vs_no_external"] = (table["wall_s_this_step"] / base["wall_s_this_step"]).round(2)
        table.loc[table["case"] == "no_external", "extra_wall_vs_no_external"] = None
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)


if __name__ == "__main__":
    main()
