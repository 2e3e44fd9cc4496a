"""The encoder shipped in the package, as it is committed: its sha256, that it loads as plain
VGG16, and that the code here still runs the recipe its provenance records."""

import hashlib
import json

import pytest
import torch

from netvlad_tutorial.backbone import SHIPPED_DIR, build_encoder, shipped_weights, vgg16_features
from netvlad_tutorial.config import apply_settings
from netvlad_tutorial.pretrain import PretrainConfig, first_losses, recipe


def test_the_shipped_file_is_the_recorded_one_and_loads_as_plain_vgg16():
    path, provenance = shipped_weights("world")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == provenance["sha256"]
    assert path.stat().st_size <= 30 * 2**20
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    plain = vgg16_features()[:-2]
    plain.load_state_dict({k: v.float() for k, v in state.items()})  # torchvision's keys
    encoder = build_encoder("world")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key].float()), key
    for field in ("command", "commit", "hardware", "seconds", "recipe", "first_losses"):
        assert provenance[field], field


def test_the_recorded_command_is_the_recipe_and_its_first_steps_reproduce():
    provenance = json.loads((SHIPPED_DIR / "vgg16_world.json").read_text())
    words = provenance["command"].split()
    config = apply_settings(PretrainConfig(), words[5::2])
    assert recipe(config) == provenance["recipe"]
    # two SGD steps from the seed, in fp32 on this CPU: within float rounding of the record
    assert first_losses(config) == pytest.approx(provenance["first_losses"], rel=1e-4)
