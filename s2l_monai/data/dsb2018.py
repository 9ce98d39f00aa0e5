"""Prepare BBBC038v1 (Kaggle Data Science Bowl 2018, stage 1 training set) for Scribble2Label.

The archive ``stage1_train.zip`` is read exactly as users download it from
https://bbbc.broadinstitute.org/BBBC038 (entries ``<id>/images/<id>.png`` as RGBA PNG and
``<id>/masks/<mask-id>.png``, one binary 0/255 PNG per nucleus), straight from the zip: nothing is extracted.

The result is one folder per modality (the paper's DSB-Fluo, DSB-Histo and DSB-BF sets) with images, uint16
instance label maps, automatic scribbles for several ratios, full-mask "scribbles" for the fully supervised
baseline, a seeded 60/20/20 split and MONAI-style datalist JSON files; see :func:`prepare_dsb2018`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from s2l_monai.data.scribbles import auto_scribbles

__all__ = [
    "ARCHIVE_NAME",
    "BRIGHTFIELD_MIN_MEAN",
    "DOWNLOAD_URL",
    "MODALITIES",
    "SCRIBBLE_VALUES",
    "SPLIT_FRACTIONS",
    "assemble_labels",
    "classify_modality",
    "image_rng",
    "prepare_dsb2018",
    "ratio_tag",
    "split_ids",
]

DOWNLOAD_URL = "https://bbbc.broadinstitute.org/BBBC038"
ARCHIVE_NAME = "stage1_train.zip"
MODALITIES: tuple[str, ...] = ("fluorescence", "histopathology", "brightfield")
#: Grey images whose mean intensity is at least this are bright-field, darker grey ones fluorescence.
BRIGHTFIELD_MIN_MEAN = 100.0
SCRIBBLE_VALUES: dict[str, int] = {"background": 0, "foreground": 1, "unlabelled": 255}
#: Fractions of each modality's images in the training, validation and test splits (as in the paper).
SPLIT_FRACTIONS: dict[str, float] = {"training": 0.6, "validation": 0.2, "test": 0.2}
FULL_TAG = "full"
MANIFEST_NAME = "prepare_dsb2018.json"
FORMAT_VERSION = 1

_IMAGE_RE = re.compile(r"^([^/]+)/images/([^/]+)\.png$")
_MASK_RE = re.compile(r"^([^/]+)/masks/([^/]+\.png)$")


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------------------


def ratio_tag(ratio: float) -> str:
    """Return the folder tag of a scribble ratio: ``0.3 -> "30"``, ``1.0 -> "100"``, ``0.125 -> "12p5"``.

    Args:
        ratio: Share of skeleton pieces kept, in (0, 1].

    Raises:
        ValueError: If ``ratio`` is not in (0, 1].
    """
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"scribble ratio must be in (0, 1], got {ratio!r}")
    pct = round(float(ratio) * 100.0, 6)
    return f"{pct:g}".replace(".", "p")


def classify_modality(rgb: np.ndarray) -> str:
    """Classify a DSB2018 image as ``fluorescence``, ``histopathology`` or ``brightfield``.

    The rule is deterministic and needs no clustering: an image is *grey* if R == G == B at every pixel.
    Grey images with mean intensity < :data:`BRIGHTFIELD_MIN_MEAN` (100) are fluorescence, grey images with
    mean >= 100 are bright-field, and every non-grey (colour) image is histopathology. On the 670 images of
    ``stage1_train.zip`` this gives 546 fluorescence (means 1-57), 108 histopathology and 16 bright-field
    (means 205-218) images.

    Args:
        rgb: Image as HW (already grey) or HWC array with C >= 3; only the first three channels are used.

    Returns:
        The modality name.
    """
    if rgb.ndim == 2:
        grey = rgb
    else:
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        if not (np.array_equal(r, g) and np.array_equal(r, b)):
            return "histopathology"
        grey = r
    return "brightfield" if float(grey.mean()) >= BRIGHTFIELD_MIN_MEAN else "fluorescence"


def assemble_labels(masks: Sequence[np.ndarray], shape: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """Combine per-nucleus binary masks into one uint16 instance label map.

    Masks are painted in the given order (the caller passes them sorted by mask id) with labels 1, 2, ...;
    where masks overlap, the later mask wins. Nuclei that end up with no pixel at all are dropped and the
    labels are then renumbered consecutively, so the result always has labels ``1..N`` without gaps.

    Args:
        masks: Binary masks (any value > 0 is foreground), all of the same HW shape.
        shape: Shape of the label map; needed only when ``masks`` is empty.

    Returns:
        ``(labels, overlap)``: the uint16 label map and the number of pixels claimed by more than one mask.

    Raises:
        ValueError: If the masks do not all have the same shape or there are more than 65535 of them.
    """
    if not masks and shape is None:
        raise ValueError("assemble_labels needs at least one mask or an explicit shape")
    shape = tuple(masks[0].shape[:2]) if masks else tuple(shape)  # type: ignore[arg-type]
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(masks)} masks do not fit a uint16 label map")
    labels = np.zeros(shape, dtype=np.uint16)
    coverage = np.zeros(shape, dtype=np.uint16)
    for index, mask in enumerate(masks, start=1):
        if mask.shape[:2] != shape:
            raise ValueError(f"mask {index} has shape {mask.shape[:2]}, expected {shape}")
        fg = mask > 0
        labels[fg] = index
        coverage[fg] += 1
    overlap = int(np.count_nonzero(coverage > 1))
    present = np.unique(labels)
    present = present[present > 0]
    if present.size != len(masks):  # some nucleus was completely covered: renumber 1..N
        lut = np.zeros(len(masks) + 1, dtype=np.uint16)
        lut[present] = np.arange(1, present.size + 1, dtype=np.uint16)
        labels = lut[labels]
    return labels, overlap


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """Return the random generator for one image's scribbles, derived from ``(seed, image_id)`` only.

    The id is hashed with SHA-256 (not Python's salted ``hash``), so scribbles are identical across runs,
    processes, processing orders and ``limit`` values.

    Args:
        seed: Global non-negative seed.
        image_id: The image id (the archive's folder name).
    """
    digest = int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), digest]))


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Round ``fractions * n`` half-up for all but the last split, which gets the rest."""
    counts = [int(math.floor(f * n + 0.5)) for f in fractions[:-1]]
    counts.append(n - sum(counts))
    while counts[-1] < 0:  # only possible with odd fractions; take back from the largest split
        counts[int(np.argmax(counts[:-1]))] -= 1
        counts[-1] += 1
    return counts


def split_ids(ids: Iterable[str], seed: int, fractions: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Split ids into training/validation/test with a seeded permutation.

    The ids are sorted, permuted with ``np.random.default_rng(seed).permutation`` and cut into consecutive
    chunks of ``round(f * n)`` items (half-up; the last split gets the remainder). Each split is returned sorted.

    Args:
        ids: Image ids.
        seed: Seed of the permutation.
        fractions: Split name -> fraction; defaults to :data:`SPLIT_FRACTIONS` (60/20/20).
    """
    fractions = dict(SPLIT_FRACTIONS if fractions is None else fractions)
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    counts = _split_counts(len(ordered), list(fractions.values()))
    out: dict[str, list[str]] = {}
    start = 0
    for name, count in zip(fractions, counts):
        out[name] = sorted(ordered[i] for i in perm[start : start + count])
        start += count
    return out


# --------------------------------------------------------------------------------------------------------------
# Archive access
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Archive members of one image."""

    image: str
    masks: tuple[str, ...]


_ZIP_CACHE: dict[str, zipfile.ZipFile] = {}


def _open_zip(zip_path: str) -> zipfile.ZipFile:
    """Return this process's open handle on ``zip_path`` (one per process; also used by pool workers)."""
    handle = _ZIP_CACHE.get(zip_path)
    if handle is None:
        handle = zipfile.ZipFile(zip_path)
        _ZIP_CACHE[zip_path] = handle
    return handle


def _close_zips() -> None:
    while _ZIP_CACHE:
        _ZIP_CACHE.popitem()[1].close()


def _check_archive(zip_path: Path) -> None:
    if not zip_path.is_file():
        raise FileNotFoundError(
            f"BBBC038 archive not found at {zip_path}. Download '{ARCHIVE_NAME}' (the stage 1 training set) "
            f"from {DOWNLOAD_URL} and pass its path (do not extract it)."
        )
    if not zipfile.is_zipfile(zip_path):
        raise ValueError(f"{zip_path} is not a zip archive; expected '{ARCHIVE_NAME}' from {DOWNLOAD_URL}")


def index_archive(zip_path: str | Path) -> dict[str, _Entry]:
    """List the images and masks of a BBBC038 archive.

    Args:
        zip_path: Path of ``stage1_train.zip``.

    Returns:
        Image id -> its image member and its mask members (sorted by name), ordered by id.

    Raises:
        FileNotFoundError: If the archive does not exist.
        ValueError: If the archive does not have the BBBC038 layout (names the offending members).
    """
    zip_path = Path(zip_path)
    _check_archive(zip_path)
    images: dict[str, str] = {}
    masks: dict[str, list[str]] = {}
    problems: list[str] = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if m := _IMAGE_RE.match(name):
                image_id, stem = m.groups()
                if stem != image_id:
                    problems.append(f"{name}: image name does not match its folder id {image_id!r}")
                elif image_id in images:
                    problems.append(f"{name}: duplicate image for id {image_id!r}")
                else:
                    images[image_id] = name
            elif m := _MASK_RE.match(name):
                masks.setdefault(m.group(1), []).append(name)
    for image_id in sorted(set(masks) - set(images)):
        problems.append(f"{image_id}/: has masks but no image {image_id}/images/{image_id}.png")
    for image_id in sorted(set(images) - set(masks)):
        problems.append(f"{images[image_id]}: has no masks (is this the stage 1 *training* archive?)")
    if not images:
        problems.append(f"no '<id>/images/<id>.png' entries; expected '{ARCHIVE_NAME}' from {DOWNLOAD_URL}")
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{zip_path} does not have the BBBC038 layout:\n  - {shown}")
    return {i: _Entry(images[i], tuple(sorted(masks[i]))) for i in sorted(images)}


def _read_member(zip_path: str, member: str) -> np.ndarray:
    """Decode one PNG member of the archive."""
    try:
        with Image.open(io.BytesIO(_open_zip(zip_path).read(member))) as im:
            return np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{zip_path}: cannot read member {member}: {exc}") from exc


def _read_rgb(zip_path: str, member: str) -> np.ndarray:
    """Read an archive image as uint8 HWC RGB (alpha dropped) or HW grey."""
    arr = _read_member(zip_path, member)
    if arr.dtype != np.uint8:
        raise ValueError(f"{zip_path}: {member} has dtype {arr.dtype}, expected 8-bit")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # L or LA
        return arr[..., 0]
    if arr.ndim == 2:
        return arr
    raise ValueError(f"{zip_path}: {member} has unexpected shape {arr.shape}")


def _read_mask(zip_path: str, member: str) -> np.ndarray:
    arr = _read_member(zip_path, member)
    return arr.max(axis=-1) if arr.ndim == 3 else arr


# --------------------------------------------------------------------------------------------------------------
# Per-image work (runs in pool workers when workers > 1)
# --------------------------------------------------------------------------------------------------------------


def _classify_task(task: tuple[str, str, str]) -> tuple[str, str, int]:
    """Return ``(id, modality, number of pixels)`` of one archive image."""
    zip_path, image_id, member = task
    rgb = _read_rgb(zip_path, member)
    return image_id, classify_modality(rgb), int(rgb.shape[0] * rgb.shape[1])


@dataclass(frozen=True)
class _ImageTask:
    zip_path: str
    image_id: str
    entry: _Entry
    modality: str
    mod_dir: str
    ratios: tuple[tuple[str, float], ...]
    seed: int


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG atomically (temporary file + rename), so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read {path}: {exc} (delete it and rerun to regenerate it)") from exc


def _check_scribble(scribble: np.ndarray, labels: np.ndarray, image_id: str, tag: str) -> np.ndarray:
    allowed = np.array(sorted(SCRIBBLE_VALUES.values()))
    if scribble.shape != labels.shape or not np.isin(scribble, allowed).all():
        raise RuntimeError(
            f"auto_scribbles returned an invalid scribble for {image_id} (scribbles_{tag}): shape {scribble.shape}"
            f" vs {labels.shape}, values {np.unique(scribble)[:10].tolist()}"
        )
    return scribble.astype(np.uint8, copy=False)


def _process_image(task: _ImageTask) -> dict[str, Any]:
    """Write image, labels and scribbles of one image, skipping files that already exist."""
    mod_dir = Path(task.mod_dir)
    name = f"{task.image_id}.png"
    image_path, label_path = mod_dir / "images" / name, mod_dir / "labels" / name
    scribble_paths = {tag: mod_dir / f"scribbles_{tag}" / name for tag, _ in task.ratios}
    full_path = mod_dir / f"scribbles_{FULL_TAG}" / name
    stats: dict[str, Any] = {"id": task.image_id, "n_masks": len(task.entry.masks), "overlap_pixels": None}
    missing = [p for p in (image_path, label_path, full_path, *scribble_paths.values()) if not p.is_file()]
    if image_path.is_file() and label_path.is_file():
        labels = _read_png(label_path)
    else:
        rgb = _read_rgb(task.zip_path, task.entry.image)
        masks = [_read_mask(task.zip_path, m) for m in task.entry.masks]
        for member, mask in zip(task.entry.masks, masks):
            if mask.shape[:2] != rgb.shape[:2]:
                raise ValueError(
                    f"{task.zip_path}: mask {member} has shape {mask.shape[:2]}, image has {rgb.shape[:2]}"
                )
        labels, stats["overlap_pixels"] = assemble_labels(masks)
        image = rgb if task.modality == "histopathology" or rgb.ndim == 2 else rgb[..., 0]
        _save_png(image_path, image)
        _save_png(label_path, labels)
    for tag, ratio in task.ratios:
        if not scribble_paths[tag].is_file():
            scribble = auto_scribbles(labels, ratio, image_rng(task.seed, task.image_id), **SCRIBBLE_VALUES)
            _save_png(scribble_paths[tag], _check_scribble(np.asarray(scribble), labels, task.image_id, tag))
    if not full_path.is_file():
        _save_png(full_path, (labels > 0).astype(np.uint8) * SCRIBBLE_VALUES["foreground"])
    stats["n_nuclei"] = int(labels.max())
    stats["shape"] = list(labels.shape)
    stats["skipped"] = not missing
    return stats


def _run_tasks(
    fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, desc: str, chunksize: int = 1
) -> list[Any]:
    """Map ``fn`` over ``tasks`` in this process or in a process pool, with a progress bar."""
    if not tasks:
        return []
    if workers <= 1:
        try:
            return [fn(t) for t in tqdm(tasks, desc=desc, unit="img")]
        finally:
            _close_zips()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, tasks, chunksize=chunksize), total=len(tasks), desc=desc, unit="img"))


