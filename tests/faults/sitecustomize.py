"""Test-only fault injection: Python imports this at start-up when a test puts this folder on
PYTHONPATH. HFTK_FAULT=KIND:N[:RANK] SIGKILLs the process right after the N-th call of:
  step  -> an optimizer step (hftk.train.loop.train_window)
  micro -> a training micro-batch forward (hftk.train.loop.token_loss_sums)
  save  -> Accelerator.save_state, i.e. mid-checkpoint: state written, no manifest, no rename
optionally only on process RANK. HFTK_FAULT=pace:N[:RANK] instead sleeps N milliseconds after every
optimizer step: a run slow enough for a signal sent after step k to land before the last step.
Production code knows nothing of this.
"""

import os
import signal
import time

_SPEC = os.environ.get("HFTK_FAULT")


def _arm(spec: str) -> None:
    kind, count, *rank = spec.split(":")
    if rank and os.environ.get("RANK", "0") != rank[0]:
        return
    if kind == "pace":
        _pace(int(count) / 1000)
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


def _pace(seconds: float) -> None:
    from hftk.train import loop

    step = loop.train_window

    def paced(*args, **kwargs):
        result = step(*args, **kwargs)
        time.sleep(seconds)
        return result

    loop.train_window = paced


if _SPEC and "accelerate" not in os.path.basename(os.environ.get("_", "")):
    _arm(_SPEC)
