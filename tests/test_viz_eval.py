"""The evaluation figures draw exactly the data they are given."""

import numpy as np
from matplotlib.colors import to_rgba

from netvlad_tutorial import viz
from netvlad_tutorial.evaluate import pr_auc, precision_recall_curve


def case():
    """S (4 x 3): query 0 and 1 matched correctly, query 2 wrongly; one soft-only entry."""
    S = np.array([[0.9, 0.1, 0.3],
                  [0.2, 0.8, 0.7],
                  [0.1, 0.3, 0.2],
                  [0.95, 0.0, 0.0]])
    hard = np.zeros((4, 3), dtype=bool)
    hard[[0, 1, 2], [0, 1, 2]] = True
    soft = hard.copy()
    soft[3, 0] = True  # skipped: query 0's best match is db 0, not db 3
    return S, hard, soft


def test_plot_similarity_matrix_shows_s_ground_truth_and_best_matches():
    S, hard, soft = case()
    ax = viz.plot_similarity_matrix(S, hard, soft).axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), S)
    soft_only = ax.images[1].get_array()
    np.testing.assert_array_equal(~np.ma.getmaskarray(soft_only), soft & ~hard)
    drawn = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
    np.testing.assert_array_equal(drawn["hard positive"], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(drawn["best match: correct"], [[0, 0], [1, 1]])
    np.testing.assert_array_equal(drawn["best match: wrong"], [[2, 1]])
    assert ax.get_xlabel() == "query" and ax.get_ylabel() == "database image"


def test_plot_pr_curves_lines_and_summaries():
    S, hard, soft = case()
    curves = {"single": precision_recall_curve(S, hard, soft),
              "multi": precision_recall_curve(S, hard, soft, matching="multi")}
    ax = viz.plot_pr_curves(curves).axes[0]
    for line, (label, (precision, recall)) in zip(ax.get_lines(), curves.items()):
        np.testing.assert_array_equal(line.get_xdata(), recall)
        np.testing.assert_array_equal(line.get_ydata(), precision)
        assert line.get_label().startswith(f"{label} (AUC {pr_auc(precision, recall):.3f}")
    # single: 0.9 (T), 0.8 (T), 0.7 (F): precision 1 up to recall 2/3
    assert "R@100%P 66.7%" in ax.get_lines()[0].get_label()


def test_plot_match_examples_rows_of_true_then_false_matches():
    S, hard, soft = case()
    db = [np.full((4, 5, 3), 10 * i, dtype=np.uint8) for i in range(4)]
    queries = [np.full((4, 5, 3), 100 + 10 * j, dtype=np.uint8) for j in range(3)]
    fig = viz.plot_match_examples(db, queries, S, hard, soft, num=2)
    axes = fig.axes
    assert len(axes) == 8  # 2 rows of 2 (query, match) pairs
    shown = [ax.images[0].get_array()[0, 0, 0] if ax.images else None for ax in axes]
    # true: query 0 -> db 0 (0.9), query 1 -> db 1 (0.8); false: query 2 -> db 1, then nothing
    expected = [100, 0, 110, 10, 120, 10, None, None]
    np.testing.assert_allclose([np.nan if v is None else v for v in shown],
                               [np.nan if v is None else v / 255 for v in expected])
    assert axes[1].get_title() == "db 0, S = 0.900" and axes[4].get_title() == "query 2"
    assert axes[1].spines["left"].get_edgecolor() == to_rgba("green")
    assert axes[5].spines["left"].get_edgecolor() == to_rgba("red")


def test_plot_recall_bars_heights_positions_and_labels():
    recalls = {"average": {1: 0.25, 5: 0.5}, "NetVLAD": {1: 0.75, 5: 1.0},
               "max": {1: 0.0, 5: 0.125}}
    ax = viz.plot_recall_bars(recalls, n_values=(1, 5)).axes[0]
    bars = ax.patches
    assert len(bars) == 6  # 3 methods x 2 N, drawn N by N
    heights = [b.get_height() for b in bars]
    np.testing.assert_allclose(heights, [25, 75, 0, 50, 100, 12.5])
    centres = [b.get_x() + b.get_width() / 2 for b in bars]
    np.testing.assert_allclose(centres, [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["average", "NetVLAD", "max"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["R@1", "R@5"]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["25", "75", "0", "50", "100", "12"]


def test_lazy_images_read_split_images(tiny_city):
    from netvlad_tutorial.data import load_split

    split = load_split(tiny_city, "test")
    images = viz.LazyImages(split, query=True)
    assert len(images) == split.db.numQ
    np.testing.assert_array_equal(np.asarray(images[2]),
                                  np.asarray(viz.split_image(split, 2, query=True)))
