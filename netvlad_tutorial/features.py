"""Stage 3 ("first run"): the descriptor of every image, computed once and stored compactly.

Two caches live here:
- `encode_descriptors`: the global descriptor (K*D, or the PCA dimension) of every image, the
  cache that mining reads (stage 4) and that evaluation searches (stage 6);
- `encode_local_features`: the output of a frozen encoder (or of its frozen prefix) for every
  image. A frozen part never changes, so training runs it once per image and then only what
  trains on these maps: NetVLAD on conv5 features (`tiny-random`), or conv5 and NetVLAD on
  pool4 maps (`tiny`, `run_model.PrefixMapSource`).
"""

import copy
import hashlib
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .config import TRAINABLE
from .files import atomic_write, write_error
from .precision import Precision, resolve_precision
from .utils import cache_dir, display_path, leave_progress, progress_bar, progress_hidden

DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
IN_MEMORY_LIMIT_MIB = 2048  # `storage="auto"`: larger caches go to a disk-backed array
STORED_LIMIT_MIB = 256  # `stored_local_features` keeps arrays up to this size between runs


def cache_memory_mib(n, dim, dtype=np.float16):
    """Size in MiB of an (n, dim) descriptor array of `dtype` (`dim` may be a shape tuple)."""
    return n * int(np.prod(dim)) * np.dtype(dtype).itemsize / 2**20


