"""Released weights, downloaded only when asked: `python -m netvlad_tutorial weights ...`.

Nothing here downloads at import. `download_weights(name)` fetches one registered file with
`torch.hub.download_url_to_file` (progress bar, sha256 check) into the standard torch hub cache,
`torch.hub.get_dir()/checkpoints` (`$TORCH_HOME/hub/checkpoints`, by default
`~/.cache/torch/hub/checkpoints`), where `build_encoder(weights="imagenet")` and torchvision look.

Every downloaded file is checked before it is moved into the cache: its sha256 where one is
published, and always by reading it with `torch.load(weights_only=True)` (never running code)
and checking that it has the expected layout, which also catches a truncated download. A failed
check leaves no file behind. `$NETVLAD_WEIGHTS_URL` (or `base_url`) replaces the servers by one
base URL, `<base>/<file name>`: a local mirror, or the tests' server on 127.0.0.1.
"""

import hashlib
import http.client
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ArgumentError
from .model import IMAGENET_URL, detect_model_format, imagenet_weights_path
from .utils import atomic_write, load_torch_file

WEIGHTS_URL_ENV = "NETVLAD_WEIGHTS_URL"

NO_PUBLISHED_HASH = ("no checksum is published for this file (neither Patch-NetVLAD's "
                     "download_models.py nor its README gives one)")


