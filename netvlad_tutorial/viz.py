"""Figures for the course: maps, image strips, curves, soft-assignment maps and diagrams.

Every `plot_*` function returns a matplotlib `Figure` built without pyplot: nothing is shown
twice in a notebook, nothing accumulates in pyplot's figure list, and any backend works (Agg
included). Make the call the last expression of a cell (or `display(fig)`) to see it;
`fig.savefig(path)` keeps it. Labels are in English (Korean fonts may be missing on a reader's
machine); the notebooks explain in Korean.
"""

import inspect
import io
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator, NullFormatter
from PIL import Image
from scipy.spatial import cKDTree

from .backbone import vgg16_features
from .data import NegativeSampler, eval_positives, load_split, train_positives
from .dbstruct import DbStruct
from .evaluate import best_matches, pr_auc
from .files import atomic_write
from .images import IMAGENET_MEAN, IMAGENET_STD, load_image, to_rgb

FRAME_WIDTH = 4


class NotebookFigure(Figure):
    """A matplotlib `Figure` that Jupyter displays as a PNG, whatever the pyplot backend."""

    def _repr_png_(self):
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


def _numpy(x):
    """`x` (tensor, array or list) as a NumPy array."""
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_image(x):
    """An (H, W, 3) float array in [0, 1] that `imshow` can draw.

    Args:
        x: a PIL image, an (H, W, 3) array (uint8, or float in [0, 1]), or a (3, H, W) tensor
            normalized with the ImageNet mean and std (as `images.input_transform` makes it),
            whose normalization is undone here.
    """
    if isinstance(x, Image.Image):
        return np.asarray(to_rgb(x), dtype=np.float32) / 255
    if torch.is_tensor(x):
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a normalized (3, H, W) image tensor, got {tuple(x.shape)}")
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = x.detach().float().cpu() * std + mean  # `x`: (3, H, W) in [0, 1]
        return x.clamp(0, 1).permute(1, 2, 0).numpy()
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {x.shape}")
    return x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Notebook 01: positives and negatives on the map, memory
# ---------------------------------------------------------------------------------------------

def plot_query_map(utm_db, utm_q, query_index, positives=None, train_positives=None,
                   negatives=None, radii=(10, 25), window=60, ax=None, negatives_label=None):
    """A UTM map around one query: database points, rings, positives and negatives.

    Coordinates are drawn in metres relative to the query (east, north).

    Args:
        utm_db: (N, 2) database UTM coordinates; utm_q: (M, 2) query coordinates.
        query_index: which query to centre on.
        positives: database indices of the evaluation positives (within `radii[1]`).
        train_positives: database indices of the training positives (within `radii[0]`).
        negatives: database indices of (a sample of) negatives (beyond `radii[1]`).
        radii: the two circles to draw, in metres.
        window: half-width of the map in metres.
        ax: draw on this axes instead of a new figure.
        negatives_label: the legend of `negatives` (default: a sample of negatives).
    """
    if ax is None:
        ax = NotebookFigure(figsize=(6, 6.8), layout="constrained").subplots()
    utm_db, centre = np.asarray(utm_db, dtype=float), np.asarray(utm_q, dtype=float)[query_index]
    xy = utm_db - centre  # `xy`: (N, 2) metres east/north of the query
    near, far = radii
    visible = np.abs(xy).max(axis=1) <= window
    ax.scatter(*xy[visible].T, s=12, c="0.75", label="database image")
    if positives is not None:
        ax.scatter(*xy[positives].T, s=22, c="tab:orange",
                   label=f"evaluation positive (≤ {far:g} m)")
    if train_positives is not None:
        ax.scatter(*xy[train_positives].T, s=22, c="tab:green",
                   label=f"training positive (≤ {near:g} m)")
    if negatives is not None:
        ax.scatter(*xy[negatives].T, s=22, c="tab:red", marker="x",
                   label=negatives_label or f"negative (sample, > {far:g} m)")
    ax.scatter(0, 0, s=260, c="tab:blue", marker="*", edgecolors="black", zorder=3,
               label="query")
    for r in radii:
        ax.add_patch(Circle((0, 0), r, fill=False, ls="--", lw=1.2, color="0.3"))
    # One label per circle where they are far enough apart on the map; else one for both.
    apart = (far - near) / (2 * window) >= 0.05
    labels = ([(r, f"{r:g} m") for r in radii] if apart
              else [(far, " / ".join(f"{r:g}" for r in radii) + " m")])
    for r, text in labels:
        ax.text(0, r + 0.01 * window, text, ha="center", va="bottom", fontsize=9, color="0.3")
    ax.set(xlim=(-window, window), ylim=(-window, window), aspect="equal",
           xlabel="east of the query (m)", ylabel="north of the query (m)",
           title=f"query {query_index}")
    _map_legend(ax)
    return ax.figure


