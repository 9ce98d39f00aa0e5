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


def test_random_boxes_same_number_and_sizes_on_distinct_images():
    suggested = [{"image": "a", "boxes": [[0, 0, 10, 20], [5, 5, 8, 9]]}, {"image": "b", "boxes": []},
                 {"image": "c", "boxes": [[3, 4, 33, 10]]}]
    shapes = {"w": (100, 100), "x": (40, 60), "y": (64, 64), "z": (50, 40)}
    drawn = al.random_boxes(suggested, shapes, np.random.default_rng(3))
    assert drawn == al.random_boxes(suggested, shapes, np.random.default_rng(3))  # seeded
    assert len(drawn) == 3 and len({d["image"] for d in drawn}) == 3 and {d["image"] for d in drawn} <= set(shapes)

    def sizes(entries):
        return [[(y1 - y0, x1 - x0) for y0, x0, y1, x1 in e["boxes"]] for e in entries]

    assert sizes(drawn) == sizes(suggested)
    for d in drawn:
        height, width = shapes[d["image"]]
        assert all(0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width for y0, x0, y1, x1 in d["boxes"])
    # a box larger than its image is cut to it; more suggested images than scribbled ones: one each
    big = al.random_boxes([{"image": "a", "boxes": [[0, 0, 500, 30]]}] * 2, {"x": (40, 60)}, np.random.default_rng(0))
    assert big == [{"image": "x", "boxes": [[0, big[0]["boxes"][0][1], 40, big[0]["boxes"][0][1] + 30]]}]
    assert al.random_boxes([], shapes, np.random.default_rng(0)) == []


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
            "--round_steps", "2", "--results", str(results)]
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
    assert by["uncertain", 1]["n_boxes"] == by["random", 1]["n_boxes"] == sum(len(s["boxes"]) for s in suggested)
    # the dataset folder is untouched
    assert {p.name: p.read_bytes() for p in (data / "scribbles").iterdir()} == before
    text = results.with_suffix(".md").read_text()
    assert "## Variant images" in text and "## Variant regions" in text and text.count("### Targets") == 2
    assert "| uncertain | 0 | 1 | 2 |" in text and "| uncertain | 0 | 1 | 4 |" in text
    assert results.with_suffix(".svg").read_text().count("scribbled pixels</text>") == 4  # two rows of two panels
    # resumable: a second call trains nothing
    assert al.main(argv) == 0
    assert [r["date"] for r in json.loads(results.read_text())] == [r["date"] for r in records]
