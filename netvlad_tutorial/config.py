"""Every setting of a training run (`TrainConfig`) and the named presets (`PRESETS`).

The first module of the course: every later stage reads its settings from a `TrainConfig`.
"""

import dataclasses
import types
from dataclasses import dataclass

from . import __version__
from .precision import PRECISIONS

TRAINABLE = ("all", "conv5", "netvlad")  # what trains: `TrainConfig.trainable`
CHOICES = {"trainable": TRAINABLE, "optimizer": ("sgd", "adam"),
           "negative_pool": ("query", "shared"), "precision": PRECISIONS,
           "cache_storage": ("memory", "disk", "auto")}
# The smallest value of each numeric setting (None: no bound); floats here must be above it.
AT_LEAST = {"num_clusters": 1, "lr_step": 1, "epochs": 1, "patience": 0, "batch_size": 1,
            "n_neg": 1, "n_neg_sample": 1, "n_neg_dist": 1, "cache_refresh": 1,
            "max_queries": 1, "cache_batch_size": 1, "num_workers": 0, "seed": 0,
            "kmeans_images": 1, "kmeans_per_image": 1, "kmeans_iters": 1, "pca_dim": 1,
            "momentum": 0.0, "weight_decay": 0.0}
ABOVE = {"lr": 0.0, "lr_gamma": 0.0, "margin": 0.0}


class ArgumentError(ValueError):
    """A bad argument of a library call, or a bad combination of them.

    The message names each argument as a caller of the library writes it, in backquotes
    (`` `resume=True` ``); `arguments` maps each name to that spelling, so that the command
    line can say its own flags instead (`cli.FLAGS`).
    """

    def __init__(self, message, **arguments):
        super().__init__(message)
        self.arguments = arguments  # e.g. {"resume": "`resume=True`"}

    def spelled(self, flags):
        """The message with each argument replaced by `flags[name]` where given."""
        text = str(self)
        for name, spelling in self.arguments.items():
            if name in flags:
                text = text.replace(spelling, flags[name])
        return text


