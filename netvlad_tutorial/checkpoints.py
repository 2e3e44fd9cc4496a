"""Loading models: released weights (Patch-NetVLAD, Nanne/pytorch-NetVlad) and this project's
checkpoints, each checked before use.
"""

from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbone import BACKBONES, build_encoder
from .config import MAX_CLUSTERS, ArgumentError, TrainConfig
from .files import load_torch_file
from .model import EmbedNet
from .netvlad import NetVLAD
from .pca import PCAWhitening

MODEL_FORMATS = {
    "netvlad_tutorial": "a dict with 'model' (state dict) and 'model_config', written by "
                        "`python -m netvlad_tutorial train`",
    "patchnetvlad": "a dict with 'state_dict' holding 'encoder.*', 'pool.centroids', "
                    "'pool.conv.weight' and 'WPCA.0.weight'/'WPCA.0.bias' (QVPR/Patch-NetVLAD "
                    "pittsburgh_WPCA*.pth.tar, mapillary_WPCA*.pth.tar)",
    "nanne": "a dict with 'state_dict' holding 'encoder.*', 'pool.centroids' and "
             "'pool.conv.weight' (+ 'pool.conv.bias' for vladv2), no WPCA "
             "(Nanne/pytorch-NetVlad checkpoint.pth.tar, model_best.pth.tar)",
}

# Patch-NetVLAD resizes every image to 480 x 640 (H, W) before ToTensor and the ImageNet
# mean/std; Nanne's code reads the Pittsburgh files as they are (640 x 480, no resize).
PATCHNETVLAD_IMAGE_SIZE = (480, 640)


def _strip_module(name):
    """A parameter name without the `module.` parts that `nn.DataParallel` inserts."""
    return ".".join(part for part in name.split(".") if part != "module")


def detect_model_format(obj):
    """The format of a loaded model file (`MODEL_FORMATS` key), from its contents only.

    Raises:
        ValueError listing the keys found and the formats accepted, for anything else.
    """
    if isinstance(obj, dict):
        if "model" in obj and "model_config" in obj:
            return "netvlad_tutorial"
        state = obj.get("state_dict")
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            names = {_strip_module(k) for k in state}
            if "pool.centroids" in names and "pool.conv.weight" in names \
                    and any(n.startswith("encoder.") for n in names):
                if {"WPCA.0.weight", "WPCA.0.bias"} <= names:
                    return "patchnetvlad"
                if not any(n.startswith("WPCA.") for n in names):
                    return "nanne"
    raise ValueError(_unknown_format_message(obj))


def _unknown_format_message(obj, path=None):
    """The error for a file of no known format: the keys it holds, and what is accepted."""
    if isinstance(obj, dict):
        found = f"top-level keys {sorted(map(str, obj))[:20]}"
        state = obj.get("state_dict")
        if isinstance(state, dict):
            found += f", 'state_dict' keys {sorted(map(str, state))[:20]}"
    else:
        found = f"a {type(obj).__name__}, not a dict"
    accepted = "; ".join(f"{name}: {text}" for name, text in MODEL_FORMATS.items())
    where = f"{path}: " if path is not None else ""
    return f"{where}not a model file of a known format (found {found}). Accepted: {accepted}"


