"""The descriptor cache against a plain per-image loop with a tiny stand-in model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from netvlad_tutorial.features import cache_memory_mib, encode_descriptors


class TinyNet(nn.Module):
    """A stand-in for EmbedNet: conv, global average pool, L2-normalized (B, 8) vectors."""

    out_dim = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.out_dim, 3)
        self.drop = nn.Dropout(0.5)  # makes train mode visible in the output

    def forward(self, x):
        return F.normalize(self.drop(self.conv(x)).mean(dim=(2, 3)), dim=1)


class RandomImages(Dataset):
    """`n` random images; item i is `(image, i)` like `data.WholeDataset`."""

    def __init__(self, n=11, seed=0):
        self.images = torch.randn(n, 3, 12, 16, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def _loop(model, dataset):
    """Descriptors one image at a time, fp32, eval mode."""
    model.eval()
    with torch.no_grad():
        return np.stack([model(dataset[i][0][None])[0].numpy() for i in range(len(dataset))])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet()


def test_matches_per_image_loop_fp32(model):
    data = RandomImages()
    out = encode_descriptors(model, data, batch_size=4, dtype=np.float32, precision="fp32")
    assert out.dtype == np.float32 and out.shape == (11, 8)
    np.testing.assert_allclose(out, _loop(model, data), atol=1e-6)


def test_default_is_float16_and_close_in_bf16(model):
    data = RandomImages()
    out = encode_descriptors(model, data, batch_size=5, precision="bf16")
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), _loop(model, data), atol=3e-2)


def test_subset_rows_land_at_their_index(model):
    data = RandomImages()
    picked = [9, 2, 5]
    out = encode_descriptors(model, Subset(data, picked), batch_size=2, dtype=np.float32,
                              precision="fp32")
    assert out.shape == (11, 8)
    np.testing.assert_allclose(out[picked], _loop(model, data)[picked], atol=1e-6)
    others = np.setdiff1d(np.arange(11), picked)
    assert np.all(out[others] == 0)


def test_memmap_output_is_float16_on_disk(model, tmp_path):
    data = RandomImages()
    path = tmp_path / "cache.npy"
    out = encode_descriptors(model, data, batch_size=3, precision="fp32", out_path=path)
    assert isinstance(out, np.memmap)
    on_disk = np.load(path)
    assert on_disk.dtype == np.float16 and on_disk.shape == (11, 8)
    np.testing.assert_array_equal(on_disk, np.asarray(out))
    np.testing.assert_allclose(on_disk.astype(np.float32), _loop(model, data), atol=2e-3)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_restored(model, training):
    model.train(training)
    encode_descriptors(model, RandomImages(n=3), precision="fp32")
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_rejects_float64(model):
    with pytest.raises(ValueError, match="float16 or float32"):
        encode_descriptors(model, RandomImages(n=3), dtype=np.float64)


def test_cache_memory_mib():
    # Pitts250k test, 32,768-D: 92,232 images; float64 would be 4x the float16 size.
    assert cache_memory_mib(92232, 32768, np.float64) == pytest.approx(92232 * 32768 * 8 / 2**20)
    assert cache_memory_mib(1024, 1024) == 2.0
