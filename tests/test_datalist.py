from __future__ import annotations

import json

import pytest

from s2l_monai.data.datalist import ensure_datalist, item_id, load_datalist


def test_item_id_is_stable_and_flat():
    assert item_id("images/a.png") == "images__a"
    assert item_id("x/y/vol.nii.gz") == "x__y__vol"
    assert item_id("img.ome.tif") == "img"


def test_load_resolves_paths_and_adds_ids(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "a_s.png", "b.png", "b_s.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    (tmp_path / "datalist.json").write_text(json.dumps({
        "training": [{"image": "images/a.png", "scribble": "images/a_s.png"},
                     {"image": "images/b.png", "scribble": "images/b_s.png", "id": "custom"}],
    }))
    items = load_datalist(tmp_path, "training")
    assert [i["id"] for i in items] == ["images__a", "custom"]
    assert items[0]["image"] == str(tmp_path / "images" / "a.png")
    assert load_datalist(tmp_path, "test") == []


def test_missing_files_are_all_listed(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({
        "training": [{"image": "a.png", "scribble": "a_s.png"}, {"image": "b.png", "scribble": "b_s.png"}]}))
    with pytest.raises(FileNotFoundError) as err:
        load_datalist(tmp_path, "training")
    for name in ("a.png", "a_s.png", "b.png", "b_s.png"):
        assert name in str(err.value)


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
    with pytest.raises(FileNotFoundError, match="s2l prepare folder"):
        ensure_datalist(tmp_path / "user")
    path = ensure_datalist(tmp_path / "fresh")
    assert path == tmp_path / "fresh" / "datalist.json"
    assert len(load_datalist(tmp_path / "fresh", "training")) == 24