@dataclass(frozen=True)
class Weights:
    """One downloadable file.

    Args:
        name: the registry name (`weights download NAME`).
        url: where the authors publish it.
        filename: its name in the cache folder.
        sha256: the published sha256 (or its prefix); None when none is published.
        kind: "encoder" (a VGG16 state dict) or "model" (a file `model.load_model` reads).
        description: what it is.
        usage: how a preset, a notebook or the CLI uses it once downloaded.
        pca_dim: for a model, the WPCA dimension the file must have.
        note: anything else to know (mirrors, hash status).
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    kind: str
    description: str
    usage: str
    pca_dim: int | None = None
    note: str = ""


def _patchnetvlad(city, pca_dim, share):
    """A Patch-NetVLAD release: VGG16 + NetVLAD (K=64) + WPCA to `pca_dim`."""
    name = f"{city}_WPCA{pca_dim}"
    trained = {"pittsburgh": "Pitts30k-train", "mapillary": "Mapillary SLS"}[city]
    return Weights(
        name=name, url=f"https://cloudstor.aarnet.edu.au/plus/s/{share}/download",
        filename=f"{name}.pth.tar", sha256=None, kind="model", pca_dim=pca_dim,
        description=f"Patch-NetVLAD's NetVLAD trained on {trained}, WPCA {pca_dim}-D",
        usage=("python -m netvlad_tutorial evaluate --checkpoint <path> ...; in Python: "
               "model.load_model(<path>) (images resized to 480x640, as their code)"),
        note=(f"{NO_PUBLISHED_HASH}. URL from QVPR/Patch-NetVLAD download_models.py; CloudStor "
              "has since closed, and a later Patch-NetVLAD README points to "
              "https://huggingface.co/TobiasRobotics/Patch-NetVLAD (file "
              f"{name.replace('pittsburgh', 'pitts')}.pth.tar): use it with --base-url."))


REGISTRY = {w.name: w for w in [
    Weights(name="imagenet", url=IMAGENET_URL, filename=Path(IMAGENET_URL).name,
            sha256="397923af", kind="encoder",
            description="torchvision VGG16 ImageNet weights (IMAGENET1K_V1), the encoder's start",
            usage=("build_model(weights='imagenet'), TrainConfig(weights='imagenet'), the "
                   "presets 'tiny-imagenet', 'pitts30k', 'pitts250k'"),
            note="sha256 prefix published in the file name (torchvision's convention)"),
    _patchnetvlad("pittsburgh", 128, "2ORvaCckitjz4Sd"),
    _patchnetvlad("pittsburgh", 512, "WKl45MoboSyB4SH"),
    _patchnetvlad("pittsburgh", 4096, "1aoTGbFjsekeKlB"),
    _patchnetvlad("mapillary", 128, "vvr0jizjti0z2LR"),
    _patchnetvlad("mapillary", 512, "DFxbGgFwh1y1wAz"),
    _patchnetvlad("mapillary", 4096, "ZgW7DMEpeS47ELI"),
]}


def get_weights(name):
    """The registry entry `name` (or a `Weights` given directly), with a clear error."""
    if isinstance(name, Weights):
        return name
    if name not in REGISTRY:
        raise ValueError(f"unknown weights {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def weights_dir():
    """The torch hub cache folder of downloaded weights: `torch.hub.get_dir()/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_path(name):
    """Where the file of `name` lives once downloaded."""
    entry = get_weights(name)
    if entry.name == "imagenet":
        return imagenet_weights_path()  # the file `build_encoder("imagenet")` looks for
    return weights_dir() / entry.filename


def weights_url(name, base_url=None):
    """The URL to fetch `name` from: `<base_url or $NETVLAD_WEIGHTS_URL>/<file>`, else its own."""
    entry = get_weights(name)
    base = base_url or os.environ.get(WEIGHTS_URL_ENV)
    return f"{base.rstrip('/')}/{entry.filename}" if base else entry.url


def sha256_of(path, chunk=1 << 20):
    """The sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_weights_file(name, path):
    """Raise ValueError unless `path` reads safely and has the layout of `name`'s file."""
    entry = get_weights(name)
    obj = load_torch_file(path, f"{entry.name} weights file")
    if entry.kind == "encoder":
        state = obj if isinstance(obj, dict) else {}
        if not ({"features.0.weight", "0.weight", "encoder.0.weight"} & state.keys()):
            raise ValueError(f"{path} is not a VGG16 state dict (found keys "
                             f"{sorted(map(str, state))[:5]})")
        return
    fmt = detect_model_format(obj)
    if entry.pca_dim is not None:
        bias = obj["state_dict"].get("WPCA.0.bias") if fmt == "patchnetvlad" else None
        found = None if bias is None else int(bias.shape[0])
        if found != entry.pca_dim:
            raise ValueError(f"{path} is a {fmt} file with PCA dimension {found}, "
                             f"expected {entry.pca_dim} for {entry.name}")


def _sidecar(path):
    """The file next to `path` that records the sha256 of an unverified download."""
    return path.with_name(path.name + ".sha256")


def download_weights(name, base_url=None, progress=True, allow_unverified=False, path=None,
                     check=None):
    """Download the weights `name` into the torch hub cache, unless already there.

    Args:
        name: a `REGISTRY` name, or a `Weights`.
        base_url: fetch `<base_url>/<file name>` instead (default: `$NETVLAD_WEIGHTS_URL`).
        progress: show torch.hub's progress bar.
        allow_unverified: accept a file without a published hash. Its sha256 is then printed
            and saved next to it (`<file>.sha256`), and a later call checks the file against it.
        path: where to keep the file (default: `weights_path(name)`, in the torch hub cache).
        check: `check(path)` raises ValueError unless the downloaded file is usable (default:
            `check_weights_file`, which reads it as weights; an archive needs its own).

    Returns:
        the file's path. A wrong hash, a truncated or unreadable file raises, leaving nothing.
    """
    entry = get_weights(name)
    path = weights_path(entry) if path is None else Path(path)
    expected = entry.sha256
    if expected is None and _sidecar(path).is_file():
        expected = _sidecar(path).read_text().split()[0]
    if path.is_file():
        if expected is not None and not sha256_of(path).startswith(expected):
            raise ValueError(f"{path} is already there but its sha256 does not start with "
                             f"{expected}: delete it and download it again")
        print(f"{entry.name}: already downloaded, {path}")
        print(f"  use: {entry.usage.replace('<path>', str(path))}")
        return path
    if expected is None and not allow_unverified:
        raise ArgumentError(f"{entry.name}: {NO_PUBLISHED_HASH}, so its contents cannot be "
                            "checked against the authors'. Pass `allow_unverified=True` to "
                            "download it anyway: it is still read without running code and its "
                            "layout is checked", allow_unverified="`allow_unverified=True`")
    path.parent.mkdir(parents=True, exist_ok=True)
    url = weights_url(entry, base_url)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.download")
    print(f"{entry.name}: downloading {url}")
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=expected,
                                           progress=progress)
        except RuntimeError as err:  # torch.hub's hash check
            raise ValueError(f"{entry.name}: download from {url} refused: {err}") from err
        except (OSError, http.client.HTTPException) as err:  # refused, reset, cut short
            raise ValueError(f"{entry.name}: download from {url} failed: {err}") from err
        try:
            check(tmp) if check is not None else check_weights_file(entry, tmp)
        except ValueError as err:
            raise ValueError(f"{entry.name}: the file from {url} is truncated or not the "
                             f"expected weights: {err}") from err
        digest = sha256_of(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if entry.sha256 is None:
        atomic_write(_sidecar(path), f"{digest}  {path.name}\n")
        print(f"  unverified download (no published hash); sha256 {digest}, saved in "
              f"{_sidecar(path)}")
    print(f"{entry.name}: saved to {path}")
    print(f"  use: {entry.usage.replace('<path>', str(path))}")
    return path


def list_weights():
    """One line per registered file: name, whether it is here, its hash status, its use."""
    lines = []
    for entry in REGISTRY.values():
        path = weights_path(entry)
        here = "downloaded" if path.is_file() else "not downloaded"
        check = f"sha256 {entry.sha256}..." if entry.sha256 else "no published hash"
        lines.append(f"{entry.name:<22} {here:<15} {check:<20} {entry.description}\n"
                     f"{'':<22} file: {path}\n{'':<22} url:  {entry.url}")
    return "\n".join(lines)