# --------------------------------------------------------------------------------------------------------------
# Datalists, manifest and README
# --------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _datalist(modality: str, split: dict[str, list[str]], tag: str, ratio: float | None, seed: int) -> dict:
    scribble_dir = f"scribbles_{tag}"
    if ratio is None:
        kind = "full masks as scribbles (foreground 1 / background 0, no unlabelled pixel): the 'Full' baseline"
    else:
        kind = f"automatic scribbles keeping {ratio:.0%} of the skeleton pieces (seed {seed})"
    out: dict[str, Any] = {
        "name": f"DSB2018-{modality}-{scribble_dir}",
        "description": (
            f"BBBC038v1 (Kaggle DSB2018 stage 1 train) {modality} images; {kind}; labels are uint16 instance maps; "
            f"seeded 60/20/20 split (seed {seed}). CC0, cite Caicedo et al., Nature Methods 16 (2019)."
        ),
        "scribble_values": dict(SCRIBBLE_VALUES),
    }
    for name in SPLIT_FRACTIONS:
        out[name] = [
            {"image": f"images/{i}.png", "scribble": f"{scribble_dir}/{i}.png", "label": f"labels/{i}.png"}
            for i in split[name]
        ]
    return out


def _check_manifest(out_dir: Path, seed: int) -> None:
    """Refuse to mix outputs of different seeds in one folder; record the seed of a new folder."""
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete it or use a fresh output folder") from exc
        if previous.get("seed") != seed:
            raise ValueError(
                f"{out_dir} was prepared with seed {previous.get('seed')}, not {seed}: its scribbles would not match. "
                "Use another output folder or delete this one."
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"source": f"BBBC038v1 {ARCHIVE_NAME}", "seed": seed, "format_version": FORMAT_VERSION})


