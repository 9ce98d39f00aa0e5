"""``benchmarks/active_learning.py`` end to end on a tiny synthetic set: real trainings, suggestions and evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import active_learning as al  # noqa: E402
from s2l_monai.data.synthetic import make_synthetic_dataset  # noqa: E402

pytestmark = pytest.mark.slow


def test_choose_next_random_is_seeded_and_unique():
    pool = [{"image": f"/x/{i}.png"} for i in range(10)]
    a, _ = al.choose_next("random", pool, 3, np.random.default_rng(5), model=None, in_channels=1)
    b, _ = al.choose_next("random", pool, 3, np.random.default_rng(5), model=None, in_channels=1)
    assert a == b and len({p["image"] for p in a}) == 3
    assert al.choose_next("random", pool, 0, np.random.default_rng(5), model=None, in_channels=1) == ([], {})


def test_simulated_annotator_rounds(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=0, n_test=2, shape=(128, 128), seed=4).parent
    results = tmp_path / "res" / "al.json"
    argv = ["--dataset_dir", str(data), "--datalist_name", "datalist.json", "--work", str(tmp_path / "work"),
            "--seeds", "0", "--rounds", "1", "--start", "0.34", "--add", "0.34", "--first_steps", "4",
            "--round_steps", "2", "--results", str(results)]
    assert al.main(argv) == 0
    records = json.loads(results.read_text())
    by = {(r["strategy"], r["round"]): r for r in records}
    assert set(by) == {("uncertain", 0), ("uncertain", 1), ("random", 0), ("random", 1)}
    # both strategies start from the same images and the same model; each round adds two images
    assert by["uncertain", 0]["images"] == by["random", 0]["images"] and by["uncertain", 0]["n_images"] == 2
    assert by["uncertain", 0]["iou"] == by["random", 0]["iou"]
    for strategy in al.STRATEGIES:
        first, second = by[strategy, 0], by[strategy, 1]
        assert second["n_images"] == 4 and set(first["images"]) < set(second["images"])
        assert second["scribbled_pixels"] > first["scribbled_pixels"] > 0
        assert 0.0 <= second["iou"] <= 1.0
    # the uncertain pick: the two pool images the round-0 model is least sure about
    _, training, _ = al.absolute_items(data, "datalist.json")
    pool = [i for i in training if i["image"] not in set(by["uncertain", 0]["images"])]
    model = tmp_path / "work" / "active_learning" / "s0_r0" / "ckpt" / "model.pt"
    picks, shares = al.choose_next("uncertain", pool, 2, None, model, 1)
    added = set(by["uncertain", 1]["images"]) - set(by["uncertain", 0]["images"])
    assert added == {p["image"] for p in picks}
    assert min(shares[a] for a in added) >= max(v for k, v in shares.items() if k not in added)
    text = results.with_suffix(".md").read_text()
    assert "| uncertain | 0 | 1 | 4 |" in text and "## Targets" in text
    assert results.with_suffix(".svg").read_text().startswith("<svg")
    # resumable: a second call trains nothing
    assert al.main(argv) == 0
    assert json.loads(results.read_text())[0]["date"] == records[0]["date"]