def _load_state(module, state, path, what):
    """`module.load_state_dict(state)` (strict), with a ValueError naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the {what} does not fit this model: {err}") from err


def _released_model(state, path):
    """An `EmbedNet` from a Patch-NetVLAD or Nanne `state_dict` (names without `module.`)."""
    encoder = build_encoder(None)
    enc_state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if k.startswith("encoder.")}
    if enc_state.keys() != encoder.state_dict().keys():
        raise ValueError(f"{path}: the encoder is not VGG16 up to conv5_3 (expected keys "
                         f"{sorted(encoder.state_dict())[:4]}..., found "
                         f"{sorted(enc_state)[:4]}...); only VGG16 NetVLAD models load")
    _load_state(encoder, enc_state, path, "encoder")
    centroids = state["pool.centroids"]  # (K, D)
    num_clusters, dim = centroids.shape
    bias = "pool.conv.bias" in state
    pool = NetVLAD(num_clusters, dim, normalize_input=True, bias=bias)
    _load_state(pool, {k.removeprefix("pool."): v for k, v in state.items()
                       if k.startswith("pool.")}, path, "NetVLAD layer")
    pca = None
    if "WPCA.0.weight" in state:
        weight, b = state["WPCA.0.weight"], state["WPCA.0.bias"]  # (P, K*D, 1, 1), (P,)
        if weight.shape[1:] != (num_clusters * dim, 1, 1):
            raise ValueError(f"{path}: WPCA.0.weight has shape {tuple(weight.shape)}, "
                             f"expected (P, {num_clusters * dim}, 1, 1)")
        # Their WPCA is Conv2d(K*D, P, 1) on the VLAD vector viewed as (N, K*D, 1, 1), then
        # flatten and L2 normalization: the same as a Linear layer with the conv's weight.
        pca = PCAWhitening(num_clusters * dim, b.shape[0])
        _load_state(pca, {"linear.weight": weight.flatten(1), "linear.bias": b}, path, "WPCA")
    if any(not k.startswith(("encoder.", "pool.", "WPCA.")) for k in state):
        extra = sorted(k for k in state if not k.startswith(("encoder.", "pool.", "WPCA.")))
        raise ValueError(f"{path}: unexpected parameters {extra[:5]} in 'state_dict'")
    return EmbedNet(encoder, pool, pca)


def _own_model(ckpt, path):
    """An `EmbedNet` from this project's checkpoint (`model_config` + `model` state)."""
    cfg = ckpt["model_config"]
    if not isinstance(cfg, dict) or cfg.get("encoder") not in BACKBONES:
        found = cfg.get("encoder") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{path}: encoder {found!r} is not one of the registered backbones "
                         f"({', '.join(BACKBONES)})")
    for key, top in (("num_clusters", MAX_CLUSTERS), ("dim", 4096), ("pca_dim", 1 << 20)):
        value = cfg.get(key)
        if not (key == "pca_dim" and not value) and not (
                type(value) is int and 1 <= value <= top):
            raise ValueError(f"{path}: model_config {key} is {value!r}, not a whole number "
                             f"in 1..{top}")
    model = EmbedNet(build_encoder(None, backbone=cfg["encoder"]),
                     NetVLAD(cfg["num_clusters"], cfg["dim"],
                             normalize_input=cfg["normalize_input"], bias=cfg["bias"]),
                     PCAWhitening(cfg["num_clusters"] * cfg["dim"], cfg["pca_dim"])
                     if cfg.get("pca_dim") else None)
    _load_state(model, ckpt["model"], path, "'model' state dict")
    return model


