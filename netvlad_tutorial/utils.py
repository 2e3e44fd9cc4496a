"""Small helpers shared by every stage: seeds, paths and folders, how a path is shown,
measuring time and memory, and the modes of progress bars.
"""

import contextlib
import contextvars
import gc
import os
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm as tqdm_auto
from tqdm.std import tqdm as tqdm_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "NETVLAD_DATA_ROOT"


def set_seed(seed=0):
    """Seed Python, NumPy and PyTorch so that a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


PROGRESS_ENV = "NETVLAD_PROGRESS"


def progress_bar(*args, **kwargs):
    """A tqdm progress bar: a widget in a Jupyter kernel (`tqdm.auto`), text on stderr elsewhere.

    `$NETVLAD_PROGRESS=text` asks for text bars everywhere: `run-notebooks` sets it for the
    kernel, so that a stored notebook keeps each bar's last line, never a widget. Arguments are
    tqdm's.
    """
    if os.environ.get(PROGRESS_ENV, "").strip().lower() == "text":
        return tqdm_text(*args, **kwargs)
    return tqdm_auto(*args, **kwargs)
