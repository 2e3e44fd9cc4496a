"""The speed benchmark (`benchmarks/speed.py`): the loop NetVLAD module, image decoding paths,
the package variant's calls into the package, and a miniature run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from netvlad_tutorial import mining, precision
from netvlad_tutorial.images import input_transform
from netvlad_tutorial.model import EmbedNet
from netvlad_tutorial.netvlad import NetVLAD

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import slugify  # noqa: E402  (benchmarks/common.py)
from speed import (  # noqa: E402  (benchmarks/speed.py)
    LoopNetVLAD,
    Normalize255,
    _call_with_fallback,
    bench_images,
    check_targets,
    encode_images,
    format_speed,
    image_batches,
    main,
    package_cache_pass,
    package_train_step,
    script_train_step,
    tuple_batch,
    variant_settings,
)

FIGURES = ("cache_img_per_s", "train_tuples_per_s", "peak_mem_mb")


@pytest.fixture
def jpegs(tmp_path):
    """Eight random 16x32 JPEG files (conv5: 1x2 descriptors)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        pixels = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=90)
    return folder


def test_loop_netvlad_equals_vectorized():
    torch.manual_seed(0)
    pool = NetVLAD(num_clusters=8, dim=16)
    pool.set_centroids(torch.randn(8, 16), alpha=5.0)
    loop = LoopNetVLAD(pool)
    assert loop.centroids is pool.centroids and loop.conv is pool.conv  # shared, not copied
    x = torch.randn(3, 16, 5, 7)
    torch.testing.assert_close(loop(x), pool(x), atol=1e-5, rtol=1e-4)
    # the same gradients too: the training step of both variants trains the same thing
    loop(x).square().sum().backward()
    grads = [p.grad.clone() for p in (pool.centroids, pool.conv.weight)]
    pool.zero_grad()
    pool(x).square().sum().backward()
    for g, p in zip(grads, (pool.centroids, pool.conv.weight)):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_encode_images_is_the_plain_forward_in_batches():
    torch.manual_seed(0)
    model = EmbedNet(nn.Conv2d(3, 8, kernel_size=4, stride=4), NetVLAD(2, 8)).train()
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = model.eval()(images).numpy()  # (5, 16)
    model.train()
    got = encode_images(model, images, "cpu", 2, {"amp": False, "channels_last": True})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32 and model.training  # the mode is restored


