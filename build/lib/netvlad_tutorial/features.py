"""Stage 3 ("first run"): the descriptor of every image, computed once and stored compactly."""

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .utils import amp_supported, autocast

DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def cache_memory_mb(n, dim, dtype=np.float16):
    """Size in MiB of an (n, dim) descriptor array of `dtype`."""
    return n * dim * np.dtype(dtype).itemsize / 2**20


def _num_rows(dataset):
    """Rows of the output: the length of the dataset under any `Subset` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset)


def _model_device(model):
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def compute_descriptors(model, dataset, batch_size=24, num_workers=0, device=None, amp=None,
                        dtype=np.float16, out_path=None, desc="Caching descriptors"):
    """(N, out_dim) array of `model`'s descriptors of every image of `dataset`.

    Runs under `model.eval()` and `torch.no_grad()` (the model's train/eval mode is restored
    afterwards). Each item of `dataset` is `(image, index)` and its descriptor is written at row
    `index`, so a `Subset` of a dataset fills only its own rows of an array as long as the whole
    dataset (the other rows stay zero).

    Args:
        model: maps images (B, 3, H, W) to descriptors (B, out_dim).
        dataset: items `(image (3, H, W), index)`, e.g. `data.WholeDataset`.
        device: where to run (the model is moved there); default: the model's device.
        amp: bf16 autocast and channels_last input; default: where `utils.amp_supported`.
        dtype: `np.float16` (default, half the memory) or `np.float32`; never float64.
        out_path: if given, a disk-backed `.npy` file (`np.lib.format.open_memmap`) holds the
            result instead of RAM (Pitts250k: about 100k × 32,768, 6 GiB in float16).
    """
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    device = torch.device(device) if device is not None else _model_device(model)
    amp = amp_supported(device) if amp is None else amp
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    was_training = model.training
    model.to(device).eval()
    out = None
    try:
        with torch.no_grad():
            for images, indices in tqdm(loader, desc=desc, unit="batch"):
                images = images.to(device, non_blocking=True)  # `images`: (B, 3, H, W)
                if amp:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp):
                    feats = model(images)  # `feats`: (B, out_dim)
                if out is None:
                    shape = (_num_rows(dataset), feats.shape[1])
                    out = (np.zeros(shape, dtype) if out_path is None else
                           np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype,
                                                     shape=shape))
                out[indices.numpy()] = feats.to(DTYPES[dtype]).cpu().numpy()
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("compute_descriptors got an empty dataset")
    if out_path is not None:
        out.flush()
    return out