def _num_rows(dataset):
    """Rows of the output: the length of the dataset under any `Subset` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset)


def _model_device(model):
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def as_precision(precision, device):
    """A `Precision` from a `Precision`, a name ("auto", "fp32", "bf16") or None ("auto")."""
    if isinstance(precision, Precision):
        return precision
    return resolve_precision(precision or "auto", device)


def _new_array(shape, dtype, out_path):
    """Zeros of `shape` in RAM, or a disk-backed `.npy` file at `out_path`.

    The file's blocks are allocated first (`os.posix_fallocate`, where the system has it): a
    full disk or a file size limit is then an OSError naming the file here, not a SIGBUS
    that kills the process when a page of the memory map is first written.
    """
    if out_path is None:
        return np.zeros(shape, dtype)
    try:
        array = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate") and array.nbytes:
            with open(out_path, "r+b") as f:
                os.posix_fallocate(f.fileno(), array.offset, array.nbytes)
    except OSError as err:
        raise write_error(err, out_path) from err
    return array


def encode(model, dataset, batch_size=24, num_workers=0, device=None, precision=None,
                  dtype=np.float16, out_path=None, label="Caching descriptors", shard=True):
    """`model`'s output for every item of `dataset`, as an array; the one inference loop.

    Runs under `model.eval()` and `torch.no_grad()` (the model's train/eval mode is restored
    afterwards), with the inputs in the precision's memory format and under its autocast.
    Each item of `dataset` is `(input, index)` and its output is written at row `index`, so a
    `Subset` fills only its own rows of an array as long as the whole dataset.

    Args:
        model: maps inputs (B, ...) to outputs (B, ...), e.g. images to descriptors.
        device: where to run (the model is moved there); default: the model's device.
        precision: a `precision.Precision`, "auto", "fp32" or "bf16"; default "auto".
        dtype: `np.float16` (default, half the memory) or `np.float32`; never float64.
        out_path: if given, a disk-backed `.npy` file (`np.lib.format.open_memmap`) holds the
            result instead of RAM.
        label: the progress bar's label; None: no progress bar.
        shard: under `torch.distributed` (see `distributed`), each rank runs only its
            `distributed.shard` of the items and every rank gets the whole array, in the same
            order, gathered exactly; a disk-backed `out_path` is written by rank 0 alone (the
            other ranks hold it in RAM). False: every rank runs every item on its own, with no
            collective call (for work that some ranks may skip, e.g. a cached result).
    """
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    device = torch.device(device) if device is not None else _model_device(model)
    precision = as_precision(precision, device)
    num_rows, sharded = _num_rows(dataset), shard and distributed.is_initialized()
    if sharded:  # this rank's items only; rank 0 alone writes a file
        dataset = Subset(dataset, distributed.shard(len(dataset)))
        out_path = out_path if distributed.is_main() else None
    parts, rows = [], []  # sharded: this rank's outputs and their row numbers
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    was_training = model.training
    model.to(device).eval()
    out = None
    try:
        with torch.no_grad():
            for inputs, indices in progress_bar(loader, desc=label, unit="batch",
                                                leave=leave_progress(),
                                                disable=label is None or progress_hidden()):
                inputs = precision.images(inputs.to(device, non_blocking=True))  # (B, ...)
                with precision.autocast(device):
                    outputs = model(inputs)  # `outputs`: (B, ...)
                outputs = outputs.to(DTYPES[dtype]).cpu().numpy()
                if sharded:
                    parts.append(outputs)
                    rows.append(indices.numpy())
                    continue
                if out is None:
                    out = _new_array((num_rows, *outputs.shape[1:]), dtype, out_path)
                out[indices.numpy()] = outputs
    finally:
        model.train(was_training)
    if sharded:
        out = _gather_shards(parts, rows, num_rows, dtype, out_path)
    if out is None:
        raise ValueError("encode got an empty dataset")
    if out_path is not None:
        out.flush()
    return out


def _gather_shards(parts, rows, num_rows, dtype, out_path):
    """The full (num_rows, ...) array on every rank from each rank's output batches (None if
    no rank had any item)."""
    shapes = [s for s in distributed.all_gather_object(parts[0].shape[1:] if parts else None)
              if s is not None]
    if not shapes:
        return None
    shape = tuple(shapes[0])
    part = np.concatenate(parts) if parts else np.empty((0, *shape), dtype)  # (n_rank, ...)
    indices = np.concatenate(rows) if rows else np.empty(0, np.int64)  # (n_rank,)
    out = _new_array((num_rows, *shape), dtype, out_path)
    return distributed.gather_rows(part, indices, num_rows, out)


def encode_descriptors(model, dataset, batch_size=24, num_workers=0, device=None,
                        precision=None, dtype=np.float16, out_path=None,
                        label="Caching descriptors"):
    """(N, out_dim) array of `model`'s descriptors of every image of `dataset`.

    Runs under `model.eval()` and `torch.no_grad()` (see `encode`). Each item of
    `dataset` is `(image (3, H, W), index)`, e.g. `data.WholeDataset`; a `FeatureDataset` with
    `model.head` as the model gives the same descriptors from cached local features.

    Args:
        precision: "auto" (bf16 autocast only where the device has native bf16), "fp32",
            "bf16" or a `precision.Precision`; the NetVLAD layer computes in float32 in any case.
        dtype: `np.float16` (default, half the memory) or `np.float32`; never float64.
        out_path: if given, a disk-backed `.npy` file holds the result instead of RAM
            (Pitts250k: about 100k × 32,768, 6 GiB in float16).
    """
    return encode(model, dataset, batch_size, num_workers, device, precision, dtype,
                         out_path, label)


def encode_local_features(encoder, dataset, batch_size=24, num_workers=0, device=None,
                           precision=None, storage="auto", out_path=None,
                           label="Encoding images once (frozen encoder)"):
    """(N, D, h, w) float16 array: the encoder's output for every image of `dataset`.

    For a frozen encoder this is all that training needs of the images: every later cache
    refresh, training step and validation runs only the NetVLAD layer on these features. The
    size is printed before the pass.

    Args:
        encoder: images (B, 3, H, W) -> local descriptors (B, D, h, w), frozen.
        storage: "memory", "disk" (a `.npy` at `out_path`) or "auto": memory up to
            `IN_MEMORY_LIMIT_MIB`, disk above.
        out_path: the `.npy` file for disk storage.
    """
    if any(p.requires_grad for p in encoder.parameters()):
        raise ValueError("encode_local_features caches a frozen encoder only; this one has "
                         "trainable parameters (its output changes as it trains)")
    device = torch.device(device) if device is not None else _model_device(encoder)
    image, _ = dataset[0]  # `image`: (3, H, W)
    shape = _meta_shape(encoder, image.shape)  # (D, h, w)
    mib = cache_memory_mib(len(dataset), shape, np.float16)
    if storage == "auto":
        storage = "memory" if mib <= IN_MEMORY_LIMIT_MIB else "disk"
    if storage not in ("memory", "disk"):
        raise ValueError(f"storage must be 'memory', 'disk' or 'auto', got {storage!r}")
    if storage == "disk" and out_path is None:
        raise ValueError("storage='disk' needs out_path, the .npy file of the features")
    where = "in memory" if storage == "memory" else f"on disk ({out_path})"
    print(f"local features: {len(dataset):,} images x {shape} float16 = {mib:,.1f} MiB {where}")
    return encode(encoder, dataset, batch_size, num_workers, device, precision,
                         np.float16, out_path if storage == "disk" else None, label)


def _meta_shape(encoder, image_shape):
    """The (D, h, w) output shape of `encoder` for one image, computed without arithmetic."""
    meta = copy.deepcopy(encoder).to("meta")
    return tuple(meta(torch.empty(1, *image_shape, device="meta")).shape[1:])


class FeatureDataset(Dataset):
    """Cached local features as a dataset: item i is `(features[i] (D, h, w) float32, i)`.

    Args:
        features: (N, D, h, w) array from `encode_local_features` (RAM or memmap).
    """

    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return torch.from_numpy(np.asarray(self.features[i], dtype=np.float32)), i


# --- Local features kept between runs -----------------------------------------------------------


def features_key(encoder, dataset, precision):
    """A digest of everything the local features depend on.

    The encoder's weights, every image file (path, size, modification time), the transform,
    the precision and memory format, and the torch version: any change gives a new key.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in encoder.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for path in dataset.paths:
        stat = path.stat()
        h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    h.update(f"{dataset.transform!r}|{precision.name}|{precision.channels_last}|"
             f"{torch.__version__}".encode())
    return h.hexdigest()


