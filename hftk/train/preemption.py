"""SIGTERM/SIGINT become a flag; all processes agree on it at the next optimizer-step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

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
