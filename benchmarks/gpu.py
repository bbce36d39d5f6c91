"""Training throughput and MFU of hftk on GPUs: T5-base, GPT-2-small and BERT-base sized models from
scratch, bf16, through hftk's own recipes and `accelerate launch` (DDP over NCCL when there are
several GPUs). Writes OUT.json and OUT.md.

    python benchmarks/gpu.py                            # every model, 60 optimizer steps each
    python benchmarks/gpu.py --models gpt2 --steps 200 --peak-tflops 989
    python benchmarks/gpu.py --dry-run                  # no GPU needed: write, validate and print the recipes

The data is synthetic: random words from a fixed lexicon, long enough that every row is cut to the
recipe's lengths (T5: 512 source + 128 target tokens; GPT-2: blocks of 1023; BERT: 384-token QA
windows), so batches carry (almost) no padding. No validation split: nothing but training is timed.

Attention runs as transformers picks by default (SDPA for all three here; hftk's model.config
refuses an attn_implementation field, see the report). Tokens per second are hftk's own count of
non-pad tokens (encoder inputs plus decoder targets for T5), summed over GPUs; "steady" is the
median of the logging windows after the first (compilation of kernels, allocator warm-up).

MFU = tokens/s x model FLOPs per token / (GPUs x peak). Model FLOPs per training row are
6 x N x tokens for the weights (N without embedding lookups, with the tied output head) plus
12 x layers x d_model x query tokens x key tokens for attention scores and values (full, not halved
for a causal mask), and for T5 the encoder and decoder counted on their own tokens, cross-attention
included. Peak: dense bf16, 989 TFLOPS for H100/H200 SXM, 312 for A100, else --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {
    "t5": {"task": "summarization", "source": 512, "target": 128, "batch": 32, "learning_rate": 1e-4,
           "config": {"model_type": "t5", "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
                      "num_decoder_layers": 12, "num_heads": 12, "vocab_size": 32128}},
    # Blocks of 1023: hftk's length check adds max_target_length (at least 1, unused by text_generation)
    # to the block size against n_positions.
    "gpt2": {"task": "text_generation", "source": 1023, "target": 1, "batch": 16, "learning_rate": 3e-4,
             "config": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                        "n_positions": 1024}},
    "bert": {"task": "extractive_qa", "source": 384, "target": 1, "batch": 32, "learning_rate": 1e-4,
             "config": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per model")
    parser.add_argument("--batch", action="append", default=[], metavar="MODEL=B", help="per-GPU batch size")
    parser.add_argument("--rows", type=int, default=2048, help="synthetic training rows per model")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per-GPU dense bf16 peak (default: by name)")
    parser.add_argument("--dry-run", action="store_true", help="write, validate and print the recipes and commands")
    parser.add_argument("--out", default="benchmarks/gpu", help="writes OUT.json and OUT.md")
    parser.add_argument("--work-dir", default=None, help="where data and runs go (default: temporary, removed)")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.batch = {name: int(size) for name, _, size in (b.partition("=") for b in args.batch)}
    return args


def lexicon(rng: random.Random, size: int = 20000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(size)]


def synthetic_rows(model: str, rows: int, seed: int = 0) -> list[dict]:
    """Rows several times longer than the recipe keeps, so truncation makes every row full length."""
    rng = random.Random(seed)
    words = lexicon(rng)

    def text(count: int) -> str:
        return " ".join(rng.choices(words, k=count))

    if model == "t5":
        return [{"document": text(900), "summary": text(250)} for _ in range(rows)]
    if model == "gpt2":
        return [{"text": text(1200)} for _ in range(rows)]
    out = []
    for index in range(rows):
        context = text(700)
        start_word = rng.randrange(50, 650)
        answer = " ".join(context.split(" ")[start_word:start_word + 2])
        start = len(" ".join(context.split(" ")[:start_word])) + 1
        out.append({"id": str(index), "title": "synthetic", "context": context, "question": f"where is {answer}?",
                    "answers": {"text": [answer], "answer_start": [start]}})
    return out


def recipe_for(model: str, steps: int, batch: int, folder: Path) -> dict:
    spec = MODELS[model]
    data = {"train": str(folder / "train.jsonl"), "max_source_length": spec["source"],
            "max_target_length": spec["target"], "preprocessing_num_workers": 8}
    if model == "t5":
        data.update(source_column="document", target_column="summary")
    if model == "bert":
        data["doc_stride"] = 128
    return {
        "task": spec["task"],
        "model": {"config": spec["config"], "tokenizer": {"train": {"vocab_size": 8000, "max_texts": 1000}}},
        "data": data,
        "train": {"output_dir": str(folder / "run"), "overwrite_output_dir": True, "max_steps": steps,
                  "per_device_train_batch_size": batch, "learning_rate": spec["learning_rate"], "warmup_steps": 10,
                  "weight_decay": 0.01, "logging_steps": max(steps // 10, 1), "dataloader_num_workers": 2},
    }


def launch_command(recipe: Path, gpus: int) -> list[str]:
    # bf16 and the process count are launch settings in hftk (Accelerate's config), not recipe keys.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", str(max(gpus, 1)),
               "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if gpus > 1:
        command.append("--multi_gpu")  # DDP; hftk picks NCCL on GPUs
    return [*command, "-m", "hftk", "finetune", str(recipe)]


def model_flops(model: str) -> dict:
    """Parameters (built on the meta device: no memory) and model FLOPs per hftk-counted token."""
    import torch
    import transformers

    from hftk.models import scratch_config

    spec = MODELS[model]
    config = scratch_config(spec["config"])
    auto = {"t5": "AutoModelForSeq2SeqLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModelForQuestionAnswering"}
    with torch.device("meta"):
        built = getattr(transformers, auto[model]).from_config(config)
    embeddings = {id(p) for m in built.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    # A tied output head shares the embedding's weights but is a real matmul on every target token.
    head = spec["config"]["vocab_size"] * _width(config) if model != "bert" and config.tie_word_embeddings else 0

    def dense(module) -> int:  # weights that multiply activations
        return sum(p.numel() for p in module.parameters() if id(p) not in embeddings)

    d, src, tgt = _width(config), spec["source"], spec["target"]
    if model == "t5":
        layers_enc, layers_dec = config.num_layers, config.num_decoder_layers
        weights = 6 * (dense(built.encoder) * src + (dense(built.decoder) + dense(built.lm_head) + head) * tgt)
        attention = 12 * d * (layers_enc * src * src + layers_dec * (tgt * tgt + tgt * src))
        tokens = src + tgt
    else:
        layers = config.num_hidden_layers
        weights = 6 * (dense(built) + head) * src
        attention = 12 * layers * d * src * src
        tokens = src
    return {"parameters": sum(p.numel() for p in built.parameters()),
            "attn_implementation": built.config._attn_implementation, "flops_per_token": (weights + attention) / tokens}


def _width(config) -> int:
    return getattr(config, "d_model", None) or getattr(config, "n_embd", None) or config.hidden_size


def steady_tokens_per_second(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][1:]
    return statistics.median(rates) if rates else None


def peak_for(device_name: str, flag: float | None) -> float | None:
    if flag:
        return flag
    return next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)


def run_model(model: str, args: argparse.Namespace, work: Path, gpus: int, peak: float | None) -> dict:
    folder = work / model
    recipe = folder / "recipe.yaml"
    command = launch_command(recipe, gpus)
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with (folder / "run.log").open("w") as log:
        done = subprocess.run(command, check=False, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "\n".join((folder / "run.log").read_text().splitlines()[-20:])
        raise SystemExit(f"gpu.py: {model} failed (exit {done.returncode}):\n{tail}")
    results = json.loads((folder / "run" / "all_results.json").read_text())
    flops = model_flops(model)
    steady = steady_tokens_per_second(folder / "run")
    row = {"model": model, "gpus": gpus, "per_gpu_batch": args.batch.get(model, MODELS[model]["batch"]),
           "steps": results["train_steps"], "wall_seconds": time.perf_counter() - started,
           "train_seconds": results["train_runtime"], "tokens_per_second": results["train_tokens_per_second"],
           "steady_tokens_per_second": steady, "padding_fraction": results["train_padding_fraction"],
           "train_loss": results["train_loss"], **flops, "peak_tflops_per_gpu": peak,
           "hftk_logged_mfu": results.get("train_mfu")}  # hftk's own count over the whole run, for comparison
    rate = steady or row["tokens_per_second"]
    row["tflops_per_gpu"] = rate * flops["flops_per_token"] / gpus / 1e12
    row["mfu"] = row["tflops_per_gpu"] / peak if peak else None
    return row


def prepare(models: list[str], args: argparse.Namespace, work: Path, rows: int) -> dict[str, Path]:
    recipes = {}
    for model in models:
        folder = work / model
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.jsonl").open("w") as handle:
            for row in synthetic_rows(model, rows):
                handle.write(json.dumps(row) + "\n")
        recipe = recipe_for(model, args.steps, args.batch.get(model, MODELS[model]["batch"]), folder)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipes[model] = folder / "recipe.yaml"
    return recipes


def dry_run(args: argparse.Namespace, work: Path) -> None:
    """Recipes on a few rows, validated by hftk (data, columns, model config built on the meta device)."""
    from hftk.preflight import plan_finetune
    from hftk.recipe import load_recipe

    for model, recipe in prepare(args.models, args, work, rows=16).items():
        plan_finetune(load_recipe(recipe))
        flops = model_flops(model)
        print(f"# {model}: {flops['parameters']:,} parameters, {flops['flops_per_token'] / 1e9:.3f} GFLOPs per "
              f"token, attention {flops['attn_implementation']}; recipe {recipe} (valid)")
        print(recipe.read_text())
        for gpus in (1, 8):
            print(f"# {gpus} GPU(s):  " + " ".join(launch_command(recipe, gpus)))
        print()


def markdown(report: dict) -> str:
    header = ("| model | parameters | attention | GPUs x batch | tokens/s (steady) | tokens/s (whole run) | "
              "TFLOPS / GPU | MFU | padding |")
    about = (f"{report['device']} x {report['gpus']}; torch {report['torch']}, transformers {report['transformers']}; "
             f"bf16; written by `python benchmarks/gpu.py`.")
    lines = ["# hftk GPU throughput", "", about, "", header, "|" + " --- |" * 9]
    for r in report["rows"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (give --peak-tflops)"
        steady = f"{r['steady_tokens_per_second']:,.0f}" if r["steady_tokens_per_second"] else ""
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['attn_implementation']} | {r['gpus']} x "
                     f"{r['per_gpu_batch']} | {steady} | {r['tokens_per_second']:,.0f} | {r['tflops_per_gpu']:.1f} | "
                     f"{mfu} | {r['padding_fraction']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="hftk-gpu-"))
    try:
        if args.dry_run:
            dry_run(args, work)
            return
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu.py: no CUDA device on this machine; this benchmark needs NVIDIA GPUs "
                     "(--dry-run writes and prints the recipes and commands without one)")
        import transformers

        gpus, device = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        peak = peak_for(device, args.peak_tflops)
        recipes = prepare(args.models, args, work, args.rows)
        rows = [run_model(model, args, work, gpus, peak) for model in recipes]
        report = {"device": device, "gpus": gpus, "torch": torch.__version__,
                  "transformers": transformers.__version__, "rows": rows}
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
