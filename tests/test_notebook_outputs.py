"""The stored notebooks are clean to read on GitHub: no errors, machine paths, warnings or
progress-bar floods in their outputs, and every cell with outputs has its execution count."""

import json
import os
import re
import tempfile
from pathlib import Path

import pytest

from netvlad_tutorial.cli import squash_progress

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_STDERR_CHUNKS = 40  # per notebook: a progress bar ends as one line, not one per update
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# What a widget progress bar (`tqdm.auto` in a kernel) leaves in a stored output: its repr.
WIDGET_REPR = re.compile(r"\b(HBox|VBox|FloatProgress|IntProgress|HTML)\(")


def _text(output):
    return "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))


def _machine_paths():
    """Absolute paths of the machine that ran a notebook: checkout, temp and home folders."""
    roots = {str(ROOT), tempfile.gettempdir(), os.path.expanduser("~"), "/tmp"} - {"", "/"}
    return re.compile("|".join([re.escape(r.rstrip("/") + "/") for r in sorted(roots)]
                               + [r"ipykernel_\d+"]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_outputs_are_clean(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and any(c.get("outputs") for c in code), "no stored outputs"
    paths, problems, stderr_chunks = _machine_paths(), [], 0
    for i, cell in enumerate(cells):
        for out in cell.get("outputs", []):
            text = _text(out)
            if out.get("output_type") == "error":
                problems.append(f"cell {i}: stored error {out.get('ename')}")
            if paths.search(text):
                problems.append(f"cell {i}: machine path {paths.search(text).group(0)!r}")
            if re.search(r"[A-Za-z]+Warning\b", text):
                problems.append(f"cell {i}: warning in the output")
            if out.get("name") == "stderr":
                stderr_chunks += 1 + text.count("\r")  # each update of a bar is a chunk
            if WIDGET_REPR.search(text):
                problems.append(f"cell {i}: widget repr {WIDGET_REPR.search(text).group(0)!r}")
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is not None and not text.startswith("IntSlider("):
                problems.append(f"cell {i}: a stored widget other than the query slider")
        if cell.get("outputs") and cell.get("execution_count") is None:
            problems.append(f"cell {i}: outputs without an execution_count (nbval fails)")
    if stderr_chunks > MAX_STDERR_CHUNKS:
        problems.append(f"{stderr_chunks} stderr chunks (progress bars not squashed)")
    assert not problems, "\n".join(problems)


# The query slider of `viz.explore_queries` (an IntSlider with its layout and style): what
# Jupyter stores for it is plain settings, and GitHub shows the figure stored above it.
HARMLESS_WIDGETS = {"IntSliderModel", "LayoutModel", "SliderStyleModel", "DescriptionStyleModel"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_widget_state_is_harmless(path):
    widgets = json.loads(path.read_text(encoding="utf-8"))["metadata"].get("widgets", {})
    state = widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    models = {m.get("model_name") for m in state.values()}
    assert models <= HARMLESS_WIDGETS, f"unexpected stored widgets: {models - HARMLESS_WIDGETS}"
    assert not _machine_paths().search(json.dumps(widgets)), "machine path in the widget state"


def test_squash_progress_keeps_what_a_terminal_shows():
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="Caching:   0%|  | 0/3\r"),
        nbformat.v4.new_output("stream", name="stderr", text="Caching:  33%|# | 1/3\r"),
        nbformat.v4.new_output("stream", name="stderr", text="Caching: 100%|##| 3/3\n"),
        nbformat.v4.new_output("stream", name="stdout", text="epoch 0\n"),
        nbformat.v4.new_output("stream", name="stderr", text="Training: 50%\r        \r"),
        nbformat.v4.new_output("stream", name="stderr", text="Mining: 100%|##| 2/2\n"),
        nbformat.v4.new_output("stream", name="stdout", text="neg_counts:"),
        nbformat.v4.new_output("stream", name="stdout", text=" [4, 4]\r\n"),
    ]
    nb.cells.append(cell)
    out = squash_progress(nb).cells[0].outputs
    assert [(o["name"], o["text"]) for o in out] == [
        ("stderr", "Caching: 100%|##| 3/3\n"), ("stdout", "epoch 0\n"),
        ("stderr", "Mining: 100%|##| 2/2\n"),  # a cleared bar (leave=False) leaves nothing
        ("stdout", "neg_counts: [4, 4]\r\n")]  # one line printed in two chunks; stdout as is


def test_run_notebooks_executes_in_place_quietly_and_leaves_no_socket_files(tmp_path):
    """`run-notebooks` (what `make tutorial` calls) stores the outputs and execution counts, runs
    the kernel in the notebook's folder, prints one line per notebook and nothing else: on POSIX
    the kernel's sockets are files in a private temporary folder, so ipykernel has no
    unencrypted-TCP warning to print and no socket file is left beside the notebook."""
    import subprocess
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook()
    source = "import os\nprint(6 * 7, os.path.basename(os.getcwd()))"
    nb.cells = [nbformat.v4.new_code_cell(source)]
    folder = tmp_path / "course"
    folder.mkdir()
    path = folder / "tiny.ipynb"
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "netvlad_tutorial", "run-notebooks", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cell = nbformat.read(path, as_version=4).cells[0]
    assert cell.execution_count == 1
    assert [o.get("text") for o in cell.outputs] == ["42 course\n"]
    assert run.stdout.startswith(f"{path}: executed in "), run.stdout
    assert run.stdout.count("\n") == 1, run.stdout
    if os.name == "posix":
        assert "without encryption" not in run.stderr, run.stderr
        assert sorted(p.name for p in folder.iterdir()) == ["tiny.ipynb"]


def test_run_notebooks_stores_progress_bars_as_text_not_widgets(tmp_path):
    """In a kernel the package's bars are widgets (`tqdm.auto`); `run-notebooks` asks for text
    bars, so that the stored notebook holds the bar's last line and no widget repr or state.
    The kernel is also what `precision.in_notebook` recognizes."""
    import subprocess
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import os\nfrom netvlad_tutorial.utils import progress_bar, PROGRESS_ENV\n"
        "for _ in progress_bar(range(3), desc='Counting'):\n    pass\n"
        "del os.environ[PROGRESS_ENV]\n"
        "from tqdm.notebook import tqdm as tqdm_notebook\n"
        "print('widget:', isinstance(progress_bar(range(1), disable=True), tqdm_notebook))\n"
        "from netvlad_tutorial.precision import in_notebook\n"
        "print('notebook:', in_notebook())")]
    path = tmp_path / "bars.ipynb"
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NETVLAD_PROGRESS"}
    run = subprocess.run([sys.executable, "-m", "netvlad_tutorial", "run-notebooks", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    stored = nbformat.read(path, as_version=4)
    outputs = stored.cells[0].outputs
    assert [o.get("name") for o in outputs] == ["stderr", "stdout"], outputs
    assert outputs[0]["text"].startswith("Counting: 100%|") and outputs[0]["text"].count("\n") == 1
    # without the variable: a widget bar; and a kernel is a notebook ("auto" is fp32 there)
    assert outputs[1]["text"] == "widget: True\nnotebook: True\n"
    assert "widgets" not in stored.metadata and not WIDGET_REPR.search(path.read_text())
