"""Precision chosen by what the hardware computes natively (the CPU probes monkeypatched)."""

import itertools

import pytest
import torch

from netvlad_tutorial import precision
from netvlad_tutorial.precision import PRECISION_ENV, resolve_precision


def _cpu(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    monkeypatch.setattr(precision, "_ANNOUNCED", set())
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "cache"))  # no measurement kept
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.0)  # a CPU where bf16 is faster


@pytest.mark.parametrize("amx, avx512_bf16", list(itertools.product([False, True], repeat=2)))
def test_auto_picks_bf16_only_where_native_on_cpu(monkeypatch, amx, avx512_bf16):
    _cpu(monkeypatch, amx, avx512_bf16)
    chosen = resolve_precision("auto", "cpu", verbose=False)
    # emulated bf16 is slower than fp32 (2.7x on an Ice Lake Xeon): never chosen by "auto"
    assert chosen.name == ("bf16" if amx or avx512_bf16 else "fp32")
    assert chosen.channels_last  # faster than NCHW on CPU in both precisions
    expected = "AMX" if amx else "AVX512-BF16" if avx512_bf16 else "no native bf16"
    assert expected in chosen.reason


@pytest.mark.parametrize("speedup, expected", [(2.0, "bf16"), (1.2, "bf16"), (1.1, "fp32"),
                                               (0.6, "fp32")])
def test_auto_takes_bf16_on_a_cpu_only_where_it_measured_faster(monkeypatch, speedup, expected):
    # bf16 instructions are not enough: an Intel Xeon with AVX512-BF16 and no AMX ran VGG16
    # 0.7x as fast in bf16 as in fp32
    _cpu(monkeypatch, False, True)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    chosen = resolve_precision("auto", "cpu", verbose=False)
    assert chosen.name == expected and f"{speedup:.1f}x" in chosen.reason
    assert resolve_precision("bf16", "cpu", verbose=False).name == "bf16"  # forced: obeyed


def test_cpu_bf16_speedup_is_measured_once_and_kept(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real function, a fresh cache folder
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path / "cache2"))
    calls = []
    real = precision._time_conv
    monkeypatch.setattr(precision, "_time_conv",
                        lambda bf16: calls.append(bf16) or real(bf16, reps=1))
    first = precision.cpu_bf16_speedup()
    assert first > 0 and calls == [False, True]
    assert precision.cpu_bf16_speedup() == first and len(calls) == 2  # read back, not measured
    kept = list((tmp_path / "cache2" / "precision").glob("*.json"))
    assert len(kept) == 1 and "bf16_speedup" in kept[0].read_text()


def test_mkldnn_probe_is_not_trusted(monkeypatch):
    # oneDNN says "bf16 supported" on CPUs that only emulate it; the decision must not follow
    _cpu(monkeypatch, False, False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                        raising=False)
    assert resolve_precision("auto", "cpu", verbose=False).name == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_auto_on_cuda_follows_is_bf16_supported(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    chosen = resolve_precision("auto", "cuda", verbose=False)
    assert chosen.name == ("bf16" if native else "fp32")


def test_auto_is_fp32_in_a_notebook_unless_the_variable_says_otherwise(monkeypatch):
    _cpu(monkeypatch, True, True)  # a CPU where the command line's "auto" picks bf16
    assert resolve_precision("auto", "cpu", verbose=False).name == "bf16"
    monkeypatch.setattr(precision, "in_notebook", lambda: True)
    chosen = resolve_precision("auto", "cpu", verbose=False)
    assert chosen.name == "fp32" and "notebooks' default" in chosen.reason
    assert resolve_precision("bf16", "cpu", verbose=False).name == "bf16"  # explicit wins
    monkeypatch.setenv(PRECISION_ENV, "auto")  # the reader lets the machine choose
    assert resolve_precision("auto", "cpu", verbose=False).name == "bf16"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert resolve_precision("auto", "cpu", verbose=False).name == "bf16"


def test_in_notebook_is_false_outside_a_kernel():
    assert not precision.in_notebook()  # pytest is no Jupyter kernel


def test_forced_settings_and_the_environment_variable(monkeypatch):
    _cpu(monkeypatch, True, False)
    assert resolve_precision("fp32", "cpu", verbose=False).name == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    chosen = resolve_precision("auto", "cpu", verbose=False)  # the variable overrides "auto"
    assert chosen.name == "fp32" and PRECISION_ENV in chosen.reason
    _cpu(monkeypatch, False, False)
    monkeypatch.setenv(PRECISION_ENV, "BF16")
    chosen = resolve_precision(None, "cpu", verbose=False)
    assert chosen.name == "bf16" and "emulated" in chosen.reason  # forced, with a warning
    assert resolve_precision("fp32", "cpu", verbose=False).name == "fp32"  # explicit wins
    monkeypatch.setenv(PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match=PRECISION_ENV):
        resolve_precision("auto", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("half", "cpu")


def test_the_choice_is_printed_once_with_its_reason(monkeypatch, capsys):
    _cpu(monkeypatch, False, False)
    for _ in range(3):
        resolve_precision("auto", "cpu")
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays for results (`evaluate --json`)
    assert captured.err.splitlines() == [
        "precision: fp32 + channels_last (this CPU has no native bf16: no AMX, no AVX512-BF16)"]


def test_autocast_and_memory_format_follow_the_choice(monkeypatch):
    _cpu(monkeypatch, False, False)
    x = torch.randn(2, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 4, 3)
    fp32 = resolve_precision("fp32", "cpu", verbose=False)
    with fp32.autocast("cpu"):
        assert conv(fp32.images(x)).dtype == torch.float32
    assert fp32.images(x).is_contiguous(memory_format=torch.channels_last)
    bf16 = resolve_precision("bf16", "cpu", verbose=False)
    with bf16.autocast("cpu"):
        assert conv(bf16.images(x)).dtype == torch.bfloat16