MAX_CLUSTERS = 4096  # 4096 x 512 centroids: a 2M-D descriptor; more is a mistake


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the reference (Nanne) settings."""

    data_root: str = ""
    dataset: str | None = None  # `.mat` prefix, e.g. "pitts30k"; None: the only one there
    image_size: tuple | None = None  # (H, W) to resize to; None keeps the files' size
    num_clusters: int = 64
    weights: str | None = "imagenet"  # "imagenet", a local file, or None (random)
    backbone: str = "vgg16_conv5"  # the encoder: a name in `backbone.BACKBONES`
    # What trains: "all" (every VGG16 layer and NetVLAD), "conv5" (conv5_1..conv5_3 and
    # NetVLAD, the reference with ImageNet weights; `tiny`) or "netvlad" (only NetVLAD: a
    # frozen encoder, `tiny-random`).
    trainable: str = "conv5"
    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_step: int = 5
    lr_gamma: float = 0.5
    epochs: int = 30
    patience: int = 10  # early stop after this many epochs without a better R@5
    batch_size: int = 4  # tuples per step
    n_neg: int = 10
    n_neg_sample: int = 1000
    n_neg_dist: int = 100
    # Potential negatives: "query" (each query draws its own, the reference) or "shared" (a
    # group of queries draws one pool; the same distribution per query, far less memory read
    # when mining a large cache on a CPU; see `mining.mine_triplets`).
    negative_pool: str = "query"
    # The paper's margin, on squared distances. Mining and the loss compare plain distances
    # with sqrt(margin) (0.316), as the reference code (see `mining.triplet_loss`).
    margin: float = 0.1
    cache_refresh: int = 1000  # queries between two cache refreshes
    max_queries: int | None = None  # training queries per epoch (None: all)
    cache_batch_size: int = 24
    num_workers: int = 8
    seed: int = 123
    precision: str = "auto"  # "fp32", "bf16", or "auto": bf16 where native (resolve_precision)
    cache_storage: str = "auto"  # descriptor/feature caches: "memory", "disk" or "auto" (by size)
    feature_cache: bool = True  # a frozen encoder runs once per image (see FeatureCache)
    device: str | None = None
    kmeans_images: int = 500
    kmeans_per_image: int = 100
    kmeans_iters: int = 100
    pca_dim: int = 4096

    def __post_init__(self):
        """Check every setting: its type, its choices or its range (the one place that does)."""
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, f.type):
                raise ArgumentError(f"`{f.name}` must be {_type_name(f.type)}, not {value!r}",
                                    **{f.name: f"`{f.name}`"})
            bad = None
            if f.name in CHOICES and value not in CHOICES[f.name]:
                bad = f"one of {', '.join(map(repr, CHOICES[f.name]))}"
            elif value is not None and f.name in AT_LEAST and value < AT_LEAST[f.name]:
                bad = f"at least {AT_LEAST[f.name]}"
            elif f.name in ABOVE and not value > ABOVE[f.name]:
                bad = f"above {ABOVE[f.name]}"
            if bad:
                raise ArgumentError(f"`{f.name}` must be {bad}, not {value!r}",
                                    **{f.name: f"`{f.name}`"})
        if self.image_size is not None and (len(self.image_size) != 2 or not all(
                isinstance(n, int) and n > 0 for n in self.image_size)):
            raise ArgumentError(f"`image_size` must be (H, W), two positive integers, not "
                                f"{self.image_size!r}", image_size="`image_size`")
        if not self.backbone:
            raise ArgumentError("`backbone` must name a backbone", backbone="`backbone`")
        if not self.num_clusters <= MAX_CLUSTERS:
            raise ArgumentError(f"`num_clusters` must lie in 1..{MAX_CLUSTERS}, not "
                                f"{self.num_clusters} (NetVLAD uses 64)",
                                num_clusters="`num_clusters`")

    def replace(self, **changes):
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def with_settings(self, settings):
        """A copy with `settings`, strings "KEY=VALUE" (the command line's `--set`), applied
        (`apply_settings`)."""
        return apply_settings(self, settings)

    @classmethod
    def from_dict(cls, d, source="the configuration", strict=True, version=None):
        """A `TrainConfig` from a dict read from a file (`config.json`, a checkpoint).

        Older files are mapped to the settings that mean the same:
        - `amp: true/false` becomes `precision: "auto"/"fp32"`;
        - `train_all` and `freeze_encoder` become `trainable` (`old_trainable`);
        - `image_size` lists become tuples.

        Args:
            source: the file, for the error message.
            strict: refuse settings this version does not know; else drop them (with a note).
            version: the package version that wrote the file, for the error message.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source} holds {type(d).__name__}, not a dict of settings")
        d, names = dict(d), {f.name for f in dataclasses.fields(cls)}
        if "amp" in d and "amp" not in names:
            d["precision"] = "auto" if d.pop("amp") else "fp32"
        if "train_all" in d or "freeze_encoder" in d:
            d["trainable"] = old_trainable(d.pop("train_all", None),
                                           d.pop("freeze_encoder", False),
                                           d.get("weights", cls.weights))
        unknown = sorted(set(d) - names)
        if unknown:
            by = f"netvlad_tutorial {version}" if version else "another version"
            message = (f"{source} has settings unknown to netvlad_tutorial {__version__}: "
                       f"{', '.join(unknown)} (written by {by})")
            if strict:
                raise ValueError(f"{message}; continue it with that version, or start a new "
                                 "run (a new --out)")
            print(f"{message}; ignored")
            for key in unknown:
                d.pop(key)
        if isinstance(d.get("image_size"), list):  # JSON has no tuples
            d["image_size"] = tuple(d["image_size"])
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], f.type):
                raise ValueError(f"{source}: setting {f.name} is {d[f.name]!r}, not of type "
                                 f"{f.type if isinstance(f.type, str) else _type_name(f.type)}")
        if d.get("image_size") is not None:
            size = d["image_size"]
            if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
                raise ValueError(f"{source}: image_size is {size!r}, not (H, W) in pixels")
            d["image_size"] = tuple(size)
        try:
            return cls(**d)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


def apply_settings(config, settings):
    """A copy of the dataclass `config` with `settings`, strings "KEY=VALUE", applied.

    Each value is read as its field's type: `none` for an optional field, true/false for a
    flag, `96,128` for a size (`setting_text` writes them so). An unknown key or a bad value
    is an `ArgumentError` naming it.
    """
    fields = {f.name: f.type for f in dataclasses.fields(config)}
    changes = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ArgumentError(f"`{item}` is not KEY=VALUE with KEY a setting: "
                                f"{', '.join(fields)}", set=f"`{item}`")
        try:
            changes[key] = _parse(text.strip(), fields[key])
        except ValueError:
            raise ArgumentError(f"`{item}`: {key} must be {_type_name(fields[key])}, not "
                                f"{text!r}", set=f"`{item}`") from None
    return dataclasses.replace(config, **changes)


def setting_text(value):
    """`value` as `apply_settings` reads it back: `none`, `true`, `96,128`, `0.02`."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _types(annotation):
    """The types an annotation allows: `int | None` -> (int, NoneType)."""
    if isinstance(annotation, types.UnionType):
        return annotation.__args__
    return (annotation,)


def _type_name(annotation):
    return " or ".join("None" if t is type(None) else t.__name__ for t in _types(annotation))


def _has_type(value, annotation):
    """Whether `value` is of `annotation`'s types; an int is a float, a bool is not an int."""
    allowed = _types(annotation)
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed) or (isinstance(value, int) and float in allowed)


