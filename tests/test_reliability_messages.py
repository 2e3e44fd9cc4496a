"""Every exit-2 message names the file or the flag (issue 28, item 7): a sample of the messages
that named neither, driven through the command line, and through the library where the
command line cannot reach them (a library caller sees the argument, not the flag)."""

import re

import pytest
from oracles import cli_error

from netvlad_tutorial import backbone, precision, pretrain
from netvlad_tutorial.config import ArgumentError


@pytest.mark.parametrize("device", ["nonsense", "cuda:99", "tpu"])
def test_a_device_error_names_the_flag(device, micro_city, tmp_path, capsys):
    """precision.check_device (before `config`, so in words): each of its errors names --device."""
    err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", tmp_path / "run",
                              "--device", device])
    assert f"'{device}'" in err and "--device" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("requested, device", [("fp64", "cpu"), ("bf16", "meta")])
def test_a_precision_error_names_the_setting_and_flag(requested, device, monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    with pytest.raises(ValueError) as info:
        precision.resolve_precision(requested, device, verbose=False)
    assert "`precision`" in str(info.value) and "--precision" in str(info.value)


def test_a_precision_error_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(precision.PRECISION_ENV, "fp64")
    with pytest.raises(ValueError, match=re.escape(f"${precision.PRECISION_ENV}")):
        precision.resolve_precision("auto", "cpu", verbose=False)


def test_pretrain_resume_and_overwrite_names_both(tmp_path, capsys):
    err = cli_error(capsys, ["pretrain", "--out", tmp_path / "run", "--resume",
                              "--overwrite"])
    assert "--resume" in err and "--overwrite" in err and "`" not in err, err
    with pytest.raises(ArgumentError, match=re.escape("`resume=True` or `overwrite=True`")):
        pretrain.pretrain(pretrain.PretrainConfig(), tmp_path / "run", resume=True,
                          overwrite=True)


def test_an_unknown_backbone_names_the_setting(micro_city, tmp_path, capsys):
    err = cli_error(capsys, ["train", "--data-root", micro_city, "--out", tmp_path / "run",
                              "--device", "cpu", "--set", "backbone=nope"])
    assert "'nope'" in err and "`backbone`" in err, err
    with pytest.raises(ArgumentError) as info:
        backbone.get_backbone("nope")
    assert info.value.arguments == {"backbone": "`backbone`"}
    assert "`backbone`" in str(info.value) and "vgg16_conv5" in str(info.value)


def test_an_unknown_weights_name_names_the_argument(capsys):
    err = cli_error(capsys, ["weights", "download", "nope"])
    assert "weights name 'nope'" in err and "imagenet" in err, err