def _map_legend(ax):
    """The legend of a query map, below it."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, fontsize=8,
              frameon=False)


def plot_seed_pitfall(utm_db, utm_q, query_index, negatives=None, radii=(10, 25), window=60):
    """The seed's reading of the thresholds (left) next to the reference one (right).

    The seed keeps only the 10–25 m ring as training positives (mask `d² > 100`) and drops the
    nearest images; the reference trains on images within 10 m and evaluates within 25 m.
    """
    fig = NotebookFigure(figsize=(11, 6.4), layout="constrained")
    seed_ax, ref_ax = fig.subplots(1, 2)
    near, far = radii
    xy = np.asarray(utm_db, dtype=float) - np.asarray(utm_q, dtype=float)[query_index]  # (N, 2)
    dist = np.linalg.norm(xy, axis=1)  # (N,)
    train = np.flatnonzero(dist <= near)
    ring = np.flatnonzero((dist > near) & (dist <= far))

    plot_query_map(utm_db, utm_q, query_index, positives=np.flatnonzero(dist <= far),
                   train_positives=train, negatives=negatives, radii=radii, window=window,
                   ax=ref_ax)
    ref_ax.set_title(f"reference: train on ≤ {near:g} m, evaluate on ≤ {far:g} m")

    plot_query_map(utm_db, utm_q, query_index, radii=radii, window=window, ax=seed_ax)
    seed_ax.scatter(*xy[ring].T, s=22, c="tab:purple",
                    label=f"seed's training positive ({near:g}–{far:g} m ring)")
    seed_ax.scatter(*xy[train].T, s=30, c="black", marker="x",
                    label=f"seed drops as 'trivial' (≤ {near:g} m)")
    _map_legend(seed_ax)
    seed_ax.set_title("seed's reading (wrong): only the ring is positive", color="tab:red")
    return fig


def plot_memory_comparison(labels, mebibytes):
    """Horizontal bars of memory use in MiB (log scale), each labelled with its size."""
    mebibytes = np.asarray(mebibytes, dtype=float)
    fig = NotebookFigure(figsize=(7, 0.6 * len(labels) + 1.2), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(labels, mebibytes, color="tab:blue")
    ax.bar_label(bars, labels=[_format_mib(mib) for mib in mebibytes], padding=4)
    ax.set_xscale("log")
    ax.set_xlim(mebibytes.min() / 3, mebibytes.max() * 8)
    ax.invert_yaxis()
    ax.set(xlabel="memory (MiB, log scale)")
    return fig


def _format_mib(mib):
    """`mib` mebibytes as a short string in binary units: 5.3 GiB, 12.3 MiB, 640 KiB."""
    if mib >= 1024:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:.1f} MiB" if mib >= 1 else f"{mib * 1024:.0f} KiB"


# ---------------------------------------------------------------------------------------------
# Notebooks 01, 04, 06: image strips, training tuples, retrievals
# ---------------------------------------------------------------------------------------------

def show_images(images, titles=None, frames=None, ncols=6, size=2.4):
    """A grid of images, optionally titled and framed ("green", "red" or None per image).

    Args:
        images: PIL images, (H, W, 3) arrays or normalized (3, H, W) tensors (see `to_image`).
        ncols: images per row (at most); size: width of one image in inches.
    """
    images = [to_image(img) for img in images]
    n = len(images)
    titles = titles or [None] * n
    frames = frames or [None] * n
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    height, width = images[0].shape[:2]
    title_room = 0.45 if any(titles) else 0.1
    fig = NotebookFigure(figsize=(ncols * size, nrows * (size * height / width + title_room)),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, img, title, frame in zip(axes, images, titles, frames):
        ax.imshow(img)
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set(visible=frame is not None, color=frame, linewidth=FRAME_WIDTH)
        if title:
            ax.set_title(title, fontsize=9)
    for ax in axes[n:]:
        ax.remove()
    return fig


# ---------------------------------------------------------------------------------------------
# Notebooks 05, 06: curves
# ---------------------------------------------------------------------------------------------

def plot_recall_curves(curves, n_marks=(1, 5, 10, 20)):
    """Recall@N against N (log scale) for each labelled curve, marked at `n_marks`.

    Args:
        curves: {label: (max_n,) array} with entry i = Recall@(i+1) as a fraction in [0, 1]
            (as `evaluate.recall_curve` returns it).
    """
    fig = NotebookFigure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    max_n = max(len(c) for c in curves.values())
    for label, curve in curves.items():
        curve = 100 * _numpy(curve)
        marks = [n for n in n_marks if n <= len(curve)]
        summary = ", ".join(f"R@{n} {curve[n - 1]:.1f}" for n in marks)
        (line,) = ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{label} ({summary})")
        ax.plot(marks, curve[np.array(marks) - 1], "o", color=line.get_color())
    ax.set_xscale("log")
    ticks = sorted({*n_marks, max_n})
    ax.set_xticks(ticks, labels=[str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlim=(1, max_n), ylim=(0, 100), xlabel="N (top-N retrieved)", ylabel="Recall@N (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def plot_training_log(history, before=None):
    """Training loss (left) and validation Recall@N (right) per epoch.

    Args:
        history: one dict per epoch with keys `epoch`, `loss` and `recall@N` (fractions),
            as `train.train` returns it.
        before: the validation `recall@N` of the model before training (e.g. the untrained
            model's `evaluate_split`), drawn at the left of the first epoch, marked "before".
    """
    fig = NotebookFigure(figsize=(10, 3.8), layout="constrained")
    loss_ax, recall_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["loss"] for row in history], "o-", color="tab:red")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    recall_keys = sorted((k for k in history[0] if k.startswith("recall@")),
                         key=lambda k: int(k.split("@")[1]))
    start = epochs[0] - 1  # where the `before` point goes
    for key in recall_keys:
        xs, ys = epochs, [100 * row[key] for row in history]
        if before is not None and key in before:
            xs, ys = [start, *xs], [100 * before[key], *ys]
        recall_ax.plot(xs, ys, "o-", label=f"R@{key[7:]}")
    recall_ax.set(xlabel="epoch", ylabel="Recall@N (%)", title="validation recall")
    recall_ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    for ax in (loss_ax, recall_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if before is not None:
        ticks = [t for t in recall_ax.get_xticks() if epochs[0] <= t <= epochs[-1]]
        recall_ax.set_xticks([start, *ticks], ["before", *(f"{t:g}" for t in ticks)])
        recall_ax.set_xlim(start - 0.5, epochs[-1] + 0.5)
    return fig


# ---------------------------------------------------------------------------------------------
# Notebooks 02, 06: soft-assignment maps, descriptor scatter
# ---------------------------------------------------------------------------------------------

def plot_soft_assignment(image, assignment, clusters=None):
    """Soft-assignment maps of a few clusters over the image, and the argmax cluster map.

    Args:
        image: the input image (see `to_image`).
        assignment: (K, h, w) soft-assignment of the image's conv5 descriptors
            (`NetVLAD.soft_assign(x)[0]`); each map is stretched over the whole image.
        clusters: which clusters to draw (default: the 3 with the most total assignment).
    """
    image, assignment = to_image(image), _numpy(assignment)
    if assignment.ndim != 3:
        raise ValueError(f"expected a (K, h, w) soft-assignment, got shape {assignment.shape}")
    if clusters is None:
        clusters = np.argsort(-assignment.sum(axis=(1, 2)))[:3]
    height, width = image.shape[:2]
    extent = (0, width, height, 0)  # stretch the (h, w) maps over the (H, W) image
    fig = NotebookFigure(figsize=(3.2 * (len(clusters) + 2), 3.2 * height / width + 0.6),
                 layout="constrained")
    axes = fig.subplots(1, len(clusters) + 2)
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, k in zip(axes[1:], clusters):
        ax.imshow(image)
        ax.imshow(assignment[k], extent=extent, cmap="magma", vmin=0, vmax=1, alpha=0.6,
                  interpolation="bilinear")
        ax.set_title(f"cluster {k}: a_k(x)")
    axes[-1].imshow(image)
    axes[-1].imshow(assignment.argmax(axis=0), extent=extent, cmap="tab20", alpha=0.55,
                    interpolation="nearest")
    axes[-1].set_title("argmax cluster")
    for ax in axes:
        ax.set_axis_off()
    return fig


def plot_descriptor_scatter(desc, labels, method="pca", seed=0, title=None, label_name="place"):
    """Descriptors projected to 2-D (PCA or t-SNE), one colour per label.

    Args:
        desc: (N, D) descriptors; labels: (N,) ids of what the colours mean (e.g. a place).
        method: "pca" or "tsne"; seed: the projection's `random_state`.
        title: first line of the title (e.g. "untrained"); label_name: what one label is,
            written in the title ("colour = group of 4 neighbouring places"). The 20 colours
            repeat beyond 20 labels, and the title says so.
    """
    desc, labels = _numpy(desc).astype(np.float32), _numpy(labels)
    names = {"pca": "PCA", "tsne": "t-SNE"}
    if method == "pca":
        from sklearn.decomposition import PCA  # scikit-learn only when a scatter is drawn

        xy = PCA(n_components=2, random_state=seed).fit_transform(desc)
    elif method == "tsne":
        perplexity = min(30.0, (len(desc) - 1) / 3)
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=seed).fit_transform(desc)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    fig = NotebookFigure(figsize=(6, 5.2), layout="constrained")
    ax = fig.subplots()
    _, colour = np.unique(labels, return_inverse=True)  # `colour`: (N,) in 0..num_places-1
    ax.scatter(*xy.T, c=colour % 20, cmap="tab20", vmin=0, vmax=19, s=18)
    num_labels = colour.max() + 1
    text = (f"{names[method]} of {len(desc)} descriptors, colour = {label_name} "
            f"({num_labels} in all" + (", colours repeat)" if num_labels > 20 else ")"))
    ax.set(xticks=[], yticks=[], title=text if title is None else f"{title}\n{text}")
    return fig


# ---------------------------------------------------------------------------------------------
# Notebooks 03, 05, 06: Markdown tables, the paired evidence that training helps
# ---------------------------------------------------------------------------------------------

class Markdown(str):
    """A string that Jupyter shows as Markdown (like `IPython.display.Markdown`)."""

    def _repr_markdown_(self):
        return str(self)

    def __repr__(self):  # the text form (a terminal, nbval) is the Markdown source itself
        return str(self)


def show_source(*objects, lines=None):
    """The source code of functions or classes as one Markdown Python block (no ANSI colours,
    unlike `%psource`, so that it reads the same on GitHub as in JupyterLab).

    Make it the last expression of a cell; its text form is the plain source.

    Args:
        lines: show only part of one object: its signature, then the lines from `first` to
            `last` (inclusive), with `# ...` where lines are left out. `(first, last)` are
            either line numbers counted from 1 at the `def` line, or two strings: the first
            line that contains `first`, through the next line that contains `last`.
    """
    parts = [textwrap.dedent(inspect.getsource(obj)).rstrip() for obj in objects]
    if lines is not None:
        if len(parts) != 1:
            raise ValueError("show_source(..., lines=) shows part of one object")
        parts = [source_excerpt(parts[0], *lines)]
    return Markdown("```python\n" + "\n\n\n".join(parts) + "\n```")


def source_excerpt(source, first, last):
    """Lines `first`..`last` of `source` after its signature, `# ...` marking the gaps.

    `first`, `last`: 1-based line numbers, or strings (see `show_source`).
    """
    src = source.splitlines()

    def find(marker, start):
        if isinstance(marker, int):
            return marker - 1
        for i in range(start, len(src)):
            if marker in src[i]:
                return i
        raise ValueError(f"no line containing {marker!r} in the source")

    start = find(first, 0)
    stop = find(last, start)
    if not 0 <= start <= stop < len(src):
        raise ValueError(f"lines {first}..{last} are not in the {len(src)} lines of the source")
    signature = next(i for i, line in enumerate(src) if line.rstrip().endswith(":")) + 1
    indent = src[start][:len(src[start]) - len(src[start].lstrip())]
    head = src[:signature] + [indent + "# ..."] if start > signature else src[:start]
    tail = [indent + "# ..."] if stop < len(src) - 1 else []
    return "\n".join(head + src[start:stop + 1] + tail)


def markdown_table(header, rows, float_format=".1f"):
    """A Markdown table: the `header` cells, then one line per row of `rows`.

    Floats are written with `float_format`, other cells with `str`; a `|` inside a cell is
    escaped. Make it the last expression of a cell to see the table.
    """
    def cell(x):
        text = format(x, float_format) if isinstance(x, float) else str(x)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


PAIRED_COLOURS = {"both": "0.85", "neither": "0.85", "fixed": "#a1d99b", "broken": "#fc9272"}


def plot_paired_outcomes(outcomes, labels=("untrained", "trained")):
    """The 2×2 tables of per-query outcomes before and after, one per `PairedOutcomes`.

    Rows: correct or wrong before (`labels[0]`); columns: after (`labels[1]`). Green counts the
    queries the change fixed, red those it broke; the grey diagonal did not change. The title
    gives Recall@n before → after and McNemar's exact p-value of fixed against broken.

    Args:
        outcomes: `evaluate.PairedOutcomes`, e.g. at R@1 and R@5.
    """
    fig = NotebookFigure(figsize=(4.2 * len(outcomes), 4.1), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(outcomes)))
    before, after = labels
    for ax, out in zip(axes, outcomes):
        table = out.table  # [[both, broken], [fixed, neither]]
        names = [["both", "broken"], ["fixed", "neither"]]
        ax.imshow([[to_rgba(PAIRED_COLOURS[name]) for name in row] for row in names])
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{names[i][j]}\n{table[i, j]}", ha="center", va="center",
                        fontsize=12)
        ax.set_xticks([0, 1], labels=[f"{after}\ncorrect", f"{after}\nwrong"])
        ax.set_yticks([0, 1], labels=[f"{before}\ncorrect", f"{before}\nwrong"])
        ax.tick_params(length=0)
        ax.set_title(f"R@{out.n}: {100 * out.before.mean():.1f} → {100 * out.after.mean():.1f}%"
                     f" of {len(out.before)} queries\n{len(out.fixed)} fixed, "
                     f"{len(out.broken)} broken; McNemar exact p = {out.p_value:.3g}",
                     fontsize=10)
    return fig


def plot_distance_histograms(before, after, margin=None, labels=("untrained", "trained"),
                             bins=30):
    """d_pos and d_neg of every query, before (left) and after (right).

    Top: histograms of the distance to the nearest positive (green) and to the nearest
    negative (red). Bottom: the gap d_neg − d_pos of each query; a query is correct at R@1
    exactly when its gap is positive, and a triplet with gap ≥ `margin` adds no loss. Each
    panel has its own scale (an untrained model's distances may be a hundred times smaller).

    Args:
        before, after: (d_pos (M,), d_neg (M,)) as `evaluate.positive_negative_distances`
            returns them (non-finite values are left out).
        margin: the loss margin in distance units (this course's loss: sqrt(config.margin)),
            drawn where it falls inside the gaps' range. The loss uses training positives
            (10 m), these gaps the evaluation positives (25 m): the line is a guide.
    """
    fig = NotebookFigure(figsize=(11, 7.4), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, ((d_pos, d_neg), label) in enumerate(zip((before, after), labels)):
        d_pos, d_neg = np.asarray(d_pos, dtype=float), np.asarray(d_neg, dtype=float)
        dist_ax, gap_ax = axes[:, col]
        both = np.concatenate([d_pos, d_neg])
        edges = np.histogram_bin_edges(both[np.isfinite(both)], bins=bins)
        dist_ax.hist(d_pos[np.isfinite(d_pos)], edges, color="tab:green", alpha=0.6,
                     label="d_pos: nearest positive")
        dist_ax.hist(d_neg[np.isfinite(d_neg)], edges, color="tab:red", alpha=0.6,
                     label="d_neg: nearest negative")
        dist_ax.set(xlabel="descriptor distance", ylabel="queries",
                    title=f"{label}\nmedian d_pos {np.median(d_pos):.3g}, "
                          f"median d_neg {np.median(d_neg):.3g}")
        dist_ax.legend(fontsize=9)
        gap = d_neg - d_pos
        gap = gap[np.isfinite(gap)]
        gap_ax.hist(gap, np.histogram_bin_edges(np.append(gap, 0.0), bins=bins),
                    color="tab:blue", alpha=0.7)
        gap_ax.axvline(0, color="black", lw=1.5, label="0: right of it, correct at R@1")
        title = f"{label}\nd_neg − d_pos > 0: {100 * np.mean(gap > 0):.1f}% (= R@1)"
        if margin:
            title += f"; ≥ margin {margin:.3g}: {100 * np.mean(gap >= margin):.1f}%"
            if margin <= gap.max():
                gap_ax.axvline(margin, color="tab:orange", lw=1.5, ls="--", label="margin")
        gap_ax.set(xlabel="d_neg − d_pos", ylabel="queries", title=title)
        gap_ax.legend(fontsize=9)
    return fig


def split_image(split, i, query=False):
    """Database image `i` of a `data.Split` (or query `i` with `query=True`), as a PIL image."""
    db = split.db
    path = (Path(split.root) / split.queries_dir / db.qImage[i] if query
            else Path(split.root) / db.dbImage[i])
    return load_image(path)


def plot_retrievals_before_after(split, queries, pred_before, pred_after, positives,
                                 dist_before=None, dist_after=None, k=5,
                                 labels=("untrained", "trained")):
    """The top-k of the same queries before and after: two rows per query.

    Each row is query | top-k database images, framed green (a positive) or red (wrong).

    Args:
        split: the `data.Split` the predictions index (images are read from its files).
        queries: query indices to show.
        pred_before, pred_after: (M, >= k) database indices, nearest first.
        positives: per query, its positive database indices (`data.eval_positives`).
        dist_before, dist_after: optional (M, >= k) descriptor distances, shown in the titles.
    """
    images, titles, frames = [], [], []
    for q in queries:
        query_image = split_image(split, q, query=True)
        for label, pred, dist in [(labels[0], pred_before, dist_before),
                                  (labels[1], pred_after, dist_after)]:
            images.append(query_image)
            titles.append(f"query {q}\n{label}")
            frames.append(None)
            for j, i in enumerate(pred[q][:k]):
                images.append(split_image(split, i))
                titles.append(f"top-{j + 1}" + ("" if dist is None else f"\nd = {dist[q][j]:.3f}"))
                frames.append("green" if np.isin(i, positives[q]) else "red")
    return show_images(images, titles, frames, ncols=k + 1)


# ---------------------------------------------------------------------------------------------
# Notebooks 01, 04, 06: exploring the queries (ipywidgets slider, static figure without it)
# ---------------------------------------------------------------------------------------------

def _draw_images(fig, images, titles, frames, ncols):
    """`show_images` drawn into an existing figure or subfigure; a None image is a blank."""
    nrows = -(-len(images) // ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, img, title, frame in zip(axes, images, titles, frames):
        if img is None:
            ax.set_axis_off()
            continue
        ax.imshow(to_image(img))
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set(visible=frame is not None, color=frame, linewidth=FRAME_WIDTH)
        ax.set_title(title, fontsize=9)
    for ax in axes[len(images):]:
        ax.remove()


def _window(xy, shown, least=40):
    """A map half-width (m) that holds the database points `shown` (indices into `xy`)."""
    return max(least, float(np.abs(xy[shown]).max()) + 10) if len(shown) else least


def query_drawer(split, mine=None, predictions=None, distances=None, n_neg_sample=40,
                 shown=5, seed=0, window=None):
    """A function `draw(q)` -> Figure: query `q` on the map (left) and its images (right).

    What is drawn depends on the stage:
    - default (01): positives within 10 m and 25 m, a sample of `n_neg_sample` negatives
      (`data.NegativeSampler`, seeded); images: the query, its nearest training positives and
      sampled negatives, with their distance in metres.
    - `mine` (04): a function q -> `mining.MinedTuple` (e.g. a `mine_tuple` call); the map
      shows its sampled potential negatives, the chosen hard negatives and the best positive;
      images: query | best positive | hard negatives, with descriptor distances.
    - `predictions` (06): (M, >= `shown`) database indices, nearest first (and optional
      `distances`); the map numbers the top-`shown`, green if within 25 m, red if not;
      images: query | top-`shown`, framed green or red.

    Args:
        window: half-width of the map in metres (default: 60, or enough for all drawn points).
    """
    if mine is not None and predictions is not None:
        raise ValueError("give either `mine` (stage 04) or `predictions` (stage 06), not both")
    db = split.db
    eval_pos, train_pos = eval_positives(db), train_positives(db)
    sampler = NegativeSampler(db)

    def draw(q):
        xy = np.asarray(db.utmDb, dtype=float) - np.asarray(db.utmQ, dtype=float)[q]  # (N, 2)
        metres = np.linalg.norm(xy, axis=1)  # (N,)
        fig = NotebookFigure(figsize=(12, 5.2), layout="constrained")
        map_fig, strip_fig = fig.subfigures(1, 2, width_ratios=(1, 1.9))
        ax = map_fig.subplots()
        cells = [(split_image(split, q, query=True), f"query {q}", None)]  # (image, title, frame)
        if mine is not None:
            t = mine(q)
            drawn = np.concatenate([t.sampled, t.negatives, [t.positive]]).astype(int)
            plot_query_map(db.utmDb, db.utmQ, q, eval_pos[q], train_pos[q], t.sampled,
                           window=window or _window(xy, drawn), ax=ax)
            ax.scatter(*xy[t.negatives].T, s=90, facecolors="none", edgecolors="darkred",
                       linewidths=1.8, label="chosen hard negative")
            ax.scatter(*xy[t.positive], s=90, c="lime", marker="D", edgecolors="black",
                       label="best positive (nearest descriptor)")
            ax.set_title(f"query {q}: {len(t.sampled)} sampled, {len(t.negatives)} chosen")
            best = f"best positive\nd = {t.d_pos:.3f}, {metres[t.positive]:.0f} m"
            cells.append((split_image(split, t.positive), best, "green"))
            cells += [(split_image(split, i), f"hard negative\nd = {d:.3f}, {metres[i]:.0f} m",
                       "red") for i, d in zip(t.negatives, t.d_negs)]
        elif predictions is not None:
            top = np.asarray(predictions[q][:shown], dtype=int)
            correct = np.isin(top, eval_pos[q])
            plot_query_map(db.utmDb, db.utmQ, q, eval_pos[q], train_pos[q],
                           window=window or _window(xy, top), ax=ax)
            ax.scatter(*xy[top].T, s=110, facecolors="none", linewidths=2,
                       edgecolors=np.where(correct, "green", "red"), label="retrieved")
            for rank, i in enumerate(top):
                colour = "green" if correct[rank] else "red"
                ax.annotate(str(rank + 1), xy[i], xytext=(5, 5), textcoords="offset points",
                            fontsize=9, color=colour)
                d = "" if distances is None else f"d = {distances[q][rank]:.3f}, "
                cells.append((split_image(split, i), f"top-{rank + 1}\n{d}{metres[i]:.0f} m",
                              colour))
            ax.set_title(f"query {q}: top-{len(top)} retrieved, {correct.sum()} correct")
        else:
            negatives = sampler.sample(q, n_neg_sample, np.random.default_rng(seed))
            plot_query_map(db.utmDb, db.utmQ, q, eval_pos[q], train_pos[q], negatives,
                           window=window or 60, ax=ax)
            positives = train_pos[q][:shown]
            cells += [(split_image(split, i), f"training positive\n{metres[i]:.1f} m", "green")
                      for i in positives]
            cells += [(None, "", None)] * (shown - len(positives))  # negatives: second row
            cells += [(split_image(split, i), f"negative\n{metres[i]:.0f} m", "red")
                      for i in negatives[:shown + 1]]
        _map_legend(ax)
        _draw_images(strip_fig, *zip(*cells), ncols=shown + 1)
        return fig

    return draw


def _widgets():
    """The `ipywidgets` module when it is installed and this runs in a Jupyter kernel, else
    None."""
    try:
        import ipywidgets
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return ipywidgets if getattr(shell, "kernel", None) is not None else None


def explore_queries(split, query=0, **options):
    """Query `query`'s map and images, with a slider to choose another query.

    The figure is shown as an ordinary output (a picture in the saved notebook, as on GitHub);
    in a Jupyter kernel with ipywidgets, a query slider below it redraws that same output.
    Without them (a script, a test, no ipywidgets) the figure is returned instead.

    Args:
        split: a `data.Split`; options: those of `query_drawer` (`mine` for stage 04,
            `predictions` for stage 06).

    Returns:
        the slider (shown by Jupyter as the cell's value), or the Figure without a kernel.
    """
    draw = query_drawer(split, **options)
    fig = draw(query)
    widgets = _widgets()
    if widgets is None:
        return fig
    from IPython.display import display

    handle = display(fig, display_id=True)
    slider = widgets.IntSlider(value=query, min=0, max=split.db.numQ - 1, description="query",
                               continuous_update=False)
    slider.observe(lambda change: handle.update(draw(change["new"])), names="value")
    return slider


# ---------------------------------------------------------------------------------------------
# Notebook 02: diagrams, written into figures/ by `make figures`
# ---------------------------------------------------------------------------------------------

def vgg16_shapes(image_size=(480, 640)):
    """Output shape (C, H, W) of every conv and max-pool of VGG16's `features`.

    Runs the layers on a "meta" tensor (shapes only, no memory, no weights).

    Returns:
        list of (name, (C, H, W)) with names conv1_1 … conv5_3 and pool1 … pool5.
    """
    with torch.device("meta"):
        features = vgg16_features()
        x = torch.empty(1, 3, *image_size)
    shapes, block, conv = [], 1, 0
    for layer in features:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            conv += 1
            shapes.append((f"conv{block}_{conv}", tuple(x.shape[1:])))
        elif isinstance(layer, torch.nn.MaxPool2d):
            shapes.append((f"pool{block}", tuple(x.shape[1:])))
            block, conv = block + 1, 0
    return shapes


def _box(ax, x, y, w, h, color, text="", dashed=False):
    """A rounded box centred at (x, y), with centred text."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                fc=color, ec="0.25", lw=1.2, ls="--" if dashed else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def _arrow(ax, start, end, color="0.25", **kwargs):
    """An arrow from `start` to `end` (data coordinates)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.4,
                                 color=color, **kwargs))


def _fmt_shape(shape):
    """(C, H, W) as "C×H×W"."""
    return "×".join(str(s) for s in shape)


def plot_vgg_blocks(image_size=(480, 640)):
    """VGG16's conv blocks with their output shapes, the NetVLAD cut at conv5_3, frozen parts.

    Box heights follow the feature-map height (log scale), widths the channel count.
    """
    shapes = dict(vgg16_shapes(image_size))
    frozen, trained, dropped = "#c6dbef", "#fdae6b", "0.9"
    blocks = [("input", (3, *image_size), "white")]  # (name, (C, H, W) or None, colour)
    for b in range(1, 5):
        num_convs = sum(name.startswith(f"conv{b}_") for name in shapes)
        blocks.append((f"conv{b}_1–{b}_{num_convs}", shapes[f"conv{b}_1"], frozen))
    blocks += [(f"conv5_{i}", shapes[f"conv5_{i}"], trained) for i in (1, 2, 3)]
    blocks += [("pool5", shapes["pool5"], dropped), ("FC6–FC8", None, dropped)]

    fig = NotebookFigure(figsize=(14, 4.4), layout="constrained")
    ax = fig.subplots()
    x, centres, edges = 0.0, [], []
    for name, shape, color in blocks:
        w = 0.5 + 0.12 * np.log2(shape[0]) if shape else 1.2
        h = 0.8 + 0.35 * np.log2(shape[1]) if shape else 1.6
        x += w / 2
        centres.append(x)
        edges.append((x - w / 2, x + w / 2))
        greyed = color == dropped
        text_color = "0.55" if greyed else "black"
        _box(ax, x, 0, w, h, color, dashed=greyed)
        ax.text(x, h / 2 + 0.15, name, ha="center", va="bottom", fontsize=9, color=text_color)
        caption = _fmt_shape(shape) if shape else "4096, 4096, 1000"
        ax.text(x, -h / 2 - 0.15, caption, ha="center", va="top", fontsize=9, color=text_color)
        x += w / 2 + 0.9
    for i, ((_, a), (b, _)) in enumerate(zip(edges, edges[1:])):
        _arrow(ax, (a, 0), (b, 0), color="0.6" if i >= 7 else "0.25")
        if 1 <= i <= 4:  # the arrows leaving conv blocks 1-4 are pool1-pool4
            ax.text((a + b) / 2, 0.1, "pool", ha="center", va="bottom", fontsize=8, color="0.4")

    cut = (centres[7] + centres[8]) / 2
    ax.axvline(cut, color="tab:red", ls="--", lw=1.5)
    ax.text(cut, 2.7, "cut: features[:-2] (before ReLU and pool5)\n"
            f"→ {_fmt_shape(shapes['conv5_3'])} local descriptors", ha="center", va="bottom",
            fontsize=9, color="tab:red", bbox=dict(fc="white", ec="none"))
    for first, last, label, color in [(1, 4, "frozen (ImageNet weights)", "#3182bd"),
                                      (5, 7, "trained with NetVLAD", "#e6550d"),
                                      (8, 9, "dropped", "0.55")]:
        ax.annotate("", (centres[first] - 0.6, -2.75), (centres[last] + 0.6, -2.75),
                    arrowprops=dict(arrowstyle="|-|", color=color))
        ax.text((centres[first] + centres[last]) / 2, -2.85, label, ha="center", va="top",
                color=color)
    ax.set(xlim=(-0.2, x - 0.7), ylim=(-3.4, 3.6), aspect="equal",
           title=f"torchvision VGG16 at {image_size[0]}×{image_size[1]}: output shapes C×H×W")
    ax.set_axis_off()
    return fig


def plot_netvlad_pipeline(num_clusters=64, dim=512, pca_dim=4096, image_size=(480, 640)):
    """The NetVLAD pipeline from an image to the global descriptor, with shapes."""
    _, h, w = dict(vgg16_shapes(image_size))["conv5_3"]
    k, d, full = num_clusters, dim, num_clusters * dim
    steps = [
        (f"image\n3×{image_size[0]}×{image_size[1]}", "white", False),
        (f"VGG16 to conv5_3\n{d}×H×W\n({d}×{h}×{w})", "#c6dbef", False),
        (f"soft-assignment\n1×1 conv + softmax\nK×H×W  (K={k})", "#fdae6b", False),
        (f"residual sum\nK×D = {k}×{d}", "#fdae6b", False),
        ("intra-norm\n(L2 per cluster)", "#fdae6b", False),
        (f"L2-norm\n{full:,}-D", "#fdae6b", False),
        (f"PCA-whitening\n(optional)\n{pca_dim:,}-D", "#c7e9c0", True),
    ]
    fig = NotebookFigure(figsize=(13.5, 3.6), layout="constrained")
    ax = fig.subplots()
    box_w, gap = 1.55, 0.45
    xs = [i * (box_w + gap) for i in range(len(steps))]
    for x, (text, color, dashed) in zip(xs, steps):
        _box(ax, x, 0, box_w, 1.1, color, text, dashed=dashed)
    for a, b in zip(xs, xs[1:]):
        _arrow(ax, (a + box_w / 2, 0), (b - box_w / 2, 0))
    _arrow(ax, (xs[1], 0.6), (xs[3], 0.6), connectionstyle="arc3,rad=-0.3")
    ax.text(xs[2], 1.3, f"local descriptors $x_i$ (L2-normalized, D = {d})", ha="center",
            fontsize=9)
    ax.text(xs[3], -0.7, r"$V_k = \sum_i \bar{a}_k(x_i)\,(x_i - c_k)$", ha="center",
            va="top", fontsize=10)
    ax.annotate("", (xs[2] - box_w / 2, -1.25), (xs[5] + box_w / 2, -1.25),
                arrowprops=dict(arrowstyle="|-|", color="#e6550d"))
    ax.text((xs[2] + xs[5]) / 2, -1.35, "NetVLAD layer", ha="center", va="top",
            color="#e6550d")
    ax.set(xlim=(xs[0] - box_w / 2 - 0.1, xs[-1] + box_w / 2 + 0.1), ylim=(-1.75, 1.65),
           aspect="equal")
    ax.set_axis_off()
    return fig


def make_figures(out_dir="figures"):
    """Write the figures that the notebooks' markdown refers to; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"vgg16_conv5_cut.png": plot_vgg_blocks(),
               "netvlad_pipeline.png": plot_netvlad_pipeline()}
    paths = []
    for name, fig in figures.items():
        path = out_dir / name
        atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110,
                                                          metadata={"Software": None}))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Datasets on the map and in pictures (notebook 01)
# ---------------------------------------------------------------------------------------------


def show_city(root, split="train", num_places=3, max_views=6, max_queries=2, name=None,
              seed=0):
    """A figure: for a few places, their database views (one row) and nearby queries.

    Works on any dataset in a layout `load_split` reads: a place is the set of database images
    at the same position; its queries are those nearest to it.

    Args:
        num_places: rows, chosen at random (`seed`) among places that have queries.
        max_views, max_queries: database views and queries shown per place.
    """
    loaded = load_split(root, split, name)
    db, root, queries_dir = loaded.db, Path(loaded.root), loaded.queries_dir
    places, place_of = np.unique(db.utmDb, axis=0, return_inverse=True)
    place_of = place_of.ravel()
    dist, nearest = cKDTree(places).query(db.utmQ)  # each query's nearest place
    rng = np.random.default_rng(seed)
    with_queries = np.unique(nearest)
    chosen = np.sort(rng.choice(with_queries, min(num_places, len(with_queries)), replace=False))
    rows = []
    for p in chosen:
        views = np.flatnonzero(place_of == p)[:max_views]
        queries = np.flatnonzero(nearest == p)[:max_queries]
        rows.append([(root / db.dbImage[i], f"db {Path(db.dbImage[i]).stem}") for i in views]
                    + [(root / queries_dir / db.qImage[q],
                        f"query {Path(db.qImage[q]).stem}, {dist[q]:.1f} m") for q in queries])
    cols = max(map(len, rows))
    fig = NotebookFigure(figsize=(1.9 * cols, 1.6 * len(rows)), layout="constrained")
    for axes, panels in zip(fig.subplots(len(rows), cols, squeeze=False), rows):
        for ax in axes:
            ax.axis("off")
        for ax, (path, title) in zip(axes, panels):
            ax.imshow(load_image(path))
            ax.set_title(title, fontsize=6)
    fig.suptitle(f"{db.dataset} {db.whichSet}: database views of a place, then its queries",
                 fontsize=9)
    return fig


def plot_city_map(dbs, ax=None):
    """Database places and queries of one or more `DbStruct`s on a UTM map; returns the figure.

    Args:
        dbs: a `DbStruct` or a list of them (e.g. train, val and test).
        ax: a matplotlib axes to draw on; by default a new figure.
    """
    dbs = [dbs] if isinstance(dbs, DbStruct) else list(dbs)
    if ax is None:
        ax = NotebookFigure(figsize=(6, 5), layout="constrained").subplots()
    for i, db in enumerate(dbs):
        colour = f"C{i}"
        ax.scatter(*db.utmDb.T, s=6, color=colour, label=f"{db.whichSet} database")
        ax.scatter(*db.utmQ.T, s=14, marker="x", color=colour, alpha=0.6,
                   label=f"{db.whichSet} queries")
    ax.set_aspect("equal")
    ax.set_xlabel("UTM easting (m)")
    ax.set_ylabel("UTM northing (m)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=7, markerscale=1.5)
    return ax.figure


# ---------------------------------------------------------------------------------------------
# Evaluation as the VPR tutorial does it: similarity matrix, PR curves, true and false matches
# ---------------------------------------------------------------------------------------------


def plot_similarity_matrix(S, gt_hard=None, gt_soft=None, title=None):
    """S as an image (rows: database, columns: queries) with the ground truth over it.

    Hard positives are white dots, soft-only positives a light band (`gt_soft` & ~`gt_hard`),
    and each query's best match (`evaluate.best_matches`) a ring: green on a hard positive,
    red elsewhere.

    Args:
        S: (N, M) similarities (`evaluate.similarity_matrix`).
        gt_hard, gt_soft: optional (N, M) booleans.
    """
    S = _numpy(S)
    fig = NotebookFigure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(S, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="similarity S")
    if gt_soft is not None:
        soft_only = np.asarray(gt_soft, dtype=bool) & ~np.asarray(gt_hard, dtype=bool)
        ax.imshow(np.ma.masked_where(~soft_only, soft_only), cmap="Greys", alpha=0.35,
                  aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    if gt_hard is not None:
        rows, cols = np.nonzero(np.asarray(gt_hard, dtype=bool))
        ax.scatter(cols, rows, s=4, color="white", label="hard positive")
        best, _, correct = best_matches(S, gt_hard, gt_soft)
        q = np.flatnonzero(best >= 0)
        for mask, colour, label in [(correct[q], "#31a354", "best match: correct"),
                                    (~correct[q], "#de2d26", "best match: wrong")]:
            ax.scatter(q[mask], best[q][mask], s=30, facecolors="none", edgecolors=colour,
                       linewidths=1.2, label=label)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax.set(xlabel="query", ylabel="database image", title=title or "similarity matrix S")
    return fig


def plot_pr_curves(curves, title=None):
    """Precision against recall of several methods, with AUC and recall at 100 % precision.

    Args:
        curves: {label: (precision, recall)} as `evaluate.precision_recall_curve` returns them.
    """
    fig = NotebookFigure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, (precision, recall) in curves.items():
        precision, recall = np.asarray(precision), np.asarray(recall)
        at_one = recall[precision == 1].max() if np.any(precision == 1) else 0.0
        ax.plot(recall, precision,
                label=f"{label} (AUC {pr_auc(precision, recall):.3f}, "
                      f"R@100%P {100 * at_one:.1f}%)")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=title or "precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_recall_bars(recalls, n_values=(1, 5, 10), title=None):
    """Recall@N of several methods as grouped bars: one group per method, one bar per N.

    Args:
        recalls: {label: {n: Recall@n as a fraction}} (as `evaluate.recall_from_predictions`
            returns it), in the order to draw.
        n_values: the N of each bar in a group.
    """
    fig = NotebookFigure(figsize=(max(6.0, 0.9 * len(recalls) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(recalls))  # group centres
    width = 0.8 / len(n_values)
    for i, n in enumerate(n_values):
        heights = [100 * r[n] for r in recalls.values()]
        bars = ax.bar(x + (i - (len(n_values) - 1) / 2) * width, heights, width, label=f"R@{n}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, labels=list(recalls), rotation=30, ha="right")
    ax.set(ylim=(0, 105), ylabel="Recall@N (%)", title=title or "Recall@N per method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncols=len(n_values))
    return fig


def plot_match_examples(db_images, query_images, S, gt_hard, gt_soft=None, num=3):
    """The most confident true and false best matches as image rows.

    Top row: the `num` queries whose best match is a hard positive, highest S first, each
    followed by that database image (framed green). Bottom row: the `num` highest-scoring
    wrong best matches (framed red). Soft-only entries are skipped (`evaluate.best_matches`).

    Args:
        db_images, query_images: indexable by image index (lists, or `LazyImages`).
        S, gt_hard, gt_soft: as in `evaluate.precision_recall_curve`.
    """
    best, score, correct = best_matches(S, gt_hard, gt_soft)
    images, titles, frames = [], [], []
    for wanted, frame in [(True, "green"), (False, "red")]:
        q = np.flatnonzero((best >= 0) & (correct == wanted))
        q = q[np.argsort(-score[q], kind="stable")][:num]
        for j in range(num):
            if j < len(q):
                images += [query_images[q[j]], db_images[best[q[j]]]]
                titles += [f"query {q[j]}", f"db {best[q[j]]}, S = {score[q[j]]:.3f}"]
            else:
                images += [None, None]
                titles += [None, None]
            frames += [None, frame]
    fig = NotebookFigure(figsize=(2 * num * 2.2, 2 * 2.3), layout="constrained")
    _draw_images(fig, images, titles, frames, ncols=2 * num)
    fig.suptitle("most confident true matches (top) and false matches (bottom)", fontsize=10)
    return fig


class LazyImages:
    """The database (or query) images of a `data.Split`, read from disk when indexed."""

    def __init__(self, split, query=False):
        self.split, self.query = split, query

    def __len__(self):
        return self.split.db.numQ if self.query else self.split.db.numDb

    def __getitem__(self, i):
        return split_image(self.split, int(i), query=self.query)


# ---------------------------------------------------------------------------------------------
# Notebook 07: exact and approximate search
# ---------------------------------------------------------------------------------------------

SEARCH_COLOURS = {"exact": "0.35", "flat": "#3182bd", "ivfpq": "#e6550d", "hnsw": "#31a354"}


def plot_search_tradeoff(rows, sweeps=None, recall="recall@1"):
    """Recall against query time (left) and memory (right) of each kind of search.

    Left: for each kind in `sweeps`, a line through the settings `search.sweep_search` tried,
    each point labelled with its value (`nprobe` or `ef_search`), and one point for each other
    row of `search.benchmark_search` (a kind without a setting: exact, flat); time is on a log
    scale. Right: each row's index memory in MiB (log scale), labelled with its size.

    Args:
        rows: `benchmark_search`'s rows (`index`, `query_ms`, `memory_mib`, `recall`).
        sweeps: optional {kind: `sweep_search`'s rows}.
        recall: the row key drawn on the vertical axis.
    """
    fig = NotebookFigure(figsize=(11, 4.3), layout="constrained")
    ax, mem_ax = fig.subplots(1, 2, width_ratios=[1.6, 1])
    for kind, sweep in (sweeps or {}).items():
        times = [r["query_ms"] for r in sweep]
        ax.plot(times, [r[recall] for r in sweep], "-", color=SEARCH_COLOURS.get(kind), alpha=0.6,
                marker=".", label=f"{kind}, {sweep[0]['setting']} swept")
        for r in sweep:
            ax.annotate(str(r["value"]), (r["query_ms"], r[recall]), textcoords="offset points",
                        xytext=(3, -9), fontsize=7, color=SEARCH_COLOURS.get(kind))
    for row in rows:
        if row["index"] not in (sweeps or {}):
            ax.scatter(row["query_ms"], row[recall], s=60, color=SEARCH_COLOURS.get(row["index"]),
                       edgecolors="black", zorder=3, label=row["index"])
    ax.set_xscale("log")
    name = recall.replace("recall", "Recall")
    ax.set(xlabel="query time (ms per query, log scale)", ylabel=name,
           title=f"{name} against speed")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    labels = [row["index"] for row in rows]
    mebibytes = np.array([row["memory_mib"] for row in rows], dtype=float)
    bars = mem_ax.barh(labels, mebibytes,
                       color=[SEARCH_COLOURS.get(label, "tab:blue") for label in labels])
    mem_ax.bar_label(bars, labels=[_format_mib(mib) for mib in mebibytes], padding=4)
    mem_ax.set_xscale("log")
    mem_ax.set_xlim(mebibytes.min() / 3, mebibytes.max() * 10)
    mem_ax.invert_yaxis()
    mem_ax.set(xlabel="memory (MiB, log scale)", title="index memory")
    return fig
