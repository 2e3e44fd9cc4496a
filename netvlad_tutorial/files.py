"""Safe files: every write is atomic (temporary file, then rename), folders are locked against a
second writer, write errors name the file, and `fault_point` lets tests inject crashes.
"""

import contextlib
import json
import os
import pickle
import re
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

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