def _write_readme(out_dir: Path, summary: dict[str, Any]) -> None:
    rows = []
    for modality, info in summary["modalities"].items():
        s = info["splits"]
        rows.append(
            f"| {modality} | {info['n_images']} | {s['training']} | {s['validation']} | {s['test']} "
            f"| {info['n_nuclei']} | {summary['archive_counts'].get(modality, 0)} |"
        )
    tags = ", ".join(f"`scribbles_{t}`" for t in summary["ratio_tags"])
    limit = summary["limit"]
    limit_line = f"\n**Subset:** only the first {limit} ids (sorted) of each modality.\n" if limit else ""
    text = f"""# DSB2018 (BBBC038v1) prepared for Scribble2Label

Source: BBBC038v1, the Kaggle Data Science Bowl 2018 stage 1 training set (`{ARCHIVE_NAME}`),
{DOWNLOAD_URL}. Licence: CC0. Please cite Caicedo et al., "Nucleus segmentation across imaging experiments:
the 2018 Data Science Bowl", Nature Methods 16, 1247-1253 (2019), and the Broad Bioimage Benchmark Collection
(Ljosa et al., Nature Methods 9, 637 (2012)).

Generated by `s2l_monai.data.dsb2018.prepare_dsb2018` with seed {summary['seed']}.
{limit_line}
## Counts

| modality | images | training | validation | test | nuclei | in archive |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Method
- Modality: grey if R == G == B at every pixel; grey with mean intensity < {BRIGHTFIELD_MIN_MEAN:g} is
  fluorescence, grey with mean >= {BRIGHTFIELD_MIN_MEAN:g} bright-field, colour images histopathology.
- `images/<id>.png`: uint8 grey (fluorescence, bright-field) or RGB (histopathology); the alpha channel is dropped.
- `labels/<id>.png`: uint16 instance labels built from the per-nucleus masks in sorted mask-id order; where masks
  overlap the later mask wins; labels are consecutive 1..N.
- {tags}: automatic scribbles (`s2l_monai.data.scribbles.auto_scribbles`), values background 0,
  foreground 1, unlabelled 255, random generator seeded from (seed, SHA-256 of the id).
- `scribbles_full/<id>.png`: the full mask (foreground 1, background 0) for the fully supervised baseline.
- `split.json`: seeded 60/20/20 split (sorted ids, `numpy.random.default_rng(seed).permutation`).
- `datalist_<ratio>.json`, `datalist_full.json`: MONAI-style datalists, paths relative to the modality folder.
"""
    (out_dir / "README.md").write_text(text)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def _validate_args(
    ratios: Sequence[float], seed: int, modalities: Sequence[str], limit: int | None, workers: int
) -> list[tuple[str, float]]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"unknown modalities {unknown}; choose from {list(MODALITIES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    tagged = [(ratio_tag(r), float(r)) for r in ratios]
    tags = [t for t, _ in tagged]
    if len(set(tags)) != len(tags):
        raise ValueError(f"ratios {list(ratios)} give duplicate folder tags {tags}")
    return tagged


