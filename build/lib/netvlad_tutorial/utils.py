"""Small helpers shared by every stage: seeds, devices, paths, safe saving."""

import contextlib
import os
import random
import shutil
import tempfile
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


def amp_supported(device):
    """Whether bf16 autocast is worth using on `device` (CUDA with bf16, or a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast(device, enabled=True):
    """bf16 autocast on `device` when `enabled`, a no-op context otherwise."""
    device = torch.device(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def atomic_save(obj, path):
    """`torch.save` to a temporary file next to `path`, then rename: never a half-written file."""
    path = Path(path)
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


def load_or_compute(path, compute_fn):
    """Load `path` if it exists, else compute it with `compute_fn()`, save it and return it."""
    path = Path(path)
    if path.exists():
        return torch.load(path, weights_only=False)
    obj = compute_fn()
    atomic_save(obj, path)
    return obj


def default_data_root():
    """`$NETVLAD_DATA_ROOT` if set, else the tiny synthetic city in `data/synthetic_tiny`."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return REPO_ROOT / "data" / "synthetic_tiny"


def ensure_synthetic_city(root=None, preset="tiny", seed=0):
    """Generate the synthetic city at `root` unless it is already there; return its path."""
    from .synthetic import make_synthetic_city

    root = Path(root) if root is not None else REPO_ROOT / "data" / f"synthetic_{preset}"
    if root.exists():
        return root
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
