"""The model of a run, with every decision about how it runs made once: `RunModel`.

A run (training, evaluation) builds one `RunModel` from its `TrainConfig`. It holds
- the `model.EmbedNet` and its `backbone.Backbone` (builder, channels, trainable block, weights);
- the resolved `precision.Precision` (bf16 autocast or fp32, and the memory format of the inputs);
- the source of its descriptors, one of `SOURCES`, with the storage that source needs.

Training, validation, evaluation and k-means ask it for descriptors (`descriptors`) and for a
training step (`train_step`); they do not decide precision or source themselves.

A source is one small class. `choose_source` is the one place that picks it: a new source (say,
cached prefix maps through the trainable tail) is one more class and one more line there.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .data import whole_dataset
from .features import (
    IN_MEMORY_LIMIT_MIB,
    FeatureDataset,
    cache_memory_mib,
    encode_descriptors,
    encode_local_features,
    stored_local_features,
)
from .mining import triplet_loss
from .model import make_model
from .precision import resolve_precision


class ImageSource:
    """Descriptors from the images, through the whole model: any encoder, trained or not."""

    name = "images"
    images = True  # the inputs are images: the precision's memory format applies

    def __init__(self, run):
        self.run = run

    def prepare(self, splits, work_dir=None):
        """Nothing to store: the images are read every time."""

    def inference(self, split, key=None, label=None):
        """(module, dataset, num_workers) of one inference pass over `split`."""
        return self.run.model, whole_dataset(split, self.run.config), self.run.config.num_workers

    def trainable(self):
        """The module a training step runs: the whole model."""
        return self.run.model

    def tuple_features(self, key):
        """What `mining.TripletDataset` reads for the split `key`: None, the images."""
        return None

    @property
    def num_workers(self):
        return self.run.config.num_workers


class LocalFeatureSource:
    """A frozen encoder runs once per image; descriptors come from its local features
    (N, D, h, w) float16 through `model.head` (NetVLAD, then PCA).

    Storage, per split (`key`: "train", "val", ...): `prepare` encodes the run's splits, in RAM
    (small arrays also kept between runs: `features.stored_local_features`) or in a disk-backed
    array in the run folder. A split not prepared is encoded when first asked for, when it is
    small enough to be kept (else its images go through the whole model).

    Args:
        arrays: local features already computed, by key.
        stored: keep small arrays between runs (False: always encode the images afresh).
    """

    name = "local_features"
    images = False
    num_workers = 0  # rows of an array: nothing to decode in parallel

    def __init__(self, run, arrays=None, stored=True):
        self.run, self.arrays, self.stored = run, dict(arrays or {}), stored
        self.frozen, self.rest = run.model.encoder, run.model.head  # encoded once; then run

    def prepare(self, splits, work_dir=None):
        """Encode each split of `splits` ({key: split}) once, e.g. train and val."""
        for key, split in splits.items():
            path = Path(work_dir) / f"features_{key}.npy" if work_dir is not None else None
            self.arrays[key] = self._encode(split, f"Encoding {key} images once", path)

    def _encode(self, split, label, path=None, required=True):
        """(N, D, h, w) local features of `split`, stored as `config.cache_storage` says (disk
        only with a `path`); None if not `required` and too large to keep between runs."""
        run, config = self.run, self.run.config
        storage = config.cache_storage if path is not None else "memory"
        dataset = whole_dataset(split, config)
        args = {"batch_size": config.cache_batch_size, "num_workers": config.num_workers,
                "device": run.device, "precision": run.precision, "label": label}
        features = None
        if storage != "disk" and self.stored:
            features = stored_local_features(self.frozen, dataset, **args)
        if features is None and required:  # large, or disk asked for: this run's own array
            features = encode_local_features(self.frozen, dataset, storage=storage,
                                              out_path=path, **args)
        return features

    def inference(self, split, key=None, label=None):
        """(module, dataset, num_workers) of one inference pass over `split`."""
        if key not in self.arrays and self.stored:
            self.arrays[key] = self._encode(split, f"{label}: encoding images once",
                                            required=False)
        features = self.arrays.get(key)
        if features is None:  # too large to keep: the images, through the whole model
            return ImageSource(self.run).inference(split, key, label)
        return self.rest, FeatureDataset(features), self.num_workers

    def trainable(self):
        """The module a training step runs: the head, on the cached local features."""
        return self.rest

    def tuple_features(self, key):
        """What `mining.TripletDataset` reads for the split `key`: its local features."""
        return self.arrays[key]


class PrefixMapSource(LocalFeatureSource):
    """Only the backbone's last block trains (`trainable="conv5"`, the paper's setting with a
    pretrained encoder): its frozen prefix (VGG16: conv1_1 ... pool4) runs once per image, and
    descriptors come from the prefix maps (N, C, h, w) float16 through the trainable tail
    (conv5_1 ... conv5_3) and the head. The same storage as `LocalFeatureSource`."""

    name = "prefix_maps"

    def __init__(self, run, arrays=None, stored=True):
        super().__init__(run, arrays, stored)
        prefix, tail = run.model.encoder.backbone.split(run.model.encoder)
        self.frozen, self.rest = prefix, nn.Sequential(tail, run.model.head)


def prefix_frozen(model):
    """True when the encoder's prefix is frozen and its last block trains (`"conv5"`)."""
    backbone = getattr(model.encoder, "backbone", None)
    if backbone is None:
        return False
    prefix, tail = backbone.split(model.encoder)
    return (not any(p.requires_grad for p in prefix.parameters())
            and any(p.requires_grad for p in tail.parameters()))


