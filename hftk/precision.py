"""Which precision a run trains in, from train.bf16 (auto, true or false) and the launcher's mixed_precision.

Resolved once, before the Accelerator is built; the run, `hftk plan` and a resume check all ask
resolve_precision, and every checkpoint records the answer (Accelerate's names: "bf16", "fp16", "no").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FP32 = "no"  # Accelerate's mixed_precision for fp32


def auto_fp32_families() -> dict[str, str]:
    """The families train.bf16=auto keeps in fp32, with why. benchmarks/RESULTS.md, hftk in bf16 against its
    fp32 default on the same 120 CPU steps: GPT-2 ran at 0.60x the tokens/s (a run before measured 1.12x),
    where T5 ran at 1.05-1.37x and BERT at 2.80x."""
    from hftk.tasks.base import DECODER_ONLY  # here: hftk.tasks imports every task, and torch with them

    return {DECODER_ONLY: "decoder-only models train faster in fp32 here"}


@dataclass(frozen=True)
class Resolved:
    mixed_precision: str  # "bf16", "fp16" or "no", as Accelerate names it
    reason: str  # why, as the start line gives it
    launcher: bool  # the launcher's own setting, which Accelerate reads from the environment

    def accelerator_argument(self) -> str | None:
        """What Accelerator(mixed_precision=...) gets: None where the launcher's setting stands."""
        return None if self.launcher else self.mixed_precision

    def line(self) -> str:
        shown = "fp32" if self.mixed_precision == FP32 else f"{self.mixed_precision} autocast"
        return f"precision: {shown} ({self.reason})"


def launcher_precision() -> str:
    """The launcher's mixed_precision: `accelerate launch` sets it from its flags or config file."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", FP32).lower() or FP32


def device_type() -> str:
    """The device a process of this launch trains on, before the Accelerator says so."""
    import torch

    from hftk.parallel.launch import env_true

    if env_true("ACCELERATE_USE_CPU"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def native_bf16(device: str) -> bool:
    """Whether this device computes in bf16 natively, rather than through conversions to fp32: a CUDA GPU
    that says so (Ampere and later), or a CPU with AVX512_BF16 or AMX-BF16 (x86) or BF16/SVE-BF16 (Arm)."""
    import torch

    if device == "cuda":
        # Not the emulated bf16 of older GPUs, which is slower than fp32.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()
        return any(capabilities.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    return False


def fp16_runs_on(device: str) -> bool:
    """fp16 autocast needs a CUDA GPU (hftk.parallel.launch refuses it elsewhere)."""
    return device == "cuda"


def resolve_precision(setting: bool | str, family: str | None = None, device: str | None = None,
                      launcher: str | None = None, saved: str | None = None,
                      saved_by: str = "the resumed checkpoint") -> Resolved:
    """train.bf16 resolved. true: bf16 autocast, over the launcher. false: the launcher's mixed_precision
    (fp32 unless it sets one). auto: the launcher's where it sets one; else a resumed checkpoint's `saved`
    precision; else fp32 for the families in auto_fp32_families, bf16 where `device` has native bf16, fp32
    elsewhere. `launcher` defaults to the environment's; family and device are asked only in the last case.
    `saved_by` names what trained in `saved`, for the start line."""
    launcher = (launcher or launcher_precision()).lower()
    if setting is True:
        return Resolved("bf16", "train.bf16=true", False)
    if setting is False:
        return Resolved(launcher, "train.bf16=false" + _from_launcher(launcher), True)
    if launcher != FP32:
        return Resolved(launcher, "train.bf16=auto" + _from_launcher(launcher), True)
    if saved is not None:
        return Resolved(saved, f"train.bf16=auto: as {saved_by} trained", saved == FP32)
    if family is None or device is None:
        raise ValueError("train.bf16=auto without a launcher setting or a checkpoint needs the family and device")
    kept = auto_fp32_families()
    if family in kept:
        return Resolved(FP32, f"train.bf16=auto: {kept[family]}", True)
    named = {"cuda": "GPU", "cpu": "CPU"}.get(device, device)
    if native_bf16(device):
        return Resolved("bf16", f"train.bf16=auto: this {named} has native bf16", False)
    return Resolved(FP32, f"train.bf16=auto: this {named} has no native bf16", True)


def _from_launcher(launcher: str) -> str:
    return "" if launcher == FP32 else f": the launcher's mixed_precision={launcher}"
