"""Test-only fault injection: Python imports this at start-up when a test puts this folder on
PYTHONPATH. HFTK_FAULT=KIND:N[:RANK] SIGKILLs the process right after the N-th call of:
  step  -> an optimizer step (hftk.train.loop.train_window)
  micro -> a training micro-batch forward (hftk.train.loop.token_loss_sums)
  save  -> Accelerator.save_state, i.e. mid-checkpoint: state written, no manifest, no rename
optionally only on process RANK, and only in a launch's first attempt (TORCHELASTIC_RESTART_COUNT unset or
0), so that a restarted attempt runs clean. Other kinds, after the N-th optimizer step of the process:
  freeze -> SIGSTOPs the process: it stays alive and silent (a wedged worker, a partition)
  spike  -> multiplies the step's reported loss by 1000, and remembers the step's training examples
            (input ids without padding) in the file HFTK_FAULT_KEYS; from then on, in this process or any
            later one given the same file, every step that trains on one of them spikes again, and the
            N-th step spikes only if the file did not exist yet. A spike keyed by example: a run that
            skips those examples sees no more of it, a rerun meets it at the same step.
  spikes -> every step from the N-th on reports 1000x its loss (a divergence that skipping cannot cure)
HFTK_FAULT=pace:N[:RANK] instead sleeps N milliseconds after every optimizer step: a run slow enough for
a signal sent after step k to land before the last step. Several faults: separate them with commas.
HFTK_HIDE_PACKAGES=NAME[,NAME] makes the import system find no such package, as on a machine where it was
never installed (importlib.util.find_spec answers None, import raises ModuleNotFoundError).
HFTK_RECORD=DIR (with or without a fault) appends each optimizer step's training examples (input ids
without padding) to DIR/rank-R.jsonl: which examples each process drew.
Production code knows nothing of this.
"""

import importlib.machinery
import os
import signal
import sys
import time

_SPEC = os.environ.get("HFTK_FAULT")


def _arm(spec: str) -> None:
    kind, count, *rank = spec.split(":")
    if rank and os.environ.get("RANK", "0") != rank[0]:
        return
    if kind == "pace":
        _pace(int(count) / 1000)
        return
    if kind in ("spike", "spikes"):
        _spike(int(count), keyed=kind == "spike")
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # a restarted attempt: the fault has done its work
    if kind == "freeze":
        _freeze(int(count))
        return
    calls = [0]

    def counting(original):
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] == int(count):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    if kind in ("step", "micro"):
        from hftk.train import loop

        name = "train_window" if kind == "step" else "token_loss_sums"
        setattr(loop, name, counting(getattr(loop, name)))
    elif kind == "save":
        from accelerate import Accelerator

        Accelerator.save_state = counting(Accelerator.save_state)


def _window_rows(window) -> list[list[int]]:
    rows = []
    for batch in window:
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            rows.append([i for i, m in zip(ids, mask) if m])
    return rows


def _spike(count: int, keyed: bool) -> None:
    import json

    from hftk.train import loop

    step, calls, path = loop.train_window, [0], os.environ.get("HFTK_FAULT_KEYS", "")

    def spiking(parts, window, *args, **kwargs):
        share = step(parts, window, *args, **kwargs)
        calls[0] += 1
        if not keyed:
            return share * 1000 if calls[0] >= count else share
        rows = _window_rows(window)
        if calls[0] == count and not os.path.exists(path):
            with open(path, "w") as handle:
                json.dump(rows, handle)
            return share * 1000
        keys = set()
        if os.path.exists(path):
            with open(path) as handle:
                keys = {tuple(r) for r in json.load(handle)}
        return share * 1000 if any(tuple(r) in keys for r in rows) else share

    loop.train_window = spiking


def _freeze(count: int) -> None:
    from hftk.train import loop

    step, calls = loop.train_window, [0]

    def freezing(*args, **kwargs):
        result = step(*args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    loop.train_window = freezing


def _pace(seconds: float) -> None:
    from hftk.train import loop

    step = loop.train_window

    def paced(*args, **kwargs):
        result = step(*args, **kwargs)
        time.sleep(seconds)
        return result

    loop.train_window = paced


if _SPEC and "accelerate" not in os.path.basename(os.environ.get("_", "")):
    for _one in _SPEC.split(","):
        _arm(_one)


class _Hidden:
    """The path finder, blind to the hidden packages."""

    def __init__(self, finder, hidden):
        self.finder, self.hidden = finder, hidden

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.hidden:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


_HIDE = {name for name in os.environ.get("HFTK_HIDE_PACKAGES", "").split(",") if name}
if _HIDE:
    sys.meta_path[:] = [_Hidden(f, _HIDE) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def _record(folder: str) -> None:
    import json

    from hftk.train import loop

    step = loop.train_window
    path = os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.jsonl")

    def recorded(parts, window, *args, **kwargs):
        rows = []
        for batch in window:
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                rows.append([i for i, m in zip(ids, mask) if m])
        with open(path, "a") as handle:
            handle.write(json.dumps(rows) + "\n")
        return step(parts, window, *args, **kwargs)

    loop.train_window = recorded


if os.environ.get("HFTK_RECORD") and "accelerate" not in os.path.basename(os.environ.get("_", "")):
    _record(os.environ["HFTK_RECORD"])
