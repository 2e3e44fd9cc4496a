"""Stage 1b: images, checked before they are opened and loaded as the encoder expects them:
EXIF orientation applied, 16-bit scaled, RGB, resized and normalized.
"""

import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .dbstruct import QUERIES_DIR, DataLayoutError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class InputTransform:
    """PIL image -> normalized float tensor (3, H, W), optionally resized to (H, W) first.

    The arithmetic of torchvision's `Compose([Resize, ToTensor, Normalize])`, bit for bit
    (a test compares them), without importing torchvision, which costs seconds per process.
    """

    def __init__(self, resize=None):
        self.resize = tuple(resize) if resize is not None else None
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)  # `mean`: (3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)

    def __call__(self, img):
        if self.resize is not None and img.size != self.resize[::-1]:
            img = img.resize(self.resize[::-1], Image.BILINEAR)  # PIL takes (W, H)
        if img.mode != "RGB":
            img = to_rgb(img)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # `x`: (H, W, 3)
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # `x`: (3, H, W)
        return x.sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"InputTransform(resize={self.resize}, mean={IMAGENET_MEAN}, std={IMAGENET_STD})"


def input_transform(resize=None):
    """PIL image -> normalized tensor (ImageNet mean/std), optionally resized to (H, W)."""
    return InputTransform(resize)


def _file_kind(mode):
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")


def check_image_file(path, root=None):
    """Raise unless `path` is a regular file (after symlinks) inside `root` when given.

    Symlinks are followed only while they stay inside `root` (a link to a file elsewhere is
    refused); a folder, FIFO, device or socket is refused before it is opened (a FIFO would
    block the read for ever).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} not found (database names are relative to the "
                                f"dataset root, query names to ROOT/{QUERIES_DIR})") from None
    if not stat.S_ISREG(mode):
        raise DataLayoutError(f"image {path} is {_file_kind(mode)}, not an image file")
    if root is not None:
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise DataLayoutError(f"image {path} leads outside {root} (to {real}): image "
                                  "files must lie inside their folder, symlinks included")


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img):
    """A PIL image as 8-bit RGB, upright: its EXIF orientation applied (as a photo viewer
    shows it; torchvision ignores it), 16-bit grey scaled to 8 bits (`convert("RGB")` would
    clip it to white)."""
    if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)  # `grey`: (H, W), 0..65535
        img = Image.fromarray(np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def load_image(path, root=None):
    """Open an image file as upright 8-bit RGB (`to_rgb`); errors name the file.

    Args:
        root: the folder the image must lie in (`check_image_file`).
    """
    path = Path(path)
    check_image_file(path, root)
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataLayoutError(f"image {path} cannot be read: {err}") from err


def image_size(path):
    """(width, height) of an image file as `load_image` gives it; errors name the file."""
    return load_image(path).size