def load_model(path, device=None, contents=None):
    """A NetVLAD model from a file of this project, of Patch-NetVLAD or of Nanne/pytorch-NetVlad.

    The format is detected from the file's contents (`detect_model_format`), never its name,
    and the file is read with `torch.load(weights_only=True)`: loading never runs code from it.
    The model gives the original code's descriptor for the same input: VGG16 conv5_3 (no ReLU),
    NetVLAD (L2-normalized input, soft-assignment, intra- then L2-normalization), then for
    Patch-NetVLAD their WPCA (a linear map of the VLAD vector, then L2 normalization).

    Args:
        path: the file.
        device: where to put the model (default: CPU).
        contents: the file as `files.load_torch_file` read it, if the caller already has it.

    Returns:
        (model, info): an `EmbedNet` in eval mode with gradients off, and a dict with
        `format`, `num_clusters`, `dim` (local descriptor channels), `pca_dim` (None without
        whitening), `out_dim`, `vladv2` (assignment bias), `image_size` ((H, W) to resize to,
        None: as the files are) and `input_rule` (the input rule in words).
    """
    obj = contents if contents is not None else load_torch_file(path, "model file")
    try:
        fmt = detect_model_format(obj)
    except ValueError:
        raise ValueError(_unknown_format_message(obj, path)) from None
    info = {"format": fmt}
    if fmt == "netvlad_tutorial":
        model = _own_model(obj, path)
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        size = config.get("image_size")
        info["image_size"] = tuple(size) if size else None
        info["input_rule"] = (f"resize to {tuple(size)} (H, W), " if size else
                              "no resize, ") + "ToTensor, ImageNet mean/std (as trained)"
    else:
        state = {_strip_module(k): v for k, v in obj["state_dict"].items()}
        model = _released_model(state, path)
        if fmt == "patchnetvlad":
            info["image_size"] = PATCHNETVLAD_IMAGE_SIZE
            info["input_rule"] = ("resize to (480, 640) (H, W) as Patch-NetVLAD's "
                                  "Resize((480, 640)), ToTensor, ImageNet mean/std")
        else:
            info["image_size"] = None
            info["input_rule"] = ("no resize (Nanne's code reads the Pittsburgh 640x480 files "
                                  "as they are), ToTensor, ImageNet mean/std")
            for key in ("epoch", "best_score"):
                if key in obj:
                    info[key] = np.asarray(obj[key]).item()
    info.update(num_clusters=model.pool.num_clusters, dim=model.pool.dim,
                pca_dim=None if model.pca is None else model.pca.out_dim,
                out_dim=model.out_dim, vladv2=model.pool.conv.bias is not None)
    model.encoder.weights_source = str(path)
    model.requires_grad_(False)
    model.eval()
    return model.to(device or "cpu"), info




def load_checkpoint(path, expected_config=None, contents=None):
    """Load a checkpoint (never running code: `files.load_torch_file`), with clear errors.

    Args:
        expected_config: the `model_config` the checkpoint must have, if given.
        contents: the file as already read (`files.load_torch_file`): only checked here.

    Raises:
        FileNotFoundError, ValueError: one line naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == "best.pth" and (path.parent / "latest.pth").is_file():
            hint = (f"; {path.parent} holds an interrupted run: resuming it (`resume=True`) "
                    f"completes it and writes {path.name}")
        raise FileNotFoundError(f"checkpoint {path} not found (expected RUN_DIR/best.pth or "
                                f"RUN_DIR/latest.pth, written by `netvlad_tutorial train`){hint}")
    ckpt = contents if contents is not None else load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this package (no model/model_config)")
    if expected_config is not None:
        check_model_config(ckpt, path, expected_config)
    return ckpt


def check_model_config(ckpt, path, expected_config):
    """Raise unless checkpoint `ckpt` (read from `path`) is of the model `expected_config`."""
    if ckpt["model_config"] != expected_config:
        raise ArgumentError(f"checkpoint {path} was saved for model {ckpt['model_config']}, "
                            f"but this run builds {expected_config}; use the matching `preset`",
                            preset="`preset`")


def checkpoint_config(ckpt, path, strict=True):
    """The `TrainConfig` stored in checkpoint `ckpt` (read from `path`), see `from_dict`."""
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path} is not a checkpoint of this package (no config)")
    return TrainConfig.from_dict(ckpt["config"], source=str(path), strict=strict,
                                 version=ckpt.get("version"))


def load_weights(model, ckpt, path):
    """`model.load_state_dict(ckpt["model"])` with a clear error when they do not fit, or
    when a weight is NaN or infinite (a diverged run: its recall would be 0 without a word)."""
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else {}
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the weights {', '.join(bad[:3])} hold NaN or infinite "
                         "values (the run diverged, or the file is damaged)")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        by = ckpt.get("version", "an older or newer version")
        raise ValueError(f"{path}: its weights do not fit the model of netvlad_tutorial "
                         f"{__version__} (written by {by}): {first}") from err
