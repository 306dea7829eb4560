"""How long `polymodal generate` takes to start before it loads the checkpoint (issue 17).

Claim: on a trained run, a fresh process spends at most 2 s before the checkpoint load: importing
torch and polymodal's CLI, reading config.yaml and tokenizer.json, and building the model (no
data, references or judges are read). Each repeat is a new Python process (imports are what
dominates, and only a fresh process pays them); the script prints each phase per repeat.

    polymodal train --config tiny run_dir=runs/tiny
    python benchmarks/bench_startup.py runs/tiny --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

# Runs in the child: times each phase and prints them as JSON. The checkpoint load is timed by
# wrapping the function `load_run` calls, so "before" ends exactly where it starts.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # noqa: F401
t1 = time.perf_counter()
from polymodal.cli.main import main  # noqa: F401
from polymodal.training import run as run_module
t2 = time.perf_counter()
marks = {}
real = run_module.load_checkpoint
def timed(*args, **kwargs):
    marks["start"] = time.perf_counter()
    out = real(*args, **kwargs)
    marks["end"] = time.perf_counter()
    return out
run_module.load_checkpoint = timed
run_module.load_run(sys.argv[1])
print(json.dumps({"torch": t1 - t0, "polymodal": t2 - t1, "config_and_build": marks["start"] - t2,
                  "before_checkpoint": marks["start"] - t0, "checkpoint": marks["end"] - marks["start"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained run folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, args.run_dir], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| repeat | " + " | ".join(f"{k} (s)" for k in keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for i, row in enumerate(rows, start=1):
        print(f"| {i} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    print("| median | " + " | ".join(f"{statistics.median(r[k] for r in rows):.2f}" for k in keys) + " |")
    worst = max(r["before_checkpoint"] for r in rows)
    print(f"line (before the checkpoint load <= 2 s): worst {worst:.2f} s, {'met' if worst <= 2.0 else 'not met'}")


if __name__ == "__main__":
    main()
