"""``benchmarks/active_learning.py`` end to end on a tiny synthetic set: real trainings, suggestions and evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def images_run(tmp_path_factory):
    """The images variant on the synthetic set, 1 round, both strategies (the regions test reuses its round 0)."""
    tmp_path = tmp_path_factory.mktemp("al")
    data = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=0, n_test=2, shape=(128, 128), seed=4).parent
    results = tmp_path / "res" / "al.json"
    argv = ["--dataset_dir", str(data), "--datalist_name", "datalist.json", "--work", str(tmp_path / "work"),
            "--seeds", "0", "--rounds", "1", "--start", "0.34", "--add", "0.34", "--first_steps", "4",
            "--round_steps", "2", "--results", str(results)]
    assert al.main(argv) == 0
    return SimpleNamespace(tmp=tmp_path, data=data, results=results, argv=argv,
                           records=json.loads(results.read_text()))


def test_simulated_annotator_rounds(images_run):
    data, results, argv, records = images_run.data, images_run.results, images_run.argv, images_run.records
    tmp_path = images_run.tmp
    by = {(r["strategy"], r["round"]): r for r in records}
    assert set(by) == {("uncertain", 0), ("uncertain", 1), ("random", 0), ("random", 1)}
    assert {r["variant"] for r in records} == {"images"}
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
    assert "| uncertain | 0 | 1 | 4 |" in text and "## Variant images" in text and "### Targets" in text
    assert "## Variant regions" not in text and results.with_suffix(".svg").read_text().startswith("<svg")
    # resumable: a second call trains nothing
    assert al.main(argv) == 0
    assert json.loads(results.read_text())[0]["date"] == records[0]["date"]


# ------------------------------------------------------------------------------------------------------------------
# The regions variant
# ------------------------------------------------------------------------------------------------------------------

VALUES = {"background": 0, "foreground": 1, "unlabelled": 255}


def test_add_pieces_adds_exactly_the_pieces_that_meet_the_box():
    u = 255
    scribble = np.full((10, 10), u, np.uint8)
    scribble[0, 0:2] = 1  # an existing foreground stroke, away from everything
    scribble[2, 3] = 0  # an existing background stroke where the dense scribble says foreground: kept as it is
    dense = np.full((10, 10), u, np.uint8)
    dense[2, 2:5] = 1  # foreground piece A (3 px), inside the box
    dense[8, 8:10] = 1  # foreground piece B, outside
    dense[3, 5] = dense[4, 6] = 0  # background piece C: 8-connected, one pixel in the box, one outside
    dense[9, 0:3] = 0  # background piece D, outside
    dense[6, 0] = 1  # foreground piece E, outside (it touches no box)
    box = [2, 2, 4, 6]  # rows 2-3, columns 2-5
    merged, added = al.add_pieces(scribble, dense, [box], VALUES)
    expected = scribble.copy()
    expected[2, 2] = expected[2, 4] = 1  # A, less the pixel already scribbled background
    expected[3, 5] = expected[4, 6] = 0  # C, whole
    np.testing.assert_array_equal(merged, expected)
    assert added == 4 == np.count_nonzero(merged != u) - np.count_nonzero(scribble != u)
    assert merged[0, 0] == merged[0, 1] == 1 and merged[2, 3] == 0  # the strokes drawn before are all there
    assert np.count_nonzero(scribble != u) == 3  # the input is not modified
    # no box, or a box on unscribbled ground: nothing added
    assert al.add_pieces(scribble, dense, [], VALUES)[1] == 0
    assert al.add_pieces(scribble, dense, [[5, 5, 6, 6]], VALUES)[1] == 0
    with pytest.raises(ValueError, match="shape"):
        al.add_pieces(scribble, dense[:5], [box], VALUES)


def _pieces_case():
    """Two 10x10 images with known dense pieces (per image: foreground 3 + 2 px, background 4 px, one pixel of them
    already scribbled) and their current scribbles."""
    u = 255
    dense, scribbles = {}, {}
    for name, shift in (("a", 0), ("b", 4)):
        d = np.full((10, 10), u, np.uint8)
        d[1 + shift, 1:4] = 1  # foreground piece, 3 px
        d[5, 7:9] = 1  # foreground piece, 2 px
        d[8, 0:4] = 0  # background piece, 4 px
        s = np.full((10, 10), u, np.uint8)
        s[8, 0] = 0  # one pixel of the background piece is scribbled already
        s[0, 9] = 1  # a stroke away from every piece
        dense[name], scribbles[name] = d, s
    return scribbles, dense  # 8 px to add per image


def test_matched_random_boxes_stops_at_the_first_box_that_reaches_the_target():
    scribbles, dense = _pieces_case()
    whole = [{"image": "x", "boxes": [[0, 0, 10, 10]]}]  # a box that takes all of an image's pieces at once
    seen = set()
    for seed in range(6):
        drawn = al.matched_random_boxes(whole, scribbles, dense, VALUES, 5, np.random.default_rng(seed))
        # one image gives 8 >= 5: the first box is the last
        assert drawn["stop"] == "target" and drawn["n_boxes"] == 1 and drawn["added"] == 8 >= drawn["target"] == 5
        seen.add(drawn["selection"][0]["image"])
        # 9 needs both images (distinct images until each has been drawn): two boxes, all 16 px
        drawn = al.matched_random_boxes(whole, scribbles, dense, VALUES, 9, np.random.default_rng(seed))
        assert (drawn["stop"], drawn["n_boxes"], drawn["added"]) == ("target", 2, 16)
        assert sorted(s["image"] for s in drawn["selection"]) == ["a", "b"]
        # more than all the pieces hold: drawing stops when they are used up, and says so
        drawn = al.matched_random_boxes(whole, scribbles, dense, VALUES, 17, np.random.default_rng(seed))
        assert (drawn["stop"], drawn["added"], drawn["target"]) == ("exhausted", 16, 17)
    assert seen == {"a", "b"}  # the image is drawn at random
    assert al.matched_random_boxes(whole, scribbles, dense, VALUES, 0, np.random.default_rng(0)) == {
        "selection": [], "target": 0, "added": 0, "n_boxes": 0, "stop": "target"}
    # small boxes on one image: the sizes cycle through the suggested ones; the pieces the boxes touch, as add_pieces
    # counts them, reach the target with the last box and not without it
    one = {"a": scribbles["a"]}
    suggested = [{"image": "p", "boxes": [[0, 0, 2, 3]]}, {"image": "q", "boxes": [[5, 5, 6, 6], [0, 0, 1, 4]]}]
    for seed in range(20):
        drawn = al.matched_random_boxes(suggested, one, dense, VALUES, 6, np.random.default_rng(seed))
        assert drawn == al.matched_random_boxes(suggested, one, dense, VALUES, 6, np.random.default_rng(seed))
        assert drawn["stop"] == "target" and len(drawn["selection"]) == 1
        boxes = drawn["selection"][0]["boxes"]
        assert len(boxes) == drawn["n_boxes"] >= 1
        cycle = [(2, 3), (1, 1), (1, 4)]
        assert [(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes] == [cycle[i % 3] for i in range(len(boxes))]
        assert all(0 <= y0 < y1 <= 10 and 0 <= x0 < x1 <= 10 for y0, x0, y1, x1 in boxes)
        full = al.add_pieces(scribbles["a"], dense["a"], boxes, VALUES)[1]
        assert full == drawn["added"] >= 6 > al.add_pieces(scribbles["a"], dense["a"], boxes[:-1], VALUES)[1]
    # a box larger than its image is cut to it; the inputs are not modified
    big = al.matched_random_boxes([{"image": "p", "boxes": [[0, 0, 50, 3]]}], one, dense, VALUES, 1,
                                  np.random.default_rng(1))
    assert all(y1 - y0 == 10 and x1 - x0 == 3 for y0, x0, y1, x1 in big["selection"][0]["boxes"])
    assert np.count_nonzero(scribbles["a"] != 255) == 2
    with pytest.raises(ValueError, match="shape"):
        al.matched_random_boxes(whole, one, {"a": dense["a"][:5]}, VALUES, 1, np.random.default_rng(0))


def test_uncertain_round_from_record_or_selection_or_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="uncertain arm first"):
        al.uncertain_round(tmp_path, 0, 1, [])
    record = {"variant": "regions", "strategy": "uncertain", "seed": 0, "round": 1, "added_pixels": 12,
              "boxes": [["a.png", [[0, 0, 4, 4]]]]}
    other = {**record, "seed": 1, "added_pixels": 99}
    assert al.uncertain_round(tmp_path, 0, 1, [other, record]) == {
        "added_pixels": 12, "boxes": [{"image": "a.png", "boxes": [[0, 0, 4, 4]]}]}
    path = tmp_path / "active_learning" / "regions_uncertain_s0_r1" / "data" / "selection.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"strategy": "uncertain", "added_pixels": 7,
                                "selection": [{"image": "/d/a.png", "boxes": [[1, 1, 3, 3]]}]}))
    assert al.uncertain_round(tmp_path, 0, 1, [other])["added_pixels"] == 7
    with pytest.raises(RuntimeError, match="seed 0"):
        al.uncertain_round(tmp_path, 0, 2, [record])


def _dense_datalist(data: Path) -> None:
    """``datalist_dense.json`` beside the synthetic datalist: every skeleton piece (ratio 1) as the denser scribble."""
    from s2l_monai.data.checks import read_array
    from s2l_monai.data.scribbles import auto_scribbles

    datalist = json.loads((data / "datalist.json").read_text())
    for item in datalist["training"]:
        path = data / "scribbles_dense" / Path(item["scribble"]).name
        path.parent.mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(auto_scribbles(read_array(data / item["label"]), 1.0, 7, **VALUES)).save(path)
        item["scribble"] = str(path.relative_to(data))
    (data / "datalist_dense.json").write_text(json.dumps(datalist))


def test_simulated_annotator_regions_variant(images_run, tmp_path):
    """The regions variant after the images one, in the same folders: round 0 (model and scores) is shared."""
    from s2l_monai.data.checks import read_array

    data, results = images_run.data, images_run.results
    _dense_datalist(data)
    before = {p.name: p.read_bytes() for p in (data / "scribbles").iterdir()}
    # the images records as made before the variants existed (no variant field): read as the images variant
    old = [{k: v for k, v in r.items() if k != "variant"} for r in json.loads(results.read_text())]
    results.write_text(json.dumps(old))
    argv = ["--variant", "regions", "--dense_datalist", "datalist_dense.json", "--dataset_dir", str(data),
            "--datalist_name", "datalist.json", "--work", str(images_run.tmp / "work"), "--seeds", "0",
            "--rounds", "1", "--start", "0.34", "--region_images", "2", "--max_regions", "2", "--first_steps", "4",
            "--round_steps", "2", "--results", str(results), "--strategies", "random", "uncertain"]
    assert al.main(argv) == 0
    records = json.loads(results.read_text())
    assert sorted((r["variant"], r["strategy"], r["round"]) for r in records) == sorted(
        [(v, s, n) for v in al.VARIANTS for s in al.STRATEGIES for n in (0, 1)])
    by = {(r["strategy"], r["round"]): r for r in records if r["variant"] == "regions"}
    images0 = next(r for r in records if r["variant"] == "images" and r["round"] == 0)
    # the same start, model and scores for both arms; no new image, only pixels
    assert by["uncertain", 0]["images"] == by["random", 0]["images"] == images0["images"]
    assert by["uncertain", 0]["iou"] == by["random", 0]["iou"] == images0["iou"]
    work = images_run.tmp / "work" / "active_learning"
    _, training, _ = al.absolute_items(data, "datalist.json")
    _, dense_items, _ = al.absolute_items(data, "datalist_dense.json")
    dense = {i["image"]: i["scribble"] for i in dense_items}
    start = [i for i in training if i["image"] in set(by["uncertain", 0]["images"])]
    for strategy in al.STRATEGIES:
        first, second = by[strategy, 0], by[strategy, 1]
        assert second["images"] == first["images"] and first["added_pixels"] == 0
        assert second["scribbled_pixels"] == first["scribbled_pixels"] + second["added_pixels"]
        # the merged scribbles live in the run folder; every stroke of the start is still there
        items = json.loads((work / f"regions_{strategy}_s0_r1" / "data" / "datalist.json").read_text())["training"]
        assert sum(al.scribbled_pixels(i, 255) for i in items) == second["scribbled_pixels"]
        for item, original in zip(items, start):
            merged, scribble = read_array(item["scribble"]), read_array(original["scribble"])
            kept = scribble != 255
            np.testing.assert_array_equal(merged[kept], scribble[kept])
            if item["scribble"] != original["scribble"]:
                assert str(work) in item["scribble"]
                new = (merged != 255) & ~kept
                np.testing.assert_array_equal(merged[new], read_array(dense[item["image"]])[new])
    # the uncertain arm scribbled the regions s2l suggest ranks first for the round-0 model
    model = work / "s0_r0" / "ckpt" / "model.pt"
    suggested = al.suggested_boxes(work / "s0_r0" / "train", start, 2, 2, tmp_path / "sugg", model, 1)
    assert by["uncertain", 1]["boxes"] == [[Path(s["image"]).name, s["boxes"]] for s in suggested if s["boxes"]]
    assert by["uncertain", 1]["n_boxes"] == sum(len(s["boxes"]) for s in suggested)
    # the random arm is pixel-matched to it (run after it although listed first in --strategies): its boxes add at
    # least as many pixels, or every piece was used up
    uncertain, random = by["uncertain", 1], by["random", 1]
    assert random["target_pixels"] == uncertain["added_pixels"] and "target_pixels" not in uncertain
    assert random["stop"] in ("target", "exhausted") and random["n_boxes"] >= 1
    assert random["added_pixels"] >= uncertain["added_pixels"] or random["stop"] == "exhausted"
    saved = json.loads((work / "regions_random_s0_r1" / "data" / "selection.json").read_text())
    assert saved["added_pixels"] == saved["drawn_pixels"] == random["added_pixels"]
    assert saved["target_pixels"] == random["target_pixels"] and saved["n_boxes"] == random["n_boxes"]
    assert al.uncertain_round(images_run.tmp / "work", 0, 1, [])["added_pixels"] == uncertain["added_pixels"]
    # the dataset folder is untouched
    assert {p.name: p.read_bytes() for p in (data / "scribbles").iterdir()} == before
    text = results.with_suffix(".md").read_text()
    assert "## Variant images" in text and "## Variant regions" in text and text.count("### Targets") == 2
    assert "| uncertain | 0 | 1 | 2 |" in text and "| uncertain | 0 | 1 | 4 |" in text and "pixel-matched" in text
    assert f"| random | 0 | 1 | 2 | {random['n_boxes']} | {random['added_pixels']:,}" in text
    assert results.with_suffix(".svg").read_text().count("scribbled pixels</text>") == 4  # two rows of two panels
    # resumable: a second call trains nothing
    assert al.main(argv) == 0
    assert [r["date"] for r in json.loads(results.read_text())] == [r["date"] for r in records]
    # a random-arm record from before the pixel matching is not reused
    results.write_text(json.dumps([{k: v for k, v in r.items() if k != "target_pixels"} for r in records]))
    with pytest.raises(RuntimeError, match="pixel-matched"):
        al.main(argv)


def test_targets_use_the_mean_over_seeds():
    """The 'all-scribbled IoU with half the pixels' target counts a round when its MEAN over seeds reaches the
    reference, not when one seed does; 'beats random' needs the lead over random's seed std at every round."""

    def rec(strategy, seed, rnd, iou, px):
        return {"variant": "images", "strategy": strategy, "seed": seed, "round": rnd, "iou": iou,
                "scribbled_pixels": px}

    records = [rec("uncertain", 0, 1, 0.86, 40), rec("uncertain", 1, 1, 0.80, 60),  # mean 0.83 < 0.845
               rec("uncertain", 0, 2, 0.85, 70), rec("uncertain", 1, 2, 0.84, 90),  # mean 0.845: reached, 80 px
               rec("random", 0, 1, 0.80, 40), rec("random", 1, 1, 0.82, 60),
               rec("random", 0, 2, 0.81, 70), rec("random", 1, 2, 0.83, 90)]
    beats, half = al.targets(records, {"iou": 0.845, "scribbled_pixels": 200})
    # round 1: 0.83 - 0.81 = 0.02 > std 0.0141; round 2: 0.845 - 0.82 = 0.025 > 0.0141
    assert beats[1] == "PASS" and "round 1: 0.8300 vs 0.8100 ± 0.0141" in beats[2]
    assert half[1] == "PASS" and "round 2: IoU 0.8450 with 80 px (mean over seeds)" in half[2]
    # 80 px is not at most half of 150: FAIL, although seed 0 alone passed the reference in round 1 with 40 px
    assert al.targets(records, {"iou": 0.845, "scribbled_pixels": 150})[1][1] == "FAIL"
    none = al.targets(records, {"iou": 0.9, "scribbled_pixels": 200})[1]
    assert none[1] == "FAIL" and "no round; best round 2: IoU 0.8450 with 80 px (mean over 2 seed(s))" in none[2]
