from __future__ import annotations

import hashlib
import json

import pytest

from s2l_monai.data.datalist import ensure_datalist, item_id, legacy_aliases, legacy_item_id, load_datalist
from s2l_monai.errors import DataError


def test_item_id_is_a_readable_stem_and_a_hash_of_the_path():
    assert item_id("images/a.png") == "a-" + hashlib.sha1(b"images/a.png").hexdigest()[:8]
    assert item_id("x/y/vol.nii.gz").startswith("vol-")
    assert item_id("img.ome.tif").startswith("img-")
    assert item_id("./images/a.png") == item_id("images/a.png")  # normalised path
    # the old rule's collisions and hidden names are gone
    assert item_id("a/b.png") != item_id("a__b.png")
    for path in ("../x.png", "../../x.png", ".hidden.png", "..png", "a/.b.tif"):
        assert not item_id(path).startswith("."), path
    assert item_id("../x.png") != item_id("../../x.png")
    assert legacy_item_id("images/a.png") == "images__a"  # the rule of <= 0.4, for migrations


def test_legacy_aliases_map_old_ids_to_new(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [
        {"image": "images/a.png", "scribble": "s/a.png"}, {"image": "b.png", "scribble": "s/b.png", "id": "own"}]}))
    assert legacy_aliases(tmp_path) == {"images__a": item_id("images/a.png")}
    assert legacy_aliases(tmp_path / "missing") == {}


def test_load_resolves_paths_and_adds_ids(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "a_s.png", "b.png", "b_s.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "datalist.json").write_text(json.dumps({
        "training": [{"image": "images/a.png", "scribble": "images/a_s.png"},
                     {"image": "images/b.png", "scribble": "images/b_s.png", "id": "custom"}],
    }))
    items = load_datalist(tmp_path, "training")
    assert [i["id"] for i in items] == [item_id("images/a.png"), "custom"]
    assert items[0]["image"] == str(tmp_path / "images" / "a.png")
    assert load_datalist(tmp_path, "test") == []


def test_missing_files_are_all_listed(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({
        "training": [{"image": "a.png", "scribble": "a_s.png"}, {"image": "b.png", "scribble": "b_s.png"}]}))
    with pytest.raises(DataError) as err:
        load_datalist(tmp_path, "training")
    for name in ("a.png", "a_s.png", "b.png", "b_s.png"):
        assert str(tmp_path / name) in str(err.value)
    assert len(err.value.problems) == 4


def test_missing_keys_and_duplicate_ids_are_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "x.png"}]}))
    with pytest.raises(ValueError, match="scribble"):
        load_datalist(tmp_path, "training")
    (tmp_path / "datalist.json").write_text(json.dumps(
        {"training": [{"image": "x.png", "scribble": "x.png"}, {"image": "x.png", "scribble": "x.png"}]}))
    with pytest.raises(ValueError, match="share the id"):
        load_datalist(tmp_path, "training")


def test_synthetic_set_only_in_empty_or_missing_folder(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "photo.png").write_bytes(b"")
    with pytest.raises(DataError, match="s2l prepare folder"):
        ensure_datalist(tmp_path / "user")
    with pytest.raises(DataError, match="folder does not exist"):
        load_datalist(tmp_path / "typo", "training", synthesize_if_missing=False)
    assert not (tmp_path / "typo").exists()
    path = ensure_datalist(tmp_path / "fresh")
    assert path == tmp_path / "fresh" / "datalist.json"
    assert len(load_datalist(tmp_path / "fresh", "training")) == 24
