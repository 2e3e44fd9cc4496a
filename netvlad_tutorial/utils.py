"""Small helpers shared by every stage: seeds, devices, paths, safe saving."""

import contextlib
import contextvars
import gc
import json
import os
import pickle
import platform
import random
import re
import signal
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

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


def resolve_device(config):
    """The device of a run: `config.device` if set, else CUDA if available, else CPU.

    Raises:
        ValueError: an unknown device name, or one that is not available here.
    """
    return check_device(config.device) if config.device else get_device()


# How the errors below name the setting: true for a caller of the library and of the command
# line (`utils` comes before `config`, so it cannot raise `config.ArgumentError`).
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


def measure(fn, *args):
    """(seconds, peak extra MiB) of `fn(*args)`, with its result kept alive until the end.

    Time is taken in a plain run, memory in a second run under `tracemalloc`.
    """
    gc.collect()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    del result
    gc.collect()
    tracemalloc.start()
    result = fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return seconds, peak / 2 ** 20


PRECISION_ENV = "NETVLAD_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")


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
    device has bf16 instructions (`native_bf16`) and, on a CPU, bf16 also measured faster
    (`cpu_bf16_speedup` at least `BF16_MIN_SPEEDUP`), fp32 otherwise: it never picks a path
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


FAULT_ENV = "NETVLAD_FAULT"
_FAULT_COUNTS = {}


def fault_point(name):
    """Test-only fault injection: kill this process (SIGKILL) at the point called `name`.

    `$NETVLAD_FAULT` = `NAME` or `NAME:N` kills at the N-th time (default: the first) that
    `fault_point(NAME)` is reached, e.g. `write:best.pth:2` while the second `best.pth` is being
    written (its temporary file complete, not yet renamed) or `after:latest.pth` just after
    `latest.pth` is in place. Unset (always, outside the tests) it does nothing.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    target, _, count = wanted.rpartition(":") if wanted[-1:].isdigit() else (wanted, "", "1")
    if target != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def _tmp_prefix(path):
    return f".{Path(path).name}."


def _new_file_mode():
    """The mode `open(path, "w")` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def is_main_process():
    """True on rank 0 of a `torch.distributed` run, or in a single process: the one that writes.

    Every function of the package that writes a file goes through `atomic_write`, which checks
    it (see `distributed`).
    """
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_error(err, path):
    """An OSError naming `path` for a failed write `err`, readable when the error has no errno
    (`np.save` on a full disk) or is not an OSError at all (`torch.save`: a RuntimeError
    "[enforce fail at inline_container.cc]" when the disk fills up or a size limit is hit)."""
    if isinstance(err, OSError) and err.errno is not None:
        return type(err)(err.errno, f"cannot write {path}: {err.strerror}")
    inner = str(err).strip() or type(err).__name__
    return OSError(f"cannot write {path}: the write failed ({inner}): is the disk full, or a "
                   "file size limit reached?")


def atomic_write(path, data, sync=True):
    """Write `data` to `path` through a temporary file in the same folder, then rename.

    The one writer of every file the package writes: a reader (or a killed run) never sees a
    half-written file, only the old one or the new one. The temporary file is
    `.NAME.XXXX.tmp` next to `path`; `remove_temporary_files` cleans up those a kill left.

    Args:
        data: bytes, str (written as UTF-8), or a function `write(file)` that writes to a
            binary file object (e.g. `lambda f: torch.save(obj, f)`).

    Under `torch.distributed` only rank 0 writes (the others return `path` at once).

    Raises:
        OSError (PermissionError, ENOSPC, EFBIG, ...): naming `path` (`write_error`); `path` is
            then unchanged.
    """
    path = Path(path)
    if not is_main_process():  # distributed: rank 0 alone writes files
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    except OSError as err:
        raise write_error(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600): give it the mode the file has, or would get.
            os.fchmod(f.fileno(), path.stat().st_mode & 0o7777 if path.is_file()
                      else _new_file_mode())
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save on a full disk: RuntimeError
        raise write_error(err, path) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fault_point(f"after:{path.name}")
    return path


class FolderInUseError(OSError):
    """Another process is writing the folder (`folder_lock`)."""


@contextlib.contextmanager
def folder_lock(lock_file, folder, command):
    """Hold the lock `lock_file` (`filelock.FileLock`) while `command` writes `folder`.

    A second writer is refused at once (`FolderInUseError`), not queued: two runs into one
    folder would mix their files. The lock is the kernel's (`flock`), so a killed holder frees
    it; the empty lock file stays (with the folder it alone was created for, if the command
    wrote nothing else there: then it is removed). Under `torch.distributed` only rank 0, the
    writer, locks.
    """
    if not is_main_process():
        yield
        return
    lock_file = Path(lock_file)
    made = not lock_file.parent.exists()
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file, timeout=0)
        lock.acquire()
    except Timeout:
        raise FolderInUseError(f"{folder} is being written by another process ({command} "
                               f"holds {lock_file}); wait for it to finish, or choose another "
                               "folder") from None
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {lock_file}: {err.strerror or err}") from err
    try:
        yield
    finally:
        if made and [p.name for p in lock_file.parent.iterdir()] == [lock_file.name]:
            lock_file.unlink()  # a refused first run leaves no folder behind
            lock_file.parent.rmdir()
        lock.release()


