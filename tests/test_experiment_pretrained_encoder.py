"""experiments/pretrained_encoder.py on the micro city: every paired comparison is read back."""

import importlib.util
import json

import torch

from netvlad_tutorial.backbone import vgg16_features
from netvlad_tutorial.config import PRESETS
from netvlad_tutorial.data import load_split
from netvlad_tutorial.utils import REPO_ROOT

MICRO = dict(image_size=(32, 48), num_clusters=4, epochs=1, n_neg=2, n_neg_sample=20,
             n_neg_dist=10, cache_refresh=8, kmeans_images=20, kmeans_per_image=4,
             kmeans_iters=10, precision="fp32", device="cpu")


def test_script_runs_and_reports_paired_tests(micro_city, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "pretrained_encoder", REPO_ROOT / "experiments" / "pretrained_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setitem(PRESETS, "tiny-random", PRESETS["tiny-random"].replace(**MICRO))
    monkeypatch.setitem(PRESETS, "micro-pretrained", PRESETS["tiny"].replace(**MICRO))
    encoder = tmp_path / "encoder.pth"  # stands for `pretrain`'s output: a VGG16 state dict
    torch.manual_seed(0)
    torch.save(vgg16_features()[:-2].state_dict(), encoder)
    out = tmp_path / "result.json"
    result = script.main(["--encoder", str(encoder), "--root", str(micro_city), "--seeds", "1",
                          "--lrs", "0.001", "--base", "micro-pretrained",
                          "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["lr"] == 0.001 and [r["seed"] for r in result["fine_tuned"]] == [1]
    num_q = load_split(micro_city, "test").db.numQ
    for rows in [result["pretrained_vs_random"], *result["fine_tuned"]]:
        for n in (1, 5, 10):
            row = rows[f"R@{n}"]
            assert 0 <= row["p"] <= 1
            # the recall moves by exactly the fixed minus the broken queries
            assert round((row["after"] - row["before"]) * num_q / 100) == (
                row["fixed"] - row["broken"])
    gain = result["fine_tuned"][0]["R@1"]
    assert result["mean_gain_r1"] == round(gain["after"] - gain["before"], 1)
    table = script.render_table(result)  # the README's table is this function of the file
    rows = [r for r in table.splitlines() if r.startswith("| ") and "→" in r]
    assert len(rows) == 1 + len(result["fine_tuned"])
    r1 = result["fine_tuned"][0]["R@1"]
    assert f"{r1['before']} → {r1['after']} (+{r1['fixed']}/−{r1['broken']}" in rows[1]


def test_the_readme_table_is_the_committed_result_rendered():
    spec = importlib.util.spec_from_file_location(
        "pretrained_encoder", REPO_ROOT / "experiments" / "pretrained_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    files = sorted((REPO_ROOT / "experiments" / "results").glob("pretrained_encoder_*.json"))
    assert files, "run experiments/pretrained_encoder.py --json and commit its result"
    newest = max(files, key=lambda p: json.loads(p.read_text())["date"])
    readme = (REPO_ROOT / "README.md").read_text()
    assert script.render_table(json.loads(newest.read_text())) in readme
