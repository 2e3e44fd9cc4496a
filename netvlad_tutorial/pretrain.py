"""Stage 2: pretraining VGG16 on the synthetic world, the course's stand-in for ImageNet.

`python -m netvlad_tutorial pretrain --out runs/pretrain` trains the encoder's layers (VGG16 up
to conv5_3, `backbone.build_encoder`) with a BatchNorm after every convolution and two linear heads
(facade style, sky) on the views of `world.py`. At the end the BatchNorms are folded into the
convolutions, so the result is a plain VGG16 state dict that loads exactly as torchvision's.

The run folder follows the rules of `train`: a folder holding a run is refused unless resumed
(`resume`) or replaced (`overwrite`); `latest.pth` is saved atomically every `save_every` steps,
so a kill loses at most those steps; batch `s` is a pure function of the seed and `s`, so a
resumed run trains on the same batches as an uninterrupted one. On a CPU, `max_minutes` stops
it at a checkpoint, to continue in chunks.

The package ships the final encoder as `pretrained/vgg16_world.pth` with the run's
`provenance.json` beside it as `vgg16_world.json` (`backbone.shipped_weights`, `weights="world"`).
"""

import dataclasses
import hashlib
import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .backbone import vgg16_features
from .config import ArgumentError, setting_text
from .files import atomic_json, atomic_save, load_torch_file, remove_temporary_files
from .images import IMAGENET_MEAN, IMAGENET_STD
from .precision import cpu_model, resolve_precision
from .utils import display_path, progress_bar
from .world import NUM_STYLES, SKY_NAMES, facade_ppm, world_batch, world_street, world_styles

ENCODER_FILE = "vgg16_world.pth"  # the exported encoder in a run folder (fp16 state dict)
CHECKPOINT_KEYS = ("step", "net", "optimizer", "seconds", "sums")
HELD_OUT = 10 ** 9  # street and batch index of the held-out views: no step reaches it


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pretraining run (the recipe; `device` and `precision` excepted)."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 0.02  # SGD with momentum, after a linear warm-up, cosine to 0 at `steps`
    warmup: int = 100
    momentum: float = 0.9
    weight_decay: float = 5e-4
    image_size: tuple = (72, 96)  # 3:4 as the tiny city (96 x 128), at 0.56x its pixels
    streets_per_chunk: int = 32  # a new set of world streets every `chunk_steps` steps
    chunk_steps: int = 100
    save_every: int = 20
    log_every: int = 20
    val_views: int = 256  # held-out views (streets never trained on), checked every chunk
    precision: str = "auto"
    device: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "streets_per_chunk", "chunk_steps", "save_every",
                     "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"`{name}` must be a positive whole number, not {value!r}",
                                    **{name: f"`{name}`"})
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ArgumentError(f"`lr` must be a positive number, not {self.lr!r}", lr="`lr`")
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))


RESUMABLE = ("device", "precision")  # may change when a run is resumed: not part of the recipe


def recipe(config):
    """The settings that define the result: everything but `RESUMABLE`."""
    d = json.loads(json.dumps(dataclasses.asdict(config)))
    return {k: v for k, v in d.items() if k not in RESUMABLE}


# ---------------------------------------------------------------------------------------------
# The network: VGG16 with BatchNorm, two heads; folding the BatchNorms away
# ---------------------------------------------------------------------------------------------