def atomic_json(obj, path):
    """`obj` as indented JSON at `path`, written atomically (`atomic_write`)."""
    return atomic_write(path, json.dumps(obj, indent=1))


def atomic_save(obj, path):
    """`torch.save(obj)` at `path`, written atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_temporary_files(folder, names=None):
    """Delete the `.NAME.XXXX.tmp` files that a killed `atomic_write` left in `folder`.

    Args:
        names: the file names whose temporary files to delete (e.g. a run's files); None: any
            NAME. Another `.something.tmp` of the user's is then kept.

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    patterns = [".*.tmp"] if names is None else [f".{name}.*.tmp" for name in names]
    removed = sorted({p for pattern in patterns for p in folder.glob(pattern)}
                     if folder.is_dir() else [])
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


CACHE_ENV = "NETVLAD_CACHE_DIR"


def cache_dir():
    """The user cache folder of derived files (k-means centroids), never in the source tree.

    `$NETVLAD_CACHE_DIR` if set, else `$XDG_CACHE_HOME/netvlad_tutorial`, else
    `~/.cache/netvlad_tutorial`.
    """
    if os.environ.get(CACHE_ENV):
        return env_path(CACHE_ENV)
    if os.environ.get("XDG_CACHE_HOME"):
        return env_path("XDG_CACHE_HOME") / "netvlad_tutorial"
    return Path.home() / ".cache" / "netvlad_tutorial"


def env_path(name):
    """The path in environment variable `name`, `~` expanded; a ValueError naming the variable
    when it cannot be (`~nouser/x`: no such user)."""
    value = os.environ[name]
    try:
        return Path(value).expanduser()
    except RuntimeError as err:
        raise ValueError(f"${name} is {value!r}: {err}; set it to an existing folder") from None


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
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle of objects at all: random bytes, text
            raise ValueError(f"{path} is not a readable {what} (not written by torch.save)") \
                from err
        detail = f" (it holds {found.group(1)})"
        raise ValueError(f"{path}: refused to load this {what}: it holds objects other than "
                         f"tensors, numbers and arrays, which could run code{detail}") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable {what} (empty, truncated or not written by "
                         f"torch.save): {type(err).__name__}: {err}") from err


def default_data_root():
    """`$NETVLAD_DATA_ROOT` if set, else the tiny synthetic city in `data/synthetic_tiny`."""
    if os.environ.get(DATA_ENV):
        return env_path(DATA_ENV)
    return REPO_ROOT / "data" / "synthetic_tiny"


def runs_dir():
    """Where the course keeps training runs (`runs/`, git-ignored), created when missing."""
    path = REPO_ROOT / "runs"
    path.mkdir(exist_ok=True)
    return path


def display_path(path):
    """`path` as a person reads it in a message: relative to the working folder when it is
    inside it or beside it (one `..`, e.g. `../data` from `notebooks/`), else `~/...` under the
    home folder, else as it is."""
    path = Path(path)
    try:
        resolved, cwd = path.resolve(), Path.cwd().resolve()
    except OSError:
        return str(path)
    rel = os.path.relpath(resolved, cwd)
    if not rel.startswith(os.path.join("..", "..")):
        return rel
    try:
        return "~/" + resolved.relative_to(Path.home().resolve()).as_posix()
    except ValueError:
        return str(path)


_TRANSIENT_PROGRESS = contextvars.ContextVar("transient_progress", default=False)
_HIDDEN_PROGRESS = contextvars.ContextVar("hidden_progress", default=False)


@contextlib.contextmanager
def _true_inside(flag):
    """Set the context variable `flag` to True inside the block."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def transient_progress():
    """Progress bars started inside the block are erased when they finish (`leave_progress`):
    a training epoch's bars go, and the epoch's one summary line stays."""
    return _true_inside(_TRANSIENT_PROGRESS)


def leave_progress():
    """tqdm's `leave`: False inside `transient_progress()`, else True."""
    return not _TRANSIENT_PROGRESS.get()


def hidden_progress():
    """The package's progress bars started inside the block are not shown (`progress_hidden`),
    e.g. on the ranks other than 0 under torchrun (`distributed.quiet_other_ranks`)."""
    return _true_inside(_HIDDEN_PROGRESS)


def progress_hidden():
    """tqdm's `disable`: True inside `hidden_progress()`, else False."""
    return _HIDDEN_PROGRESS.get()