def test_decoding_paths_match_input_transform(jpegs):
    paths = sorted(jpegs.glob("*.jpg"))
    reference = torch.stack([input_transform()(Image.open(p).convert("RGB")) for p in paths])
    # the file-bytes path runs `decode_jpeg` on the CPU here (nvjpeg on CUDA)
    nvjpeg_on_cpu = {**variant_settings("gpu_extras", "cpu"), "decode": "nvjpeg"}
    for settings in (variant_settings("reference", "cpu"), variant_settings("gpu_extras", "cpu"),
                     nvjpeg_on_cpu):
        batches = list(image_batches(paths, torch.device("cpu"), 3, settings, num_workers=0))
        assert [len(b) for b in batches] == [3, 3, 2]
        channels_last = batches[0].is_contiguous(memory_format=torch.channels_last)
        assert channels_last == settings["channels_last"]
        torch.testing.assert_close(torch.cat(batches), reference, atol=1e-5, rtol=1e-5)
    x = torch.tensor([[0, 255], [128, 64]], dtype=torch.uint8).expand(1, 3, 2, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (x.float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(Normalize255("cpu")(x), expected)


@pytest.mark.parametrize("native", [False, True])
def test_variant_settings_on_cpu(monkeypatch, native):
    monkeypatch.delenv("NETVLAD_PRECISION", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.0)  # an AMX CPU: bf16 measured 2x
    ref, pkg = variant_settings("reference", "cpu"), variant_settings("package", "cpu")
    assert (ref["pipeline"], ref["amp"], ref["channels_last"], ref["pool"], ref["decode"]) == (
        "script", False, False, "loop", "pil")
    # "auto": bf16 only where the CPU computes it natively (AMX here), else fp32
    assert (pkg["pipeline"], pkg["amp"], pkg["channels_last"]) == ("package", native, True)
    assert pkg["precision"] == ("bf16" if native else "fp32")
    assert variant_settings("package", "cpu", precision="fp32")["amp"] is False
    assert (pkg["decode"], pkg["device_cache"], pkg["compile"]) == ("pil", False, False)
    extras = variant_settings("gpu_extras", "cpu", gpu_decode=True)
    assert extras["pipeline"] == "script" and extras["device_cache"]
    assert extras["decode"] == "pil-uint8" and not extras["compile"]  # nvjpeg, compile: CUDA
    with pytest.raises(ValueError, match="reference"):
        variant_settings("project", "cpu")


class FailingCompiled(nn.Module):
    """Stands for a `torch.compile`d module whose compilation fails at the first call."""

    def __init__(self, orig):
        super().__init__()
        self._orig_mod = orig

    def forward(self, x):
        raise RuntimeError("inductor failed")


def test_package_cache_pass_is_the_model_on_input_transform(jpegs):
    torch.manual_seed(0)
    model = EmbedNet(nn.Conv2d(3, 8, kernel_size=4, stride=4), NetVLAD(2, 8))
    paths = sorted(jpegs.glob("*.jpg"))
    images = torch.stack([input_transform()(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        expected = model.eval()(images)  # (8, 16), fp32, one batch
    settings = variant_settings("package", "cpu", precision="fp32")
    got = package_cache_pass(model, paths, torch.device("cpu"), 3, settings, num_workers=0)
    assert got.dtype == torch.float16 and got.shape == (8, 16)  # the package's cache
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=1e-3)


def test_tuple_batch_is_collate_fn_of_the_tuples():
    images = torch.randn(48, 3, 2, 2)
    items = [(images[12 * t], images[12 * t + 1], images[12 * t + 2:12 * t + 12], t)
             for t in range(4)]
    for got, expected in zip(tuple_batch(images), mining.collate_fn(items)):
        if isinstance(expected, torch.Tensor):
            assert torch.equal(got, expected)
        else:
            assert got == expected


def test_package_step_trains_like_the_reference_step():
    """`RunModel.train_step` and the script's step: the same loss, so the same SGD update."""
    torch.manual_seed(0)
    model = EmbedNet(nn.Conv2d(3, 8, kernel_size=4, stride=4), NetVLAD(4, 8)).train()
    twin = EmbedNet(nn.Conv2d(3, 8, kernel_size=4, stride=4), NetVLAD(4, 8)).train()
    twin.load_state_dict(model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(48, 3, 8, 8)
    settings = variant_settings("package", "cpu", precision="fp32")
    package_train_step(model, images, torch.device("cpu"), settings)()
    script_train_step(twin, images, torch.device("cpu"), {"amp": False})()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[name], atol=1e-6, rtol=1e-5)
    assert not torch.equal(start["pool.centroids"], model.pool.centroids)  # a step was taken


def test_compile_failure_falls_back_to_eager():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 16, 1)
    model = EmbedNet(FailingCompiled(encoder), NetVLAD(num_clusters=4, dim=16))
    x = torch.randn(2, 3, 4, 5)
    info = {"compiled": True}
    v = _call_with_fallback(lambda: model(x), model, info)
    assert model.encoder is encoder and info["compiled"] is False
    assert "inductor failed" in info["compile_error"]
    torch.testing.assert_close(v, model.pool(encoder(x)))
    with pytest.raises(RuntimeError, match="channels"):  # eager errors are not swallowed
        _call_with_fallback(lambda: model(torch.randn(2, 5, 4, 5)), model, {})


def test_bench_images_cycles_through_files(jpegs):
    paths = bench_images(11, image_dir=jpegs)
    assert [p.name for p in paths] == [f"{i % 8:02d}.jpg" for i in range(11)]
    with pytest.raises(FileNotFoundError, match="JPEG"):
        bench_images(4, image_dir=jpegs / "missing")


def test_slugify_and_targets():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slugify("Intel(R) Xeon(R) Processor, 2 cores") == "intel-xeon-processor-2-cores"
    result = {"device": "cuda", "package": {"cache_img_per_s": 2000.0, "train_peak_mem_mb": 9000},
              "speedup": {"package": {"cache": 4.0, "train": 3.0}},
              "cosine": {"package": {"min": 0.9995}}}
    met = {name: t["met"] for name, t in check_targets(result).items()}
    assert met == {"cache_img_per_s": True, "cache_speedup": True, "train_speedup": False,
                   "train_peak_mem_mb": False, "cosine_min": True}


def test_miniature_run_json(jpegs, tmp_path, capsys):
    out = tmp_path / "results"
    main(["--device", "cpu", "--json", "--image-dir", str(jpegs), "--num-images", "8",
          "--batch-size", "4", "--train-steps", "1", "--warmup-steps", "0", "--num-workers", "0",
          "--in-process", "--gpu-extras", "--precision", "fp32",
          "--out", str(out)])
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert result["device"] == "cpu" and result["image_size"] == [16, 32]
    assert result["num_images"] == 8 and result["batch_size"] == 4
    names = ["reference", "package_fp32", "package", "gpu_extras"]
    assert result["variants"] == names
    for name in names:
        for key in FIGURES:
            assert result[name][key] > 0, (name, key)
    assert result["reference"]["settings"]["pool"] == "loop"
    assert result["package"]["settings"]["pipeline"] == "package"
    assert result["gpu_extras"]["settings"]["device_cache"]
    assert result["speedup"]["package"]["cache"] == pytest.approx(
        result["package"]["cache_img_per_s"] / result["reference"]["cache_img_per_s"])
    assert result["speedup"]["package_fp32"]["train"] == pytest.approx(
        result["package_fp32"]["train_tuples_per_s"] / result["reference"]["train_tuples_per_s"])
    assert result["package_fp32"]["settings"]["precision"] == "fp32"
    assert isinstance(result["native_bf16"], bool) and result["native_bf16_reason"]
    # all in fp32 from the same weights and pixels: the descriptors agree (float16 cache)
    for name in names[1:]:
        assert 0.999 <= result["cosine"][name]["min"] <= result["cosine"][name]["mean"] <= 1 + 1e-6
    saved = json.loads((out / result["saved_to"].rsplit("/", 1)[1]).read_text())
    assert saved["reference"] == result["reference"] and "saved_to" not in saved

    # the table: every variant's figures beside the reference's, then the ratios
    lines = format_speed(result).splitlines()
    header = next(line for line in lines if line.startswith("figure"))
    assert header.split() == ["figure", *names, *(f"{n}/ref" for n in names[1:])]
    row = next(line for line in lines if line.startswith("cache pass (images/s)")).split()
    assert [float(v) for v in row[3:7]] == [round(result[n]["cache_img_per_s"], 1)
                                            for n in names]
    assert row[7:] == [f"{result['speedup'][n]['cache']:.2f}x" for n in names[1:]]
