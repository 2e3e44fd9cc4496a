"""Released weights, downloaded only when asked: `python -m netvlad_tutorial weights ...`.

Nothing here downloads at import. `download_weights(name)` fetches one registered file with
`fetch_url` (progress bar, sha256 check, timeouts, a size cap) into the standard torch hub cache,
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
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import IMAGENET_URL, SHIPPED, imagenet_weights_path, shipped_weights
from .checkpoints import detect_model_format
from .config import ArgumentError
from .files import atomic_write, folder_lock, load_torch_file, write_error
from .utils import progress_bar

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
        kind: "encoder" (a VGG16 state dict) or "model" (a file `checkpoints.load_model` reads).
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
               "checkpoints.load_model(<path>) (images resized to 480x640, as their code)"),
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
        raise ValueError(f"unknown weights name {name!r}; choose one of {', '.join(REGISTRY)}")
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


DOWNLOAD_TIMEOUT = 60  # seconds to connect, and between two reads of the body
MAX_DOWNLOAD_BYTES = 1 << 30  # 1 GiB: a cap when the server does not say the size


class _WriteFailed(Exception):
    """A write to the download's file failed (`fetch_url` tells it from a network error)."""


def fetch_url(url, dest, hash_prefix=None, progress=True, timeout=DOWNLOAD_TIMEOUT,
              max_bytes=MAX_DOWNLOAD_BYTES):
    """Download `url` into the new file `dest`; returns its sha256 hex digest.

    Bounded: `timeout` seconds to connect and for each read (a server that never answers or
    stalls mid-body raises), and at most `max_bytes` (and exactly the `Content-Length` the
    server announces): an endless body is cut off.

    Raises:
        ValueError: the server failed, sent too much or too little, or the sha256 does not start
            with `hash_prefix` ("invalid hash value").
        OSError: writing `dest` failed (`files.write_error`: a full disk, a size limit).
    """
    digest, received = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "netvlad-tutorial"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                open(dest, "xb") as f:
            length = response.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else None
            if size is not None and max_bytes is not None and size > max_bytes:
                raise ValueError(f"{url} announces {size:,} bytes, more than the {max_bytes:,} "
                                 "expected")
            cap = size if size is not None else max_bytes
            with progress_bar(total=size, unit="B", unit_scale=True, disable=not progress) as bar:
                while block := response.read(1 << 16):
                    received += len(block)
                    if cap is not None and received > cap:
                        raise ValueError(f"{url} sent more than the {cap:,} bytes expected; "
                                         "stopped")
                    try:
                        f.write(block)
                    except OSError as err:
                        raise _WriteFailed(err) from err
                    digest.update(block)
                    bar.update(len(block))
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as err:
                raise _WriteFailed(err) from err
    except _WriteFailed as err:
        raise write_error(err.args[0], dest) from err
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, 404
        raise ValueError(f"download from {url} failed: {err or type(err).__name__}") from err
    if size is not None and received != size:
        raise ValueError(f"download from {url} was cut short: {received:,} of {size:,} bytes")
    if hash_prefix and not digest.hexdigest().startswith(hash_prefix):
        raise ValueError(f"invalid hash value: the sha256 of {url} is {digest.hexdigest()}, "
                         f"not {hash_prefix}...")
    return digest.hexdigest()


def _expected_hash(entry, path):
    """The published sha256 (prefix) of `entry`, else the one its sidecar recorded, else None."""
    if entry.sha256 is not None or not _sidecar(path).is_file():
        return entry.sha256
    words = _sidecar(path).read_text(errors="replace").split()
    if not words or not all(c in "0123456789abcdef" for c in words[0]) or len(words[0]) < 8:
        raise ValueError(f"{_sidecar(path)} holds no sha256 (it is empty or damaged): delete "
                         f"it and {path}, and download again")
    return words[0]


def _remove_partials(path):
    """Delete the `.NAME.*.download` files that a killed download of `path` left."""
    for left in path.parent.glob(f".{path.name}.*.download"):
        left.unlink(missing_ok=True)
        print(f"Removed {left}, left by an interrupted download")


