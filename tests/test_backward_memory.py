"""What autograd keeps for backward, against sizes counted by hand."""

import pytest
import torch
from torch import nn

from netvlad_tutorial import backbone, features, model, netvlad

MIB = 2**20


def test_saved_for_backward_tiny_conv_net_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 6)
    b, h, w = 2, 5, 6
    params = list(net.parameters())
    # All layers train: conv1 keeps its input (2·3·5·6 floats), ReLU its output, which conv2
    # keeps as its input too (one storage); the weights are excluded.
    mib, out = features.saved_for_backward_mib(lambda: net(x), exclude=params)
    assert mib * MIB == 4 * (b * 3 * h * w + b * 4 * h * w)
    assert out.requires_grad
    # With the weights (4·3·3·3 + 2·4 floats); not the biases, whose gradient needs neither.
    mib_all, _ = features.saved_for_backward_mib(lambda: net(x))
    assert mib_all * MIB == 4 * (b * 3 * h * w + b * 4 * h * w + 4 * 27 + 2 * 4)
    # Only the last conv trains: nothing before it needs a gradient, it keeps its input.
    net[0].requires_grad_(False)
    assert features.saved_for_backward_mib(lambda: net(x), params)[0] * MIB == 4 * b * 4 * h * w
    with torch.no_grad():
        assert features.saved_for_backward_mib(lambda: net(x), params)[0] == 0


def _vgg_before_conv5_bytes(b, height, width):
    """Bytes that VGG16's blocks 1–4 keep only when they train, counted from the architecture.

    Each conv keeps its input: the image, then the (in-place) ReLU outputs; each max-pool keeps
    its int64 indices, and its output is the next conv's input. pool4's output is conv5_1's
    input, kept in either case.
    """
    total = 3 * height * width * 4  # the image, conv1_1's input
    for convs, channels in [(2, 64), (2, 128), (3, 256), (3, 512)]:
        total += convs * channels * height * width * 4  # ReLU outputs = the next layer's input
        height, width = height // 2, width // 2
        total += channels * height * width * 8  # max-pool indices (int64)
        total += channels * height * width * 4  # pool output, the next conv's input
    total -= 512 * height * width * 4  # pool4's output is kept in both cases
    return b * total


def test_backward_memory_vgg16_all_minus_conv5_closed_form():
    net = model.build_model(num_clusters=4).to("meta")
    b, size = 3, (64, 96)
    mem = {t: features.backward_memory_mib(net, b, size, trainable=t) for t in features.TRAINABLE}
    assert all(m["no_grad"] == 0 for m in mem.values())
    assert mem["netvlad"]["grad"] < mem["conv5"]["grad"] < mem["all"]["grad"]
    extra = (mem["all"]["grad"] - mem["conv5"]["grad"]) * MIB
    assert extra == _vgg_before_conv5_bytes(b, *size)
    # conv5 adds at least its three 512-channel maps at stride 16 (pool4 out, conv5_1, conv5_2)
    h, w = size[0] // 16, size[1] // 16
    assert (mem["conv5"]["grad"] - mem["netvlad"]["grad"]) * MIB >= 3 * b * 512 * h * w * 4


def _mini_vgg():
    """VGG16's pattern in miniature: a block, a max-pool, then conv5_1 … conv5_3 (its last
    block, `tail` 5, as VGG16's)."""
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    for i in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1)] + ([nn.ReLU(inplace=True)] if i < 2 else [])
    encoder = nn.Sequential(*layers)
    encoder.backbone = backbone.Backbone("mini_vgg", lambda: None, channels=8, tail=5)
    return model.EmbedNet(encoder, netvlad.NetVLAD(num_clusters=4, dim=8))


def test_backward_memory_meta_equals_a_real_forward_pass():
    torch.manual_seed(0)
    net = _mini_vgg()
    flags = [p.requires_grad for p in net.parameters()]
    for trainable in features.TRAINABLE:
        meta = features.backward_memory_mib(net, 2, (16, 24), trainable)
        cpu = features.backward_memory_mib(net, 2, (16, 24), trainable, device="cpu")
        assert meta == cpu and meta["grad"] > 0 and meta["no_grad"] == 0
    assert [p.requires_grad for p in net.parameters()] == flags  # the model is left alone
    assert next(net.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="trainable"):
        features.backward_memory_mib(net, 1, (16, 16), trainable="conv4")
