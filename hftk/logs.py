"""metrics.jsonl and console logging, on the main process only."""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("hftk")

METRICS_FILE = "metrics.jsonl"


LOG_FILE = "train.log"
THIRD_PARTY = ("datasets", "transformers", "accelerate", "DeepSpeed", "torch", "absl", "py.warnings")
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"

_verbosity = NORMAL
_console: Any = None  # the rich console log lines and the progress bar share, when stderr is a terminal
_pending = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)


def set_verbosity(verbosity: str) -> None:
    global _verbosity
    _verbosity = verbosity


class _OwnLines(logging.Filter):
    """The terminal shows hftk's own records; the rest (third-party warnings included) go to train.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _verbosity == VERBOSE or record.name == "hftk" or record.name.startswith("hftk.")


def setup_logging(is_main: bool) -> None:
    """Terminal: hftk's lines on stderr (errors only with --quiet, everything with --verbose).
    Everything else is held until train.log opens (attach_log_file)."""
    import sys

    global _console
    # Progress goes to stderr, like every Hugging Face library; stdout stays for results. A log file
    # or CI gets plain lines: rich would wrap them at 80 columns and split what a grep looks for.
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        _console = _console or Console(stderr=True)
        terminal: logging.Handler = RichHandler(console=_console, show_path=False, show_time=False)
        terminal.setFormatter(logging.Formatter("%(message)s"))
    else:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    terminal.addFilter(_OwnLines())
    terminal.setLevel(logging.ERROR if _verbosity == QUIET else logging.INFO if is_main else logging.WARNING)
    handlers = [terminal] + ([_pending] if is_main else [])
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    logging.captureWarnings(True)  # Python warnings become records of the py.warnings logger
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING if is_main else logging.ERROR)
    logging.getLogger("absl").setLevel(logging.INFO if is_main else logging.ERROR)  # rouge_score's few notes
    _route_library_handlers()


def _route_library_handlers() -> None:
    """transformers, datasets and DeepSpeed print through handlers of their own; send their records to
    ours instead, and keep their tqdm bars (e.g. "Writing model shards") off the terminal."""
    import sys

    if "transformers" in sys.modules:
        import transformers.utils.logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        if _verbosity != VERBOSE:
            transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets.utils.logging as datasets_logging

        datasets_logging.enable_propagation()
        if _verbosity != VERBOSE:
            datasets_logging.disable_progress_bar()
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed_logger.handlers):
        deepspeed_logger.removeHandler(handler)
    deepspeed_logger.propagate = True


def import_deepspeed_quietly() -> None:
    """DeepSpeed logs "Setting accelerator to CPU" to stdout while it is imported (Accelerate imports it),
    through a handler it makes at that moment: import it first with stdout caught, and log what it said."""
    import contextlib
    import importlib.util
    import io
    import sys

    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    caught = io.StringIO()
    with contextlib.redirect_stdout(caught):
        import deepspeed  # noqa: F401
    _route_library_handlers()
    for line in caught.getvalue().splitlines():
        if line.strip():  # without DeepSpeed's own "[time] [LEVEL] [file:line:function]" prefix
            logging.getLogger("DeepSpeed").warning(re.sub(r"^(\[[^\]]*\] ){1,3}", "", line))


def attach_log_file(output_dir: Path) -> None:
    """Open train.log in the run folder (main process) and write into it what was held so far."""
    handler = logging.FileHandler(Path(output_dir) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s %(name)s: %(message)s"))
    root = logging.getLogger()
    _pending.setTarget(handler)
    _pending.flush()
    root.removeHandler(_pending)
    root.addHandler(handler)
    _route_library_handlers()


def progress_console() -> Any:
    """The console a progress bar may draw on: stderr is a terminal and the user did not ask for quiet."""
    return _console if _verbosity != QUIET else None


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # an interval
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool, forward: Any = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.forward = forward  # also hands each row to the experiment trackers

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.forward is not None:
            self.forward(row)
        row = {k: _clean(v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info(" ".join(f"{k}={_shown(v)}" for k, v in row.items()))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))
