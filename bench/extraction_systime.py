"""Where an extraction job's kernel (``sys``) CPU time goes, and which setting removes it.

A short extraction (``leukotype.features.extract_features``, EfficientNet-Lite0, real PBC
JPEGs, batch 32, the workflow's defaults otherwise) runs in a fresh child process per setting;
the child reports its own and its children's (the DataLoader worker's) CPU time from
``resource.getrusage``: ``user_s``, ``sys_s``, minor page faults and context switches, so the
sys share can be attributed:

- thread spinning (OpenMP workers busy-waiting / yielding between parallel regions):
  ``OMP_WAIT_POLICY=PASSIVE``, one intra-op thread;
- worker hand-off (each batch travels from the decoding worker through a new shared-memory
  segment that both processes fault in): ``num_workers`` 0 vs 1;
- page faults on fresh memory: glibc returns every block above its mmap threshold (at most
  32 MiB) to the kernel on ``free`` and maps it again, zero-filled, on the next ``malloc``; a
  batch-32 forward pass allocates activations of tens of MiB per layer, so each batch faults
  them in again. ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
  keep freed memory in the heap; smaller batches keep activations under the threshold.
  ``leukotype.allocator.keep_freed_memory`` (called by every extraction) applies the same
  settings with ``mallopt``; ``LEUKOTYPE_KEEP_FREED_MEMORY=0`` switches it off for the rows
  that measure glibc's defaults. Blocks above the mmap threshold's 32 MiB ceiling (Lite0 at
  batch 32 frees 147 MiB ones) are kept only when the heap's top pad is larger than them.

The feature store's memory map itself is written once per row (4 bytes x 1,280 per sample).

    python bench/extraction_systime.py            # ~3 min on 2 cores
    python bench/extraction_systime.py --settings 0 6 --tag _after_fix   # defaults vs the fix
    python bench/extraction_systime.py --settings 0 5 6 --tag _top_pad    # + the environment
    python bench/extraction_systime.py --quick    # smoke test (synthetic images, seconds)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NAME = "extraction_systime"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import pandas as pd
from leukotype.features import extract_features
args = json.loads(sys.argv[1])
samples = pd.read_csv(args["samples"], sep="\t", dtype=str)
weights = None
if args["weights"]:
    from leukotype.weights import resolve_weights
    weights = resolve_weights(args["backbone"], "imagenet")
def usage():
    return [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
# one warm-up batch outside the measurement (model build, oneDNN primitive creation)
extract_features(samples.head(args["batch_size"]), args["backbone"], weights, [args["layer"]],
                 Path(args["out"]) / "warm", batch_size=args["batch_size"],
                 num_workers=args["num_workers"], threads=args["threads"], progress=False)
before, started = usage(), time.perf_counter()
extract_features(samples, args["backbone"], weights, [args["layer"]], Path(args["out"]) / "run",
                 batch_size=args["batch_size"], num_workers=args["num_workers"],
                 threads=args["threads"], progress=False)
seconds, after = time.perf_counter() - started, usage()
d = lambda f: sum(getattr(a, f) - getattr(b, f) for a, b in zip(after, before))
print("RESULT " + json.dumps({"seconds": seconds, "user_s": d("ru_utime"), "sys_s": d("ru_stime"),
      "minor_faults": d("ru_minflt"), "voluntary_switches": d("ru_nvcsw"),
      "involuntary_switches": d("ru_nivcsw")}))
"""

#: Glibc settings that keep freed blocks in the process (values in bytes; the mmap threshold's
#: ceiling is 32 MiB on 64-bit glibc, larger blocks are always mapped fresh).
MALLOC_KEEP = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**34),
    "MALLOC_TOP_PAD_": str(2**30),
}

#: Every setting but the last runs with glibc's defaults (the package's fix switched off).
GLIBC_DEFAULT = {"LEUKOTYPE_KEEP_FREED_MEMORY": "0"}

SETTINGS = [
    # name, num_workers, threads, batch_size, extra environment
    ("glibc defaults (1 worker, 2 threads, batch 32)", 1, 2, 32, GLIBC_DEFAULT),
    ("num_workers 0", 0, 2, 32, GLIBC_DEFAULT),
    ("1 thread", 1, 1, 32, GLIBC_DEFAULT),
    ("OMP_WAIT_POLICY=PASSIVE", 1, 2, 32, {**GLIBC_DEFAULT, "OMP_WAIT_POLICY": "PASSIVE"}),
    ("batch 8", 1, 2, 8, GLIBC_DEFAULT),
    ("MALLOC_* environment keeps freed memory", 1, 2, 32, {**GLIBC_DEFAULT, **MALLOC_KEEP}),
    ("package default (leukotype.allocator.keep_freed_memory)", 1, 2, 32, {}),
]


def run_setting(samples_tsv: Path, scratch: Path, backbone: str, layer: str, weights: bool,
                num_workers: int, threads: int, batch_size: int, extra_env: dict) -> dict:
    args = {"samples": str(samples_tsv), "backbone": backbone, "layer": layer,
            "weights": weights, "out": str(scratch), "batch_size": batch_size,
            "num_workers": num_workers, "threads": threads}
    env = {**os.environ, **extra_env}
    env.setdefault("PYTHONPATH", str(common.REPO_ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                         capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=320, help="samples per run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", type=int, nargs="+", default=None,
                        help="indices into SETTINGS to run (default: all), e.g. 0 6: glibc's "
                             "defaults and the package default")
    parser.add_argument("--tag", default="", help="results go to extraction_systime<tag>.csv")
    args = parser.parse_args()
    backbone, layer, weights = "efficientnet_lite0", "pool", True
    n = args.samples
    settings = SETTINGS if args.settings is None else [SETTINGS[i] for i in args.settings]
    if args.quick:
        backbone, layer, weights, n = "paper_cnn", "flatten", False, 64
        settings = SETTINGS[:2]
    rows = []
    with tempfile.TemporaryDirectory(prefix="leukotype-systime-") as tmp:
        scratch = Path(tmp)
        images, source = common.image_table(args.data, n, scratch)
        samples_tsv = scratch / "samples.tsv"
        common.sample_table(images).to_csv(samples_tsv, sep="\t", index=False)
        for repeat in range(args.repeats):
            for name, workers, threads, batch, env in settings:
                load = common.load_avg()
                result = run_setting(samples_tsv, scratch / f"{repeat}-{len(rows)}", backbone,
                                     layer, weights, workers, threads, batch, env)
                cpu = result["user_s"] + result["sys_s"]
                rows.append({
                    "benchmark": NAME, "setting": name, "backbone": backbone, "source": source, "n_samples": n,
                    "num_workers": workers, "threads": threads, "batch_size": batch,
                    "env": " ".join(f"{k}={v}" for k, v in env.items()),
                    "repeat": repeat, **result,
                    "samples_per_s": n / result["seconds"],
                    "sys_share": result["sys_s"] / cpu if cpu else float("nan"),
                    "faults_per_sample": result["minor_faults"] / n,
                    "load_avg_1m": load,
                })
                print(f"{name:42s} {n / result['seconds']:6.1f} samples/s  user "
                      f"{result['user_s']:6.1f} s  sys {result['sys_s']:6.1f} s "
                      f"({rows[-1]['sys_share']:.0%})  faults/sample "
                      f"{rows[-1]['faults_per_sample']:.0f}  load {load}", flush=True)
    path = common.write_results(rows, NAME + args.tag, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
