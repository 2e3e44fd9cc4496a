"""`checkpoints.load_model` on files in the exact released formats, against the original
forward passes.

The reference below re-implements, independently of the package, what the original code computes:
VGG16 `features[:-2]` (torchvision layer indices), NetVLAD as Nanne/pytorch-NetVlad's and
Patch-NetVLAD's `netvlad.py` forward (the per-cluster loop with their permute/expand residuals),
and Patch-NetVLAD's WPCA path (`Conv2d(K*D, P, 1)` on (N, K*D, 1, 1), Flatten, L2Norm(dim=-1)).
Tolerance: float32 descriptors agree to atol 1e-5 / rtol 1e-4 (summation order differs).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models.vgg import cfgs, make_layers

from netvlad_tutorial import data, evaluate, features
from netvlad_tutorial.checkpoints import load_model
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.images import input_transform
from netvlad_tutorial.model import build_model, model_config

K, P = 4, 8  # clusters, WPCA dimension
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# --- The original forward passes, re-implemented from the state dict ---------------------------


def reference_encoder(state, images):
    """VGG16 `features[:-2]`: conv3x3+ReLU blocks with max-pools, ending at conv5_3 (no ReLU)."""
    x = images
    i = 0
    for v in cfgs["D"][:-1]:  # the last "M" (pool5) and the ReLU before it are dropped
        if v == "M":
            x = F.max_pool2d(x, 2, 2)
            i += 1
        else:
            x = F.conv2d(x, state[f"encoder.{i}.weight"], state[f"encoder.{i}.bias"], padding=1)
            if i < 28:  # conv5_3 is index 28: its ReLU (29) is cut off
                x = F.relu(x)
            i += 2
    return x  # (B, 512, H/16, W/16)


def reference_netvlad(x, centroids, conv_weight, conv_bias=None):
    """Nanne's (and Patch-NetVLAD's) `NetVLAD.forward`, loop over clusters as written there."""
    N, C = x.shape[:2]
    num_clusters = centroids.shape[0]
    x = F.normalize(x, p=2, dim=1)
    soft_assign = F.conv2d(x, conv_weight, conv_bias).view(N, num_clusters, -1)
    soft_assign = F.softmax(soft_assign, dim=1)
    x_flatten = x.view(N, C, -1)
    vlad = torch.zeros([N, num_clusters, C], dtype=x.dtype)
    for c in range(num_clusters):
        residual = x_flatten.unsqueeze(0).permute(1, 0, 2, 3) - \
            centroids[c:c + 1, :].expand(x_flatten.size(-1), -1, -1).permute(1, 2, 0).unsqueeze(0)
        residual *= soft_assign[:, c:c + 1, :].unsqueeze(2)
        vlad[:, c:c + 1, :] = residual.sum(dim=-1)
    vlad = F.normalize(vlad, p=2, dim=2)
    vlad = vlad.view(x.size(0), -1)
    return F.normalize(vlad, p=2, dim=1)  # (N, K*C)


def reference_wpca(vlad, weight, bias):
    """Patch-NetVLAD `get_pca_encoding`: WPCA(vlad.unsqueeze(-1).unsqueeze(-1))."""
    y = F.conv2d(vlad.unsqueeze(-1).unsqueeze(-1), weight, bias)  # (N, P, 1, 1)
    return F.normalize(y.view(y.size(0), -1), p=2, dim=-1)  # (N, P)


def reference_descriptor(state, images):
    """The original model's descriptor from a (module-free) state dict."""
    x = reference_encoder(state, images)
    v = reference_netvlad(x, state["pool.centroids"], state["pool.conv.weight"],
                          state.get("pool.conv.bias"))
    if "WPCA.0.weight" in state:
        v = reference_wpca(v, state["WPCA.0.weight"], state["WPCA.0.bias"])
    return v


# --- Files in the released formats -------------------------------------------------------------


class _Pool(nn.Module):
    """The parameters of their NetVLAD module (names as in their `netvlad.py`)."""

    def __init__(self, vladv2):
        super().__init__()
        self.conv = nn.Conv2d(512, K, kernel_size=(1, 1), bias=vladv2)
        self.centroids = nn.Parameter(torch.rand(K, 512))


