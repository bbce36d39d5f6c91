"""Every accelerate config on this machine against one process: loss difference, eval, speed.

    python benchmarks/strategies.py [recipes/summarize.yaml] [--steps 20]

Runs the recipe once in one process with batch 2B, then under every config in accelerate_configs/
on 2 processes with batch B (the README's launch lines, run as they are), and writes the per-strategy
maximum relative loss difference, eval_loss, eval_rougeL and seconds per optimizer step to
benchmarks/strategies.json. One run, this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = ["ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_shard_grad_op"]
# Different process counts draw different dropout masks, so the comparison runs without dropout.
NO_DROPOUT = {"t5": ["model.config.dropout_rate=0.0"],
              "gpt2": ["model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0"]}


def _no_dropout(recipe: str) -> list[str]:
    import yaml

    config = (yaml.safe_load(Path(recipe).read_text()).get("model") or {}).get("config") or {}
    return NO_DROPOUT.get(config.get("model_type"), [])


def run(recipe: str, out: Path, batch: int, steps: int, launcher: list[str], env: dict) -> dict:
    command = launcher + ["hftk", "finetune", recipe, f"train.output_dir={out}", f"train.max_steps={steps}",
                          f"train.per_device_train_batch_size={batch}", "train.logging_steps=1",
                          "train.save_steps=null", "data.max_eval_samples=64", *_no_dropout(recipe)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, **env})
    results = json.loads((out / "all_results.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["loss"] for r in rows if "loss" in r}, "eval_loss": results["eval_loss"],
            "eval_rougeL": results.get("eval_rougeL"), "seconds_per_step": results["train_runtime"] / steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/summarize.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="per process; the single run uses twice this")
    args = parser.parse_args()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        single = run(args.recipe, Path(tmp) / "single", 2 * args.batch, args.steps, [sys.executable, "-m"], {})
        table.append({"strategy": "single process (batch 2B)", "rel_loss_diff_step_1": 0.0, "max_rel_loss_diff": 0.0,
                      **_row(single)})
        for name in CONFIGS:
            launcher = ["accelerate", "launch", "--config_file", f"accelerate_configs/{name}.yaml", "-m"]
            result = run(args.recipe, Path(tmp) / name, args.batch, args.steps, launcher, {})
            diffs = {s: abs(result["losses"][s] - single["losses"][s]) / abs(single["losses"][s]) for s in single["losses"]}
            # Reduction order differs between layouts; at a high learning rate the last bits grow step by step.
            table.append({"strategy": f"{name} (2 x B)", "rel_loss_diff_step_1": diffs[1],
                          "max_rel_loss_diff": max(diffs.values()), **_row(result)})
    print(json.dumps(table, indent=2))
    Path("benchmarks/strategies.json").write_text(json.dumps(table, indent=2) + "\n")


def _row(result: dict) -> dict:
    return {k: result[k] for k in ("eval_loss", "eval_rougeL", "seconds_per_step")}


if __name__ == "__main__":
    main()
