"""How long the command line takes to answer a mistake: a mistyped input path, a mistyped option, a
bad choice, a missing model, beside `--help` and `--version`. Each case runs the `hexpr` command in a
fresh process (as a user would, `python -m hexpr`), repeated; the table gives the median and worst
wall time, the exit code and the first line the user sees. Nothing here loads torch unless the CLI
does: a case that takes seconds means heavy libraries load before the arguments are checked.

    python -m benchmarks.cli_latency [--repeat 5]

Prints a table and writes JSON (default benchmarks/results/cli_latency.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("--help", ["--help"]),
    ("--version", ["--version"]),
    ("fit-head: mistyped data path", ["fit-head", "{w}/trian.csv"]),
    ("embed: mistyped data path", ["embed", "{w}/trian.csv"]),
    ("predict: missing model folder", ["predict", "{w}/no-model", "{w}/test.csv"]),
    ("predict-slide: mistyped slide", ["predict-slide", "{w}/no-model", "{w}/slide.svs"]),
    ("import: mistyped source", ["import", "{w}/her2st", "--out", "{w}/dataset"]),
    ("fit-head: mistyped option", ["fit-head", "{w}/train.csv", "--hed", "ridge"]),
    ("inspect: bad choice", ["inspect", "{w}/train.csv", "--method", "umap"]),
    ("fit-head: unknown head", ["fit-head", "{w}/train.csv", "--head", "rigde"]),
]


def run_case(args: list[str], repeat: int) -> dict:
    times, done = [], None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hexpr", *args], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
    first = next((line for line in (done.stderr + done.stdout).splitlines() if line.strip()), "")
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "exit_code": done.returncode,
            "first_line": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cli_latency.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hexpr-cli-latency-") as work:
        (Path(work) / "train.csv").write_text("ID,path,G0\nspot0,img/0.png,1.0\n")
        rows = {label: run_case([a.replace("{w}", work) for a in argv], args.repeat) for label, argv in CASES}
    print(f"{'case':34} {'median s':>9} {'max s':>7} {'exit':>5}  first line")
    for label, r in rows.items():
        line = r["first_line"].replace(work, "<tmp>")
        print(f"{label:34} {r['median_s']:9.3f} {r['max_s']:7.3f} {r['exit_code']:5d}  {line[:70]}")
    result = {"repeat": args.repeat, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
