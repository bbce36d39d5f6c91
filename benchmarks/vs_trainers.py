"""hftk against the Hugging Face trainers, run alternately on the same work; markdown + JSON with ratios.

    python benchmarks/vs_trainers.py                                   # every task, recipe epochs, 1 seed
    python benchmarks/vs_trainers.py --tasks summarization --steps 200
    python benchmarks/vs_trainers.py --seeds 3                         # the quality table: mean ± sd
    python benchmarks/vs_trainers.py --qa-data train.jsonl,dev.jsonl   # adds SQuAD-file rows (Hub schema)
    python benchmarks/vs_trainers.py --hftk-set train.some_new_key=true --hftk-mixed-precision bf16

Tasks (override a recipe with --recipe NAME=PATH):
  summarization  recipes/summarize.yaml      scratch T5   vs Seq2SeqTrainer
  translation    recipes/translate.yaml      scratch T5   vs Seq2SeqTrainer
  decoder_only   recipes/translate_gpt2.yaml scratch GPT-2 vs Trainer (prompt tokens masked as hftk masks them)
  extractive_qa  recipes/extractive_qa.yaml  scratch BERT vs Trainer with the transformers QA example's
                 windows and postprocess_qa_predictions (n_best 20, max answer 30)
  squad          the same QA recipe on the files given with --qa-data

What is the same on both sides, per task and seed: one folder holding the tokenizer hftk trains and the
model hftk's seed draws (benchmarks/vs_trainers_worker.py init), loaded by both; the checked data rows
(hftk's tokenization for text tasks; the QA example's own windows for the Trainer); batch size,
optimizer and schedule settings; the number of optimizer steps (--steps, or the recipe's epochs as
hftk counts them); greedy generation settings; and the metric code (hftk.metrics).

Trainer variants (--trainers): default = fp32, the Trainer's defaults (fused AdamW on torch >= 2.8);
tuned = bf16 and length-grouped batches (the QA example then pads each batch, not to max length).
hftk runs with its recipe as given plus --hftk-set; its precision comes from the Accelerate config,
so --hftk-mixed-precision bf16 sets ACCELERATE_MIXED_PRECISION for the hftk processes.

Each side runs in a process of its own; peak memory is that process's peak resident set (wait4's
ru_maxrss), host memory only. Tokens are non-pad tokens of the batches trained (encoder inputs plus
decoder targets for encoder-decoders), counted the same way on both sides. Training seconds are the
loop's own (hftk's train_runtime; the Trainer's on_train_begin -> on_train_end). Evaluation seconds
time the validation pass as each side does it, the validation loss included (hftk reports it; the
Trainer's predict computes it, and the decoder-only side calls Trainer.evaluate): forward passes,
generation or span search, decoding and scoring; for hftk, its own evaluate_split on its saved model.
Both paths also evaluate hftk's final weights, which times them on identical work and checks that
they predict the same texts.

Time to the Trainer's metric: a second hftk run of the first seed evaluates every --eval-every
optimizer steps (the same trajectory: evaluation draws no random numbers); the first evaluation whose
metric reaches the default Trainer's final metric gives the step, and seconds = step x the clean
run's training seconds per step (evaluation time left out, as it is for the Trainer's own figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "vs_trainers_worker.py"
sys.path.insert(0, str(ROOT))

from hftk.recipe_yaml import read_yaml

RECIPES = {"summarization": "recipes/summarize.yaml", "translation": "recipes/translate.yaml",
           "decoder_only": "recipes/translate_gpt2.yaml", "extractive_qa": "recipes/extractive_qa.yaml"}
METRIC = {"summarization": "rougeL", "translation": "bleu", "extractive_qa": "f1", "generative_qa": "f1"}
TRAINER_VARIANTS = ("default", "tuned")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(RECIPES), help="comma list of " + ", ".join([*RECIPES, "squad"]))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's epochs)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per side, seeds recipe seed, +1, +2, ...")
    parser.add_argument("--trainers", default=",".join(TRAINER_VARIANTS), help="comma list of default, tuned")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="[TASK:]KEY=VALUE",
                        help="a recipe override for both sides (repeatable), e.g. data.max_eval_samples=64")
    parser.add_argument("--hftk-set", action="append", default=[], metavar="[TASK:]KEY=VALUE",
                        help="a recipe override for hftk only (repeatable): settings the Trainer has no use for")
    parser.add_argument("--hftk-mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                        help="ACCELERATE_MIXED_PRECISION for the hftk processes (default: as the environment)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluation interval of the time-to-metric run (default: steps/10; 0: no such run)")
    parser.add_argument("--qa-data", default=None, metavar="TRAIN,VALIDATION",
                        help="SQuAD-schema files (id, title, context, question, answers{text, answer_start}) "
                             "for the squad task; added to --tasks when given")
    parser.add_argument("--recipe", action="append", default=[], metavar="TASK=PATH", help="another recipe for a task")
    parser.add_argument("--out", default="benchmarks/vs_trainers", help="writes OUT.json and OUT.md")
    parser.add_argument("--work-dir", default=None, help="where runs go (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.qa_data and "squad" not in args.tasks:
        args.tasks.append("squad")
    args.trainers = [t for t in args.trainers.split(",") if t]
    problems = [f"unknown task '{t}'" for t in args.tasks if t not in [*RECIPES, "squad"]]
    problems += [f"unknown trainer variant '{t}'" for t in args.trainers if t not in TRAINER_VARIANTS]
    if not args.trainers:
        problems.append("--trainers needs at least one of default, tuned")
    if "squad" in args.tasks and not (args.qa_data and len(args.qa_data.split(",")) == 2):
        problems.append("the squad task needs --qa-data TRAIN,VALIDATION")
    if problems:
        parser.error("; ".join(problems))
    return args


def task_recipes(args: argparse.Namespace) -> dict[str, dict]:
    recipes = dict(RECIPES, squad=RECIPES["extractive_qa"])
    for item in args.recipe:
        name, _, path = item.partition("=")
        recipes[name] = path
    tasks = {}
    for name in args.tasks:
        path = recipes[name]
        kind = read_yaml(path)["task"]
        if kind not in METRIC:
            raise SystemExit(f"vs_trainers: {path} is a {kind} recipe; supported: {', '.join(METRIC)}")
        common = [o for o in _for_task(args.common, name)]
        if name == "squad":
            train, validation = args.qa_data.split(",")
            common = [f"data.train={train}", f"data.validation={validation}", *common]
        tasks[name] = {"recipe": path, "kind": kind, "metric": METRIC[kind], "common": common,
                       "hftk_set": _for_task(args.hftk_set, name)}
    return tasks


def _for_task(overrides: list[str], task: str) -> list[str]:
    """KEY=VALUE applies to every task, TASK:KEY=VALUE to that task only."""
    picked = []
    for item in overrides:
        prefix, colon, rest = item.partition(":")
        if colon and "=" not in prefix:
            if prefix == task:
                picked.append(rest)
        else:
            picked.append(item)
    return picked


def run_measured(command: list[str], log_path: Path, env: dict[str, str]) -> dict:
    """Runs a child to its end; its wall time and its own peak resident set (wait4, Linux KiB)."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise SystemExit(f"vs_trainers: {' '.join(command[:5])} ... exited {child.returncode}; "
                         f"log {log_path}:\n{tail}")
    return {"wall_seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024}


class Runner:
    """Runs the sides of one task; every run gets a folder under work_dir."""

    def __init__(self, args: argparse.Namespace, name: str, task: dict, work_dir: Path):
        self.args, self.name, self.task, self.work = args, name, task, work_dir / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.hftk_env = dict(self.env)
        if args.hftk_mixed_precision:
            self.hftk_env["ACCELERATE_MIXED_PRECISION"] = args.hftk_mixed_precision

    def worker(self, mode: str, label: str, spec: dict, env: dict | None = None) -> dict:
        spec_path, result_path = self.work / f"{label}.spec.json", self.work / f"{label}.result.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        measured = run_measured([sys.executable, str(WORKER), mode, str(spec_path), str(result_path)],
                                self.work / f"{label}.log", env or self.env)
        return {**json.loads(result_path.read_text()), **measured}

    def initial(self, seed: int) -> dict:
        init_dir = self.work / f"init-{seed}"
        spec = {"recipe": self.task["recipe"], "overrides": self.task["common"] + [f"train.output_dir={init_dir}"],
                "seed": seed, "init_dir": str(init_dir)}
        return {**self.worker("init", f"init-{seed}", spec), "init_dir": str(init_dir)}

    def hftk(self, seed: int, init_dir: str, steps: int, label: str, eval_steps: int | None = None) -> dict:
        from vs_trainers_worker import model_overrides

        out = self.work / label
        command = [sys.executable, "-m", "hftk", "finetune", self.task["recipe"], *self.task["common"],
                   *model_overrides(init_dir), f"train.seed={seed}", f"train.max_steps={steps}",
                   f"train.output_dir={out}", "train.overwrite_output_dir=true", "train.save_steps=null",
                   f"train.eval_steps={eval_steps or 'null'}", "train.load_best_model_at_end=false",
                   "train.early_stopping_patience=null", *self.task["hftk_set"]]
        measured = run_measured(command, self.work / f"{label}.log", self.hftk_env)
        return {"results": json.loads((out / "all_results.json").read_text()), "output_dir": str(out), **measured}

    def hftk_side(self, seed: int, init_dir: str, steps: int) -> dict:
        run = self.hftk(seed, init_dir, steps, f"hftk-{seed}")
        spec = {"recipe": self.task["recipe"], "model_dir": run["output_dir"],
                "overrides": self.task["common"] + self.task["hftk_set"] + [f"train.output_dir={run['output_dir']}"]}
        timed = self.worker("hftk-eval", f"hftk-eval-{seed}", spec, self.hftk_env)
        same = self.trainer_eval_of(run["output_dir"], seed, steps)
        results, metric = run["results"], self.task["metric"]
        return {"train_seconds": results["train_runtime"], "train_steps": results["train_steps"],
                "train_loss": results["train_loss"], "train_tokens_per_second": results["train_tokens_per_second"],
                "train_tokens": results["train_tokens_per_second"] * results["train_runtime"],
                "train_padding_fraction": results["train_padding_fraction"], "peak_rss_mib": run["peak_rss_mib"],
                "eval_seconds": timed["eval_seconds"], "metric": results[f"eval_{metric}"],
                "metrics": {k[5:]: v for k, v in results.items() if k.startswith("eval_")},
                "metric_of_timed_eval": timed["results"].get(f"eval_{metric}"), "wall_seconds": run["wall_seconds"],
                "trainer_eval_of_hftk_weights": {"variant": same["variant"], "eval_seconds": same["eval_seconds"],
                                                 "metric": same["metrics"][metric],
                                                 "identical_predictions": same["identical_predictions"],
                                                 "examples": same["examples"]}}

    def trainer_eval_of(self, model_dir: str, seed: int, steps: int) -> dict:
        """The Trainer's evaluation path on hftk's weights, in hftk's precision (tuned = bf16)."""
        variant = "tuned" if self.hftk_env.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16" else "default"
        label = f"trainer-eval-{seed}"
        spec = {"recipe": self.task["recipe"], "overrides": self.task["common"] + [f"train.output_dir={self.work / label}"],
                "seed": seed, "model_dir": model_dir, "steps": steps, "variant": variant,
                "output_dir": str(self.work / label)}
        return {**self.worker("trainer-eval", label, spec), "variant": variant}

    def trainer_side(self, seed: int, init_dir: str, steps: int, variant: str) -> dict:
        label = f"trainer-{variant}-{seed}"
        spec = {"recipe": self.task["recipe"], "overrides": self.task["common"] + [f"train.output_dir={self.work / label}"],
                "seed": seed, "init_dir": init_dir, "steps": steps, "variant": variant,
                "output_dir": str(self.work / label)}
        run = self.worker("trainer", label, spec)
        return {**run, "metric": run["metrics"][self.task["metric"]]}

    def curve(self, seed: int, init_dir: str, steps: int, every: int) -> list[dict]:
        run = self.hftk(seed, init_dir, steps, f"hftk-curve-{seed}", eval_steps=every)
        key = f"eval_{self.task['metric']}"
        rows = [json.loads(line) for line in (Path(run["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        return [{"step": r["step"], "metric": r[key]} for r in rows if key in r]


def run_task(args: argparse.Namespace, name: str, task: dict, work_dir: Path) -> dict:
    runner = Runner(args, name, task, work_dir)
    base_seed = int(read_yaml(task["recipe"]).get("train", {}).get("seed", 42))
    runs, info = [], {}
    for index in range(args.seeds):
        seed = base_seed + index
        info = runner.initial(seed)
        steps = args.steps or info["epoch_steps"]
        sides = ["hftk", *args.trainers]
        if index % 2:  # alternate who goes first, so a drifting machine favours neither side
            sides.reverse()
        run = {"seed": seed}
        for side in sides:
            print(f"[{name}] seed {seed}: {side}", flush=True)
            run[side] = (runner.hftk_side(seed, info["init_dir"], steps) if side == "hftk"
                         else runner.trainer_side(seed, info["init_dir"], steps, side))
        runs.append(run)
    first = runs[0]
    every = args.eval_every if args.eval_every is not None else max(steps // 10, 1)
    target_side = "default" if "default" in args.trainers else args.trainers[0]
    curve = None
    if every:
        print(f"[{name}] seed {first['seed']}: hftk evaluating every {every} steps", flush=True)
        curve = runner.curve(first["seed"], str(runner.work / f"init-{first['seed']}"), steps, every)
    return {"recipe": task["recipe"], "task": task["kind"], "metric": task["metric"], "optimizer_steps": steps,
            "overrides": task["common"], "hftk_set": task["hftk_set"], "model_type": info.get("model_type"),
            "parameters": info.get("parameters"), "runs": runs,
            "summary": summarize(runs, ["hftk", *args.trainers]),
            "time_to_target": time_to_target(first, curve, target_side, every) if curve is not None else None}


FIGURES = ("train_tokens_per_second", "train_seconds", "train_padding_fraction", "peak_rss_mib", "eval_seconds",
           "metric", "train_loss")


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict], sides: list[str]) -> dict:
    summary = {side: {f: mean_sd([r[side][f] for r in runs]) for f in FIGURES} for side in sides}
    hftk = summary["hftk"]
    for side in sides[1:]:
        summary[f"hftk_over_{side}"] = {
            f: hftk[f]["mean"] / summary[side][f]["mean"] if summary[side][f]["mean"] else None
            for f in ("train_tokens_per_second", "eval_seconds", "peak_rss_mib", "train_seconds")}
    return summary


def time_to_target(run: dict, curve: list[dict], target_side: str, every: int) -> dict:
    target = run[target_side]["metric"]
    hftk = run["hftk"]
    seconds_per_step = hftk["train_seconds"] / hftk["train_steps"]
    hit = next((row for row in curve if row["metric"] >= target), None)
    best = max(curve, key=lambda row: row["metric"])
    result = {"seed": run["seed"], "target_from": target_side, "target": target, "eval_every": every,
              "curve": curve, "hftk_seconds_per_step": seconds_per_step,
              "trainer_train_seconds": run[target_side]["train_seconds"], "reached_at_step": None,
              "hftk_seconds": None, "hftk_over_trainer": None, "best": best}
    if hit:
        seconds = hit["step"] * seconds_per_step
        result.update(reached_at_step=hit["step"], hftk_seconds=seconds,
                      hftk_over_trainer=seconds / run[target_side]["train_seconds"])
    return result


def environment() -> dict:
    import accelerate
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                            cwd=ROOT).stdout
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "commit": commit.strip(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_trainers_report import markdown

    tasks = task_recipes(args)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_trainers-"))
    report = {"settings": {"tasks": args.tasks, "steps": args.steps, "seeds": args.seeds, "trainers": args.trainers,
                           "set": args.common, "hftk_set": args.hftk_set,
                           "hftk_mixed_precision": args.hftk_mixed_precision or os.environ.get(
                               "ACCELERATE_MIXED_PRECISION", "no"), "qa_data": args.qa_data},
              "environment": environment(), "tasks": {}}
    try:
        for name, task in tasks.items():
            report["tasks"][name] = run_task(args, name, task, work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
