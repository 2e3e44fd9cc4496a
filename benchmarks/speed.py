"""Speed: the package's cache pass and training step against the reference, in one run.

    python benchmarks/speed.py [--device cuda|cpu] [--json] [--no-save] [--gpu-extras]

The package's variants call its own code: `features.encode_descriptors` (the one inference
loop, `features.encode`) and `RunModel.train_step`. The reference is a Nanne-style loop.
`gpu_extras` (CUDA only by default) is not the package: a pipeline of this script with uint8
input normalized on the device, a device-side cache, `torch.compile` and nvjpeg.

Method: `benchmarks/README.md`; figures per CPU: `RESULTS.md`. Every figure printed is measured
in this run.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # `common` and the package, from a checkout

from common import RESULTS_DIR, ROOT, device_name, slugify  # noqa: E402

from netvlad_tutorial.centroids import kmeans_centroids  # noqa: E402
from netvlad_tutorial.config import TrainConfig  # noqa: E402
from netvlad_tutorial.data import WholeDataset, load_split  # noqa: E402
from netvlad_tutorial.dbstruct import SPLITS  # noqa: E402
from netvlad_tutorial.features import encode, encode_descriptors  # noqa: E402
from netvlad_tutorial.files import atomic_write  # noqa: E402
from netvlad_tutorial.images import IMAGENET_MEAN, IMAGENET_STD, input_transform, load_image  # noqa: E402
from netvlad_tutorial.mining import triplet_loss  # noqa: E402
from netvlad_tutorial.model import build_model, prepare_for_device  # noqa: E402
from netvlad_tutorial.netvlad import assignment_alpha, netvlad_loop  # noqa: E402
from netvlad_tutorial.precision import Precision, autocast, native_bf16, resolve_precision  # noqa: E402
from netvlad_tutorial.run_model import ImageSource, RunModel  # noqa: E402
from netvlad_tutorial.synthetic import make_synthetic_city  # noqa: E402
from netvlad_tutorial.train import make_optimizer  # noqa: E402
from netvlad_tutorial.utils import cache_dir  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Speed: cache pass and training step, the reference formulation vs the package
# ---------------------------------------------------------------------------------------------

NUM_CLUSTERS = 64  # K; D = 512 from VGG16 conv5
TUPLES, TUPLE_SIZE = 4, 12  # a training batch: 4 x (query, positive, 10 negatives)
SPEED_DEFAULTS = {  # image size (H, W), images in the cache pass, batch size, timed train steps
    "cuda": {"image_size": (480, 640), "num_images": 4096, "batch_size": 64, "train_steps": 10},
    "cpu": {"image_size": (120, 160), "num_images": 96, "batch_size": 16, "train_steps": 2},
}
TARGETS = {  # the minimum speedups (and GPU throughput, training memory) the package aims at
    "cuda": {"cache_img_per_s": 1800, "cache_speedup": 3.5, "train_speedup": 3.5,
             "train_peak_mem_mb": 8192, "cosine_min": 0.999},
    "cpu": {"cache_speedup": 2.0, "train_speedup": 2.0, "cosine_min": 0.999},
}


class LoopNetVLAD(nn.Module):
    """NetVLAD computed cluster by cluster (`netvlad.netvlad_loop`), sharing a layer's weights.

    The reference (Nanne/pytorch-NetVlad) formulation: one (B, D, H*W) residual tensor per
    cluster, which autograd keeps for the backward pass, K times.

    Args:
        pool: a `netvlad.NetVLAD` whose `conv` and `centroids` this module uses (not copies).
    """

    def __init__(self, pool):
        super().__init__()
        self.conv, self.centroids = pool.conv, pool.centroids
        self.num_clusters, self.dim = pool.num_clusters, pool.dim
        self.normalize_input = pool.normalize_input

    def forward(self, x):
        """VLAD vectors (B, K*D) of local descriptors `x` (B, D, H, W)."""
        return netvlad_loop(x, self.conv, self.centroids, self.normalize_input)


def variant_settings(name, device, compile=None, gpu_decode=None, precision="auto"):
    """The levers of the "reference", "package" or "gpu_extras" variant on `device` (a dict).

    "package" runs the package's own code; "reference" and "gpu_extras" run this script's
    loops (`pipeline: "script"`).

    Args:
        compile: `torch.compile` the gpu_extras encoder; default: on CUDA.
        gpu_decode: decode the gpu_extras JPEGs with nvjpeg on the GPU; default: on CUDA.
        precision: "auto", "fp32" or "bf16" (`precision.resolve_precision`) of the package and
            gpu_extras variants.
    """
    cuda = torch.device(device).type == "cuda"
    if name == "reference":  # Nanne: fp32, NCHW, loop NetVLAD, PIL workers, .cpu() per batch
        return {"pipeline": "script", "precision": "fp32", "amp": False,
                "channels_last": False, "pool": "loop", "decode": "pil", "pin_memory": False,
                "cudnn_benchmark": False, "device_cache": False, "compile": False}
    if name not in ("package", "gpu_extras"):
        raise ValueError(f"unknown variant {name!r}; expected 'reference', 'package' or "
                         "'gpu_extras'")
    chosen = resolve_precision(precision, device, verbose=False)
    common = {"precision": chosen.name, "precision_reason": chosen.reason, "amp": chosen.bf16,
              "channels_last": chosen.channels_last, "pool": "vectorized"}
    if name == "package":  # what `features.encode` and `RunModel.train_step` do
        return {"pipeline": "package", **common, "decode": "pil", "pin_memory": cuda,
                "cudnn_benchmark": False, "device_cache": False, "compile": False}
    compile = cuda and hasattr(torch, "compile") if compile is None else compile
    gpu_decode = cuda if gpu_decode is None else gpu_decode and cuda
    return {"pipeline": "script", **common, "decode": "nvjpeg" if gpu_decode else "pil-uint8",
            "pin_memory": cuda, "cudnn_benchmark": cuda, "device_cache": True,
            "compile": bool(compile)}


# --- Images -----------------------------------------------------------------------------------


def bench_images(num_images, image_size=None, image_dir=None, seed=0):
    """`num_images` JPEG paths: files under `image_dir`, else a synthetic city, cycled if few.

    The synthetic city (preset "tiny", 1,152 images at `image_size`) is generated once into
    `utils.cache_dir()/bench_city_<H>x<W>_seed<seed>/` and reused.
    """
    if image_dir is not None:
        image_dir = Path(image_dir)
        files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"no JPEG files (*.jpg, *.jpeg) under {image_dir}; expected "
                                    "a folder of same-size JPEG images, e.g. a Pittsburgh root")
    else:
        h, w = image_size
        root = cache_dir() / f"bench_city_{h}x{w}_seed{seed}"
        if not (root / "netvlad_v100_datasets").is_dir():  # the .mat files are written last
            partial = root.with_name(root.name + ".partial")
            make_synthetic_city(partial, preset="tiny", seed=seed, image_size=(h, w))
            os.replace(partial, root)
        files = []
        for split in SPLITS:
            s = load_split(root, split)
            files += WholeDataset(s.root, s.db, queries_dir=s.queries_dir).paths
    return [files[i % len(files)] for i in range(num_images)]


class JpegFiles(Dataset):
    """Item i: JPEG file i decoded by PIL and passed through `transform`, and i."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(self.paths[i])), i