def download_weights(name, base_url=None, progress=True, allow_unverified=False, path=None,
                     check=None, timeout=DOWNLOAD_TIMEOUT, max_bytes=MAX_DOWNLOAD_BYTES):
    """Download the weights `name` into the torch hub cache, unless already there.

    Args:
        name: a `REGISTRY` name, or a `Weights`.
        base_url: fetch `<base_url>/<file name>` instead (default: `$NETVLAD_WEIGHTS_URL`).
        progress: show a progress bar.
        allow_unverified: accept a file without a published hash. Its sha256 is then printed
            and saved next to it (`<file>.sha256`), and a later call checks the file against it.
        path: where to keep the file (default: `weights_path(name)`, in the torch hub cache).
        check: `check(path)` raises ValueError unless the downloaded file is usable (default:
            `check_weights_file`, which reads it as weights; an archive needs its own).
        timeout, max_bytes: the limits of `fetch_url`.

    A file already there is checked: against its published hash or its sidecar, else (one
    placed by hand, unverified) by reading it and, with `allow_unverified`, its hash is
    recorded; otherwise it is refused. Downloads of one file are serialized
    (`files.folder_lock`), and the partial files of a killed download are removed.

    Returns:
        the file's path. A wrong hash, a truncated or unreadable file raises, leaving nothing.
    """
    entry = get_weights(name)
    path = weights_path(entry) if path is None else Path(path)
    expected = _expected_hash(entry, path)
    if path.is_file():
        if expected is not None and not sha256_of(path).startswith(expected):
            raise ValueError(f"{path} is already there but its sha256 does not start with "
                             f"{expected}: delete it and download it again")
        if expected is None:
            _adopt_unverified(entry, path, allow_unverified, check)
        print(f"{entry.name}: already downloaded, {path}")
        print(f"  use: {entry.usage.replace('<path>', str(path))}")
        return path
    if expected is None and not allow_unverified:
        raise ArgumentError(f"{entry.name}: {NO_PUBLISHED_HASH}, so its contents cannot be "
                            "checked against the authors'. Pass `allow_unverified=True` to "
                            "download it anyway: it is still read without running code and its "
                            "layout is checked", allow_unverified="`allow_unverified=True`")
    url = weights_url(entry, base_url)
    with folder_lock(path.parent / f".{path.name}.lock", path, "weights download"):
        _remove_partials(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.download")
        print(f"{entry.name}: downloading {url}")
        try:
            try:
                digest = fetch_url(url, tmp, expected, progress, timeout, max_bytes)
            except ValueError as err:
                raise ValueError(f"{entry.name}: {err}") from err
            try:
                check(tmp) if check is not None else check_weights_file(entry, tmp)
            except ValueError as err:
                raise ValueError(f"{entry.name}: the file from {url} is truncated or not the "
                                 f"expected weights: {err}") from err
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


def _adopt_unverified(entry, path, allow_unverified, check=None):
    """A file of `entry` placed by hand, with no hash to check it against: refused unless
    `allow_unverified`, then read (its layout checked) and its sha256 recorded."""
    if not allow_unverified:
        raise ValueError(f"{path} is there, but {entry.name} has no published hash and no "
                         f"{_sidecar(path).name} records its download, so it cannot be "
                         "verified: delete it and download again, or pass --allow-unverified to "
                         "check its layout and keep it")
    try:
        check(path) if check is not None else check_weights_file(entry, path)
    except ValueError as err:
        raise ValueError(f"{path} is there but is truncated or not the expected weights "
                         f"({err}): delete it and download again") from err
    digest = sha256_of(path)
    atomic_write(_sidecar(path), f"{digest}  {path.name}\n")
    print(f"  unverified file placed by hand; sha256 {digest}, saved in {_sidecar(path)}")


def list_weights():
    """One line per registered file: name, whether it is here, its hash status, its use."""
    lines = []
    for entry in REGISTRY.values():
        path = weights_path(entry)
        here = "downloaded" if path.is_file() else "not downloaded"
        check = f"sha256 {entry.sha256}..." if entry.sha256 else "no published hash"
        lines.append(f"{entry.name:<22} {here:<15} {check:<20} {entry.description}\n"
                     f"{'':<22} file: {path}\n{'':<22} url:  {entry.url}")
    for name in SHIPPED:  # made by `pretrain` and shipped in the package: nothing to download
        try:
            path, prov = shipped_weights(name)
        except (FileNotFoundError, ValueError) as err:
            lines.append(f"{name:<22} {'not shipped':<15} {'':<20} {err}")
            continue
        lines.append(f"{name:<22} {'shipped':<15} {'sha256 ' + prov['sha256'][:8] + '...':<20} "
                     f"VGG16 pretrained on the synthetic world (the course's ImageNet)\n"
                     f"{'':<22} file: {path}\n"
                     f"{'':<22} made by: {prov.get('command')} at commit {prov.get('commit')}, "
                     f"on {prov.get('hardware')} ({prov.get('device')}), "
                     f"{prov.get('seconds', 0) / 3600:.1f} h")
    return "\n".join(lines)
