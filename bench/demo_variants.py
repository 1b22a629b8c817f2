"""What external sets and preprocessing variants add to the demo: job count and wall time.

Runs the demo (config.yaml) three ways, each in a fresh folder, one after the other on the same
machine: without external sets (the baseline), as shipped (one synthetic external set), and as
shipped plus preprocessing variants. For each: the dry run's job count, then a timed
``snakemake --cores N`` run at ``nice -n 15`` (the project's rule on a shared machine), with
the 1-minute load average before and after so a row says how busy the machine was. The ratios
against the baseline are the result; absolute seconds depend on the load.

    python bench/demo_variants.py [--cores 2] [--only shipped,variants]

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


def job_count(text: str) -> int:
    match = re.search(r"^total\s+(\d+)$", text, flags=re.M)
    return int(match.group(1)) if match else 0


def measure(name: str, cfg: dict, cores: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"demo-{name}-") as tmp:
        workdir = Path(tmp)
        cfg = {**cfg, "results": "results"}
        config = workdir / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        dry = snakemake(workdir, config, cores, "-n", "--quiet", "rules")
        jobs = job_count(dry.stdout + dry.stderr)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        snakemake(workdir, config, cores)
        wall = time.perf_counter() - start
        return {
            **machine_info(),
            "case": name,
            "variants": ",".join(v["name"] for v in cfg.get("preprocessing") or [{"name": "none"}]),
            "external_sets": len(cfg["evaluation"]["external"]),
            "jobs": jobs,
            "cores": cores,
            "nice": 15,
            "wall_s": round(wall, 1),
            "load_before_1m": round(load_before, 2),
            "load_after_1m": round(os.getloadavg()[0], 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated cases (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "demo_variants.csv")
    args = parser.parse_args()
    cases = case_configs()
    chosen = [c for c in args.only.split(",") if c] or list(cases)
    rows = []
    for name in chosen:
        rows.append(measure(name, cases[name], args.cores))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    if "no_external" in set(table["case"]):
        base = table.loc[table["case"] == "no_external"].iloc[0]
        table["jobs_vs_no_external"] = (table["jobs"] / base["jobs"]).round(2)
        table["wall_vs_no_external"] = (table["wall_s"] / base["wall_s"]).round(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table[["case", "jobs", "wall_s", "load_before_1m", "load_after_1m"]].to_string(index=False))


if __name__ == "__main__":
    main()