SOURCES = {"images": ImageSource, "local_features": LocalFeatureSource,
           "prefix_maps": PrefixMapSource}


def choose_source(run):
    """The source of `run`'s descriptors when `config.feature_cache` is on: local features
    when no encoder weight trains, prefix maps when only the last block trains; else (and
    when every layer trains) the images."""
    if run.config.feature_cache and run.model.encoder_frozen:
        return LocalFeatureSource(run)
    if run.config.feature_cache and prefix_frozen(run.model):
        return PrefixMapSource(run)
    return ImageSource(run)


class RunModel:
    """A model with its run's decisions: backbone, precision, descriptor source.

    Args:
        model: a `model.EmbedNet`, on `device`.
        config: the run's `TrainConfig`.
        precision: a resolved `precision.Precision`; None: resolved here from `config.precision`.
        source: run -> source object (a class of `SOURCES`); None: `choose_source`.
    """

    def __init__(self, model, config, device, precision=None, source=None):
        self.model, self.config, self.device = model, config, torch.device(device)
        self.backbone = getattr(model.encoder, "backbone", None)  # a `Backbone`, if built so
        self.precision = precision or resolve_precision(config.precision, self.device)
        self.source = source(self) if source is not None else choose_source(self)
        self._trainable = None

    @classmethod
    def build(cls, config, train_split, device, init="kmeans", source=None):
        """The model of `config` (`model.make_model`: k-means with this run's precision)."""
        precision = resolve_precision(config.precision, device)
        return cls(make_model(config, train_split, device, init, precision), config, device,
                   precision, source)

    def encode_split(self, split, key=None, label="Caching descriptors", work_dir=None):
        """float16 descriptors (numDb + numQ, out_dim) of `split`, database first.

        Args:
            key: the split's name in the source's storage ("train", "val", ...).
            work_dir: with `config.cache_storage` "disk" (or "auto" and larger than
                `features.IN_MEMORY_LIMIT_MIB`), a disk-backed array in this folder holds them.
        """
        net, dataset, num_workers = self.source.inference(split, key, label)
        return encode_descriptors(net, dataset, batch_size=self.config.cache_batch_size,
                                   num_workers=num_workers, device=self.device,
                                   precision=self.precision, dtype=np.float16,
                                   out_path=self._descriptor_path(len(dataset), work_dir),
                                   label=label)

    def _descriptor_path(self, num_images, work_dir):
        """Where the descriptor cache goes: None (RAM) or a `.npy` file in `work_dir`."""
        storage = self.config.cache_storage
        if storage == "auto":
            mib = cache_memory_mib(num_images, self.model.out_dim, np.float16)
            storage = "memory" if mib <= IN_MEMORY_LIMIT_MIB else "disk"
        if storage == "disk" and work_dir is not None:
            return Path(work_dir) / "descriptor_cache.npy"
        return None

    @property
    def trainable(self):
        """The module that trains (under torchrun its DDP wrapper), built once."""
        if self._trainable is None:
            self._trainable = distributed.ddp(self.source.trainable())
        return self._trainable

    def train_step(self, batch, optimizer, margin, share=None):
        """One SGD step on a batch of tuples; returns (loss, number of tuples).

        Args:
            batch: `(query, positive, negatives, neg_counts, indices)` from `collate_fn`:
                images, or their local features.
            share: under torchrun, this rank's `distributed.Share` of the global batch: the
                step is then that of the global batch, whose loss and size are returned.
        """
        query, positive, negatives, neg_counts, _ = batch
        inputs = torch.cat([query, positive, negatives]).to(self.device)  # (2B + sum(n), ...)
        if self.source.images:
            inputs = self.precision.images(inputs)
        with self.precision.autocast(self.device):
            desc = self.trainable(inputs)
        desc = desc.float()  # (2B + sum(neg_counts), out_dim)
        B = query.shape[0]
        q, p, n = desc[:B], desc[B:2 * B], desc[2 * B:]  # `q`, `p`: (B, dim); `n`: (N, dim)
        loss = triplet_loss(q, p, n, neg_counts.to(self.device), margin=margin)
        value = None
        if share is not None:  # the all-reduced gradient is that of the global batch's loss
            loss, value = distributed.share_loss(loss, len(n), share)
            B = len(share.global_)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return (loss.item() if value is None else value), B


def as_run(model, config, device, features=None, stored=True):
    """`model` as a `RunModel` (a `RunModel` is returned as it is).

    Args:
        features: local features (N, D, h, w) of the split to encode, computed already: the
            descriptors then come from them through the head.
        stored: a frozen encoder's features (or a frozen prefix's maps) of a small split are
            kept between runs; False: always the images (the exact numbers of
            `evaluate_checkpoint`).
    """
    if isinstance(model, RunModel):
        return model
    if features is not None:
        source = lambda run: LocalFeatureSource(run, {None: features}, stored=False)  # noqa: E731
    else:
        source = (ImageSource if not stored else LocalFeatureSource if model.encoder_frozen
                  else PrefixMapSource if prefix_frozen(model) else ImageSource)
    return RunModel(model, config, device, source=source)