class JpegBytes(Dataset):
    """Item i: the bytes of JPEG file i as a (num_bytes,) uint8 tensor (decoded later), and i."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.frombuffer(bytearray(Path(self.paths[i]).read_bytes()), dtype=torch.uint8), i


def _collate_bytes(items):
    """A batch of `JpegBytes` items as one tensor: (all bytes, (B,) byte counts).

    One tensor per batch (not one per image) crosses from the worker: a single shared-memory
    segment and file descriptor, and a single buffer to pin.
    """
    return torch.cat([data for data, _ in items]), torch.tensor([len(data) for data, _ in items])


def decode_jpegs_gpu(data, device):
    """Decode a list of JPEG byte tensors with nvjpeg on `device`: (B, 3, H, W) uint8."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))


def gpu_decode_error(path, device):
    """None if nvjpeg decodes `path` on `device` like PIL (same shape), else why not."""
    try:
        x = decode_jpegs_gpu([JpegBytes([path])[0][0]], device)  # (1, 3, H, W)
        expected = tuple(pil_to_tensor(load_image(path)).shape)
        if tuple(x.shape[1:]) != expected:
            return f"nvjpeg gave shape {tuple(x.shape[1:])}, PIL {expected}"
    except Exception as e:  # no nvjpeg, CPU-only torchvision, old torchvision...
        return f"{type(e).__name__}: {e}"
    return None


