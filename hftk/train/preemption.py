"""SIGTERM/SIGINT become a flag; all processes agree on it at an optimizer-step boundary, one step after
the first process saw it."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from hftk.logs import log

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
        self._group: Any = None
        self._in_flight: tuple[torch.Tensor, Any] | None = None

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
        """True on every process, at the same step, once any process got a signal (launchers deliver
        them at slightly different moments).

        With several processes each step starts a sum of the flags and reads the one started a step
        before, long finished by then: all processes read the same sum at the same step, and the loop
        never waits for it. The sum runs on the CPU (a Gloo group beside NCCL on GPUs), so reading it
        does not wait for the device to finish the step either."""
        if accelerator.num_processes == 1:
            return self.received is not None
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor(1.0 if self.received else 0.0)
        started, self._in_flight = self._in_flight, (flag, dist.all_reduce(flag, group=self._group, async_op=True))
        if started is None:
            return False
        total, work = started
        work.wait()
        agreed = total.item() > 0
        if agreed and self.received is None:
            self.received = "a stop signal on another process"
        return agreed

    def settle(self) -> None:
        """Waits for the sum still in flight, so no collective is left running when the loop ends."""
        if self._in_flight is not None:
            self._in_flight[1].wait()
            self._in_flight = None

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