def original_model(vladv2=False, wpca=False, data_parallel=False, seed=0):
    """`nn.Module()` with `encoder` (VGG16 features[:-2]), `pool`, and optionally `WPCA`,
    assembled as their `main.py` / `models_generic.get_model` do."""
    torch.manual_seed(seed)
    model = nn.Module()
    model.add_module("encoder", nn.Sequential(*list(make_layers(cfgs["D"]).children())[:-2]))
    model.add_module("pool", _Pool(vladv2))
    if vladv2:
        nn.init.normal_(model.pool.conv.bias)
    with torch.no_grad():  # a sharper assignment than the default init, as after init_params
        model.pool.conv.weight.mul_(20)
    if wpca:
        model.add_module("WPCA", nn.Sequential(nn.Conv2d(K * 512, P, kernel_size=(1, 1))))
    if data_parallel:  # what `--nGPU > 1` does: `encoder.module.0.weight`, ...
        model.encoder = nn.DataParallel(model.encoder)
        model.pool = nn.DataParallel(model.pool)
    return model


def plain_state(model):
    """The state dict with DataParallel's `module.` parts removed (for the reference)."""
    return {k.replace("module.", ""): v for k, v in model.state_dict().items()}


def nanne_checkpoint(model, best_score=0.85):
    """The dict Nanne's `save_checkpoint` writes."""
    opt = torch.optim.SGD([p for p in model.parameters()], lr=1e-4, momentum=0.9)
    return {"epoch": 3, "state_dict": model.state_dict(),
            "recalls": {1: np.float64(0.7), 5: np.float64(best_score)},
            "best_score": np.float64(best_score), "optimizer": opt.state_dict(),
            "parallel": isinstance(model.encoder, nn.DataParallel)}


@pytest.fixture(scope="module")
def images():
    """Two small normalized images (B, 3, 64, 80): conv5 maps of 4 x 5."""
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))


