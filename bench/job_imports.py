"""What an SVM job pays to import skops: plainly, and through leukotype's torch-free import.

Every job that saves or loads an SVM (in the demo: 12 train_svm, 4 adapt_external_svm, 4
predict_external_svm and 3 export_model jobs) imports ``skops.io``, and importing it walks all of
scikit-learn, whose torch adapter imports torch (:func:`leukotype.classify._skops_io`). Each
timing is a fresh interpreter (``python -c``), as a job is; the repeats alternate so both see
the same machine load. Rows, each with the best (``seconds``: the least the machine needs) and
the median over the repeats:

- ``classify``: ``import leukotype.classify`` (what the job needs besides skops; the baseline);
- ``classify_skops_plain``: the same, then ``import skops.io``;
- ``classify_skops_torch_free``: the same, then ``leukotype.classify._skops_io()``.

``extra_seconds`` is a row's best less the baseline's best; ``torch_imported`` says whether the
interpreter held torch at the end. ``trusted_types`` (how many) and ``trusted_types_equal``:
both skops imports trust the same scikit-learn types (the stub changes nothing skops lists).

    .venv/bin/python bench/job_imports.py            # 7 repeats, ~1 min
    .venv/bin/python bench/job_imports.py --quick    # 1 repeat (smoke test)
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

_REPORT = (
    "import sys, json, hashlib; from skops.io import _trusted_types as t; "
    "print(json.dumps({'torch': 'torch' in sys.modules, 'n_types': len(t.SKLEARN_ESTIMATOR_TYPE_NAMES), "
    "'types': hashlib.md5('\\n'.join(sorted(t.SKLEARN_ESTIMATOR_TYPE_NAMES)).encode()).hexdigest()}))"
)

CASES = {
    "classify": "import leukotype.classify; import sys, json; print(json.dumps({'torch': 'torch' in sys.modules}))",
    "classify_skops_plain": "import leukotype.classify; import skops.io; " + _REPORT,
    "classify_skops_torch_free": "import leukotype.classify; leukotype.classify._skops_io(); " + _REPORT,
}


def run_case(code: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Path:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    reports: dict[str, dict] = {}
    load = common.load_avg()
    for _ in range(repeats):
        for name, code in CASES.items():
            elapsed, reports[name] = run_case(code)
            seconds[name].append(elapsed)
    baseline = min(seconds["classify"])
    same_types = reports["classify_skops_plain"]["types"] == reports["classify_skops_torch_free"]["types"]
    rows = [{"benchmark": "job_imports", "measurement": name, "repeats": repeats, "threads": 1,  # an import is serial
             "seconds": round(min(values), 3), "seconds_median": round(common.median(values), 3),
             "extra_seconds": round(min(values) - baseline, 3),
             "torch_imported": reports[name]["torch"],
             "trusted_types": reports[name].get("n_types", ""),
             "trusted_types_equal": same_types if "skops" in name else "",
             "load_avg_1m": load, "load_avg_1m_end": common.load_avg()}
            for name, values in seconds.items()]
    common.print_table(rows, ["measurement", "seconds", "seconds_median", "extra_seconds", "torch_imported",
                              "trusted_types_equal"])
    path = common.write_results(rows, "job_imports", args.out)
    print(f"written {path}")
    return path


if __name__ == "__main__":
    main()