def prepare_dsb2018(
    zip_path: str | Path,
    out_dir: str | Path,
    ratios: Sequence[float] = (0.1, 0.3, 0.5, 1.0),
    seed: int = 0,
    modalities: Sequence[str] = MODALITIES,
    limit: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Prepare the BBBC038v1 stage 1 training archive for scribble-supervised training and evaluation.

    Every image is classified by :func:`classify_modality` (grey if R == G == B everywhere; grey with mean
    intensity < 100 is fluorescence, grey with mean >= 100 bright-field, colour is histopathology: 546 / 16 / 108
    images of the full archive). For each requested modality, ``out_dir/<modality>/`` receives:

    - ``images/<id>.png``: uint8 grey (fluorescence, bright-field) or RGB (histopathology), alpha dropped;
    - ``labels/<id>.png``: uint16 instance label map (:func:`assemble_labels`: masks painted in sorted mask-id
      order, the later mask wins where nuclei overlap, labels renumbered 1..N);
    - ``scribbles_<pct>/<id>.png`` for each ratio (e.g. ``scribbles_30``): ``auto_scribbles(labels, ratio, rng)``
      with values background 0 / foreground 1 / unlabelled 255, where ``rng`` comes from
      :func:`image_rng` ``(seed, id)``, so scribbles do not depend on processing order, ``workers`` or ``limit``
      (every ratio starts from the same generator state);
    - ``scribbles_full/<id>.png``: the full mask (foreground 1 / background 0) for the "Full" baseline;
    - ``split.json``: 60/20/20 training/validation/test split from :func:`split_ids` (sorted ids,
      ``np.random.default_rng(seed).permutation``);
    - ``datalist_<pct>.json`` and ``datalist_full.json``: ``{"name", "description", "scribble_values",
      "training", "validation", "test"}`` with items ``{"image", "scribble", "label"}`` relative to the
      modality folder (validation and test items carry scribbles too).

    ``out_dir/README.md`` records provenance (CC0; cite Caicedo et al. 2019) and counts, and
    ``out_dir/prepare_dsb2018.json`` the seed. Files that already exist are not recomputed, so a rerun (e.g. with
    more ratios or a larger ``limit``) only does the missing work; reusing a folder with another seed is refused.

    Args:
        zip_path: ``stage1_train.zip`` as downloaded from https://bbbc.broadinstitute.org/BBBC038.
        out_dir: Output folder.
        ratios: Shares of skeleton pieces kept by the automatic scribbles, each in (0, 1].
        seed: Non-negative seed for the split and the scribbles.
        modalities: Which modalities to write.
        limit: Use only the first ``limit`` ids (sorted) of each modality, for quick runs and tests.
        workers: Number of processes (1 = work in this process).

    Returns:
        Summary: ``out_dir``, ``seed``, ``ratios``, ``ratio_tags``, ``limit``, ``archive_counts`` (images per
        modality in the whole archive), ``modalities`` (per modality: ``dir``, ``n_images``, ``n_nuclei``,
        ``splits`` counts, ``datalists`` paths by tag), ``processed`` / ``skipped`` image counts and
        ``overlap_pixels`` (pixels claimed by several nuclei, over the images assembled in this run).

    Raises:
        FileNotFoundError: If the archive is missing (the message says where to download it).
        ValueError: On bad arguments, an archive without the BBBC038 layout, or an output folder of another seed.
    """
    tagged = _validate_args(ratios, seed, modalities, limit, workers)
    seed = int(seed)
    zip_path, out_dir = Path(zip_path).resolve(), Path(out_dir)
    entries = index_archive(zip_path)
    _check_manifest(out_dir, int(seed))

    classify = [(str(zip_path), i, e.image) for i, e in entries.items()]
    by_modality: dict[str, list[str]] = {m: [] for m in MODALITIES}
    n_pixels: dict[str, int] = {}
    for image_id, modality, size in _run_tasks(_classify_task, classify, workers, "classify", chunksize=8):
        by_modality[modality].append(image_id)
        n_pixels[image_id] = size
    selected = {m: sorted(by_modality[m])[:limit] for m in modalities}

    # largest images first, so that the pool does not end on a few slow bright-field images
    order = sorted((i for m in modalities for i in selected[m]), key=lambda i: (-n_pixels[i], i))
    modality_of = {i: m for m in modalities for i in selected[m]}
    tasks = [
        _ImageTask(str(zip_path), i, entries[i], modality_of[i], str(out_dir / modality_of[i]), tuple(tagged), seed)
        for i in order
    ]
    results = {r["id"]: r for r in _run_tasks(_process_image, tasks, workers, "prepare")}

    summary: dict[str, Any] = {
        "out_dir": str(out_dir),
        "seed": int(seed),
        "ratios": [r for _, r in tagged],
        "ratio_tags": [t for t, _ in tagged],
        "limit": limit,
        "archive_counts": {m: len(v) for m, v in by_modality.items()},
        "modalities": {},
        "processed": sum(not r["skipped"] for r in results.values()),
        "skipped": sum(r["skipped"] for r in results.values()),
        "overlap_pixels": sum(r["overlap_pixels"] or 0 for r in results.values()),
    }
    for modality in modalities:
        summary["modalities"][modality] = _finish_modality(out_dir / modality, modality, selected[modality],
                                                           results, tagged, int(seed))
    _write_readme(out_dir, summary)
    return summary


def _finish_modality(
    mod_dir: Path,
    modality: str,
    ids: list[str],
    results: dict[str, dict[str, Any]],
    tagged: Sequence[tuple[str, float]],
    seed: int,
) -> dict[str, Any]:
    """Write split.json and the datalists of one modality; return its summary."""
    mod_dir.mkdir(parents=True, exist_ok=True)
    split = split_ids(ids, seed)
    _write_json(
        mod_dir / "split.json",
        {
            "seed": seed,
            "method": "sorted ids, numpy.random.default_rng(seed).permutation, consecutive 60/20/20 chunks",
            "fractions": dict(SPLIT_FRACTIONS),
            **split,
        },
    )
    datalists: dict[str, str] = {}
    for tag, ratio in [*tagged, (FULL_TAG, None)]:
        path = mod_dir / f"datalist_{tag}.json"
        _write_json(path, _datalist(modality, split, tag, ratio, seed))
        datalists[tag] = str(path)
    return {
        "dir": str(mod_dir),
        "n_images": len(ids),
        "n_nuclei": sum(results[i]["n_nuclei"] for i in ids),
        "splits": {name: len(v) for name, v in split.items()},
        "datalists": datalists,
    }