class Normalize255(nn.Module):
    """uint8 images (B, 3, H, W) -> float ImageNet-normalized, like `images.input_transform`."""

    def __init__(self, device):
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def forward(self, x):
        """Normalized float32 images (B, 3, H, W) in `x`'s memory format."""
        return (x.float() - self.mean) / self.std


def image_batches(paths, device, batch_size, settings, num_workers):
    """Batches (B, 3, H, W) of the images at `paths`, in order, on `device`, ready for the model.

    settings["decode"]: "pil" (float tensors made in the workers, as the reference),
    "pil-uint8" (uint8 from the workers, normalized on `device`) or "nvjpeg" (file bytes from
    the workers, decoded on the GPU). Copies are non-blocking from pinned memory when
    settings["pin_memory"]; no step waits for the device.
    """
    decode, pin = settings["decode"], settings["pin_memory"]
    fmt = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    kwargs = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": pin}
    if decode == "pil":
        for x, _ in DataLoader(JpegFiles(paths, input_transform()), **kwargs):
            yield x.to(device, non_blocking=pin).contiguous(memory_format=fmt)
        return
    normalize = Normalize255(device)
    if decode == "nvjpeg":
        for data, sizes in DataLoader(JpegBytes(paths), collate_fn=_collate_bytes, **kwargs):
            x = decode_jpegs_gpu(list(data.split(sizes.tolist())), device)  # (B, 3, H, W) uint8
            yield normalize(x.contiguous(memory_format=fmt))
    elif decode == "pil-uint8":
        for x, _ in DataLoader(JpegFiles(paths, pil_to_tensor), **kwargs):
            x = x.to(device, non_blocking=pin)  # (B, 3, H, W) uint8
            yield normalize(x.contiguous(memory_format=fmt))
    else:
        raise ValueError(f"unknown decode {decode!r}; expected 'pil', 'pil-uint8' or 'nvjpeg'")


# --- Measurements -----------------------------------------------------------------------------


