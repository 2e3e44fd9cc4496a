"""The seed comparison (`experiments/tiny_seeds.py`): its means and paired differences, against a
hand computation on made-up runs (training itself is replaced)."""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import tiny_seeds  # noqa: E402  (experiments/tiny_seeds.py)

# (seed, batch size) -> (validation, test) R@1/5/10 in percent, as if trained.
FAKE = {(1, 2): ((40, 70, 80), (41, 72, 88)), (1, 4): ((38, 71, 80), (42, 70, 88)),
        (2, 2): ((36, 74, 90), (39, 75, 90)), (2, 4): ((37, 72, 85), (37, 73, 91)),
        (3, 2): ((35, 70, 85), (44, 71, 86)), (3, 4): ((35, 69, 86), (40, 71, 85))}


def test_means_and_paired_differences(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_run(config, out, root, precision):
        seen.append((config.seed, config.batch_size, precision))
        val, test = FAKE[(config.seed, config.batch_size)]
        row = lambda r: {f"recall@{n}": v / 100 for n, v in zip((1, 5, 10), r)}  # noqa: E731
        return {"epoch": 3, **row(val)}, row(test), 1.0

    monkeypatch.setattr(tiny_seeds, "train_and_test", fake_run)
    monkeypatch.setattr(tiny_seeds, "ensure_synthetic_city", lambda root: Path(root))
    out = tmp_path / "seeds.json"
    result = tiny_seeds.main(["--data-root", str(tmp_path), "--seeds", "1", "2", "3",
                              "--json", str(out)])
    # Every seed trains both recipes, batch 2 first, in fp32 by default.
    assert seen == [(s, b, "fp32") for s in (1, 2, 3) for b in (2, 4)]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    new, old = tiny_seeds.RECIPES
    for split, i in (("val", 0), ("test", 1)):
        for name, b in ((new, 2), (old, 4)):
            cols = list(zip(*(FAKE[(s, b)][i] for s in (1, 2, 3))))
            assert result["mean"][name][split] == [round(statistics.mean(c), 2) for c in cols]
            assert result["stdev"][name][split] == [round(statistics.stdev(c), 2) for c in cols]
    # Test R@1 per seed: 41-42, 39-37, 44-40 -> -1, +2, +4: mean 1.67, higher in 2, lower in 1.
    paired = result["paired"]["test"]
    assert paired["mean_difference"][0] == 1.67
    assert paired["higher_lower_seeds"][0] == (2, 1)
    # R@10: 0, -1, +1 -> one tie.
    assert paired["higher_lower_seeds"][2] == (1, 1)
    assert "batch 2 - batch 4, paired by seed" in capsys.readouterr().out