class PretrainNet(nn.Module):
    """VGG16 to conv5_3 with a BatchNorm after each conv, then average pooling and two heads."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the init of `seed`, global RNG untouched
            torch.manual_seed(seed)
            plain = vgg16_features()[:-2]
            self.style = nn.Linear(512, NUM_STYLES)
            self.sky = nn.Linear(512, len(SKY_NAMES))
        layers = []
        for m in plain:
            layers.append(m)
            if isinstance(m, nn.Conv2d):
                layers.append(nn.BatchNorm2d(m.out_channels))
        self.encoder = nn.Sequential(*layers)  # ends with conv5_3 and its BatchNorm

    def forward(self, x):
        f = F.relu(self.encoder(x)).mean((2, 3))  # `f`: (B, 512)
        return self.style(f), self.sky(f)


def fold_batchnorm(encoder):
    """A plain `vgg16_features()[:-2]` computing what `encoder` (conv, BN, ...) computes in
    eval mode: each BN's affine map is folded into the conv before it."""
    plain = vgg16_features()[:-2]
    mods = list(encoder)
    pairs = [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    targets = [m for m in plain if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for (conv, bn), target in zip(pairs, targets, strict=True):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # `scale`: (C,)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
            target.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    return plain


# ---------------------------------------------------------------------------------------------
# Batches, the schedule, one step
# ---------------------------------------------------------------------------------------------


def chunk_streets(config, chunk, styles):
    """The world streets of chunk `chunk` (held-out streets for chunk -1)."""
    n = config.streets_per_chunk
    first = chunk * n if chunk >= 0 else HELD_OUT
    ppm = facade_ppm(config.image_size)
    return [world_street(config.seed, first + i, styles, ppm) for i in range(n)]


def to_input(images, device, precision):
    """uint8 (B, H, W, 3) views -> normalized float input (B, 3, H, W), as the loaders make."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return precision.images((x - mean) / std)


def learning_rate(config, step):
    """Linear warm-up to `lr`, then a cosine down to 0 at `steps`."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_step(net, optimizer, x, labels, config, step, precision, device):
    """One SGD step; returns (loss, style accuracy, sky accuracy)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    with precision.autocast(device):
        style, sky = net(x)
    loss = F.cross_entropy(style.float(), labels[:, 0]) + F.cross_entropy(sky.float(),
                                                                           labels[:, 1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    acc = [(out.argmax(1) == labels[:, i]).float().mean().item()
           for i, out in enumerate((style, sky))]
    return loss.item(), *acc


@torch.no_grad()
def accuracy(net, config, streets, device, precision):
    """(style, sky) accuracy on the held-out views, BatchNorm in eval mode."""
    net.eval()
    images, labels = world_batch(config.seed, (HELD_OUT,), streets, config.image_size,
                                 config.val_views)
    hits = np.zeros(2)
    for start in range(0, len(images), 64):
        x = to_input(images[start:start + 64], device, precision)
        with precision.autocast(device):
            outs = net(x)
        for i, out in enumerate(outs):
            hits[i] += (out.argmax(1).cpu().numpy() == labels[start:start + 64, i]).sum()
    net.train()
    return tuple(hits / len(images))


def first_losses(config, steps=2):
    """The losses of the recipe's first `steps` steps, from its seed, in fp32 on the CPU.

    Recorded in the shipped encoder's provenance, so that a test can check that the code here
    still runs the recipe that made it (the second loss depends on the first update: the
    learning rate, momentum and weight decay).
    """
    config = dataclasses.replace(config, precision="fp32", device="cpu")
    device, precision = torch.device("cpu"), resolve_precision("fp32", "cpu", verbose=False)
    net = PretrainNet(config.seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    streets = chunk_streets(config, 0, world_styles(config.seed))
    losses = []
    for step in range(steps):
        images, labels = world_batch(config.seed, (step,), streets, config.image_size,
                                     config.batch_size)
        loss, *_ = train_step(net, optimizer, to_input(images, device, precision),
                              torch.from_numpy(labels), config, step, precision, device)
        losses.append(round(loss, 6))
    return losses


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _check_folder(out, config, resume, overwrite):
    """Apply the run-folder rules; returns the checkpoint to resume from, or None."""
    if resume and overwrite:
        raise ArgumentError("give either `resume=True` or `overwrite=True`, not both",
                            resume="`resume=True`", overwrite="`overwrite=True`")
    latest, config_file = out / "latest.pth", out / "config.json"
    found = [p.name for p in (latest, config_file, out / "log.jsonl", out / ENCODER_FILE)
             if p.exists()]
    if found and not (resume or overwrite):
        raise ValueError(f"{out} already holds a pretraining run ({', '.join(found)}); resume "
                         "it, give another folder, or overwrite it")
    if overwrite:
        for name in found:
            (out / name).unlink()
        return None
    if not resume or not latest.exists():
        return None
    saved = json.loads(config_file.read_text()) if config_file.exists() else None
    if saved != recipe(config):
        changed = sorted(k for k in recipe(config) if (saved or {}).get(k) !=
                         recipe(config)[k])
        raise ValueError(f"{out} holds a pretraining run with another recipe (changed: "
                         f"{', '.join(changed)}); resume it with its own settings")
    ckpt = load_torch_file(latest, "a pretraining checkpoint")
    if not isinstance(ckpt, dict) or set(CHECKPOINT_KEYS) - ckpt.keys():
        raise ValueError(f"{latest} is not a pretraining checkpoint (expected the keys "
                         f"{', '.join(CHECKPOINT_KEYS)}); overwrite the run")
    return ckpt


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pretrain(config, out, resume=False, overwrite=False, max_minutes=None, max_steps=None):
    """Pretrain the encoder on the world; export `out/vgg16_world.pth` once all steps are done.

    Args:
        config: a `PretrainConfig`.
        out: the run folder.
        resume: continue the run in `out` (same recipe) from its `latest.pth`.
        overwrite: replace the run in `out`.
        max_minutes: stop at the next checkpoint after this many minutes (a chunk of the run).
        max_steps: stop after this step (tests).

    Returns:
        the path of the exported encoder, or None if the run stopped before its last step.
    """
    out = Path(out)
    ckpt = _check_folder(out, config, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_temporary_files(out):
        print(f"Removed {display_path(path)}, left by an interrupted write")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(config.precision, device)
    net = PretrainNet(config.seed).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    step, seconds, sums = 0, 0.0, np.zeros(3)  # `sums`: loss, accuracies since the last log row
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, seconds, sums = ckpt["step"], ckpt["seconds"], ckpt["sums"].numpy()
        print(f"Resuming {display_path(out)} at step {step} of {config.steps}")
    atomic_json(recipe(config), out / "config.json")
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    styles = world_styles(config.seed)
    held_out = chunk_streets(config, -1, styles)
    streets, chunk = None, None
    log = out / "log.jsonl"
    start_time = time.perf_counter()

    def save():
        atomic_save({"step": step, "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "seconds": seconds + time.perf_counter() - start_time,
                     "sums": torch.from_numpy(sums.copy()),
                     "version": __version__}, out / "latest.pth")

    net.train()
    bar = progress_bar(total=config.steps, initial=step, desc="Pretraining", unit="step")
    while step < config.steps:
        if step // config.chunk_steps != chunk:
            chunk = step // config.chunk_steps
            streets = chunk_streets(config, chunk, styles)
        images, labels = world_batch(config.seed, (step,), streets, config.image_size,
                                     config.batch_size)
        x = to_input(images, device, precision)
        sums += train_step(net, optimizer, x, torch.from_numpy(labels).to(device), config,
                           step, precision, device)
        step += 1
        bar.update()
        if step % config.log_every == 0 or step == config.steps:
            row = {"step": step, "lr": round(learning_rate(config, step - 1), 6),
                   **dict(zip(("loss", "style_acc", "sky_acc"),
                              np.round(sums / (step % config.log_every or config.log_every),
                                       4).tolist())),
                   "seconds": round(seconds + time.perf_counter() - start_time, 1)}
            if step % config.chunk_steps == 0 or step == config.steps:
                acc = accuracy(net, config, held_out, device, precision)
                row["val_style_acc"], row["val_sky_acc"] = (round(float(a), 4) for a in acc)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=row["loss"], style=row["style_acc"])
            sums[:] = 0
        minutes = (time.perf_counter() - start_time) / 60
        stop = (max_steps is not None and step >= max_steps) or (
            max_minutes is not None and minutes >= max_minutes)
        if step % config.save_every == 0 or stop or step == config.steps:
            save()
        if stop and step < config.steps:
            bar.close()
            print(f"Stopped at step {step} of {config.steps}; continue with resume")
            return None
    bar.close()
    return export_encoder(net, out, config, seconds + time.perf_counter() - start_time, device)


def export_encoder(net, out, config, seconds, device):
    """Fold the BatchNorms, write the fp16 encoder and its provenance; return the file's path."""
    encoder = fold_batchnorm(net.float().to("cpu", memory_format=torch.contiguous_format)
                             .encoder.eval())
    state = {k: v.half() for k, v in encoder.state_dict().items()}
    path = out / ENCODER_FILE
    atomic_save(state, path)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = log[-1] if log else {}
    provenance = {
        "file": ENCODER_FILE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "command": " ".join(["python -m netvlad_tutorial pretrain"] + [
            f"--set {k}={setting_text(v)}" for k, v in recipe(config).items()
            if v != recipe(PretrainConfig())[k]]),
        "recipe": recipe(config), "commit": _git_commit(), "version": __version__,
        "hardware": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device": device.type, "seconds": round(seconds), "final": final,
        "first_losses": first_losses(config),
    }
    atomic_json(provenance, out / "provenance.json")
    print(f"Wrote {display_path(path)} (sha256 {provenance['sha256'][:12]}...), "
          f"held-out style accuracy {final.get('val_style_acc')}")
    return path
