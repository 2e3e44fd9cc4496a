"""Tests of the figures: each draws exactly what it is given, checked against its inputs."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torchvision
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from PIL import Image

from netvlad_tutorial import viz

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def normalize(image):
    """ImageNet normalization of a (3, H, W) tensor in [0, 1], channel by channel."""
    return torch.stack([(image[c] - MEAN[c]) / STD[c] for c in range(3)])


def rgb_images(n, height=12, width=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def collections_by_label(ax):
    return {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}


def frame_colour(ax):
    spine = ax.spines["left"]
    return spine.get_edgecolor() if spine.get_visible() else None


def test_to_image_inverts_imagenet_normalization():
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = viz.to_image(normalize(image))
    assert out.shape == (5, 7, 3)
    np.testing.assert_allclose(out, image.permute(1, 2, 0).numpy(), atol=1e-6)
    # a normalized zero is the ImageNet mean colour
    np.testing.assert_allclose(viz.to_image(torch.zeros(3, 1, 1))[0, 0], MEAN, atol=1e-7)


def test_to_image_reads_pil_and_uint8_arrays():
    array = rgb_images(1)[0]
    expected = array.astype(np.float32) / 255
    np.testing.assert_array_equal(viz.to_image(array), expected)
    np.testing.assert_array_equal(viz.to_image(Image.fromarray(array)), expected)
    with pytest.raises(ValueError, match="H, W, 3"):
        viz.to_image(np.zeros((3, 4, 5)))


@pytest.fixture
def street():
    """Database points every 4 m along a street through a query, plus a far-away point."""
    rng = np.random.default_rng(0)
    xs = np.arange(-80, 81, 4.0)
    utm_db = np.stack([xs, rng.normal(0, 1, len(xs))], 1) + [585000.0, 4477000.0]
    utm_db = np.vstack([utm_db, [585000.0, 4477500.0]])
    utm_q = np.array([[584000.0, 4476000.0], [585001.0, 4477001.0]])
    return utm_db, utm_q


def test_plot_query_map_puts_each_class_where_given(street):
    utm_db, utm_q = street
    centre = utm_q[1]
    dist = np.array([np.hypot(*(p - centre)) for p in utm_db])  # brute force, one by one
    positives, train = np.flatnonzero(dist <= 25), np.flatnonzero(dist <= 10)
    negatives = np.flatnonzero(dist > 25)[::3]
    fig = viz.plot_query_map(utm_db, utm_q, 1, positives, train, negatives, window=60)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    drawn = collections_by_label(ax)
    in_window = [p - centre for p in utm_db if max(abs(p - centre)) <= 60]
    np.testing.assert_allclose(drawn["database image"], in_window)
    np.testing.assert_allclose(drawn["evaluation positive (≤ 25 m)"], utm_db[positives] - centre)
    np.testing.assert_allclose(drawn["training positive (≤ 10 m)"], utm_db[train] - centre)
    np.testing.assert_allclose(drawn["negative (sample, > 25 m)"], utm_db[negatives] - centre)
    np.testing.assert_allclose(drawn["query"], [[0, 0]])
    assert sorted(p.get_radius() for p in ax.patches if isinstance(p, Circle)) == [10, 25]
    assert ax.get_aspect() == 1.0 and ax.get_xlim() == (-60, 60)


def test_plot_query_map_draws_only_what_is_given(street):
    fig = viz.plot_query_map(*street, 1)
    assert sorted(collections_by_label(fig.axes[0])) == ["database image", "query"]


def test_plot_seed_pitfall_contrasts_ring_and_reference(street):
    utm_db, utm_q = street
    centre = utm_q[1]
    dist = [np.hypot(*(p - centre)) for p in utm_db]
    near = [p - centre for p, d in zip(utm_db, dist) if d <= 10]
    ring = [p - centre for p, d in zip(utm_db, dist) if 10 < d <= 25]
    within = [p - centre for p, d in zip(utm_db, dist) if d <= 25]
    fig = viz.plot_seed_pitfall(utm_db, utm_q, 1)
    seed_ax, ref_ax = fig.axes
    seed, ref = collections_by_label(seed_ax), collections_by_label(ref_ax)
    np.testing.assert_allclose(seed["seed's training positive (10–25 m ring)"], ring)
    np.testing.assert_allclose(seed["seed drops as 'trivial' (≤ 10 m)"], near)
    np.testing.assert_allclose(ref["training positive (≤ 10 m)"], near)
    np.testing.assert_allclose(ref["evaluation positive (≤ 25 m)"], within)
    labels = [t.get_text() for t in seed_ax.get_legend().get_texts()]
    assert "seed's training positive (10–25 m ring)" in labels


def test_show_images_grid_frames_and_pixels():
    images = rgb_images(7)
    frames = ["green", "red", None, "green", None, None, "red"]
    fig = viz.show_images(images, titles=list("abcdefg"), frames=frames, ncols=3)
    assert len(fig.axes) == 7  # the two unused grid cells are removed
    for ax, image, frame, title in zip(fig.axes, images, frames, "abcdefg"):
        assert frame_colour(ax) == (None if frame is None else to_rgba(frame))
        np.testing.assert_array_equal(ax.images[0].get_array(), image / np.float32(255))
        assert ax.get_title() == title


def test_show_images_accepts_tensors_and_pil():
    image = torch.rand(3, 8, 10)
    fig = viz.show_images([normalize(image), Image.fromarray(rgb_images(1)[0])])
    assert len(fig.axes) == 2
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), image.permute(1, 2, 0),
                               atol=1e-6)


def test_plot_recall_curves_lines_and_marks():
    curves = {"a": np.linspace(0.2, 0.9, 30), "b": torch.linspace(0.1, 0.5, 30)}
    fig = viz.plot_recall_curves(curves, n_marks=(1, 5, 10, 20))
    ax = fig.axes[0]
    assert len(ax.lines) == 4  # one curve and one set of marks per label
    curve_a, marks_a = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(curve_a.get_xdata(), np.arange(1, 31))
    np.testing.assert_allclose(curve_a.get_ydata(), 100 * curves["a"])
    np.testing.assert_allclose(marks_a.get_ydata(),
                               [100 * curves["a"][n - 1] for n in (1, 5, 10, 20)])
    assert ax.get_legend().get_texts()[1].get_text().startswith("b (R@1 10.0, R@5 ")


def test_plot_training_log_two_axes():
    history = [{"epoch": e, "loss": 1 / (e + 1), "lr": 1e-4, "recall@10": 0.3 + e / 10,
                "recall@1": 0.1 + e / 10, "recall@5": 0.2 + e / 10} for e in range(4)]
    fig = viz.plot_training_log(history)
    loss_ax, recall_ax = fig.axes
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [1, 1 / 2, 1 / 3, 1 / 4])
    assert [line.get_label() for line in recall_ax.lines] == ["R@1", "R@5", "R@10"]
    np.testing.assert_allclose(recall_ax.lines[2].get_ydata(), [30, 40, 50, 60])


def test_plot_soft_assignment_default_clusters():
    assignment = torch.softmax(torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0)),
                               dim=0)
    mass = [float(assignment[k].sum()) for k in range(6)]
    top3 = sorted(range(6), key=lambda k: -mass[k])[:3]
    fig = viz.plot_soft_assignment(torch.zeros(3, 24, 32), assignment)
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes[1:4]] == [f"cluster {k}: a_k(x)" for k in top3]
    overlay = fig.axes[1].images[1]
    assert overlay.get_extent() == [0, 32, 24, 0]  # stretched over the whole image
    np.testing.assert_allclose(fig.axes[-1].images[1].get_array(), assignment.argmax(0))


def test_plot_soft_assignment_chosen_clusters_and_bad_shape():
    assignment = np.full((4, 2, 2), 0.25)
    fig = viz.plot_soft_assignment(rgb_images(1)[0], assignment, clusters=[2])
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="K, h, w"):
        viz.plot_soft_assignment(rgb_images(1)[0], assignment[None])


def test_plot_descriptor_scatter_pca_matches_svd():
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(40, 8)) * [5, 3, 1, 1, 1, 1, 1, 1]
    labels = np.repeat(np.arange(4), 10)
    fig = viz.plot_descriptor_scatter(desc, labels, method="pca")
    xy = fig.axes[0].collections[0].get_offsets()
    centred = desc - desc.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    np.testing.assert_allclose(np.abs(xy), np.abs(expected), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(fig.axes[0].collections[0].get_array(), labels)


def test_plot_descriptor_scatter_tsne_is_seeded():
    rng = np.random.default_rng(0)
    desc, labels = rng.normal(size=(20, 6)), np.repeat(np.arange(5), 4)
    first, second = (viz.plot_descriptor_scatter(desc, labels, method="tsne", seed=3)
                     for _ in range(2))
    xy = first.axes[0].collections[0].get_offsets()
    assert xy.shape == (20, 2)
    np.testing.assert_array_equal(xy, second.axes[0].collections[0].get_offsets())
    with pytest.raises(ValueError, match="pca"):
        viz.plot_descriptor_scatter(desc, labels, method="umap")


def test_plot_memory_comparison_bars():
    fig = viz.plot_memory_comparison(["lists", "sampler"], [5460.0, 0.73])
    ax = fig.axes[0]
    assert [bar.get_width() for bar in ax.patches] == [5460.0, 0.73]
    assert [t.get_text() for t in ax.texts] == ["5.3 GiB", "748 KiB"]
    assert viz._format_mib(12.34) == "12.3 MiB"


def test_vgg16_shapes_match_a_real_forward_pass():
    features = torchvision.models.vgg16(weights=None).features.eval()
    x, expected = torch.zeros(1, 3, 64, 96), []
    with torch.no_grad():
        for layer in features:
            x = layer(x)
            if not isinstance(layer, torch.nn.ReLU):
                expected.append(tuple(x.shape[1:]))
    shapes = viz.vgg16_shapes((64, 96))
    assert [shape for _, shape in shapes] == expected
    names = [name for name, _ in shapes]
    assert names[:3] == ["conv1_1", "conv1_2", "pool1"] and names[-2:] == ["conv5_3", "pool5"]
    # closed form at 480×640: stride 16 at conv5_3
    assert dict(shapes)["conv5_3"] == (512, 4, 6)
    assert dict(viz.vgg16_shapes())["conv5_3"] == (512, 480 // 16, 640 // 16)


@pytest.mark.parametrize("size", [(480, 640), (224, 320)])
def test_plot_vgg_blocks_shows_the_computed_shapes(size):
    height, width = size
    texts = {t.get_text() for t in viz.plot_vgg_blocks(size).axes[0].texts}
    for c, stride in [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16)]:
        assert f"{c}×{height // stride}×{width // stride}" in texts
    assert f"512×{height // 32}×{width // 32}" in texts  # pool5, greyed out
    assert any(f"512×{height // 16}×{width // 16} local descriptors" in t for t in texts)


def test_plot_netvlad_pipeline_dimensions():
    texts = " ".join(t.get_text() for t in viz.plot_netvlad_pipeline(16, 512, 1024).axes[0].texts)
    assert "8,192-D" in texts and "1,024-D" in texts and "K×D = 16×512" in texts


def test_figures_stay_out_of_pyplot_and_render_in_notebooks():
    before = plt.get_fignums()
    fig = viz.show_images(rgb_images(1))
    assert isinstance(fig, Figure) and plt.get_fignums() == before
    assert fig._repr_png_()[:8] == PNG_SIGNATURE


def test_make_figures_writes_small_pngs(tmp_path):
    paths = viz.make_figures(tmp_path / "figures")
    assert sorted(p.name for p in paths) == ["netvlad_pipeline.png", "vgg16_conv5_cut.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size < 200_000
        assert Image.open(path).width > 1000


def test_radius_labels_stay_apart_on_a_zoomed_out_map(street):
    """Near the query both circles are labelled; zoomed out, one label names both radii."""
    def labels(window):
        ax = viz.plot_query_map(*street, 1, window=window).axes[0]
        return sorted(t.get_text() for t in ax.texts)
    assert labels(40) == ["10 m", "25 m"]
    assert labels(360) == ["10 / 25 m"]


def test_plot_training_log_starts_at_the_model_before_training():
    history = [{"epoch": e, "loss": 1.0, "recall@1": 0.2 + e / 10, "recall@5": 0.5}
               for e in range(3)]
    fig = viz.plot_training_log(history, before={"recall@1": 0.1, "recall@5": 0.4})
    recall_ax = fig.axes[1]
    np.testing.assert_allclose(recall_ax.lines[0].get_xdata(), [-1, 0, 1, 2])
    np.testing.assert_allclose(recall_ax.lines[0].get_ydata(), [10, 20, 30, 40])
    assert recall_ax.get_xticklabels()[0].get_text() == "before"
