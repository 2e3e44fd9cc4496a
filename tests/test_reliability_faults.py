"""Issue #28: untrusted input, real faults, concurrent runs. Each test is one case of a class
(data loss, concurrent writers, reads outside the root, caches, disk faults, network, tracebacks,
images) that failed before the fix: a clear exit-2 error every time, nothing of the user's lost."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netvlad_tutorial import synthetic
from netvlad_tutorial.cli import main as cli_main
from netvlad_tutorial.synthetic import city_is_current, make_synthetic_city


def _cli_error(capsys, argv):
    """Run the CLI, expect exit 2 with one `error: ` line; return that message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(re.findall("^error: ", err, flags=re.M)) == 1, err
    return err[err.index("error: "):].strip()


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def city(micro_city, tmp_path):
    """A copy of the micro city to change freely."""
    return Path(shutil.copytree(micro_city, tmp_path / "city"))


# ---------------------------------------------------------------------------------------------
# 1. Data loss: make-synthetic deletes only the files it wrote
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "000/my_photo.jpg", "queries_real/extra.jpg",
                                  "netvlad_v100_datasets/datasets/mine_train.mat"])
def test_make_synthetic_refuses_a_city_holding_other_files(city, name, capsys):
    (city / name).parent.mkdir(parents=True, exist_ok=True)
    (city / name).write_bytes(b"the user's own file")
    before = _files(city)
    err = _cli_error(capsys, ["make-synthetic", "--out", city, "--preset", "micro"])
    assert name.split("/")[-1] in err and "did not write" in err
    assert _files(city) == before


def test_a_folder_named_like_a_leftover_but_not_ours_is_kept(city):
    mine = city.parent / ".city.backup.partial" / "thesis.txt"
    mine.parent.mkdir()
    mine.write_bytes(b"keep me")
    make_synthetic_city(city, preset="micro", seed=1)
    assert mine.read_bytes() == b"keep me" and city_is_current(city, "micro", 1)


def test_replacing_a_city_deletes_only_its_named_files(city, monkeypatch):
    """The old city's files go by name (`city_files`), never by `rmtree` of the folder."""
    named = synthetic.city_files(city)
    assert {p for p in _files(city)} == named  # the micro city is exactly its named files
    removed = []
    real = synthetic._remove_named
    monkeypatch.setattr(synthetic, "_remove_named",
                        lambda folder, names: removed.append(set(names)) or real(folder, names))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: pytest.fail("rmtree of a city"))
    make_synthetic_city(city, preset="micro", seed=1)
    assert removed[0] == named
    assert not [p for p in city.parent.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# 2. Concurrent writers of one folder: the second is refused, the folder stays consistent
# ---------------------------------------------------------------------------------------------


class _LockHolder:
    """Another process holding `lock_file` (`filelock`), as a running writer would."""

    def __init__(self, lock_file):
        code = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
                "lock.acquire(); print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_a_second_make_synthetic_on_one_folder_is_refused(city, capsys):
    before = _files(city)
    holder = _LockHolder(city.parent / ".city.lock")
    try:
        err = _cli_error(capsys, ["make-synthetic", "--out", city, "--preset", "micro",
                                  "--seed", "3"])
    finally:
        holder.release()
    assert "another process" in err and str(city) in err
    assert _files(city) == before
    make_synthetic_city(city, preset="micro", seed=3)  # the lock is free again
    assert city_is_current(city, "micro", 3)


def test_a_second_train_on_one_run_folder_is_refused(micro_city, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"seed": 1}')  # the first run's, being written
    holder = _LockHolder(run_dir / ".lock")
    try:
        err = _cli_error(capsys, ["train", "--data-root", micro_city, "--out", run_dir,
                                  "--overwrite", "--seed", "2"])
    finally:
        holder.release()
    assert "another process" in err and "train" in err
    assert json.loads((run_dir / "config.json").read_text()) == {"seed": 1}
