"""Tests of the BBBC038 / DSB2018 preparation on a tiny fake archive with the real layout, and on the real one."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s2l_monai.data.dsb2018 import (
    assemble_labels,
    classify_modality,
    image_rng,
    prepare_dsb2018,
    ratio_tag,
    split_ids,
)

MODALITY_OF_PREFIX = {"f": "fluorescence", "b": "brightfield", "h": "histopathology"}
SIZE = 48


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _disc(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.uint8) * 255


def _fake_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """RGBA image: dark grey (fluorescence), bright grey (bright-field) or coloured (histopathology)."""
    if kind == "f":
        grey = rng.integers(0, 60, (SIZE, SIZE), dtype=np.uint8)
        rgb = np.stack([grey] * 3, axis=-1)
    elif kind == "b":
        grey = rng.integers(180, 240, (SIZE, SIZE), dtype=np.uint8)
        rgb = np.stack([grey] * 3, axis=-1)
    else:
        rgb = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        rgb[..., 2] = 255 - rgb[..., 0]
    alpha = np.full((SIZE, SIZE, 1), 255, dtype=np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


# Masks of every image; in "f00" mask "m2" overlaps "m1" and "m3" covers "m0" completely.
OVERLAP_MASKS = {"m0": _disc(10, 10, 3), "m1": _disc(30, 30, 8), "m2": _disc(30, 40, 6), "m3": _disc(10, 10, 5)}
PLAIN_MASKS = {"a": _disc(12, 12, 6), "b": _disc(34, 30, 7), "c": _disc(12, 36, 5)}


def make_fake_archive(path: Path, n_fluo: int = 10, n_bf: int = 5, n_histo: int = 5) -> Path:
    """Write a stage1_train.zip look-alike (directory entries, RGBA images, 0/255 masks) to ``path``."""
    rng = np.random.default_rng(123)
    ids = [f"f{i:02d}" for i in range(n_fluo)] + [f"b{i:02d}" for i in range(n_bf)]
    ids += [f"h{i:02d}" for i in range(n_histo)]
    with zipfile.ZipFile(path, "w") as zf:
        for image_id in ids:
            zf.writestr(f"{image_id}/", b"")
            zf.writestr(f"{image_id}/images/", b"")
            zf.writestr(f"{image_id}/images/{image_id}.png", _png(_fake_image(image_id[0], rng)))
            zf.writestr(f"{image_id}/masks/", b"")
            masks = OVERLAP_MASKS if image_id == "f00" else PLAIN_MASKS
            for mask_id, mask in reversed(list(masks.items())):  # archive order must not matter
                zf.writestr(f"{image_id}/masks/{mask_id}.png", _png(mask))
    return path


@pytest.fixture(scope="module")
def fake_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_archive(tmp_path_factory.mktemp("archive") / "stage1_train.zip")


@pytest.fixture(scope="module")
def prepared(fake_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_dsb2018(fake_zip, out, ratios=(0.3, 1.0), seed=7)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


# ---------------------------------------------------------------------------------------------------- helpers


def test_classify_modality() -> None:
    grey_dark = np.full((8, 8, 3), 40, np.uint8)
    grey_bright = np.full((8, 8, 3), 100, np.uint8)
    colour = grey_dark.copy()
    colour[0, 0, 1] = 41
    assert classify_modality(grey_dark) == "fluorescence"
    assert classify_modality(grey_bright) == "brightfield"  # mean >= 100
    assert classify_modality(np.full((8, 8, 3), 99, np.uint8)) == "fluorescence"
    assert classify_modality(colour) == "histopathology"  # a single differing pixel makes it colour
    assert classify_modality(np.full((8, 8), 200, np.uint8)) == "brightfield"


def test_assemble_labels_later_mask_wins_and_renumbers() -> None:
    masks = list(OVERLAP_MASKS.values())
    labels, overlap = assemble_labels(masks)
    assert labels.dtype == np.uint16
    # m0 is covered by m3 -> dropped; m1, m2, m3 become 1, 2, 3
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert labels[10, 10] == 3
    both = (OVERLAP_MASKS["m1"] > 0) & (OVERLAP_MASKS["m2"] > 0)
    assert both.any() and (labels[both] == 2).all()
    expected_overlap = int(np.count_nonzero(sum((m > 0).astype(int) for m in masks) > 1))
    assert overlap == expected_overlap
    with pytest.raises(ValueError, match="shape"):
        assemble_labels([np.zeros((4, 4)), np.zeros((5, 4))])


def test_ratio_tag() -> None:
    assert [ratio_tag(r) for r in (0.1, 0.3, 0.5, 1.0, 0.125)] == ["10", "30", "50", "100", "12p5"]
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError):
            ratio_tag(bad)


@pytest.mark.parametrize(
    "n, expected", [(10, (6, 2, 2)), (546, (328, 109, 109)), (108, (65, 22, 21)), (16, (10, 3, 3))]
)
def test_split_proportions(n: int, expected: tuple[int, int, int]) -> None:
    ids = [f"id{i:04d}" for i in range(n)]
    split = split_ids(reversed(ids), seed=0)
    assert tuple(len(split[k]) for k in ("training", "validation", "test")) == expected
    assert sorted(sum(split.values(), [])) == ids
    assert split == split_ids(ids, seed=0)  # input order does not matter
    if n > 10:
        assert split != split_ids(ids, seed=1)


def test_image_rng_depends_on_seed_and_id_only() -> None:
    a = image_rng(0, "abc").integers(0, 2**31, 4)
    assert (a == image_rng(0, "abc").integers(0, 2**31, 4)).all()
    assert not (a == image_rng(1, "abc").integers(0, 2**31, 4)).all()
    assert not (a == image_rng(0, "abd").integers(0, 2**31, 4)).all()


# ---------------------------------------------------------------------------------------------- fake archive


def test_fake_archive_layout_and_counts(prepared: tuple[Path, dict]) -> None:
    out, summary = prepared
    assert summary["archive_counts"] == {"fluorescence": 10, "histopathology": 5, "brightfield": 5}
    assert summary["ratio_tags"] == ["30", "100"]
    assert (out / "README.md").is_file() and "CC0" in (out / "README.md").read_text()
    for modality, n in summary["archive_counts"].items():
        mod_dir = out / modality
        info = summary["modalities"][modality]
        assert info["n_images"] == n
        ids = sorted(p.stem for p in (mod_dir / "images").glob("*.png"))
        assert len(ids) == n and all(MODALITY_OF_PREFIX[i[0]] == modality for i in ids)
        for sub in ("labels", "scribbles_30", "scribbles_100", "scribbles_full"):
            assert sorted(p.stem for p in (mod_dir / sub).glob("*.png")) == ids
        for name in ("datalist_30.json", "datalist_100.json", "datalist_full.json", "split.json"):
            assert (mod_dir / name).is_file()
        assert not list(mod_dir.rglob(".*.tmp"))
    assert summary["modalities"]["fluorescence"]["splits"] == {"training": 6, "validation": 2, "test": 2}
    assert summary["modalities"]["brightfield"]["splits"] == {"training": 3, "validation": 1, "test": 1}


def test_fake_archive_images_labels_scribbles(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    grey = _read(out / "fluorescence" / "images" / "f01.png")
    assert grey.shape == (SIZE, SIZE) and grey.dtype == np.uint8
    assert _read(out / "brightfield" / "images" / "b00.png").shape == (SIZE, SIZE)
    assert _read(out / "histopathology" / "images" / "h00.png").shape == (SIZE, SIZE, 3)

    labels = _read(out / "fluorescence" / "labels" / "f00.png")
    assert labels.dtype == np.uint16
    expected, _ = assemble_labels([OVERLAP_MASKS[k] for k in sorted(OVERLAP_MASKS)])
    np.testing.assert_array_equal(labels, expected)

    for tag in ("30", "100"):
        scribble = _read(out / "fluorescence" / f"scribbles_{tag}" / "f00.png")
        assert scribble.dtype == np.uint8 and set(np.unique(scribble)) <= {0, 1, 255}
        assert (scribble == 1).any() and (scribble == 0).any()
        assert (labels[scribble == 1] > 0).all() and (labels[scribble == 0] == 0).all()
    full = _read(out / "fluorescence" / "scribbles_full" / "f00.png")
    np.testing.assert_array_equal(full, (labels > 0).astype(np.uint8))


def test_fake_archive_datalists(prepared: tuple[Path, dict]) -> None:
    out, _ = prepared
    for modality in ("fluorescence", "histopathology", "brightfield"):
        mod_dir = out / modality
        split = json.loads((mod_dir / "split.json").read_text())
        assert split["seed"] == 7
        for tag in ("30", "100", "full"):
            datalist = json.loads((mod_dir / f"datalist_{tag}.json").read_text())
            assert set(datalist) == {"name", "description", "scribble_values", "training", "validation", "test"}
            assert datalist["scribble_values"] == {"background": 0, "foreground": 1, "unlabelled": 255}
            for section in ("training", "validation", "test"):
                items = datalist[section]
                assert [Path(it["image"]).stem for it in items] == split[section]
                for item in items:
                    assert set(item) == {"image", "scribble", "label"}
                    assert item["scribble"].startswith(f"scribbles_{tag}/")
                    assert all((mod_dir / p).is_file() and not Path(p).is_absolute() for p in item.values())


def test_datalist_loads_with_project_loader(prepared: tuple[Path, dict]) -> None:
    datalist = pytest.importorskip("s2l_monai.data.datalist")
    out, _ = prepared
    items = datalist.load_datalist(out / "fluorescence" / "datalist_30.json", "training", synthesize_if_missing=False)
    assert len(items) == 6 and all(Path(it["scribble"]).is_file() for it in items)


def test_deterministic_independent_of_limit_and_workers(
    fake_zip: Path, prepared: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = prepared
    limited = tmp_path / "limited"
    summary = prepare_dsb2018(fake_zip, limited, ratios=(0.3, 1.0), seed=7, limit=2, workers=2,
                              modalities=("fluorescence", "histopathology"))
    assert set(summary["modalities"]) == {"fluorescence", "histopathology"}
    assert not (limited / "brightfield").exists()
    assert sorted(p.stem for p in (limited / "fluorescence" / "images").glob("*.png")) == ["f00", "f01"]
    for path in limited.rglob("*.png"):
        assert path.read_bytes() == (out / path.relative_to(limited)).read_bytes(), path

    other_seed = prepare_dsb2018(fake_zip, tmp_path / "seed8", ratios=(0.3,), seed=8, limit=2,
                                 modalities=("fluorescence",))
    assert other_seed["seed"] == 8
    differs = [
        (tmp_path / "seed8" / "fluorescence" / "scribbles_30" / f"{i}.png").read_bytes()
        != (out / "fluorescence" / "scribbles_30" / f"{i}.png").read_bytes()
        for i in ("f00", "f01")
    ]
    assert any(differs)


def test_idempotent_rerun(fake_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare_dsb2018(fake_zip, out, ratios=(0.5,), seed=0, limit=3)
    assert first["processed"] == 9 and first["skipped"] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    time.sleep(0.01)
    again = prepare_dsb2018(fake_zip, out, ratios=(0.5,), seed=0, limit=3)
    assert again["processed"] == 0 and again["skipped"] == 9
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert again["modalities"] == first["modalities"]

    # a missing scribble is regenerated identically; a new ratio only adds its files
    victim = out / "fluorescence" / "scribbles_50" / "f01.png"
    content = victim.read_bytes()
    victim.unlink()
    third = prepare_dsb2018(fake_zip, out, ratios=(0.5, 0.1), seed=0, limit=3)
    assert victim.read_bytes() == content
    assert third["processed"] == 9
    assert len(list((out / "brightfield" / "scribbles_10").glob("*.png"))) == 3
    assert {p: p.stat().st_mtime_ns for p in before if p != victim} == {p: before[p] for p in before if p != victim}

    with pytest.raises(ValueError, match="seed 0"):
        prepare_dsb2018(fake_zip, out, seed=1, limit=3)


def test_missing_archive_says_where_to_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"bbbc\.broadinstitute\.org/BBBC038") as info:
        prepare_dsb2018(tmp_path / "nope.zip", tmp_path / "out")
    assert "stage1_train.zip" in str(info.value) and "nope.zip" in str(info.value)


def test_bad_archive_layout(tmp_path: Path) -> None:
    path = tmp_path / "stage1_test.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x1/images/x1.png", _png(_fake_image("f", np.random.default_rng(0))))
    with pytest.raises(ValueError, match=r"x1/images/x1\.png: has no masks"):
        prepare_dsb2018(path, tmp_path / "out")
    not_zip = tmp_path / "stage1_train.zip"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match="not a zip"):
        prepare_dsb2018(not_zip, tmp_path / "out")


def test_bad_arguments(fake_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modalities"):
        prepare_dsb2018(fake_zip, tmp_path, modalities=("electron",))
    with pytest.raises(ValueError, match="duplicate"):
        prepare_dsb2018(fake_zip, tmp_path, ratios=(0.3, 0.3))
    with pytest.raises(ValueError, match="ratio"):
        prepare_dsb2018(fake_zip, tmp_path, ratios=(0.0,))


def test_cli_dsb2018(fake_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from s2l_monai.cli import main

    rc = main(["prepare", "dsb2018", "--zip", str(fake_zip), "--out", str(tmp_path / "o"), "--ratios", "0.5",
               "--limit", "2", "--modalities", "histopathology"])
    assert rc == 0
    assert "histopathology" in capsys.readouterr().out
    assert (tmp_path / "o" / "histopathology" / "datalist_50.json").is_file()
    assert main(["prepare", "dsb2018", "--zip", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "o")]) == 2
    assert "BBBC038" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real archive


@pytest.mark.slow
def test_real_archive_limited(dsb_zip: Path, tmp_path: Path) -> None:
    # about 20 s on 2 idle CPU cores (classifying all 670 images, then 3 images per modality)
    summary = prepare_dsb2018(dsb_zip, tmp_path, ratios=(0.3,), limit=3, workers=2)
    assert summary["archive_counts"] == {"fluorescence": 546, "histopathology": 108, "brightfield": 16}
    for modality, info in summary["modalities"].items():
        assert info["n_images"] == 3 and info["n_nuclei"] > 0
        assert info["splits"] == {"training": 2, "validation": 1, "test": 0}
        for image_path in sorted((tmp_path / modality / "images").glob("*.png")):
            image = _read(image_path)
            labels = _read(tmp_path / modality / "labels" / image_path.name)
            scribble = _read(tmp_path / modality / "scribbles_30" / image_path.name)
            assert image.dtype == np.uint8 and labels.dtype == np.uint16
            assert image.ndim == (3 if modality == "histopathology" else 2)
            assert labels.shape == scribble.shape == image.shape[:2]
            assert labels.max() == len(np.unique(labels)) - 1  # consecutive labels
            assert set(np.unique(scribble)) <= {0, 1, 255} and (scribble == 1).any()
            if modality == "brightfield":
                assert image.shape == (1024, 1024) and image.mean() >= 100
            if modality == "fluorescence":
                assert image.mean() < 100
