"""experiments/tiny_recipes.py resumes only its own search: another search's file is refused."""

import importlib.util
import json

import pytest

from netvlad_tutorial.utils import REPO_ROOT


def _script():
    spec = importlib.util.spec_from_file_location(
        "tiny_recipes", REPO_ROOT / "experiments" / "tiny_recipes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


FRESH = {"preset": "tiny", "base": {"lr": 0.003, "epochs": 2}, "precision": "fp32",
         "cpu": "x", "rows": []}


def test_the_same_search_resumes_and_a_missing_file_starts_fresh(tmp_path):
    script = _script()
    path = tmp_path / "t.json"
    assert script.load_table(path, FRESH) is FRESH
    assert script.load_table(None, FRESH) is FRESH
    saved = {**FRESH, "rows": [{"changes": {"lr": 0.03}}]}
    path.write_text(json.dumps(saved))
    assert script.load_table(path, FRESH) == saved  # its finished rows are kept


@pytest.mark.parametrize("text, message", [
    (json.dumps({**FRESH, "base": {"lr": 0.01, "epochs": 3}}), "holds another search"),
    (json.dumps({**FRESH, "preset": "tiny-random"}), "holds another search"),
    ("{not json", "not a table of this script"),
    (json.dumps({"rows": []}), "not a table of this script"),
])
def test_another_search_or_a_damaged_file_is_refused_and_left_as_it_is(tmp_path, text, message):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        _script().load_table(path, FRESH)
    assert path.read_text() == text