def frozen_copy(module):
    """A copy of `module` with every parameter frozen: its weights as they are now.

    `encode_local_features` and `stored_local_features` cache only a frozen encoder's output;
    an encoder whose conv5 trains (`tiny`) is given to them as its frozen copy, and keeps
    training itself."""
    return copy.deepcopy(module).requires_grad_(False)


def stored_local_features(encoder, dataset, batch_size=24, num_workers=0, device=None,
                          precision=None, label="Encoding images once (frozen encoder)"):
    """`encode_local_features` in memory, kept in `cache_dir()/features` for the next run.

    A frozen encoder gives the same features in every run (the course's notebooks encode the
    test split once with the same module: 02, 06 and 06b the pretrained encoder's frozen
    prefix, conv1_1 ... pool4, each through `frozen_copy` or a run's `PrefixMapSource`), so a
    small array
    (up to `STORED_LIMIT_MIB`) is written once, atomically, and read back by every later call
    with the same `features_key`.

    Returns:
        the (N, D, h, w) float16 array, or None when it would be larger than
        `STORED_LIMIT_MIB` (real-scale splits: use `encode_local_features` with disk storage,
        or the images) or `dataset` has no `paths` (only a `data.WholeDataset` is keyed).
    """
    device = torch.device(device) if device is not None else _model_device(encoder)
    precision = as_precision(precision, device)
    if not hasattr(dataset, "paths") or not len(dataset):
        return None
    image, _ = dataset[0]  # `image`: (3, H, W)
    shape = (len(dataset), *_meta_shape(encoder, image.shape))  # (N, D, h, w)
    if cache_memory_mib(len(dataset), shape[1:]) > STORED_LIMIT_MIB:
        return None
    path = cache_dir() / "features" / f"{features_key(encoder, dataset, precision)}.npy"
    if path.is_file():
        try:
            features = np.load(path)
        except (OSError, ValueError) as err:
            print(f"{display_path(path)} is unreadable ({err}): encoding again")
        else:
            if features.dtype == np.float16 and features.shape == shape \
                    and np.isfinite(features).all():
                print(f"local features: {features.shape[0]:,} images x {features.shape[1:]} "
                      f"float16, read from {display_path(path.parent)} (kept by an earlier run)")
                return features
            print(f"{display_path(path)} holds {features.shape} {features.dtype}, not "
                  f"{shape} finite float16: encoding again")
    features = encode_local_features(encoder, dataset, batch_size, num_workers, device,
                                      precision, "memory", None, label)
    try:
        atomic_write(path, lambda f: np.save(f, features))
    except OSError as err:  # a full or read-only cache folder: not kept, not fatal
        print(f"{err}; the features are not kept for the next run")
    return features


# ---------------------------------------------------------------------------------------------
# Why the cache runs under `no_grad()`: what autograd keeps for backward
# ---------------------------------------------------------------------------------------------

def saved_for_backward_mib(fn, exclude=()):
    """(MiB of tensors autograd saves for backward while `fn()` runs, the result of `fn()`).

    `torch.autograd.graph.saved_tensors_hooks` sees every tensor that a layer saves for its
    backward pass. Each storage is counted once (in-place ReLU outputs share their input's);
    storages of the tensors in `exclude` are left out: pass the parameters, which exist anyway,
    to count only the activations.
    """
    skip = {id(t.untyped_storage()) for t in exclude}
    kept = {}  # id -> storage; holding the storage keeps its id unique

    def pack(t):
        storage = t.untyped_storage()
        if id(storage) not in skip:
            kept[id(storage)] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(s.nbytes() for s in kept.values()) / 2**20, out


def backward_memory_mib(model, batch_size, image_size, trainable="conv5", device="meta"):
    """MiB of activations that one forward pass of a batch keeps for backward, without and
    with `no_grad()`.

    A layer saves tensors for backward only when something before or in it trains: with a
    frozen encoder ("netvlad", `tiny-random`) only the NetVLAD layer saves its inputs;
    with "conv5" (the reference with ImageNet weights; `tiny`) conv5_1…conv5_3 do too; with "all"
    (a random encoder trained from scratch) every layer does, from conv1_1's 64 full-size maps
    on. The parameters are not counted. On the "meta" device (the default) tensors have shapes
    but no data: the count is exact at any size, without memory or arithmetic.

    Args:
        model: an `EmbedNet` (copied; its own flags and weights are left alone).
        image_size: (H, W) of the batch; trainable: one of `TRAINABLE`.

    Returns:
        {"grad": MiB, "no_grad": MiB}.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    net = copy.deepcopy(model).to(device).eval()
    net.requires_grad_(trainable == "all")
    net.pool.requires_grad_(True)
    if trainable == "conv5":  # the backbone's last block: VGG16's conv5_1, ReLU, ..., conv5_3
        net.encoder.backbone.split(net.encoder)[1].requires_grad_(True)
    images = torch.zeros(batch_size, 3, *image_size, device=device)  # (B, 3, H, W)
    params = list(net.parameters())
    grad, _ = saved_for_backward_mib(lambda: net(images), exclude=params)
    with torch.no_grad():
        no_grad, _ = saved_for_backward_mib(lambda: net(images), exclude=params)
    return {"grad": grad, "no_grad": no_grad}
