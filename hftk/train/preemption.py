"""SIGTERM/SIGINT become a flag; all processes agree on it at the next optimizer-step boundary."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from hftk.tracking import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def launcher_grace() -> float | None:
    """Seconds a torch elastic launcher (torchrun, accelerate launch) waits, after passing a SIGTERM on
    to its processes, before it SIGKILLs them; None when no such launcher started this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))


class StopFlag:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._warned_of_grace = False

    def install(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received = signal.Signals(signum).name

    def agreed(self, accelerator: Any) -> bool:
        """True on every process once any process got a signal (launchers deliver them at slightly
        different moments). One scalar all-reduce per step, and only with several processes."""
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(1.0 if self.received else 0.0, device=accelerator.device)
        agreed = accelerator.reduce(flag, reduction="sum").item() > 0
        if agreed and self.received is None:
            self.received = "a stop signal on another process"
        return agreed

    def check_grace(self, seconds: float, step: int) -> None:
        """A stop costs up to one step and one checkpoint; past the launcher's grace it SIGKILLs the
        processes mid-checkpoint and the preemption saves nothing. Said once, at a save that shows it."""
        grace = launcher_grace()
        if self._warned_of_grace or grace is None or seconds < grace:
            return
        self._warned_of_grace = True
        log.warning(f"optimizer step {step} and its checkpoint took {seconds:.0f} s, longer than the {grace:.0f} s "
                    f"the launcher waits after passing on a SIGTERM before it SIGKILLs its processes: a preemption "
                    f"would end without its checkpoint; set TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds) above "
                    f"{seconds:.0f} on every machine")