CASES = {
    "patchnetvlad": dict(vladv2=False, wpca=True, data_parallel=False),
    "nanne_v1": dict(vladv2=False, wpca=False, data_parallel=False),
    "nanne_vladv2": dict(vladv2=True, wpca=False, data_parallel=False),
    "nanne_dataparallel": dict(vladv2=False, wpca=False, data_parallel=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_released_format_matches_original_forward(case, images, tmp_path):
    model = original_model(**CASES[case])
    ckpt = nanne_checkpoint(model)
    if case == "patchnetvlad":
        ckpt = {"epoch": 1, "state_dict": model.state_dict()}
    path = tmp_path / "weights.pth.tar"
    torch.save(ckpt, path)
    if case == "nanne_dataparallel":
        assert any(".module." in k for k in ckpt["state_dict"])

    loaded, info = load_model(path)
    with torch.no_grad():
        ours = loaded(images)
        ref = reference_descriptor(plain_state(model), images)
    torch.testing.assert_close(ours, ref, **TOL)
    assert torch.linalg.vector_norm(ours, dim=1).sub(1).abs().max() < 1e-5
    expected_format = "patchnetvlad" if case == "patchnetvlad" else "nanne"
    assert info["format"] == expected_format
    assert info["num_clusters"] == K and info["dim"] == 512
    assert info["pca_dim"] == (P if case == "patchnetvlad" else None)
    assert info["out_dim"] == ours.shape[1] == (P if case == "patchnetvlad" else K * 512)
    assert info["vladv2"] == (case == "nanne_vladv2")
    assert info["image_size"] == ((480, 640) if case == "patchnetvlad" else None)
    if case != "patchnetvlad":
        assert info["best_score"] == pytest.approx(0.85) and info["epoch"] == 3


def test_input_rules_match_the_original_transforms(tmp_path):
    """The resize rule in `info` gives exactly the original transforms' tensors."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    theirs = transforms.Compose([transforms.Resize((480, 640)), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model = original_model(wpca=True)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "p.pth.tar")
    _, info = load_model(tmp_path / "p.pth.tar")
    ours = input_transform(info["image_size"])(image)
    assert ours.shape == (3, 480, 640)
    torch.testing.assert_close(ours, theirs(image), atol=0, rtol=0)
    nanne = transforms.Compose([transforms.ToTensor(),
                                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(input_transform(None)(image), nanne(image), atol=0, rtol=0)


def test_own_checkpoint_loads_with_pca(images, tmp_path):
    torch.manual_seed(0)
    model = build_model(num_clusters=K, pca_dim=P).eval()
    torch.save({"model": model.state_dict(), "model_config": model_config(model),
                "config": {"image_size": [64, 80]}, "epoch": 0}, tmp_path / "best.pth")
    loaded, info = load_model(tmp_path / "best.pth")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), **TOL)
    assert info["format"] == "netvlad_tutorial"
    assert (info["num_clusters"], info["pca_dim"], info["image_size"]) == (K, P, (64, 80))


class Payload:
    """Unpickling this object would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def _make_marker(path):
    with open(path, "w") as f:
        f.write("code ran")
    return 0


@pytest.mark.parametrize("where", ["patchnetvlad", "nanne"])
def test_hidden_payload_is_refused(where, tmp_path):
    marker = tmp_path / "marker"
    model = original_model(wpca=where == "patchnetvlad")
    ckpt = ({"state_dict": model.state_dict(), "recalls": Payload(marker)}
            if where == "patchnetvlad" else {**nanne_checkpoint(model),
                                             "best_score": Payload(marker)})
    path = tmp_path / "evil.pth.tar"
    torch.save(ckpt, path)
    # The payload is live: a plain `torch.load` would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_unknown_format_lists_keys_and_formats(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3), "step": 7, "state_dict": {"fc.weight": torch.ones(2)}},
               path)
    with pytest.raises(ValueError) as err:
        load_model(path)
    message = str(err.value)
    for word in ("weights", "step", "fc.weight", "netvlad_tutorial", "patchnetvlad", "nanne"):
        assert word in message
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="a list, not a dict"):
        load_model(path)


def test_released_file_with_another_encoder_is_refused(tmp_path):
    """A Nanne AlexNet checkpoint (encoder dim 256) is not mistaken for VGG16."""
    state = {"encoder.0.weight": torch.zeros(64, 3, 11, 11), "encoder.0.bias": torch.zeros(64),
             "pool.centroids": torch.zeros(K, 256), "pool.conv.weight": torch.zeros(K, 256, 1, 1)}
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "alexnet.pth.tar")
    with pytest.raises(ValueError, match="not VGG16"):
        load_model(tmp_path / "alexnet.pth.tar")


def test_evaluate_command_takes_a_released_file(micro_city, tmp_path, capsys):
    """`evaluate --checkpoint NANNE_FILE` gives the recalls of the loaded model, computed here
    directly: its descriptors of the test split, exact search, the 25 m positives."""
    path = tmp_path / "model_best.pth.tar"
    torch.save(nanne_checkpoint(original_model()), path)
    result = evaluate.evaluate_checkpoint(micro_city, split="test", checkpoint=path,
                                          precision="fp32")
    assert result["format"] == "nanne" and result["dim"] == K * 512
    model, _ = load_model(path)
    split = data.load_split(micro_city, "test")
    dataset = data.WholeDataset(split.root, split.db, queries_dir=split.queries_dir)
    desc = features.encode_descriptors(model, dataset, precision="fp32")
    expected = evaluate.recall_at_n(desc[split.db.numDb:], desc[:split.db.numDb],
                                    data.eval_positives(split.db))
    assert {n: result[f"recall@{n}"] for n in expected} == pytest.approx(expected)
    with pytest.raises(SystemExit) as exit_info:  # a Nanne file has no PCA: --pca fits one
        cli_main(["evaluate", "--data-root", str(micro_city), "--checkpoint", str(path),
                  "--pca", "--pca-dim", "10000"])
    assert exit_info.value.code == 2 and "--pca-dim 10000" in capsys.readouterr().err
