"""Numeric precision chosen for the device a trial runs on, and the facts it is chosen from.

`train.precision`: `auto` (the default), `fp32`, `bf16` or `fp16`. `auto` is bf16 autocast where the
device computes bf16 natively and fp32 everywhere else:
- CUDA: bf16 where `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and newer);
- a CPU: bf16 where it has bf16 units (AVX512-BF16 or AMX-BF16 on x86, which torch's cpuinfo reports;
  on other architectures, where a short measured probe runs a bf16 training step faster than fp32).
  A process that torch or oneDNN keep from those units (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
  e.g. to reproduce an AVX2 machine's run) counts as without them. Without them torch emulates bf16 and a ResNet
  step is ~20-30x slower than fp32 (an AVX2-only AMD EPYC: 22.6 s vs 0.67 s), so a default that says bf16 would make
  a study run for hours.

An explicit `bf16` or `fp16` is honoured on any device; on a device that only emulates it the engine
says so once. fp16 trains with a gradient scaler (OptimizerSteps), bf16 needs none.

Which precision a trial ran with is a column of its row (`precision`, beside `precision_requested`),
with the CPU it ran on (`cpu_model`, `cpu_capability`, `cpu_bf16`) and its torch threads: the identity
of a trial holds what the study asked for (`auto`), its row holds what the device made of it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _x86_bf16_flags() -> bool | None:
    """Whether torch's cpuinfo reports bf16 units (AVX512-BF16, AMX-BF16); None where it cannot tell."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            found = caps()
            return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
        except Exception:  # noqa: BLE001 - an older torch or an unusual platform: fall back to /proc/cpuinfo
            pass
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


def _onednn_allows_bf16() -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return cap == "ALL" or "BF16" in cap or "AMX" in cap or "AVX10" in cap


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, object]:
    """The CPU this process runs on: model name, torch's kernel capability (AVX2, AVX512, ...), bf16 units."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        # The units must be there AND this process must use them: torch's kernels at AVX512 (ATEN_CPU_CAPABILITY
        # can hold them at AVX2) and oneDNN's convolutions not capped below AVX512-BF16 (ONEDNN_MAX_CPU_ISA).
        native = bool(_x86_bf16_flags()) and capability.startswith("AVX512") and _onednn_allows_bf16()
        how = "cpuinfo"
    else:  # aarch64 and others: no flag torch reports for us; measure
        native = bf16_step_ratio() > 1.05
        how = "probe"
    return {"cpu_model": _cpu_model(), "cpu_capability": capability, "cpu_bf16": native, "cpu_bf16_from": how}


def bf16_step_ratio(steps: int = 3, threads: int | None = None) -> float:
    """Measured: fp32 time / bf16 time of a small convolutional training step on this CPU (> 1: bf16 faster).
    About 0.3 s where bf16 is native; where it is emulated a bf16 step takes seconds."""
    from harness.engine.convnet import reference_network

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = reference_network()
        images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        best = {}
        for precision in ("fp32", "bf16"):
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                with autocast("cpu", precision):
                    loss = torch.nn.functional.cross_entropy(net(images), labels)
                loss.backward()
                if i:
                    times.append(time.perf_counter() - t0)
            best[precision] = min(times)
        return best["fp32"] / max(best["bf16"], 1e-9)
    finally:
        torch.set_num_threads(previous)


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no including_emulation
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_info()["cpu_bf16"])
    return False


def native_fp16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return True
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return bool(caps.get("avx512_fp16") or caps.get("amx_fp16"))


def resolve(requested: str, device: torch.device | str) -> str:
    """The precision a trial runs with on `device`: `auto` becomes bf16 where it is native, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision: {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def emulation_warning(precision: str, device: torch.device | str) -> str | None:
    """A line to print when an explicit precision is emulated on this device (slow), else None."""
    device = torch.device(device)
    if precision == "bf16" and not native_bf16(device):
        where = cpu_info()["cpu_model"] if device.type == "cpu" else device_label(device)
        return (f"train.precision=bf16 on {where}, which has no bf16 units: torch emulates it (a ResNet step ~20-30x "
                "slower than fp32); train.precision: auto picks fp32 here")
    if precision == "fp16" and not native_fp16(device):
        return f"train.precision=fp16 on {device_label(device)}, which has no fp16 units: emulated, slow"
    return None


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(cpu_info()["cpu_model"])


def autocast(device_type: str, precision: str):
    """The autocast context of a precision (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def describe_here(requested: str, gpu: bool = False) -> str:
    """What `requested` becomes on this machine, for the line printed when a run starts."""
    info = cpu_info()
    cpu = (f"{info['cpu_model']} ({info['cpu_capability']}, "
           f"{'native bf16' if info['cpu_bf16'] else 'no bf16 units'})")
    line = f"precision {requested}: {resolve(requested, 'cpu')} on this CPU, {cpu}"
    if gpu and requested == "auto":
        line += "; on a GPU, bf16 where it computes bf16 natively"
    return line
