"""Small helpers shared by every stage: seeds, devices, paths, safe saving."""

import contextlib
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "NETVLAD_DATA_ROOT"


def set_seed(seed=0):
    """Seed Python, NumPy and PyTorch so that a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device():
    """The best device here: CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISION_ENV = "NETVLAD_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device):
    """(bool, reason): whether `device` computes bf16 natively, so that bf16 is faster than fp32.

    A CPU needs AMX or AVX512-BF16: without them oneDNN emulates bf16, and VGG16 runs several
    times *slower* than in fp32 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is True even
    then, so it does not tell). A GPU needs `torch.cuda.is_bf16_supported()` (Ampere or later).
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


@dataclass(frozen=True)
class Precision:
    """How the encoder runs on a device: `name` ("fp32" or "bf16" autocast) and memory format.

    The NetVLAD layer and the loss always compute in float32 (see `model.NetVLAD`).
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

    "auto" (the default) takes `$NETVLAD_PRECISION` when it is set, else bf16 only where the
    device computes it natively (`native_bf16`) and fp32 otherwise, so it never picks a path
    slower than fp32. channels_last is used on CPU and CUDA, where it is the faster layout for
    VGG16 in both precisions (measured: `benchmarks/README.md`). The choice is printed once per
    process with its reason when `verbose`.
    """
    device = torch.device(device)
    requested = requested or "auto"
    if requested == "auto" and os.environ.get(PRECISION_ENV):
        requested = os.environ[PRECISION_ENV].strip().lower()
        source = f"${PRECISION_ENV}"
    else:
        source = None
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (from {source or 'the setting'}); "
                         f"choose one of {', '.join(PRECISIONS)}")
    native, why = native_bf16(device)
    if requested == "auto":
        name, reason = ("bf16" if native else "fp32"), why
    elif requested == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"bf16 autocast is not available on {device.type}; use fp32")
        name = "bf16"
        reason = f"forced by {source or 'the setting'}" + (
            "" if native else f"; {why}, so bf16 is emulated and slower than fp32")
    else:
        name, reason = "fp32", f"forced by {source or 'the setting'}"
    result = Precision(name, device.type in ("cpu", "cuda"), reason)
    key = (device.type, str(result))
    if verbose and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(result)
    return result


def autocast(device, enabled=True):
    """bf16 autocast on `device` when `enabled`, a no-op context otherwise."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def is_main_process():
    """True on rank 0 of a `torch.distributed` run, or in a single process: the one that writes.

    Every function of the package that writes a file checks it (see `distributed`).
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_save(obj, path):
    """`torch.save` to a temporary file next to `path`, then rename: never a half-written file.

    Under `torch.distributed` only rank 0 writes (the others return `path` at once).
    """
    path = Path(path)
    if not is_main_process():  # distributed: rank 0 alone writes files
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _numpy_safe_globals():
    """The numpy types that arrays and scalars in the project's own files need to unpickle."""
    core = np._core if hasattr(np, "_core") else np.core
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int32, np.int64, np.uint32,
                                            np.uint64, np.float16, np.float32, np.float64)]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def load_torch_file(path, what="file", safe_globals=()):
    """`torch.load(path, weights_only=True)` on the CPU: tensors, containers, numbers, strings
    and numpy arrays, never code. Anything else in the file is refused with a clear error.

    Args:
        what: what the file should be, for the error messages ("checkpoint", ...).
        safe_globals: further classes or functions to allow (e.g. a released format's types).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    allowed = _numpy_safe_globals() + list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "unsupported" in line.lower()]
        detail = f" ({found[0]})" if found else ""
        raise ValueError(f"{path}: refused to load this {what}: it holds objects other than "
                         f"tensors, numbers and arrays, which could run code{detail}") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable {what} (empty, truncated or not written by "
                         f"torch.save): {type(err).__name__}: {err}") from err


def default_data_root():
    """`$NETVLAD_DATA_ROOT` if set, else the tiny synthetic city in `data/synthetic_tiny`."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return REPO_ROOT / "data" / "synthetic_tiny"


def ensure_synthetic_city(root=None, preset="tiny", seed=0):
    """Generate the synthetic city at `root` unless it is already there; return its path.

    A city left by an older version of the course (its `synthetic_city.json` differs from what
    this code would write) is generated again, so notebook outputs match the stored ones.
    """
    from .synthetic import DATASET_NAME, city_is_current, make_synthetic_city

    root = Path(root) if root is not None else REPO_ROOT / "data" / f"synthetic_{preset}"
    if city_is_current(root, preset, seed):
        return root
    if root.exists():
        marker = root / "netvlad_v100_datasets" / "datasets" / f"{DATASET_NAME}_train.mat"
        if not marker.is_file():
            raise FileExistsError(f"{root} exists but is not a synthetic city (no {marker}); "
                                  "move it away or set NETVLAD_DATA_ROOT to your data")
        print(f"{root} was generated by an older version of the course: generating it again")
        shutil.rmtree(root)
    # Generate next to `root`, then rename: an interrupted run leaves no half-made city.
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    make_synthetic_city(tmp, preset=preset, seed=seed)
    os.replace(tmp, root)
    return root


def runs_dir():
    """Where the course keeps training runs (`runs/`, git-ignored)."""
    return REPO_ROOT / "runs"


def course_data_root():
    """The data root of the notebooks: `$NETVLAD_DATA_ROOT`, else the tiny synthetic city.

    The synthetic city is generated on first use, so any notebook runs in a fresh kernel.
    """
    root = default_data_root()
    if not os.environ.get(DATA_ENV):
        ensure_synthetic_city(root, preset="tiny", seed=0)
    return root
