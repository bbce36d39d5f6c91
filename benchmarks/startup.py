"""Start-up against the size of the data: `hftk validate`, the first `hftk finetune` (nothing cached) and
a second one on unchanged data, each timed to its first optimizer step, with the process's peak memory.

    python benchmarks/startup.py                   # 50k and 500k rows map-style, 5M rows streaming
    python benchmarks/startup.py --rows 50000      # one size, map-style

Synthetic translation rows (en -> fr pairs of random words) go into a temporary folder with their own
caches (HF_DATASETS_CACHE, HFTK_CACHE), so nothing from an earlier run answers. The model is a tiny
scratch T5 whose tokenizer is trained on the first 2000 rows: what is measured is hftk's start-up, not
training. Times are wall-clock seconds on whatever else the machine runs; print the table into
benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(3000)]


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    generator = random.Random(seed)
    with path.open("w") as handle:
        for i in range(rows):
            english = " ".join(generator.choices(WORDS, k=generator.randint(6, 14)))
            french = " ".join(generator.choices(WORDS, k=generator.randint(6, 14)))
            handle.write(json.dumps({"id": i, "translation": {"en": english, "fr": french}}) + "\n")


def recipe(folder: Path, train: Path, streaming: bool) -> Path:
    settings = {
        "task": "translation",
        "model": {"config": {"model_type": "t5", "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64,
                             "num_layers": 1, "num_decoder_layers": 1},
                  "tokenizer": {"train": {"vocab_size": 500, "max_texts": 2000}}},
        "data": {"train": str(train), "source_lang": "en", "target_lang": "fr", "max_source_length": 32,
                 "max_target_length": 32, "streaming": streaming},
        "train": {"output_dir": str(folder / "run"), "max_steps": 3, "logging_steps": 1,
                  "per_device_train_batch_size": 8, "overwrite_output_dir": True},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def timed(command: list[str], env: dict, first_step: Path | None = None) -> dict:
    """Seconds to exit (or, with `first_step`, until metrics.jsonl logs step 1) and the peak RSS in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    reached = None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # the child's own peak, not the largest so far
        if pid:
            break
        if first_step is not None and reached is None and first_step.exists() and first_step.read_text().strip():
            reached = time.perf_counter() - started
        time.sleep(0.05)
    ended = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read()[-2000:]}")
    return {"seconds": round(reached if reached is not None else ended, 1), "peak_mib": round(usage.ru_maxrss / 1024)}


def measure(rows: int, streaming: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="hftk-startup-") as tmp:
        folder = Path(tmp)
        train = folder / "train.jsonl"
        write_rows(train, rows)
        path = recipe(folder, train, streaming)
        env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "datasets"), "HFTK_CACHE": str(folder / "hftk"),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        hftk = [sys.executable, "-m", "hftk"]
        metrics = folder / "run" / "metrics.jsonl"
        found = {"rows": rows, "mode": "streaming" if streaming else "map-style",
                 "file_mib": round(train.stat().st_size / 2**20)}
        found["validate"] = timed([*hftk, "validate", str(path), "--no-cache"], env)
        found["first_start"] = timed([*hftk, "finetune", str(path)], env, metrics)
        shutil.rmtree(folder / "run")  # so the first metrics row seen is the second run's
        found["second_start"] = timed([*hftk, "finetune", str(path)], env, metrics)
        return found


def table(found: list[dict]) -> str:
    lines = ["| rows | mode | file | validate | first start | second start |",
             "| --- | --- | --- | --- | --- | --- |"]
    for f in found:
        cells = [f"{f['rows']:,}", f["mode"], f"{f['file_mib']} MiB"]
        cells += [f"{f[k]['seconds']} s, {f[k]['peak_mib']} MiB" for k in ("validate", "first_start", "second_start")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=None, help="map-style sizes (default 50000 500000)")
    parser.add_argument("--stream-rows", type=int, default=5_000_000, help="streaming size (0: none)")
    arguments = parser.parse_args()
    found = [measure(rows, streaming=False) for rows in (arguments.rows or [50_000, 500_000])]
    if arguments.stream_rows:
        found.append(measure(arguments.stream_rows, streaming=True))
    print(json.dumps(found, indent=1))
    print(table(found))


if __name__ == "__main__":
    main()
