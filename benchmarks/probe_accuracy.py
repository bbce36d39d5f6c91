"""`hftk plan --probe` against the real training time of the same recipe, alternating the two.

    python benchmarks/probe_accuracy.py [recipes/summarize.yaml] [--repeats 3] [--probe-steps 3] [--baseline DIR]

Each repetition runs `hftk plan RECIPE --probe N --json` and then `hftk finetune RECIPE` (one process,
a fresh output_dir each time) and compares the probe's estimated training seconds with the run's
train_runtime (the training loop's wall time: it holds any evaluation and checkpoint during training,
not the final evaluation). Alternating puts both under the same load when the machine is shared; the
load average before each command is recorded beside it. --baseline DIR also runs the probe of another
checkout of hftk (its own folder, with its recipes and data) in each repetition, for before/after figures
under the same conditions. Writes benchmarks/probe_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def hftk(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """The command in a fresh interpreter; from `cwd`, `python -m hftk` runs that folder's hftk."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hftk", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=cwd or HERE.parent)
    if done.returncode:
        raise SystemExit(f"hftk {' '.join(args)} ended {done.returncode}: {done.stderr[-2000:]}")
    return done, time.perf_counter() - started


def probe_estimate(recipe: str, steps: int, overrides: list[str], output_dir: Path, cwd: Path | None = None) -> dict:
    done, wall = hftk("plan", recipe, "--probe", str(steps), "--json", f"train.output_dir={output_dir}", *overrides,
                      cwd=cwd)
    report = json.loads(done.stdout)
    probe = report["probe"]
    # an older checkout's probe records fewer of these
    extra = {key: probe[key] for key in ("steps_measured", "fastest_step", "slowest_step", "cpu_share") if key in probe}
    return {"estimated_training_seconds": probe["estimated_training_seconds"],
            "seconds_per_step": probe["seconds_per_step"], "total_steps": report["total_steps"],
            "plan_wall_seconds": wall, **extra}


def real_run(recipe: str, overrides: list[str], output_dir: Path) -> dict:
    _, wall = hftk("finetune", recipe, f"train.output_dir={output_dir}", "--quiet", *overrides)
    results = json.loads((output_dir / "all_results.json").read_text())
    return {"train_runtime": results["train_runtime"], "train_steps": results["train_steps"],
            "finetune_wall_seconds": wall}


def ratio_summary(rows: list[dict]) -> dict:
    """Estimate / real per repetition, their median and extremes, and how many fall within 25%."""
    ratios = [row["estimated_training_seconds"] / row["train_runtime"] for row in rows]
    return {"ratios": ratios, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios), "within_25_percent": sum(abs(r - 1) <= 0.25 for r in ratios)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/summarize.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "probe_accuracy.json")
    parser.add_argument("--baseline", type=Path, help="another checkout of hftk whose probe runs alongside")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides for both commands")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            row = {"repeat": repeat, "load_before_probe": os.getloadavg()[0]}
            row.update(probe_estimate(args.recipe, args.probe_steps, args.overrides, Path(tmp) / "planned"))
            if args.baseline:
                row["baseline"] = probe_estimate(args.recipe, args.probe_steps, args.overrides, Path(tmp) / "planned",
                                                 args.baseline.resolve())
            row["load_before_run"] = os.getloadavg()[0]
            row.update(real_run(args.recipe, args.overrides, Path(tmp) / f"run{repeat}"))
            row["ratio"] = row["estimated_training_seconds"] / row["train_runtime"]
            if args.baseline:
                row["baseline"]["ratio"] = row["baseline"]["estimated_training_seconds"] / row["train_runtime"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"recipe": args.recipe, "probe_steps": args.probe_steps, "overrides": args.overrides,
               "cpus": os.cpu_count(), "rows": rows, **ratio_summary(rows)}
    if args.baseline:
        baseline = [{**row["baseline"], "train_runtime": row["train_runtime"]} for row in rows]
        summary["baseline"] = {"checkout": str(args.baseline), **ratio_summary(baseline)}
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"median estimate / real: {summary['median_ratio']:.2f} ({summary['min_ratio']:.2f} to "
          f"{summary['max_ratio']:.2f}); {summary['within_25_percent']} of {len(rows)} within 25%")
    if args.baseline:
        print(f"baseline: median {summary['baseline']['median_ratio']:.2f} ({summary['baseline']['min_ratio']:.2f} to "
              f"{summary['baseline']['max_ratio']:.2f})")


if __name__ == "__main__":
    main()
