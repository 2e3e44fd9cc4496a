"""Stage 2a: the encoder. VGG16 up to conv5_3 (`features[:-2]`), the registry of backbones, and
its weights: ImageNet (opt-in download) or the encoder shipped with the package (`pretrain`).
"""

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .config import TRAINABLE, ArgumentError
from .utils import display_path

# torchvision's `VGG16_Weights.IMAGENET1K_V1.url` (a test checks it), named here so that the
# package never imports torchvision: its import alone costs seconds in every process.
IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# VGG16 ("configuration D" of Simonyan & Zisserman, 2015): conv widths, "M" a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M")




def imagenet_weights_path():
    """Where torchvision keeps its VGG16 ImageNet file: `<torch hub dir>/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_URL).path).name


def vgg16_features():
    """torchvision's `vgg16().features`, built without its 123M-parameter classifier.

    The same modules in the same order (so the same indices `features.0` ... `features.30` and
    the same random draws for a seed) and the same initialization; a test compares them.
    """
    layers, channels = [], 3
    for width in VGG16_LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):  # torchvision's VGG initialization
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


def _load_vgg_state(encoder, path):
    """Copy the conv weights of a VGG16 state dict file (model or features) into `encoder`."""
    layout = ("a VGG16 state dict with keys 'features.0.weight' ... (torchvision vgg16) "
              "or '0.weight' ... '28.bias' (its features only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: expected {layout} ({e})") from e
    expected = encoder.state_dict().keys()
    if isinstance(state, dict):
        for prefix in ("features.", "encoder.", ""):
            sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if expected <= sub.keys():
                try:
                    encoder.load_state_dict({k: sub[k] for k in expected})
                except RuntimeError as e:
                    raise ValueError(f"{path} does not fit VGG16: expected {layout} ({e})") from e
                return
    found = sorted(state)[:3] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path} is not {layout}; found {found}")


@dataclass(frozen=True)
class Backbone:
    """An encoder the model can be built on: one entry of `BACKBONES`.

    Attributes:
        name: its key in `BACKBONES`, `TrainConfig.backbone` and checkpoints' `model_config`.
        build: () -> `nn.Sequential`, images (B, 3, H, W) -> local features (B, D, h, w),
            randomly initialized (under the caller's torch seed).
        channels: D, the channels of its local features.
        tail: its last `tail` modules are the block that `trainable="conv5"` trains (VGG16:
            conv5_1, ReLU, conv5_2, ReLU, conv5_3); the modules before are its frozen prefix.
        load: (encoder, path) -> None, copies a weights file into a built encoder.
        imagenet_path: () -> the `Path` of its ImageNet weights; None: it has none.
        label: its name in messages (default: `name`).
    """

    name: str
    build: Callable
    channels: int
    tail: int
    load: Callable | None = None
    imagenet_path: Callable | None = None
    label: str = ""

    def split(self, encoder):
        """(prefix, tail) of a built `encoder`: the layers before the last block, and it."""
        return encoder[:-self.tail], encoder[-self.tail:]


BACKBONES = {}


def register_backbone(backbone):
    """Add `backbone` (a `Backbone`) to `BACKBONES`; returns it."""
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name):
    """The registered `Backbone` called `name`, with a clear error for an unknown one."""
    if name not in BACKBONES:
        raise ArgumentError(f"unknown backbone {name!r} (the `backbone` setting); registered: "
                            f"{', '.join(BACKBONES)}", backbone="`backbone`")
    return BACKBONES[name]


# VGG16 up to conv5_3, before its ReLU and pool5: 512 channels at stride 16.
VGG16 = register_backbone(Backbone("vgg16_conv5", lambda: vgg16_features()[:-2], channels=512,
                                   tail=5, load=_load_vgg_state,
                                   imagenet_path=imagenet_weights_path, label="VGG16"))


SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
SHIPPED = {"world": "vgg16_world.pth"}  # encoder weights shipped in the package (`pretrain`)


def shipped_weights(name="world"):
    """(path, provenance) of encoder weights shipped in the package, their sha256 checked.

    The provenance (`<file>.json`, written by `pretrain.export_encoder`) records the command,
    the commit, the hardware and the time that made the file.
    """
    path = SHIPPED_DIR / SHIPPED[name]
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        raise FileNotFoundError(
            f"the pretrained encoder {name!r} is not in this copy of the package (expected "
            f"{display_path(path)} and {record.name}): make one with `python -m "
            "netvlad_tutorial pretrain` and give its vgg16_world.pth as the weights file")
    provenance = json.loads(record.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != provenance.get("sha256"):
        raise ValueError(f"{path}: its sha256 {digest[:12]}... is not the {record.name} record "
                         f"{str(provenance.get('sha256'))[:12]}...: the file is damaged; "
                         "reinstall the package")
    return path, provenance


def build_encoder(weights=None, trainable=None, backbone="vgg16_conv5"):
    """The encoder of `backbone` (default: VGG16 up to conv5_3, 512 channels at stride 16).

    Args:
        weights: None (random), "imagenet" (torchvision's file, used only if it is already on
            this machine: nothing is downloaded), "world" (the encoder pretrained on the
            synthetic world, shipped in the package: `shipped_weights`) or the path of a local
            state dict.
        trainable: "all" (every layer trains), "conv5" (only the backbone's last block,
            conv5_1..conv5_3 for VGG16, as the reference) or "netvlad" (no encoder layer: a
            frozen encoder). None: "conv5" with loaded weights, "all" with random ones.
        backbone: a name in `BACKBONES`.

    Returns:
        `nn.Sequential` with `weights_source` ("random", "imagenet" or the file), `name` and
        `backbone` (its `Backbone`).
    """
    spec = get_backbone(backbone)
    encoder = spec.build()
    source = "random"
    if weights == "imagenet":
        path = spec.imagenet_path() if spec.imagenet_path else None
        if path is not None and path.is_file():
            spec.load(encoder, path)
            source = "imagenet"
        elif path is None:
            warnings.warn(f"{spec.label or spec.name} has no ImageNet weights; continuing with "
                          "random initialization", stacklevel=2)
        else:
            warnings.warn(f"ImageNet weights for {spec.label or spec.name} not found at "
                          f"{display_path(path)} (`python -m netvlad_tutorial weights download "
                          "imagenet` puts them there); continuing with random initialization",
                          stacklevel=2)
    elif weights in SHIPPED:
        path, _ = shipped_weights(weights)
        spec.load(encoder, path)
        source = weights
    elif weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights {path} not found (expected a {spec.name} "
                                    "state dict saved with torch.save)")
        spec.load(encoder, path)
        source = str(path)
    if trainable is None:
        trainable = "all" if source == "random" else "conv5"
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}")
    prefix, tail = spec.split(encoder)
    prefix.requires_grad_(trainable == "all")  # everything before the last block
    tail.requires_grad_(trainable != "netvlad")  # the last block (VGG16: conv5_1..conv5_3)
    encoder.weights_source, encoder.name, encoder.backbone = source, spec.name, spec
    return encoder
