"""The precision benchmark (`benchmarks/precision.py`) runs its four paths and names the choice."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import precision as precision_bench  # noqa: E402  (benchmarks/precision.py)


def test_four_paths_measured_and_the_auto_choice_printed(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NETVLAD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NETVLAD_PRECISION", raising=False)
    rates = precision_bench.main(["--size", "32", "32", "--batch", "1", "--reps", "1"])
    assert list(rates) == [name for name, _, _ in precision_bench.PATHS]
    assert all(r > 0 for r in rates.values())
    out = capsys.readouterr().out
    assert "bf16 + channels_last / fp32 channels_last" in out and "auto: precision:" in out
