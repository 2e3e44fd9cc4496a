"""The figures and tables of the paired evidence and the query explorer, against their inputs."""

import sys
from math import comb

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from netvlad_tutorial import data, evaluate, viz
from netvlad_tutorial.mining import MinedTuple


def _images(fig):
    """(axes with an image, in order) of a figure and its subfigures."""
    return [ax for ax in fig.get_axes() if ax.images]


def _frame(ax):
    spine = ax.spines["left"]
    return spine.get_edgecolor() if spine.get_visible() else None


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def split(micro_city):
    return data.load_split(micro_city, "test")


def test_markdown_table():
    table = viz.markdown_table(["model", "R@1", "n"], [["a|b", 41.04, 3], ["c", 0.5, 12]])
    assert table == ("| model | R@1 | n |\n|---|---|---|\n| a\\|b | 41.0 | 3 |\n"
                     "| c | 0.5 | 12 |")
    assert table._repr_markdown_() == str(table)
    assert viz.markdown_table(["x"], [[0.12345]], float_format=".3f").endswith("| 0.123 |")


def test_plot_paired_outcomes_counts_and_p_value():
    before = np.array([1, 1, 0, 0, 0, 0, 0, 1, 1, 0], bool)
    after = np.array([1, 0, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    out = evaluate.PairedOutcomes(1, before, after)  # both 3, broken 1, fixed 5, neither 1
    fig = viz.plot_paired_outcomes([out, evaluate.PairedOutcomes(5, after, after)])
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        ["both\n3", "broken\n1", "fixed\n5", "neither\n1"])
    p = 2 * sum(comb(6, k) for k in range(2)) / 2 ** 6  # exact binomial tail, doubled
    assert f"p = {p:.3g}" in ax.get_title() and "R@1: 40.0 → 80.0%" in ax.get_title()
    assert "p = 1" in fig.axes[1].get_title()
    colours = ax.images[0].get_array()
    np.testing.assert_allclose(colours[1, 0], to_rgba("#a1d99b"))  # fixed: green
    np.testing.assert_allclose(colours[0, 1], to_rgba("#fc9272"))  # broken: red


def test_plot_distance_histograms_heights_and_lines():
    rng = np.random.default_rng(0)
    before = (rng.uniform(0.5, 1.0, 50), rng.uniform(0.6, 1.1, 50))
    after = (rng.uniform(0.4, 0.9, 50), rng.uniform(0.7, 1.2, 50))
    after[0][3] = np.inf  # a query without positive is left out
    fig = viz.plot_distance_histograms(before, after, margin=0.316, bins=10)
    dist_ax, gap_ax = fig.axes[1], fig.axes[3]  # the "after" column
    heights = [p.get_height() for p in dist_ax.patches]
    edges = [p.get_x() for p in dist_ax.patches[:10]] + [dist_ax.patches[9].get_x()
                                                         + dist_ax.patches[9].get_width()]
    np.testing.assert_allclose(heights[:10], np.histogram(after[0][np.isfinite(after[0])],
                                                          edges)[0])
    np.testing.assert_allclose(heights[10:], np.histogram(after[1], edges)[0])
    assert [line.get_xdata()[0] for line in gap_ax.lines] == [0, 0.316]
    gap = after[1] - after[0]
    gap = gap[np.isfinite(gap)]
    assert f"> 0: {100 * np.mean(gap > 0):.1f}% (= R@1)" in gap_ax.get_title()
    assert f"≥ margin 0.316: {100 * np.mean(gap >= 0.316):.1f}%" in gap_ax.get_title()
    assert sum(p.get_height() for p in gap_ax.patches) == 49
    # A margin beyond every gap is named in the title but not drawn.
    fig = viz.plot_distance_histograms(before, after, margin=5.0)
    assert [line.get_xdata()[0] for line in fig.axes[3].lines] == [0]
    assert "≥ margin 5: 0.0%" in fig.axes[3].get_title()


def test_plot_retrievals_before_after_frames_from_positives(split):
    positives = data.eval_positives(split.db)
    n = split.db.numDb
    before = np.array([np.arange(5) + q for q in range(split.db.numQ)]) % n
    after = np.array([positives[q][:1].tolist() + list(range(4)) for q in range(split.db.numQ)])
    fig = viz.plot_retrievals_before_after(split, [2, 0], before, after, positives, k=3)
    axes = _images(fig)
    assert len(axes) == 2 * 2 * 4
    for row, (q, pred) in enumerate([(2, before), (2, after), (0, before), (0, after)]):
        query_ax, *top = axes[4 * row:4 * row + 4]
        assert query_ax.get_title().startswith(f"query {q}\n")
        for j, ax in enumerate(top):
            colour = "green" if pred[q][j] in positives[q] else "red"
            assert _frame(ax) == to_rgba(colour)
            np.testing.assert_array_equal(ax.images[0].get_array(),
                                          _pixels(viz.split_image(split, pred[q][j])))
    assert _frame(axes[5]) == to_rgba("green")  # `after`'s top-1 is a positive


def test_query_drawer_default_map_and_strip(split):
    q, db = 3, split.db
    fig = viz.query_drawer(split, n_neg_sample=8, seed=1)(q)
    assert isinstance(fig, Figure)
    map_ax = next(ax for ax in fig.get_axes() if not ax.images)
    drawn = {c.get_label(): np.asarray(c.get_offsets()) for c in map_ax.collections}
    xy = db.utmDb - db.utmQ[q]
    negatives = data.NegativeSampler(db).sample(q, 8, np.random.default_rng(1))
    np.testing.assert_allclose(drawn["negative (sample, > 25 m)"], xy[negatives])
    dist = np.linalg.norm(xy, axis=1)
    np.testing.assert_allclose(np.sort(np.linalg.norm(drawn["training positive (≤ 10 m)"],
                                                      axis=1)), np.sort(dist[dist <= 10]))
    strip = _images(fig)
    np.testing.assert_array_equal(strip[0].images[0].get_array(),
                                  _pixels(viz.split_image(split, q, query=True)))
    frames = [_frame(ax) for ax in strip[1:]]
    num_pos = min(5, int((dist <= 10).sum()))
    assert frames == [to_rgba("green")] * num_pos + [to_rgba("red")] * 6


def test_query_drawer_mining_and_predictions(split):
    q, db = 1, split.db
    xy = db.utmDb - db.utmQ[q]
    far = np.flatnonzero(np.linalg.norm(xy, axis=1) > 25)
    near = data.train_positives(db)[q]
    t = MinedTuple(q, int(near[0]), far[:2], 0.5, np.array([0.55, 0.6]), far[:6])
    fig = viz.query_drawer(split, mine=lambda i: t)(q)
    map_ax = next(ax for ax in fig.get_axes() if not ax.images)
    drawn = {c.get_label(): np.asarray(c.get_offsets()) for c in map_ax.collections}
    np.testing.assert_allclose(drawn["chosen hard negative"], xy[far[:2]])
    np.testing.assert_allclose(drawn["best positive (nearest descriptor)"], xy[near[:1]])
    titles = [ax.get_title() for ax in _images(fig)]
    assert titles[1].startswith("best positive\nd = 0.500")
    assert titles[2].startswith("hard negative\nd = 0.550") and len(titles) == 4

    positives = data.eval_positives(db)
    pred = np.tile(np.concatenate([far[:2], positives[q][:3]]), (db.numQ, 1))
    fig = viz.query_drawer(split, predictions=pred, shown=5)(q)
    map_ax = next(ax for ax in fig.get_axes() if not ax.images)
    retrieved = next(c for c in map_ax.collections if c.get_label() == "retrieved")
    np.testing.assert_allclose(retrieved.get_offsets(), xy[pred[q]])
    expected = [to_rgba("red")] * 2 + [to_rgba("green")] * 3
    np.testing.assert_allclose(retrieved.get_edgecolors(), expected)
    assert [_frame(ax) for ax in _images(fig)[1:]] == expected
    with pytest.raises(ValueError, match="either"):
        viz.query_drawer(split, mine=lambda i: t, predictions=pred)


def test_explore_queries_without_a_kernel_returns_the_figure(split, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if not installed
    fig = viz.explore_queries(split, 2, n_neg_sample=4)
    assert isinstance(fig, Figure)
    strip = _images(fig)
    np.testing.assert_array_equal(strip[0].images[0].get_array(),
                                  _pixels(viz.split_image(split, 2, query=True)))


def test_explore_queries_slider_redraws_the_shown_figure(split, monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    shown = []

    class Handle:
        def update(self, fig):
            shown.append(fig)

    def display(fig, display_id=False):
        shown.append(fig)
        return Handle()

    monkeypatch.setattr(viz, "_widgets", lambda: ipywidgets)
    monkeypatch.setattr("IPython.display.display", display)
    slider = viz.explore_queries(split, 0, n_neg_sample=4)
    assert isinstance(slider, ipywidgets.IntSlider)
    assert (slider.min, slider.max, slider.value) == (0, split.db.numQ - 1, 0)
    slider.value = 3
    assert len(shown) == 2
    titles = [[ax.get_title() for ax in _images(fig)][0] for fig in shown]
    assert titles == ["query 0", "query 3"]


def test_plot_descriptor_scatter_says_what_the_colours_mean():
    rng = np.random.default_rng(0)
    desc, labels = rng.normal(size=(30, 5)), np.repeat(np.arange(6), 5)
    fig = viz.plot_descriptor_scatter(desc, labels, title="trained",
                                      label_name="group of 4 neighbouring places")
    assert fig.axes[0].get_title() == ("trained\nPCA of 30 descriptors, colour = group of 4 "
                                       "neighbouring places (6 in all)")
    many = viz.plot_descriptor_scatter(rng.normal(size=(42, 5)), np.arange(42))
    assert many.axes[0].get_title().endswith("colour = place (42 in all, colours repeat)")


def test_show_source_is_the_plain_source_in_one_python_block():
    import inspect

    from netvlad_tutorial import mining, viz

    shown = viz.show_source(mining.mine_tuple, mining.choose_negatives)
    assert shown.startswith("```python\ndef mine_tuple(") and shown.endswith("\n```")
    assert inspect.getsource(mining.choose_negatives).rstrip() in shown
    assert "\x1b[" not in shown and repr(shown) == str(shown) == shown._repr_markdown_()
    method = viz.show_source(mining.NegativeCache.update)  # a method: dedented
    assert method.splitlines()[1].startswith("def update(")


def test_show_source_lines_shows_the_signature_and_the_chosen_lines():
    import inspect

    import pytest

    from netvlad_tutorial import mining, viz

    source = inspect.getsource(mining.triplet_loss).rstrip().splitlines()
    body = next(i for i, line in enumerate(source) if line.endswith(":")) + 1  # after the def
    first = next(i for i, line in enumerate(source) if "= math.sqrt(margin)" in line)
    last = first + 1  # the docstring and the last lines are left out
    expected = (source[:body] + ["    # ..."] + source[first:last + 1]
                + (["    # ..."] if last < len(source) - 1 else []))
    by_number = viz.show_source(mining.triplet_loss, lines=(first + 1, last + 1))
    assert by_number.splitlines()[1:-1] == expected
    by_text = viz.show_source(mining.triplet_loss, lines=(source[first].strip(),
                                                          source[last].strip()))
    assert str(by_text) == str(by_number)
    whole = viz.show_source(mining.triplet_loss, lines=(1, len(source)))
    assert str(whole) == str(viz.show_source(mining.triplet_loss))  # nothing left out
    with pytest.raises(ValueError, match="no line containing"):
        viz.show_source(mining.triplet_loss, lines=("no such line", "return"))
    with pytest.raises(ValueError, match="one object"):
        viz.show_source(mining.triplet_loss, mining.collate_fn, lines=(1, 2))
