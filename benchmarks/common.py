"""What every benchmark script shares: where results go, and the machine's name in them."""

import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from netvlad_tutorial.precision import cpu_model  # noqa: E402


def cpu_family_model():
    """"family F model M" of the CPU from /proc/cpuinfo (x86), or None.

    Some machines name every AMD EPYC generation alike; family and model tell them apart
    (family 25: model 1 is Zen 3, model 17 is Zen 4).
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text()
                      .split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']} model {fields['model']}"


def device_name(device):
    """The GPU's name, or the CPU's model name, family and model, and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    family = cpu_family_model()
    return f"{cpu_model()}{f' ({family})' if family else ''}, {os.cpu_count()} cores"


def slugify(text):
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