def _sync(device):
    """Wait for the work queued on `device` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    """Start a new peak of `torch.cuda.max_memory_allocated` (CPU: RSS peaks can't reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device):
    """Peak memory in MiB: `torch.cuda.max_memory_allocated` on CUDA, peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb():
    """Current resident memory of this process in MiB (None where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _call_with_fallback(fn, model, info):
    """`fn()`; if it fails with a compiled encoder, go back to the eager one and call it again."""
    try:
        return fn()
    except Exception as e:
        if not hasattr(model.encoder, "_orig_mod"):
            raise
        model.encoder = model.encoder._orig_mod
        info["compiled"] = False
        info["compile_error"] = f"{type(e).__name__}: {e}"[:500]
        return fn()


def script_cache_pass(model, paths, device, batch_size, settings, num_workers):
    """(N, K*D) float16 cache of the images at `paths` by this script's loop (no timing).

    The reference copies each batch to a host cache; gpu_extras fills a cache on the device
    and copies it to the host once at the end.
    """
    n = len(paths)
    cache_device = device if settings["device_cache"] else torch.device("cpu")
    cache = torch.empty(n, model.out_dim, dtype=torch.float16, device=cache_device)
    model.eval()
    row = 0
    with torch.no_grad():
        for x in tqdm(image_batches(paths, device, batch_size, settings, num_workers),
                      total=-(-n // batch_size), desc="cache pass", unit="batch", leave=False):
            with autocast(device, settings["amp"]):
                v = model(x)  # (B, K*D) float32
            cache[row:row + len(v)] = v if settings["device_cache"] else v.cpu()
            row += len(v)
    return cache.cpu()  # waits for the device


def package_cache_pass(model, paths, device, batch_size, settings, num_workers):
    """(N, K*D) float16 cache of the images at `paths` by `features.encode_descriptors`."""
    precision = resolve_precision(settings["precision"], device, verbose=False)
    dataset = JpegFiles(paths, input_transform())  # items (image (3, H, W), index)
    return torch.from_numpy(encode_descriptors(model, dataset, batch_size, num_workers, device,
                                                precision, label="cache pass (package)"))


def timed_cache_pass(encode, model, paths, device, batch_size, info):
    """Images/s of `encode(paths)` over all `paths`, and its cache.

    A warm-up call on the first batch comes first (compilation, cuDNN autotuning); the timed
    call then counts every image, DataLoader start included, up to the cache on the host.
    """
    t0 = time.perf_counter()
    _call_with_fallback(lambda: encode(paths[:batch_size]), model, info)
    _sync(device)
    info["cache_warmup_s"] = time.perf_counter() - t0
    start = time.perf_counter()
    cache = encode(paths)  # (N, K*D) float16 on the host
    return len(paths) / (time.perf_counter() - start), cache


def tuple_batch(images):
    """The 48 images (4 tuples x 12, each a query, a positive, 10 negatives) as `collate_fn`
    gives them: (query, positive, negatives, neg_counts, indices)."""
    t = images.view(TUPLES, TUPLE_SIZE, *images.shape[1:])  # (4, 12, 3, H, W)
    neg_counts = torch.full((TUPLES,), TUPLE_SIZE - 2, dtype=torch.long)
    return t[:, 0], t[:, 1], t[:, 2:].flatten(0, 1), neg_counts, list(range(TUPLES))


def script_train_step(model, images, device, settings):
    """One training step of this script's loop on `images` (48, 3, H, W): a function."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-3)

    def step():
        with autocast(device, settings["amp"]):
            v = model(images).view(TUPLES, TUPLE_SIZE, -1)  # `v`: (4, 12, K*D)
        negs = v[:, 2:].flatten(0, 1)  # (40, K*D)
        loss = triplet_loss(v[:, 0], v[:, 1], negs, TUPLE_SIZE - 2)  # an int: no host sync
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def package_train_step(model, images, device, settings):
    """One `RunModel.train_step` on `images` (48, 3, H, W) as a batch of 4 tuples: a function.

    The same SGD settings as the reference (`TrainConfig`'s defaults: lr 1e-4, momentum 0.9,
    weight decay 1e-3) and the package's optimizer (`train.make_optimizer`).
    """
    config = TrainConfig(precision=settings["precision"], trainable="conv5")
    optimizer, _ = make_optimizer(config, model)
    batch = tuple_batch(images)
    run = RunModel(model, config, device, source=ImageSource)
    return lambda: run.train_step(batch, optimizer, config.margin)


def train_pass(step, model, device, steps, info, warmup_steps=1):
    """Tuples/s of `step()`, one training step on 4 tuples x 12 images.

    `warmup_steps` untimed steps (compilation, cuDNN autotuning), then `steps` timed ones.
    Trains what requires grad (conv5 and NetVLAD).
    """
    model.train()
    t0 = time.perf_counter()
    for i in range(warmup_steps):
        _call_with_fallback(step, model, info) if i == 0 else step()
    _sync(device)
    info["train_warmup_s"] = time.perf_counter() - t0
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="training steps", leave=False):
        step()
    _sync(device)
    return steps * TUPLES / (time.perf_counter() - start)


def load_images(paths):
    """(B, 3, H, W) float tensor of the images at `paths`, decoded by PIL, normalized."""
    transform = input_transform()
    return torch.stack([transform(load_image(p)) for p in paths])


def encode_images(model, images, device, batch_size, settings):
    """(N, out_dim) float32 host array: `model`'s descriptors of `images` (N, 3, H, W), by the
    package's inference loop (`features.encode`) in the variant's precision and layout."""
    precision = Precision("bf16" if settings["amp"] else "fp32", settings["channels_last"],
                          "the variant's settings")
    dataset = [(image, i) for i, image in enumerate(images)]  # items `(image, index)`
    return encode(model, dataset, batch_size, device=device, precision=precision,
                         dtype=np.float32, label=None)


def make_bench_state(paths, device, path, num_clusters=NUM_CLUSTERS, num_images=16, seed=0):
    """Save the weights both variants use: random VGG16 conv5, NetVLAD fitted to the images.

    The centroids are k-means (20 iterations) of the conv5 descriptors of the first
    `num_images` images and α is set as in `netvlad.assignment_alpha`, so the soft-assignment is
    as sharp as after the real initialization. Random centroids would leave every descriptor
    nearly equidistant to all of them, and any two VLAD implementations would trivially agree.
    Images too small for k-means (fewer than 4 descriptors per cluster) get sampled
    descriptors, jittered, as centroids.

    Returns:
        dict with the `alpha` and the number of descriptors fitted (`num_descriptors`).
    """
    torch.manual_seed(seed)
    model = build_model(num_clusters, weights=None, trainable="conv5")
    with torch.no_grad():
        x = model.encoder.to(device)(load_images(paths[:num_images]).to(device))  # (B, D, h, w)
    descs = F.normalize(x, dim=1).flatten(2).transpose(1, 2).flatten(0, 1)  # (B*h*w, D)
    descs = descs.cpu().numpy()
    if len(descs) >= 4 * num_clusters:
        centroids = kmeans_centroids(descs, num_clusters, iters=20, seed=seed)
    else:
        rng = np.random.default_rng(seed)
        centroids = descs[rng.choice(len(descs), num_clusters)]
        centroids = centroids + rng.normal(0, 0.01, centroids.shape).astype(np.float32)
    alpha = assignment_alpha(centroids, descs)
    model.pool.set_centroids(centroids, alpha)
    torch.save(model.cpu().state_dict(), path)
    del model, x
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"alpha": alpha, "num_descriptors": len(descs),
            "centroids": "k-means" if len(descs) >= 4 * num_clusters else "sampled"}


def run_variant(config):
    """Measure one variant (config["name"]): cache pass, training step, peak memory.

    Meant to run in a fresh process (`_variant_main`) so that peak memory is this variant's.
    Writes the first config["num_cosine"] cache rows (float32) to config["desc_path"] and,
    if it decodes with nvjpeg, its descriptors of the PIL-decoded images to
    config["same_input_path"] (the numerics compared without the decoders' differences).

    Returns:
        dict with cache_img_per_s, train_tuples_per_s, peak_mem_mb (max of the two phases),
        cache_peak_mem_mb and train_peak_mem_mb (CUDA only), the settings used and timings.
    """
    device = torch.device(config["device"])
    settings = dict(config["settings"])
    package = settings["pipeline"] == "package"
    info = {"settings": settings}
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
    try:
        torch.manual_seed(config["seed"])
        model = build_model(NUM_CLUSTERS, weights=None, trainable="conv5")
        model.load_state_dict(torch.load(config["state_path"], weights_only=True))
        if settings["pool"] == "loop":
            model.pool = LoopNetVLAD(model.pool)
        if package:
            model.to(device)  # as `model.make_model`
        else:
            prepare_for_device(model, device, fast=settings["channels_last"])
        if settings["decode"] == "nvjpeg":
            error = gpu_decode_error(config["paths"][0], device)
            if error:
                settings["decode"], info["gpu_decode_error"] = "pil-uint8", error
        info["compiled"] = False
        if settings["compile"]:
            try:
                model.encoder = torch.compile(model.encoder, dynamic=False)  # compiled lazily
                info["compiled"] = True
            except Exception as e:
                info["compile_error"] = f"{type(e).__name__}: {e}"[:500]
        info["rss_start_mb"] = _rss_mb()
        _reset_peak(device)
        cache_fn = package_cache_pass if package else script_cache_pass
        info["cache_img_per_s"], cache = timed_cache_pass(
            lambda paths: cache_fn(model, paths, device, config["batch_size"], settings,
                                   config["num_workers"]),
            model, config["paths"], device, config["batch_size"], info)
        info["cache_peak_mem_mb"] = _peak_mb(device)
        num_cosine = config["num_cosine"]
        np.save(config["desc_path"], cache[:num_cosine].float().numpy())
        del cache
        if settings["decode"] == "nvjpeg":  # pil-uint8 gives the reference's pixels
            images = load_images(config["paths"][:num_cosine])  # (M, 3, H, W), as the reference
            np.save(config["same_input_path"], encode_images(
                model, images, device, config["batch_size"], settings))
        paths = [config["paths"][i % len(config["paths"])] for i in range(TUPLES * TUPLE_SIZE)]
        images = load_images(paths).to(device)  # (48, 3, H, W)
        if not package:
            fmt = torch.channels_last if settings["channels_last"] else torch.contiguous_format
            images = images.contiguous(memory_format=fmt)
        step_fn = package_train_step if package else script_train_step
        _reset_peak(device)
        info["train_tuples_per_s"] = train_pass(step_fn(model, images, device, settings), model,
                                                device, config["train_steps"], info,
                                                config["warmup_steps"])
        info["train_peak_mem_mb"] = _peak_mb(device)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    info["peak_mem_mb"] = max(info["cache_peak_mem_mb"], info["train_peak_mem_mb"])
    if device.type != "cuda":  # one RSS peak for the whole process: the phases don't separate
        del info["cache_peak_mem_mb"], info["train_peak_mem_mb"]
    return info


def _variant_main(config_path):
    """Child process entry: run the variant of the JSON config, write its result JSON."""
    config = json.loads(Path(config_path).read_text())
    try:
        result = run_variant(config)
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    Path(config["result_path"]).write_text(json.dumps(result))


def _run_isolated(config, workdir):
    """`run_variant(config)` in a fresh Python process (its own peak memory)."""
    config_path = Path(workdir) / f"config_{config['name']}.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE),
                                                      env.get("PYTHONPATH")]))
    code = f"from speed import _variant_main; _variant_main({str(config_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=2)  # stdout -> stderr
    result_path = Path(config["result_path"])
    if not result_path.exists():
        return {"error": f"the {config['name']} process exited with code {proc.returncode}"}
    return json.loads(result_path.read_text())


def _versions(device):
    """Python, torch and torchvision versions; CUDA and cuDNN too when `device` is CUDA."""
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__}
    if torch.device(device).type == "cuda":
        versions.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return versions


PACKAGE_VARIANTS = ("package_fp32", "package")  # the package in fp32, and as `precision` picks


def bench_speed(device=None, image_size=None, num_images=None, batch_size=None,
                train_steps=None, warmup_steps=1, compile=None, gpu_decode=None, num_workers=None,
                image_dir=None, isolate=True, num_cosine=64, seed=0, precision="auto",
                gpu_extras=None):
    """The reference and the package measured one after the other on the same images.

    The package runs twice: in fp32 (`package_fp32`) and in the precision `precision` chooses
    (`package`; "auto": bf16 only where the device computes it natively), so a CPU without
    native bf16 shows that "auto" is no slower than fp32, and one with native bf16 the gain.

    Args:
        device: "cuda" or "cpu"; default: CUDA if available. `None` arguments take the
            device's `SPEED_DEFAULTS`.
        num_images: images in the cache pass, rounded up to whole batches.
        train_steps, warmup_steps: timed and untimed training steps.
        compile, gpu_decode: levers of the gpu_extras variant (see `variant_settings`).
        num_workers: DataLoader workers of every variant; default min(8, CPU count).
        image_dir: time these JPEG files (same size) instead of a synthetic city.
        isolate: each variant in a fresh process (honest peak memory; slower to start).
        num_cosine: images whose reference and package descriptors are compared (rounded up
            to whole batches: a compiled encoder sees no new batch shape).
        gpu_extras: also run the `gpu_extras` variant (not the package); default: on CUDA.

    Returns:
        the JSON-ready result: device, versions, settings, each variant's figures, speedups
        against the reference, descriptor cosine similarity and the targets met or not.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in SPEED_DEFAULTS:
        raise ValueError(f"device {device} not supported; use cuda or cpu")
    defaults = SPEED_DEFAULTS[device.type]
    image_size = tuple(image_size or defaults["image_size"])
    batch_size = batch_size or defaults["batch_size"]
    num_images = -(-(num_images or defaults["num_images"]) // batch_size) * batch_size
    train_steps = train_steps or defaults["train_steps"]
    num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    gpu_extras = device.type == "cuda" if gpu_extras is None else gpu_extras
    paths = bench_images(num_images, image_size, image_dir, seed)
    image_size = tuple(pil_to_tensor(load_image(paths[0])).shape[1:])
    native, why = native_bf16(device)
    result = {"device": device.type, "device_name": device_name(device),
              "native_bf16": native, "native_bf16_reason": why,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), **_versions(device),
              "image_size": list(image_size), "num_images": num_images,
              "distinct_images": len(set(paths)), "batch_size": batch_size,
              "train_batch": f"{TUPLES} tuples x {TUPLE_SIZE} images",
              "train_steps": train_steps, "warmup_steps": warmup_steps,
              "num_workers": num_workers, "num_clusters": NUM_CLUSTERS, "dim": 512,
              "isolated": isolate, "load_avg": list(os.getloadavg())}
    variants = {"reference": ("reference", "fp32"), "package_fp32": ("package", "fp32"),
                "package": ("package", precision)}
    if gpu_extras:
        variants["gpu_extras"] = ("gpu_extras", precision)
    result["variants"] = list(variants)
    with tempfile.TemporaryDirectory(prefix="netvlad_bench_") as workdir:
        state_path = Path(workdir) / "state.pt"
        result["init"] = make_bench_state(paths, device, state_path, seed=seed)
        descs = {}
        for name, (kind, variant_precision) in variants.items():
            config = {"name": name, "device": str(device), "paths": [str(p) for p in paths],
                      "settings": variant_settings(kind, device, compile, gpu_decode,
                                                   variant_precision),
                      "state_path": str(state_path), "batch_size": batch_size,
                      "train_steps": train_steps, "warmup_steps": warmup_steps,
                      "num_workers": num_workers, "seed": seed,
                      "num_cosine": min(-(-num_cosine // batch_size) * batch_size, num_images),
                      "desc_path": str(Path(workdir) / f"desc_{name}.npy"),
                      "same_input_path": str(Path(workdir) / f"same_input_{name}.npy"),
                      "result_path": str(Path(workdir) / f"result_{name}.json")}
            if isolate:
                result[name] = _run_isolated(config, workdir)
            else:
                result[name] = run_variant(config)
            if "error" not in result[name]:
                descs[name] = np.load(config["desc_path"])
                same_input = Path(config["same_input_path"])
                descs[name + "_same_input"] = np.load(same_input if same_input.exists()
                                                      else config["desc_path"])
    if not any("error" in result[name] for name in variants):
        ref = result["reference"]
        result["speedup"], result["cosine"], result["cosine_end_to_end"] = {}, {}, {}
        for name in list(variants)[1:]:
            v = result[name]
            result["speedup"][name] = {
                "cache": v["cache_img_per_s"] / ref["cache_img_per_s"],
                "train": v["train_tuples_per_s"] / ref["train_tuples_per_s"],
                "peak_mem_ratio": ref["peak_mem_mb"] / v["peak_mem_mb"]}
            # the same decoded pixels, then each variant's own whole pipeline (decoder included)
            result["cosine"][name] = _cosine(descs["reference"], descs[name + "_same_input"])
            result["cosine_end_to_end"][name] = _cosine(descs["reference"], descs[name])
        pkg, fp32 = result["package"], result["package_fp32"]
        result["auto_vs_fp32"] = {
            "cache": pkg["cache_img_per_s"] / fp32["cache_img_per_s"],
            "train": pkg["train_tuples_per_s"] / fp32["train_tuples_per_s"]}
        result["targets"] = check_targets(result)
    return result


def _cosine(a, b):
    """Mean and min cosine similarity of the rows of `a` and `b` (M, K*D)."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min()), "num_images": len(cos)}


def check_targets(result):
    """The targets for this device, on the package variant: {name: {target, measured, met}}."""
    measured = {"cache_img_per_s": result["package"]["cache_img_per_s"],
                "cache_speedup": result["speedup"]["package"]["cache"],
                "train_speedup": result["speedup"]["package"]["train"],
                "train_peak_mem_mb": result["package"].get("train_peak_mem_mb"),
                "cosine_min": result["cosine"]["package"]["min"]}
    out = {}
    for name, target in TARGETS[result["device"]].items():
        value = measured[name]
        met = value <= target if name.endswith("_mem_mb") else value >= target
        out[name] = {"target": target, "measured": value, "met": bool(met)}
    return out


def save_results(result, out_dir=RESULTS_DIR):
    """Write `result` to `<out_dir>/<device name slug>_<date>.json` (atomically); its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = slugify(result["device_name"])
    if result["device"] == "cpu":  # one CPU model name can come with or without AMX
        kind += "_native-bf16" if result.get("native_bf16") else "_no-native-bf16"
    path = out_dir / f"{kind}_{result['date'][:10]}.json"
    return atomic_write(path, json.dumps(result, indent=2) + "\n")


def format_speed(result):
    """The `bench_speed` result as a side-by-side table: every variant and the reference."""
    h, w = result["image_size"]
    lines = [f"Speed on {result['device']} ({result['device_name']}), torch {result['torch']}: "
             f"{result['num_images']} images of {h}x{w}, batch {result['batch_size']}, "
             f"training {result['train_batch']}"]
    lines.append(f"native bf16: {result['native_bf16']} ({result['native_bf16_reason']})")
    names = result["variants"]
    for name in names:
        if "error" in result[name]:
            lines.append(f"{name} FAILED:\n{result[name]['error']}")
    if "speedup" not in result:
        return "\n".join(lines)
    memory = "GPU memory allocated" if result["device"] == "cuda" else "RSS of the process"
    rows = [("cache pass (images/s)", "cache_img_per_s", "cache", ".1f"),
            ("training step (tuples/s)", "train_tuples_per_s", "train", ".2f"),
            (f"peak memory (MiB, {memory})", "peak_mem_mb", None, ".0f")]
    if result["device"] == "cuda":
        rows += [("  of which cache pass", "cache_peak_mem_mb", None, ".0f"),
                 ("  of which training", "train_peak_mem_mb", None, ".0f")]
    others = names[1:]
    lines.append(f"{'figure':<34}" + "".join(f"{n:>14}" for n in names)
                 + "".join(f"{n + '/ref':>18}" for n in others))
    for label, key, ratio, fmt in rows:
        line = f"{label:<34}" + "".join(f"{result[n][key]:>14{fmt}}" for n in names)
        if ratio is not None:
            line += "".join(f"{result['speedup'][n][ratio]:>17.2f}x" for n in others)
        lines.append(line)
    for name in others:
        cos, e2e = result["cosine"][name], result["cosine_end_to_end"][name]
        lines.append(f"descriptor cosine, reference vs {name} ({cos['num_images']} images, same "
                     f"decoded pixels): mean {cos['mean']:.6f}, min {cos['min']:.6f}")
        if result[name]["settings"]["decode"] == "nvjpeg":
            lines.append(f"  end to end, its own JPEG decoder: mean {e2e['mean']:.6f}, "
                         f"min {e2e['min']:.6f}")
    s = result["package"]["settings"]
    lines.append("reference: this script's loop: fp32, NCHW, per-cluster loop NetVLAD, PIL in "
                 f"{result['num_workers']} DataLoader workers, .cpu() per batch")
    lines.append("package: features.encode_descriptors and RunModel.train_step; "
                 f"auto = {s['precision']} ({s['precision_reason']})")
    if "gpu_extras" in result:
        g = result["gpu_extras"]
        lines.append(f"gpu_extras (this script, not the package): "
                     f"{'bf16 autocast, ' if g['settings']['amp'] else ''}channels_last, "
                     f"decode {g['settings']['decode']}, device-side cache, compile "
                     f"{'on' if g.get('compiled') else 'off'}"
                     f"{', cudnn.benchmark' if g['settings']['cudnn_benchmark'] else ''}")
        for key in ("gpu_decode_error", "compile_error"):
            if key in g:
                lines.append(f"  ({key}: {g[key]})")
    for name, t in result["targets"].items():
        lines.append(f"target (package) {name} {'<=' if name.endswith('_mem_mb') else '>='} "
                     f"{t['target']}: {t['measured']:.4g} {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def _run_speed(args):
    """The `speed` sub-command: run, save the JSON, print a table or the JSON."""
    result = bench_speed(device=args.device, image_size=args.image_size,
                         num_images=args.num_images, batch_size=args.batch_size,
                         train_steps=args.train_steps, warmup_steps=args.warmup_steps,
                         compile=args.compile,
                         gpu_decode=args.gpu_decode, num_workers=args.num_workers,
                         image_dir=args.image_dir, isolate=not args.in_process, seed=args.seed,
                         precision=args.precision, gpu_extras=args.gpu_extras)
    if args.out is not None:
        result["saved_to"] = str(save_results(result, args.out))
    print(json.dumps(result) if args.json else format_speed(result))
    if any("error" in result[name] for name in result["variants"]):
        raise SystemExit(1)


def build_parser():
    """The options of the speed benchmark."""
    p = argparse.ArgumentParser(prog="python benchmarks/speed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="synthetic images (default: 480 640 on cuda, 120 160 on cpu; "
                        "ignored with --image-dir)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images in the cache pass (default: 4096 on cuda, 96 on cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cache-pass batch (default: 64 on cuda, 16 on cpu)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="timed training steps (default: 10 on cuda, 2 on cpu)")
    p.add_argument("--warmup-steps", type=int, default=1,
                   help="untimed training steps first (default: 1)")
    p.add_argument("--gpu-extras", action=argparse.BooleanOptionalAction, default=None,
                   help="also run gpu_extras, this script's own pipeline (not the package): "
                        "uint8 normalized on the device, device-side cache, torch.compile, "
                        "nvjpeg (default: on cuda)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the gpu_extras encoder (default: on cuda), falls back "
                        "to eager if compiling fails")
    p.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the gpu_extras JPEGs with nvjpeg on the GPU (default: on "
                        "cuda), falls back to PIL workers if unavailable")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers (default: min(8, CPU count))")
    p.add_argument("--image-dir", type=Path, default=None,
                   help="time these JPEG files (same size, recursive) instead of synthetic ones")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (faster start, peak memory mixed)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="folder of the result JSON (default: benchmarks/results)")
    p.add_argument("--no-save", dest="out", action="store_const", const=None,
                   help="do not write a result file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the package variant's precision (a package_fp32 variant always runs "
                        "too); auto: bf16 only with native bf16")
    return p


def main(argv=None):
    """Run the speed benchmark with the options on the command line."""
    _run_speed(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