def _parse(text, annotation):
    """`text` read as a value of `annotation` (raises ValueError)."""
    allowed = _types(annotation)
    if text.lower() == "none" and type(None) in allowed:
        return None
    if bool in allowed:
        if text.lower() in ("true", "yes", "1", "false", "no", "0"):
            return text.lower() in ("true", "yes", "1")
        raise ValueError(text)
    if int in allowed:
        return int(text)
    if float in allowed:
        return float(text)
    if tuple in allowed:
        return tuple(int(n) for n in text.replace("x", ",").split(","))
    return text


def old_trainable(train_all, freeze_encoder, weights):
    """The `trainable` of a file written before it existed, from its `train_all` (None:
    conv5 with weights, all with random ones) and `freeze_encoder` (only NetVLAD)."""
    if freeze_encoder:
        return "netvlad"
    if train_all is None:
        train_all = weights is None
    return "all" if train_all else "conv5"


PRESETS = {
    # The synthetic city on 2 CPU cores, the paper's setting at tiny scale: the encoder
    # pretrained on the synthetic world (`weights="world"`, shipped in the package: the
    # course's ImageNet), conv1..pool4 frozen and encoded once (`run_model.PrefixMapSource`),
    # conv5 and NetVLAD trained. Recipe: lr 3e-3, chosen by validation R@5 among those of
    # `experiments/tiny_recipes.py` (experiments/results/tiny_recipes_*.json); its best
    # epoch there was the second, so two epochs: `train` + `evaluate` stay within 120 s of a
    # 2-core CPU in fp32.
    "tiny": TrainConfig(
        dataset="synthetic", image_size=(96, 128), num_clusters=16, weights="world",
        trainable="conv5", lr=3e-3, lr_step=100, epochs=2, patience=2, batch_size=4,
        n_neg=4, n_neg_sample=200, n_neg_dist=50, cache_batch_size=32, num_workers=0,
        kmeans_images=100, kmeans_per_image=20, kmeans_iters=50, pca_dim=64,
    ),
    # The tiny city from a random encoder (what `tiny` was before the pretrained encoder), for
    # the course's "why pretraining matters". Random initialization, so only the NetVLAD layer
    # trains, on top of fixed random VGG16 features. Training the whole random encoder on 96
    # queries did not generalize in our runs: the test recall jumped around the untrained one,
    # and SGD at lr 3e-3 or 1e-2 collapsed the descriptors. lr: chosen by validation R@5 among
    # the recipes of `experiments/tiny_recipes.py --preset tiny-random`. Batch: the
    # reference's 4 tuples; batch 2, which one seed's validation preferred, ties with it over 8
    # seeds (`experiments/tiny_seeds.py`).
    "tiny-random": TrainConfig(
        dataset="synthetic", image_size=(96, 128), num_clusters=16, weights=None,
        trainable="netvlad", lr=1e-2, lr_step=100, epochs=10, patience=10, batch_size=4,
        n_neg=4, n_neg_sample=200, n_neg_dist=50, cache_batch_size=32, num_workers=0,
        kmeans_images=100, kmeans_per_image=20, kmeans_iters=50, pca_dim=64,
    ),
    # A larger synthetic city (`make-synthetic --preset small`), still on a CPU.
    "small": TrainConfig(
        dataset="synthetic", image_size=(120, 160), num_clusters=32, weights=None,
        trainable="netvlad", lr=1e-2, lr_step=100, epochs=6, patience=6, batch_size=4, n_neg=6,
        n_neg_sample=500, n_neg_dist=100, cache_batch_size=32, num_workers=2,
        kmeans_images=200, kmeans_per_image=50, pca_dim=128,
    ),
    # The reference settings, for one GPU. At Pitts250k, mining with the reference draws reads
    # about 480 GiB of the cache per epoch (`estimate_run`): 32 queries share one pool of
    # potential negatives there, which keeps each query's sample uniform over its negatives and
    # reads 24x less (README, "Real-scale cost"). `negative_pool="query"` restores the reference.
    "pitts30k": TrainConfig(dataset="pitts30k"),
    "pitts250k": TrainConfig(dataset="pitts250k", negative_pool="shared"),
    # The tiny city from ImageNet VGG16 weights (`weights download imagenet` first; offline the
    # encoder stays random, with a warning): conv5 + NetVLAD train, as the reference. lr 1e-3 is
    # the paper's SGD rate: pretrained conv5 weights would be wrecked by `tiny-random`'s 1e-2
    # (meant for a freshly initialized NetVLAD layer alone), and Nanne's 1e-4 barely moves them
    # in ten epochs of 96 queries (Pitts30k gives 30 epochs of 7,416 queries).
    "tiny-imagenet": TrainConfig(
        dataset="synthetic", image_size=(96, 128), num_clusters=16, weights="imagenet",
        trainable="conv5", lr=1e-3, lr_step=100, epochs=10, patience=10,
        batch_size=4, n_neg=4, n_neg_sample=200, n_neg_dist=50, cache_batch_size=32,
        num_workers=0, kmeans_images=100, kmeans_per_image=20, kmeans_iters=50, pca_dim=64,
    ),
}


def get_preset(name):
    """The preset `name`, with a clear error for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
