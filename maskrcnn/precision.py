"""Which floating-point precision to run in, decided by what the machine computes natively.

    resolved = resolve_precision("auto", "cpu")
    print(resolved.message)   # "precision auto -> fp32: this CPU has no native bf16 (AVX2)"

bfloat16 halves the memory traffic and, on hardware with bf16 dot products, roughly doubles convolution
and matrix throughput. Without them PyTorch and oneDNN emulate it, and it is several times *slower* than
fp32 (a 256->256 3x3 convolution: about 10x on an AVX2 CPU). ``"auto"``, the default of the configuration
(``model.precision`` for inference, which entry points use unless told otherwise, and ``train.precision``),
therefore picks bf16 only where it is native:

- a CPU whose oneDNN has bf16 kernels: x86 with AVX512-BF16 or AMX-BF16, or Arm with the BF16 extension;
- a CUDA device that supports bf16 (compute capability 8.0 and later);

and fp32 everywhere else. An explicit ``"bf16"`` runs where it is emulated too, with a warning.

The CPU answer honours ``ONEDNN_MAX_CPU_ISA`` (a cap on the instructions oneDNN may use), so
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` reproduces an AVX2-only
CPU on a newer one (:data:`ISA_CAPS`).
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Tuple, Union

import torch

from maskrcnn.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")  # what inference entry points accept; training adds "fp16" (CUDA)

# ONEDNN_MAX_CPU_ISA values that let oneDNN use bf16 dot products ("ALL" and "DEFAULT" mean no cap).
_BF16_ISA_CAPS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                  "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                  "AVX10_2_512", "AVX10_2_512_AMX_2")


@dataclass(frozen=True)
class ResolvedPrecision:
    """The precision a run uses and why.

    precision: "fp32" or "bf16" (or "fp16", requested explicitly for CUDA training).
    requested: what the caller asked for ("auto", "fp32", "bf16", "fp16").
    reason: one clause saying why, naming the hardware.
    native: whether the device computes ``precision`` natively (always True for fp32).
    """

    precision: str
    requested: str
    reason: str
    native: bool

    @property
    def message(self) -> str:
        """One line for the console and the run's outputs."""
        return f"precision {self.requested} -> {self.precision}: {self.reason}"

    def to_dict(self) -> Dict[str, Union[str, bool]]:
        return {"precision": self.precision, "requested": self.requested, "reason": self.reason,
                "native": self.native}


def _cpu_flags() -> Tuple[str, ...]:
    """The CPU feature flags the kernel reports (Linux), else an empty tuple."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return tuple(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C", ...), or the platform's
    processor string where the kernel does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16() -> Tuple[bool, str]:
    """(whether this CPU computes bf16 natively under the current oneDNN ISA cap, the reason in words)."""
    isa = torch.backends.cpu.get_cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        flags = set(_cpu_flags())
        units = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
        if not units:
            return False, f"this CPU has no native bf16 ({isa})"
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper()
        if cap not in _BF16_ISA_CAPS:
            return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from this CPU's bf16 ({' and '.join(units)})"
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False, f"this PyTorch build's oneDNN has no bf16 kernels ({isa})"
        return True, f"this CPU has native bf16 ({' and '.join(units)})"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return True, f"this CPU has native bf16 ({machine})"
    return False, f"this CPU has no native bf16 ({machine}, {isa})"


def device_bf16(device: Union[str, torch.device]) -> Tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has native bf16"
        return False, "this GPU has no native bf16"
    if device.type == "cpu":
        return cpu_bf16()
    return False, f"bf16 is not chosen automatically on {device.type}"


def resolve_precision(requested: str, device: Union[str, torch.device], *, allowed: Tuple[str, ...] = PRECISIONS,
                      warn: bool = True) -> ResolvedPrecision:
    """The precision to run ``requested`` in on ``device``.

    "auto" becomes "bf16" where the device has native bf16 and "fp32" elsewhere. An explicit "bf16" on a
    device without it is kept, with a one-line ``UserWarning`` that it is emulated and several times slower
    (``warn=False``: for the inner calls of an entry point that has warned already). ``allowed`` lists the accepted names (a ``ValueError`` names them otherwise).
    """
    if requested not in allowed:
        raise InputError(f"precision must be one of {allowed}, got {requested!r}")
    if requested == "fp32":
        return ResolvedPrecision("fp32", requested, "asked for", True)
    if requested == "fp16":
        return ResolvedPrecision("fp16", requested, "asked for", torch.device(device).type == "cuda")
    native, why = device_bf16(device)
    if requested == "auto":
        return ResolvedPrecision("bf16" if native else "fp32", requested, why, True)
    if not native and warn:
        warnings.warn(f"precision bf16 is emulated here ({why}): expect it several times slower than fp32; "
                      f"precision 'auto' picks the fast one", UserWarning, stacklevel=3)
    return ResolvedPrecision("bf16", requested, why if native else f"asked for, emulated: {why}", native)


# oneDNN ISA caps at or below AVX2: its channels-last kernels are then slower to train than NCHW.
_AVX2_OR_BELOW = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def channels_last_is_faster(device: Union[str, torch.device]) -> Tuple[bool, str]:
    """(whether training runs faster in channels-last memory format on ``device``, the reason in words).

    Measured with ``python -m benchmarks.benchmark`` (R50-FPN training step, 2 images of 512 px, fp32):
    on an AVX-512 CPU channels-last is the fast layout; with AVX2 only, NCHW is (about 1.3x faster than
    channels-last, whose oneDNN training kernels lose there). CUDA: channels-last (tensor cores)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True, "channels-last on CUDA"
    isa = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper()
    if isa == "AVX512" and cap not in _AVX2_OR_BELOW:
        return True, f"channels-last: the fast training layout on this CPU ({isa})"
    return False, f"NCHW: channels-last trains slower on this CPU ({isa if cap not in _AVX2_OR_BELOW else cap})"


# Environment variables that cap the instructions of PyTorch's kernels, oneDNN's (convolutions) and MKL's
# (matrix products). An AVX2 CPU is reproduced on a newer one only with all three set: without the last,
# matrix products (the box head's fully connected layers) still run AVX-512 code.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> str:
    """The instruction caps set in the environment (:data:`ISA_CAPS`), as ``NAME=value`` joined by spaces;
    "" when none is."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name, "").strip())


def machine_summary(device: Union[str, torch.device] = "cpu") -> Dict[str, Union[str, int, bool]]:
    """Where a figure holds: CPU model, the ISA PyTorch dispatches to, native bf16 yes/no, threads, the
    instruction caps set (:func:`isa_caps`; "" for none), and the GPU's name when ``device`` is CUDA."""
    native, why = cpu_bf16()
    summary = {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
               "bf16_reason": why, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "isa_caps": isa_caps()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        summary["gpu"] = torch.cuda.get_device_name(torch.device(device))
        summary["gpu_native_bf16"] = device_bf16(device)[0]
    return summary


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context an inference forward runs in at ``precision`` ("auto", "fp32" or "bf16") on ``device``: a
    bfloat16 autocast where it resolves to bf16, else a disabled one (no warning: entry points warn)."""
    bf16 = resolve_precision(precision, device, warn=False).precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
