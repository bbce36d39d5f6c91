"""metrics.jsonl and console logging, on the main process only."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("hftk")

METRICS_FILE = "metrics.jsonl"


def setup_logging(is_main: bool) -> None:
    import sys

    from rich.console import Console
    from rich.logging import RichHandler

    # Progress goes to stderr, like every Hugging Face library; stdout stays for results. A log file
    # or CI gets plain lines: rich would wrap them at 80 columns and split what a grep looks for.
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=[handler], force=True)
    for noisy in ("datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if is_main else logging.ERROR)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))
