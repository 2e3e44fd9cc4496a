"""Where and in which number format a run computes: the device, and fp32 or bf16 (`auto`: bf16
only where the CPU or GPU runs it natively; emulated bf16 is slower than fp32).
"""

import contextlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_json
from .utils import cache_dir


def get_device():
    """The best device here: CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(config):
    """The device of a run: `config.device` if set, else CUDA if available, else CPU.

    Raises:
        ValueError: an unknown device name, or one that is not available here.
    """
    return check_device(config.device) if config.device else get_device()


# How the errors below name the setting: true for a caller of the library and of the command
# line (`precision` comes before `config`, so it cannot raise `config.ArgumentError`).
DEVICE_SETTING = "the `device` setting, --device"
PRECISION_SETTING = "the `precision` setting, --precision"


def check_device(name):
    """`torch.device(name)` if this machine has it; a clear ValueError otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r} ({DEVICE_SETTING}): use cpu, cuda, cuda:N "
                         "or mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} ({DEVICE_SETTING}): no CUDA GPU is available "
                             "here; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} ({DEVICE_SETTING}): this machine has {count} "
                             f"CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} ({DEVICE_SETTING}): MPS is not available here; "
                         "use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} ({DEVICE_SETTING}) is not supported: use cpu, cuda, "
                         "cuda:N or mps")
    return device


PRECISION_ENV = "NETVLAD_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")
NOTEBOOK_DEFAULT = "fp32"  # what "auto" means in a Jupyter kernel without $NETVLAD_PRECISION


def in_notebook():
    """Whether this process is a Jupyter kernel (IPython's ZMQ shell), as the notebooks run."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def native_bf16(device):
    """(bool, reason): whether `device` has bf16 instructions, without which bf16 is emulated.

    A CPU needs AMX or AVX512-BF16: without them oneDNN emulates bf16, and VGG16 runs several
    times *slower* than in fp32 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is True even
    then, so it does not tell). A GPU needs `torch.cuda.is_bf16_supported()` (Ampere or later).
    Having them is not enough on every CPU: see `cpu_bf16_speedup`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has native bf16"
        return False, "this GPU has no native bf16"
    if device.type == "cpu":
        amx = torch.cpu._is_amx_tile_supported()
        avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
        if amx or avx512_bf16:
            return True, f"this CPU has native bf16 ({'AMX' if amx else 'AVX512-BF16'})"
        return False, "this CPU has no native bf16: no AMX, no AVX512-BF16"
    return False, f"no bf16 autocast on {device.type}"


BF16_MIN_SPEEDUP = 1.2  # "auto" takes bf16 on a CPU only if it measured at least this much faster


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time_conv(bf16, reps=3):
    """Seconds of the fastest of `reps` runs of a VGG16-sized 3x3 convolution (channels_last)."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(4, 128, 24, 32, generator=gen).to(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad(), autocast("cpu", enabled=bf16):
        conv(x)  # warm-up: oneDNN picks and builds its kernel
        for _ in range(reps):
            t0 = time.perf_counter()
            conv(x)
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return best


def cpu_bf16_speedup():
    """How many times faster bf16 autocast runs a VGG16 convolution than fp32 on this CPU.

    Measured once (about 0.1 s) per CPU model, torch version and thread count, and kept in
    `cache_dir()/precision/`. bf16 instructions do not make bf16 faster everywhere: an AMD EPYC
    Zen 4 with AVX512-BF16 ran VGG16 2x faster in bf16, an Intel Xeon with AVX512-BF16 but no
    AMX 0.7x (`benchmarks/README.md`).
    """
    key = re.sub(r"[^A-Za-z0-9]+", "-", f"{cpu_model()}_torch{torch.__version__}"
                 f"_{torch.get_num_threads()}threads").strip("-")
    path = cache_dir() / "precision" / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["bf16_speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    speedup = _time_conv(False) / _time_conv(True)
    try:
        atomic_json({"cpu": cpu_model(), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "bf16_speedup": speedup}, path)
    except OSError:  # a read-only cache folder: measure again next time
        pass
    return speedup


def auto_precision(device):
    """(name, reason) that "auto" picks on `device` (see `resolve_precision`)."""
    native, why = native_bf16(device)
    if not native:
        return "fp32", why
    if torch.device(device).type != "cpu":
        return "bf16", why
    speedup = cpu_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"{why}, measured {speedup:.1f}x faster than fp32"
    return "fp32", f"{why}, but measured {speedup:.1f}x the speed of fp32 here"


@dataclass(frozen=True)
class Precision:
    """How the encoder runs on a device: `name` ("fp32" or "bf16" autocast) and memory format.

    The NetVLAD layer and the loss always compute in float32 (see `netvlad.NetVLAD`).
    """

    name: str
    channels_last: bool
    reason: str

    @property
    def bf16(self):
        return self.name == "bf16"

    def autocast(self, device):
        """bf16 autocast on `device`, or a no-op context for fp32."""
        return autocast(device, self.bf16)

    def images(self, images):
        """`images` (B, 3, H, W) in the memory format of this precision."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def __str__(self):
        return f"precision: {self.name}{' + channels_last' if self.channels_last else ''} " \
               f"({self.reason})"


_ANNOUNCED = set()


def resolve_precision(requested="auto", device="cpu", verbose=True):
    """The `Precision` to run with on `device`: "auto", "fp32" or "bf16".

    "auto" (the default) takes `$NETVLAD_PRECISION` when it is set; else, in a Jupyter kernel
    (`in_notebook`), fp32 (`NOTEBOOK_DEFAULT`), so that every reader of the course gets the
    stored numbers (`NETVLAD_PRECISION=auto` lets the machine choose there too); else, as on
    the command line, bf16 only where the device has bf16 instructions (`native_bf16`) and, on
    a CPU, bf16 also measured faster (`cpu_bf16_speedup` at least `BF16_MIN_SPEEDUP`), fp32
    otherwise: it never picks a path slower than fp32. channels_last is used on CPU and CUDA,
    where it is the faster layout for VGG16 in both precisions (measured:
    `benchmarks/README.md`). The choice is printed once per process with its reason when
    `verbose`.
    """
    device = torch.device(device)
    requested = requested or "auto"
    if requested == "auto" and os.environ.get(PRECISION_ENV):
        requested = os.environ[PRECISION_ENV].strip().lower()
        source = f"${PRECISION_ENV}"
    elif requested == "auto" and in_notebook():
        requested = NOTEBOOK_DEFAULT
        source = f"the notebooks' default; {PRECISION_ENV}=auto lets this machine choose"
    else:
        source = None
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (from {source or PRECISION_SETTING}); "
                         f"choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        name, reason = auto_precision(device)
    elif requested == "bf16":
        native, why = native_bf16(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"bf16 autocast ({source or PRECISION_SETTING}) is not available "
                             f"on {device.type}; use fp32")
        name = "bf16"
        reason = f"forced by {source or 'the setting'}" + (
            "" if native else f"; {why}, so bf16 is emulated and slower than fp32")
    else:
        name, reason = "fp32", f"forced by {source or 'the setting'}"
    result = Precision(name, device.type in ("cpu", "cuda"), reason)
    key = (device.type, str(result))
    if verbose and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(result, file=sys.stderr)  # stderr: `evaluate --json` prints only JSON on stdout
    return result


def autocast(device, enabled=True):
    """bf16 autocast on `device` when `enabled`, a no-op context otherwise."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocast_off(x):
    """A context with autocast off on `x`'s device: the code inside runs in float32.

    On the "meta" device (shapes only, no autocast there) it does nothing.
    """
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
