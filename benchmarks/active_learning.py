"""A simulated annotator (issue 18, item 4): does "where to scribble next" beat scribbling at random?

    python benchmarks/active_learning.py                       # DSB-Fluo 30%, 4 rounds, uncertain and random x 3 seeds
    python benchmarks/active_learning.py --seeds 0 --rounds 2  # a shorter sitting; resumable
    python benchmarks/active_learning.py --variant regions     # the second variant: pieces inside suggested regions

The annotator starts with the automatic scribbles (30% of the nuclei, ``s2l prepare dsb2018``) of a random
``--start`` share of the training images (the same images for both strategies at a seed). Each round it trains
(round 0 from scratch with ``--first_steps``; later rounds fine-tune the previous round's model for
``--round_steps`` with ``--pretrained_weights``), evaluates the model on the test split (flip-averaged inference,
watershed instances), then adds scribbles in one of two ways (``--variant``).

``images`` (default): the scribbles of ``--add`` more training images, chosen

* ``uncertain``: by the trained model's uncertainty on the unscribbled images (``s2l suggest --candidates``:
  :func:`s2l_monai.suggestions.candidate_uncertainty`, the share of pixels at or above the run's threshold), most
  uncertain first;
* ``random``: at random (seeded).

``regions``: no new image; the annotator adds strokes on the images it has already scribbled, only where it is
asked to. The strokes it can draw are the pieces of a denser automatic scribble of the same image
(``--dense_datalist``, default ``datalist_100.json``: every nucleus' skeleton pieces and as many background pieces):
a piece is an 8-connected component of one class of that scribble (foreground and background apart), which is how
``auto_scribbles`` cuts them. A round adds, whole, every piece that intersects a box (pixels already scribbled keep
their class, so the strokes drawn so far are never lost: the 30% scribble is not a subset of the 100% one, on
DSB-Fluo 79,030 of its 178,961 pixels are not in it; the merged scribble is the union of the strokes drawn so
far and the added pieces). The boxes are

* ``uncertain``: the suggested regions of ``s2l suggest``'s ranking of the round's training (the last ensemble's
  ``uncertainty.json`` of the already-scribbled images: :func:`s2l_monai.suggestions.suggest`, the very code a user
  runs): the ``--region_images`` most uncertain images and their ``--max_regions`` largest uncertain regions;
* ``random``: pixel-matched to ``uncertain`` (:func:`matched_random_boxes`). Boxes are drawn one at a time, their
  sizes cycled from those the strategy suggests for this arm's model (image by image; the uncertain arm's boxes
  where it suggests none), each suggested image's boxes placed uniformly at random on one randomly chosen
  already-scribbled image (distinct images until all have been drawn; seeded), and the pieces each box touches
  are added, until the pixels added reach the uncertain arm's at the same seed and round: the first box that
  reaches or passes that target is the last. If every piece of the scribbled images is used up first, drawing
  stops and the record says ``exhausted``. Equal box numbers would not be equal effort: the suggested regions hold
  more strokes (DSB-Fluo, seed 0, round 0: 86 suggested boxes add 8,941 pixels, 86 random boxes of the same sizes
  3,036), so matching pixels is what makes "beats random at every round" a comparison at equal annotation effort
  (scribbled pixels). The random arm's round ``r`` therefore needs the uncertain arm's round ``r`` (its record, or
  its ``selection.json`` on resume): the uncertain arm of a seed runs first, whatever the order of
  ``--strategies``, and ``--strategies random`` alone fails with a clear message without it. The records of the
  random arm hold ``target_pixels`` (the uncertain arm's added pixels), ``added_pixels`` (achieved), ``n_boxes``
  and ``stop`` (``target``, ``exhausted``; ``box_limit`` after 100,000 boxes).

The merged scribble files are written into the round's run folder (``regions_<strategy>_s<seed>_r<round>/data/
scribbles``), never into the dataset folder; the round's ``selection.json`` beside them lists the boxes and the
pixels they add (and, for ``random``, the target, the number of boxes and why drawing stopped). Round 0 is
the same training as the ``images`` variant's (folder ``s<seed>_r0``, scores copied from its record when there is
one). Scribbled pixels are counted the same way in both variants: the non-unlabelled pixels of the training items'
scribble files.

Writes ``results/active_learning.json`` (one record per variant, strategy, seed and round: images, scribbled pixels,
IoU, DSB score; ``variant`` is ``images`` where a record has none), ``.md`` (a table and the targets per variant,
command, machine, wall time, peak memory) and ``.svg`` (IoU and DSB score against scribbled pixels, one row of
panels per variant; random as mean with its seed range). ``--dataset_dir``/``--datalist_name`` run it on any
datalist with scribbles and a labelled test split (the tests use the synthetic set).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import dsb  # noqa: E402
from benchmarks.common import (  # noqa: E402
    load_records,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    run_measured,
    svg_panel,
    write_json_atomic,
    write_text_atomic,
)

STRATEGIES = ("uncertain", "random")
VARIANTS = ("images", "regions")
COLOURS = {"uncertain": "#d62728", "random": "#1f77b4", "all": "#000000"}
LEGENDS = {"images": (("uncertain", "where to scribble next"), ("random", "random images")),
           "regions": (("uncertain", "suggested regions"), ("random", "random boxes"))}
VARIANT_TITLES = {"images": "k more images per round", "regions": "pieces in boxes on scribbled images"}


def variant_of(record: dict[str, Any]) -> str:
    """A record's variant (records made before the regions variant have none: ``images``)."""
    return str(record.get("variant") or "images")


def absolute_items(dataset_dir: Path, datalist_name: str) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The datalist's scribble values, training and test items, with absolute paths."""
    data = json.loads((dataset_dir / datalist_name).read_text())

    def absolute(item: dict[str, Any]) -> dict[str, Any]:
        return {k: str((dataset_dir / v).resolve()) if k in ("image", "scribble", "label") else v
                for k, v in item.items()}

    training = [absolute(i) for i in data["training"]]
    test = [absolute(i) for i in data.get("test", []) if "label" in i]
    return data.get("scribble_values", {"background": 0, "foreground": 1, "unlabelled": 255}), training, test


def scribbled_pixels(item: dict[str, Any], unlabelled: int) -> int:
    """Scribbled pixels of an item's scribble file."""
    from s2l_monai.data.checks import read_array

    return int(np.count_nonzero(read_array(item["scribble"]) != unlabelled))


def write_round_datalist(folder: Path, values: dict[str, Any], training: list[dict], test: list[dict]) -> Path:
    """``datalist.json`` of one round (absolute paths; ``id`` from the image name, as the bundle makes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"scribble_values": values, "training": training, "test": test}, indent=1))
    return path


def choose_next(strategy: str, pool: list[dict], k: int, rng: np.random.Generator, model: Path, in_channels: int,
                threshold: float = 0.4) -> tuple[list[dict], dict[str, float]]:
    """``k`` items of ``pool`` (images not scribbled yet) by the strategy; also each pool image's uncertain share
    (``uncertain`` only)."""
    if k <= 0 or not pool:
        return [], {}
    if strategy == "random":
        picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return [pool[int(i)] for i in sorted(picks)], {}
    from s2l_monai.suggestions import candidate_uncertainty

    shares = {}
    for path, u in candidate_uncertainty([p["image"] for p in pool], model, in_channels):
        shares[path] = float((u >= threshold).mean())
    ranked = sorted(pool, key=lambda p: (-shares[p["image"]], p["image"]))
    return ranked[:k], shares


# ------------------------------------------------------------------------------------------------------------------
# The regions variant: pieces of a denser scribble inside boxes on already-scribbled images
# ------------------------------------------------------------------------------------------------------------------


def box_mask(shape: tuple[int, int], boxes: list[list[int]]) -> np.ndarray:
    """Boolean ``HW``: True inside any box ``[y0, x0, y1, x1]`` (end exclusive)."""
    mask = np.zeros(shape, dtype=bool)
    for y0, x0, y1, x1 in boxes:
        mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return mask


def label_pieces(scribble: np.ndarray, dense: np.ndarray,
                 values: dict[str, Any]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The pieces of the denser scribble ``dense``: per class (background, foreground), its 8-connected components.

    Returns:
        ``[(class value, labels HW, gains)]``: ``gains[i]`` = pixels of piece ``i`` not scribbled in ``scribble``
        (``gains[0] = 0``, the rest of the image).
    """
    from scipy import ndimage

    scribble, dense = np.asarray(scribble), np.asarray(dense)
    if scribble.shape != dense.shape:
        raise ValueError(f"scribble {scribble.shape} and dense scribble {dense.shape} differ in shape")
    unlabelled = int(values.get("unlabelled", 255))
    pieces = []
    for name in ("background", "foreground"):
        value = int(values.get(name, 0 if name == "background" else 1))
        labels, n = ndimage.label(dense == value, structure=np.ones((3, 3), bool))
        gains = np.bincount(labels[scribble == unlabelled], minlength=n + 1).astype(np.int64)
        gains[0] = 0
        pieces.append((value, labels, gains))
    return pieces


def add_pieces(scribble: np.ndarray, dense: np.ndarray, boxes: list[list[int]],
               values: dict[str, Any]) -> tuple[np.ndarray, int]:
    """``scribble`` plus, whole, every piece of ``dense`` (:func:`label_pieces`) that intersects a box.

    Pixels already scribbled keep their value (strokes are never lost or relabelled).

    Returns:
        the merged scribble (a new array) and how many pixels it scribbles that ``scribble`` did not.
    """
    pieces = label_pieces(scribble, dense, values)
    unlabelled = int(values.get("unlabelled", 255))
    merged = np.asarray(scribble).copy()
    inside = box_mask(merged.shape[:2], boxes)
    added = 0
    for value, labels, _ in pieces:
        hit = np.unique(labels[inside])
        new = np.isin(labels, hit[hit > 0]) & (merged == unlabelled)
        merged[new] = value
        added += int(np.count_nonzero(new))
    return merged, added


def suggested_boxes(train_dir: Path, items: list[dict], k: int, max_regions: int, out: Path, model: Path,
                    in_channels: int) -> list[dict[str, Any]]:
    """The ``k`` most uncertain of the already-scribbled ``items`` and their suggested regions, best first, as
    ``s2l suggest`` ranks them from the training's last ensemble (``uncertainty.json``); without one (no ensemble
    ran) from the trained model's flips (``s2l suggest --candidates``). ``[{"image", "boxes", "uncertain_share"}]``."""
    from s2l_monai.suggestions import suggest

    names = {str(Path(i["image"]).resolve()): i["image"] for i in items}
    try:
        ranked, _ = suggest(train_dir, top=len(items), max_regions=max_regions, out_dir=out, figures=False)
    except FileNotFoundError:
        ranked, _ = suggest(train_dir, top=len(items), max_regions=max_regions, out_dir=out, figures=False,
                            candidates=[i["image"] for i in items], ckpt_path=model, in_channels=in_channels)
    chosen = []
    for s in ranked:
        path = str(Path(s.get("image") or "").resolve())
        if path in names and s.get("slice") is None:
            chosen.append({"image": names[path], "boxes": [list(r["box"]) for r in s["regions"]],
                           "uncertain_share": s.get("uncertain_share")})
        if len(chosen) == k:
            break
    return chosen


def _place(height: int, width: int, size: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """A box of ``size`` (cut to the image) placed uniformly at random on a ``height x width`` image."""
    h, w = max(1, min(size[0], height)), max(1, min(size[1], width))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return [top, left, top + h, left + w]


def matched_random_boxes(suggested: list[dict[str, Any]], scribbles: dict[str, np.ndarray],
                         dense: dict[str, np.ndarray], values: dict[str, Any], target: int,
                         rng: np.random.Generator, max_boxes: int = 100_000) -> dict[str, Any]:
    """Random boxes drawn one by one until the dense pieces they add reach ``target`` pixels (the random arm of the
    ``regions`` variant, pixel-matched to the uncertain arm).

    The box sizes cycle through those of ``suggested`` (``[{"boxes"}]``, in order); each suggested image's boxes go
    on one image drawn at random from ``scribbles`` (image -> current scribble; distinct images until every one has
    been drawn, then a new round of them), each box placed uniformly at random on it (cut to it when larger). A box
    adds, whole, every piece of ``dense`` (image -> denser scribble; 8-connected, per class, as :func:`add_pieces`)
    it intersects that no earlier box added, less the pixels already scribbled. The first box whose addition reaches
    or passes ``target`` is the last. Drawing also stops when the pieces of every image are used up (``exhausted``)
    or after ``max_boxes`` boxes.

    Returns:
        ``{"selection": [{"image", "boxes"}] (one entry per image, in the order first drawn), "target",
        "added" (pixels), "n_boxes", "stop": "target" | "exhausted" | "box_limit" | "no_boxes" (no size to
        draw)}``.
    """
    images = sorted(scribbles)
    sizes = [[(y1 - y0, x1 - x0) for y0, x0, y1, x1 in s["boxes"]] for s in suggested if s.get("boxes")]
    # every piece's gain (its pixels not scribbled yet), per image and class; a used piece's gain drops to 0
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    remaining = 0
    for image in images:
        try:
            labelled = label_pieces(scribbles[image], dense[image], values)
            pieces[image] = [(labels, gains) for _, labels, gains in labelled]
        except ValueError as error:
            raise ValueError(f"{image}: {error}") from None
        remaining += sum(int(gains.sum()) for _, gains in pieces[image])
    boxes: dict[str, list[list[int]]] = {}
    added, n_boxes, stop = 0, 0, "target"
    order: list[int] = []
    group = 0
    while added < target:
        if remaining == 0:
            stop = "exhausted"
            break
        if n_boxes >= max_boxes or not sizes:
            stop = "box_limit" if sizes else "no_boxes"
            break
        if not order:
            order = [int(i) for i in rng.permutation(len(images))]
        image = images[order.pop(0)]
        height, width = np.asarray(scribbles[image]).shape[:2]
        for size in sizes[group % len(sizes)]:
            box = _place(height, width, size, rng)
            boxes.setdefault(image, []).append(box)
            n_boxes += 1
            for labels, gains in pieces[image]:
                hit = np.unique(labels[box[0]:box[2], box[1]:box[3]])
                gain = int(gains[hit].sum())
                gains[hit] = 0
                added += gain
                remaining -= gain
            if added >= target or remaining == 0 or n_boxes >= max_boxes:
                break
        group += 1
    return {"selection": [{"image": image, "boxes": b} for image, b in boxes.items()], "target": int(target),
            "added": added, "n_boxes": n_boxes, "stop": stop}


def uncertain_round(work: Path, seed: int, rnd: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the uncertain arm of the ``regions`` variant added at ``seed`` and round ``rnd`` (``rnd >= 1``): its
    record's ``added_pixels`` and boxes, or else its ``selection.json`` in the work folder. The random arm's round
    ``rnd`` is pixel-matched to it, so it cannot be drawn without it (``RuntimeError``)."""
    record = next((r for r in records if _record_key(r) == ("regions", "uncertain", seed, rnd)), None)
    if record is not None and record.get("added_pixels") is not None:
        return {"added_pixels": int(record["added_pixels"]),
                "boxes": [{"image": name, "boxes": b} for name, b in record.get("boxes") or []]}
    path = work / "active_learning" / f"regions_uncertain_s{seed}_r{rnd}" / "data" / "selection.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return {"added_pixels": int(saved["added_pixels"]), "boxes": saved.get("selection") or []}
    raise RuntimeError(
        f"regions variant: the random arm's round {rnd} at seed {seed} is pixel-matched to the uncertain arm's, "
        f"which is not there (no regions/uncertain record of seed {seed} round {rnd} in the results, no {path}); "
        "run the uncertain arm first (--strategies uncertain random, with the same --work and --results)")


def choose_regions(strategy: str, train_dir: Path, items: list[dict], k: int, max_regions: int,
                   rng: np.random.Generator, out: Path, model: Path, in_channels: int,
                   dense: dict[str, str] | None = None, values: dict[str, Any] | None = None,
                   matched: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The boxes of one round of the regions variant: ``[{"image", "boxes"}]`` (see the module notes), and for
    ``random`` the drawing's account (:func:`matched_random_boxes`: ``target``, ``added``, ``n_boxes``, ``stop``).

    ``random`` needs ``dense`` (image -> dense scribble file), ``values`` and ``matched`` (:func:`uncertain_round`
    of the same seed and round: the pixels to reach; its boxes' sizes are used when this arm's model suggests none).
    """
    suggested = suggested_boxes(train_dir, items, k, max_regions, out, model, in_channels)
    if strategy == "uncertain":
        return suggested, {}
    from s2l_monai.data.checks import read_array

    if matched is None or dense is None or values is None:
        raise ValueError("the random arm needs the dense scribbles, the scribble values and the uncertain arm's round")
    if not any(s["boxes"] for s in suggested):
        suggested = matched["boxes"]
    scribbles = {i["image"]: read_array(i["scribble"]) for i in items}
    drawn = matched_random_boxes(suggested, scribbles, {i: read_array(dense[i]) for i in scribbles}, values,
                                 int(matched["added_pixels"]), rng)
    return drawn.pop("selection"), drawn


def merge_regions(selection: list[dict[str, Any]], items: list[dict], dense: dict[str, str], folder: Path,
                  values: dict[str, Any]) -> tuple[list[dict], int]:
    """The training items with the pieces of their dense scribble inside the selected boxes added: the changed
    scribbles written as PNG into ``folder`` (a run folder), the others unchanged. Returns the items and the number
    of pixels added."""
    from PIL import Image

    from s2l_monai.data.checks import read_array

    boxes = {s["image"]: s["boxes"] for s in selection if s["boxes"]}
    folder.mkdir(parents=True, exist_ok=True)
    out, added = [], 0
    for item in items:
        if item["image"] not in boxes:
            out.append(item)
            continue
        merged, n = add_pieces(read_array(item["scribble"]), read_array(dense[item["image"]]),
                               boxes[item["image"]], values)
        path = folder / f"{Path(item['image']).stem}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        Image.fromarray(merged.astype(np.uint8)).save(tmp)
        tmp.replace(path)
        out.append({**item, "scribble": str(path)})
        added += n
    return out, added


def train(dataset: Path, out: Path, seed: int, steps: int, in_channels: int, start_from: Path | None) -> dict:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(dataset), "--datalist_name", "datalist.json", "--output_dir", str(out / "train"),
           "--ckpt_dir", str(out / "ckpt"), "--seed", str(seed), "--max_steps", str(steps),
           "--in_channels", str(in_channels), "--test_evaluation", "false", "--num_figures", "0"]
    # round 0 from scratch: the shipped weights (the default's start) were trained on DSB-Fluo's training images
    cmd += ["--pretrained_weights", "" if start_from is None else str(start_from)]
    result = run_measured(cmd, cwd=REPO, log_path=out / "train.log")
    if result.returncode != 0:
        raise RuntimeError(f"training failed; see {out / 'train.log'}")
    return {"train_seconds": round(result.seconds, 1), "peak_rss_mb": result.peak_rss_mb}


def evaluate(dataset: Path, model: Path, out: Path, in_channels: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", dsb.eval_run_id(), "--config_file",
           "['configs/inference.json','configs/evaluate.json']", "--dataset_dir", str(dataset), "--datalist_name",
           "datalist.json", "--ckpt_path", str(model), "--output_dir", str(out), "--instance_method", "watershed",
           "--in_channels", str(in_channels)]
    result = run_measured(cmd, cwd=REPO, log_path=out / "eval.log")
    if result.returncode != 0:
        raise RuntimeError(f"evaluation failed; see {out / 'eval.log'}")
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary.get(k) for k in ("iou", "dsb", "mdice")}


def _svg_row(records: list[dict[str, Any]], reference: dict[str, float] | None, variant: str, y0: float,
             width: int = 420, height: int = 300, pad: int = 55) -> list[str]:
    """One row of the figure: IoU and DSB score against scribbled pixels for one variant, shifted down by ``y0``."""
    xs = [r["scribbled_pixels"] for r in records] or [0, 1]
    x_lo, x_hi = min(xs), max(xs)
    parts = []
    for index, (key, title) in enumerate((("iou", "foreground IoU (test)"), ("dsb", "DSB score (test, watershed)"))):
        values = [r[key] for r in records if r.get(key) is not None] + ([reference[key]] if reference else [])
        lo, hi = (min(values) - 0.01, max(values) + 0.01) if values else (0.0, 1.0)
        ref = (reference[key], COLOURS["all"]) if reference and reference.get(key) is not None else None
        ticks = [(x, f"{x:,.0f}") for x in (x_lo, (x_lo + x_hi) / 2, x_hi)]
        if variant != "images":
            title = f"{variant} variant: {title}"
        panel, px, py = svg_panel(index * (width + 20), title, "scribbled pixels", (x_lo, x_hi), (lo, hi), ticks,
                                  ref, width, height, pad)
        parts += panel
        for strategy in STRATEGIES:
            rounds = sorted({r["round"] for r in records if r["strategy"] == strategy})
            pts, band_hi, band_lo = [], [], []
            for rnd in rounds:
                rs = [r for r in records if r["strategy"] == strategy and r["round"] == rnd and r.get(key) is not None]
                if not rs:
                    continue
                x = statistics.mean(r["scribbled_pixels"] for r in rs)
                vals = [r[key] for r in rs]
                pts.append((px(x), py(statistics.mean(vals))))
                band_hi.append((px(x), py(max(vals))))
                band_lo.append((px(x), py(min(vals))))
            if len(pts) > 1 and any(abs(a[1] - b[1]) > 0.1 for a, b in zip(band_hi, band_lo)):
                poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in band_hi + band_lo[::-1])
                parts.append(f'<polygon points="{poly}" fill="{COLOURS[strategy]}" fill-opacity="0.15" stroke="none"/>')
            if pts:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{COLOURS[strategy]}" '
                             'stroke-width="2"/>')
    parts += [f'<text x="{60 + 160 * i}" y="{height + 15}" font-size="12" fill="{COLOURS[s]}">{label}</text>'
              for i, (s, label) in enumerate(LEGENDS[variant] + (("all", "every image scribbled (dashed)"),))]
    if y0:
        return [f'<g transform="translate(0,{y0})">', *parts, "</g>"]
    return parts


def svg_plot(records: list[dict[str, Any]], reference: dict[str, float] | None) -> str:
    """IoU and DSB score against scribbled pixels, one row of two panels per variant with records: one line per
    strategy (random: mean, its seed range as a band)."""
    width, height = 420, 300
    rows = [v for v in VARIANTS if any(variant_of(r) == v for r in records)] or ["images"]
    parts = []
    for index, variant in enumerate(rows):
        parts += _svg_row([r for r in records if variant_of(r) == variant], reference, variant,
                          index * (height + 35), width, height)
    total = len(rows) * (height + 35) - 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 20}" height="{total}">'
            + "".join(parts) + "</svg>\n")


def targets(records: list[dict[str, Any]], reference: dict[str, float] | None,
            variant: str = "images") -> list[tuple[str, str, str]]:
    """Issue 18's targets, measured on one variant's records: ``(target, PASS|FAIL|pending, figures)``."""
    records = [r for r in records if variant_of(r) == variant]
    prefix = "" if variant == "images" else f"{variant}: "
    out = []
    rounds = sorted({r["round"] for r in records if r["round"] > 0})
    wins = []
    for rnd in rounds:
        ours = [r["iou"] for r in records if r["strategy"] == "uncertain" and r["round"] == rnd]
        rand = [r["iou"] for r in records if r["strategy"] == "random" and r["round"] == rnd]
        if ours and len(rand) >= 2:
            spread = statistics.stdev(rand)
            wins.append((rnd, statistics.mean(ours) - statistics.mean(rand) > spread,
                         f"round {rnd}: {statistics.mean(ours):.4f} vs {statistics.mean(rand):.4f} ± {spread:.4f}"))
    status = "pending" if not wins else ("PASS" if all(w for _, w, _ in wins) else "FAIL")
    out.append((f"{prefix}uncertain beats random at every round by more than random's seed std (IoU)", status,
                "; ".join(t for _, _, t in wins) or "needs random with 2+ seeds"))
    if reference:
        # a round reaches it when the MEAN over its seeds does (one lucky seed is not enough)
        by_round: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            if r["strategy"] == "uncertain":
                by_round.setdefault(r["round"], []).append(r)
        means = [(rnd, statistics.mean(r["scribbled_pixels"] for r in rs), statistics.mean(r["iou"] for r in rs),
                  len(rs)) for rnd, rs in sorted(by_round.items())]
        reached = [m for m in means if m[2] >= reference["iou"]]
        full = reference.get("scribbled_pixels")
        ok = bool(reached) and bool(full) and reached[0][1] <= 0.5 * full
        if reached:
            got = f"round {reached[0][0]}: IoU {reached[0][2]:.4f} with {reached[0][1]:,.0f} px (mean over seeds)"
        elif means:
            rnd, px, iou, n = max(means, key=lambda m: m[2])
            got = f"no round; best round {rnd}: IoU {iou:.4f} with {px:,.0f} px (mean over {n} seed(s))"
        else:
            got = "no round"
        out.append((f"{prefix}uncertain reaches the all-scribbled IoU with at most half the scribbled pixels",
                    "PASS" if ok else "FAIL",
                    f"all scribbled: IoU {reference['iou']:.4f} with {full:,} px; uncertain reached it in {got}"))
    return out


def _record_key(record: dict[str, Any]) -> tuple[str, str, int, int]:
    return variant_of(record), record["strategy"], record["seed"], record["round"]


def run_images(args: argparse.Namespace, strategy: str, seed: int, first: list[dict], training: list[dict],
               test: list[dict], values: dict[str, Any], n_add: int, records: list[dict]) -> list[dict]:
    """The rounds of one strategy and seed of the ``images`` variant; returns the records, updated."""
    unlabelled = int(values.get("unlabelled", 255))
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    chosen = list(first)
    previous: Path | None = None
    for rnd in range(args.rounds + 1):
        key = ("images", strategy, seed, rnd)
        done = next((r for r in records if _record_key(r) == key), None)
        # round 0 is the same training for every strategy of a seed: made once, in the first one's folder
        run = args.work / "active_learning" / (f"s{seed}_r0" if rnd == 0 else f"{strategy}_s{seed}_r{rnd}")
        model = run / "ckpt" / "model.pt"
        if done is not None and model.is_file():
            chosen = [i for i in training if i["image"] in set(done["images"])]
        else:
            dataset = write_round_datalist(run / "data", values, chosen, test).parent
            info = {"train_seconds": None, "peak_rss_mb": None}
            if not model.is_file():
                steps = args.first_steps if rnd == 0 else args.round_steps
                print(f"[al] {strategy} seed {seed} round {rnd}: {len(chosen)} images, {steps} steps", flush=True)
                info = train(dataset, run, seed, steps, args.in_channels, previous)
            scores = evaluate(dataset, model, run / "eval", args.in_channels)
            pixels = sum(scribbled_pixels(i, unlabelled) for i in chosen)
            done = {"variant": "images", "command": args.command, "strategy": strategy, "seed": seed, "round": rnd,
                    "n_images": len(chosen),
                    "scribbled_pixels": pixels, **scores, **info, "images": [i["image"] for i in chosen],
                    "date": now_iso()}
            records = [r for r in records if _record_key(r) != key] + [done]
            write_json_atomic(args.results, records)
            print(f"[al] {strategy} seed {seed} round {rnd}: {pixels:,} scribbled px, IoU {scores['iou']:.4f}, "
                  f"DSB {scores['dsb']:.4f}", flush=True)
        previous = model
        if rnd == args.rounds:
            break
        pool = [i for i in training if i["image"] not in {c["image"] for c in chosen}]
        picks, _ = choose_next(strategy, pool, n_add, rng, model, args.in_channels)
        chosen = chosen + picks
    return records


def run_regions(args: argparse.Namespace, strategy: str, seed: int, first: list[dict], test: list[dict],
                values: dict[str, Any], dense: dict[str, str], k: int, records: list[dict]) -> list[dict]:
    """The rounds of one strategy and seed of the ``regions`` variant (module notes); returns the records, updated.

    The random arm's round ``r`` is pixel-matched to the uncertain arm's round ``r`` at the same seed
    (:func:`uncertain_round`: its record, or its ``selection.json``), so that arm must have been run first.
    Resumable: a round with its record and model is not trained again; the boxes are drawn again from the saved
    uncertainty maps and the same random stream, so the merged scribbles come out the same."""
    unlabelled = int(values.get("unlabelled", 255))
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy), VARIANTS.index("regions")])
    items = list(first)
    previous: Path | None = None
    selection: list[dict[str, Any]] = []
    added = 0
    drawn: dict[str, Any] = {}
    for rnd in range(args.rounds + 1):
        key = ("regions", strategy, seed, rnd)
        done = next((r for r in records if _record_key(r) == key), None)
        run = args.work / "active_learning" / (f"s{seed}_r0" if rnd == 0 else f"regions_{strategy}_s{seed}_r{rnd}")
        if strategy == "random" and rnd > 0 and done is not None and "target_pixels" not in done:
            raise RuntimeError(
                f"{args.results} holds a regions/random record of seed {seed} round {rnd} made before the random arm "
                f"was pixel-matched (no target_pixels); remove the regions/random records of seed {seed} and the "
                f"folders {run.parent}/regions_random_s{seed}_r* and run again")
        model = run / "ckpt" / "model.pt"
        if done is None or not model.is_file():
            dataset = write_round_datalist(run / "data", values, items, test).parent
            info: dict[str, Any] = {"train_seconds": None, "peak_rss_mb": None}
            if not model.is_file():
                steps = args.first_steps if rnd == 0 else args.round_steps
                print(f"[al] regions {strategy} seed {seed} round {rnd}: {len(items)} images, {steps} steps",
                      flush=True)
                info = train(dataset, run, seed, steps, args.in_channels, previous)
            images = [i["image"] for i in items]
            # round 0 is the images variant's round 0 (same images, scribbles and model): its scores are reused
            same = next((r for r in records if rnd == 0 and r["seed"] == seed and r["round"] == 0
                         and r.get("images") == images and r.get("iou") is not None), None)
            scores = ({k_: same.get(k_) for k_ in ("iou", "dsb", "mdice")} if same is not None
                      else evaluate(dataset, model, run / "eval", args.in_channels))
            pixels = sum(scribbled_pixels(i, unlabelled) for i in items)
            matched = ({"target_pixels": drawn["target"], "stop": drawn["stop"]} if drawn else {})
            done = {"variant": "regions", "command": args.command, "strategy": strategy, "seed": seed, "round": rnd,
                    "n_images": len(items),
                    "scribbled_pixels": pixels, "added_pixels": added, **matched,
                    "n_boxes": sum(len(s["boxes"]) for s in selection), **scores, **info, "images": images,
                    "boxes": [[Path(s["image"]).name, s["boxes"]] for s in selection if s["boxes"]],
                    "dense_datalist": args.dense_datalist, "region_images": k, "max_regions": args.max_regions,
                    "date": now_iso()}
            records = [r for r in records if _record_key(r) != key] + [done]
            write_json_atomic(args.results, records)
            target = f" of {drawn['target']:,} ({drawn['stop']})" if drawn else ""
            print(f"[al] regions {strategy} seed {seed} round {rnd}: {pixels:,} scribbled px (+{added:,}{target}), "
                  f"IoU {scores['iou']:.4f}, DSB {scores['dsb']:.4f}", flush=True)
        previous = model
        if rnd == args.rounds:
            break
        following = args.work / "active_learning" / f"regions_{strategy}_s{seed}_r{rnd + 1}" / "data"
        matched_round = uncertain_round(args.work, seed, rnd + 1, records) if strategy == "random" else None
        selection, drawn = choose_regions(strategy, run / "train", items, k, args.max_regions, rng,
                                          following / "suggestions", model, args.in_channels, dense, values,
                                          matched_round)
        items, added = merge_regions(selection, items, dense, following / "scribbles", values)
        account = ({"target_pixels": drawn["target"], "drawn_pixels": drawn["added"], "n_boxes": drawn["n_boxes"],
                    "stop": drawn["stop"]} if drawn else {})
        write_json_atomic(following / "selection.json", {"strategy": strategy, "added_pixels": added, **account,
                                                         "selection": selection})
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", type=Path, default=dsb.DEFAULT_ZIP)
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_dsb"), help="data and run folder (shared with dsb.py)")
    p.add_argument("--dataset_dir", type=Path, default=None, help="default: WORK/data/fluorescence (prepared)")
    p.add_argument("--datalist_name", default="datalist_30.json")
    p.add_argument("--in_channels", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, default="images",
                   help="images: add the scribbles of more images; regions: add pieces of a denser scribble inside "
                        "boxes on the images already scribbled")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4, help="rounds after the first training")
    p.add_argument("--start", type=float, default=0.1, help="share of training images scribbled at first")
    p.add_argument("--add", type=float, default=0.1, help="share of training images added per round")
    p.add_argument("--dense_datalist", default="datalist_100.json",
                   help="regions: the datalist (in the dataset folder) whose scribbles are the pieces to add")
    p.add_argument("--region_images", type=int, default=None,
                   help="regions: images whose suggested regions a round scribbles (default: as many as --add)")
    p.add_argument("--max_regions", type=int, default=3, help="regions: suggested regions per image")
    p.add_argument("--first_steps", type=int, default=1200)
    p.add_argument("--round_steps", type=int, default=300)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "active_learning.json")
    args = p.parse_args(argv)
    args.command = " ".join(["python benchmarks/active_learning.py", *(argv if argv is not None else sys.argv[1:])])
    start_time = time.perf_counter()
    dataset_dir = args.dataset_dir
    if dataset_dir is None:
        dsb.ensure_data(args.zip, args.work / "data", ["fluorescence"], None, 2)
        dataset_dir = args.work / "data" / "fluorescence"
    values, training, test = absolute_items(dataset_dir, args.datalist_name)
    unlabelled = int(values.get("unlabelled", 255))
    n_start = max(1, round(args.start * len(training)))
    n_add = max(1, round(args.add * len(training)))
    n_regions = args.region_images if args.region_images is not None else n_add
    dense: dict[str, str] = {}
    if args.variant == "regions":
        dense_values, dense_items, _ = absolute_items(dataset_dir, args.dense_datalist)
        if any(int(dense_values.get(k, d)) != int(values.get(k, d))
               for k, d in (("background", 0), ("foreground", 1), ("unlabelled", 255))):
            raise ValueError(f"{args.dense_datalist} and {args.datalist_name} use different scribble values")
        dense = {i["image"]: i["scribble"] for i in dense_items}
        missing = [i["image"] for i in training if i["image"] not in dense]
        if missing:
            raise ValueError(f"{len(missing)} training images have no scribble in {args.dense_datalist}, e.g. "
                             f"{missing[0]}")
    records = load_records(args.results)
    for r in records:
        r.setdefault("variant", "images")
    reference = None
    peak = 0.0
    for seed in args.seeds:
        rng0 = np.random.default_rng(seed)
        first = [training[int(i)] for i in sorted(rng0.choice(len(training), n_start, replace=False))]
        # regions: the uncertain arm first, the random arm's rounds are pixel-matched to its rounds
        order = args.strategies if args.variant == "images" else [s for s in STRATEGIES if s in args.strategies]
        for strategy in order:
            if args.variant == "images":
                records = run_images(args, strategy, seed, first, training, test, values, n_add, records)
            else:
                records = run_regions(args, strategy, seed, first, test, values, dense, n_regions, records)
    peak = max([peak] + [float(r.get("peak_rss_mb") or 0) for r in records if variant_of(r) == args.variant
                         and r["seed"] in args.seeds and r["strategy"] in args.strategies])
    all_records = [r for r in load_records(dsb.RESULTS_DIR / "dsb.json")
                   if r.get("dataset") == "dsb_fluo" and r.get("method") == "s2l" and r.get("ratio") == 0.3
                   and str(r.get("profile")) == "default"] if args.dataset_dir is None else []
    if all_records:
        reference = {"iou": statistics.mean(r["iou"] for r in all_records),
                     "dsb": statistics.mean(r["dsb_score_watershed"] for r in all_records),
                     "scribbled_pixels": sum(scribbled_pixels(i, unlabelled) for i in training)}
    default_steps = json.loads((REPO / "configs" / "train.json").read_text()).get("max_steps")
    svg = args.results.with_suffix(".svg")
    write_text_atomic(svg, svg_plot(records, reference))
    sections = []
    for variant in VARIANTS:
        rs = sorted((r for r in records if variant_of(r) == variant),
                    key=lambda r: (r["strategy"], r["seed"], r["round"]))
        if not rs:
            continue
        if variant == "images":
            header = ["strategy", "seed", "round", "images", "scribbled px", "IoU", "DSB score", "train s"]
            steps = sorted({b["n_images"] - a["n_images"] for a in rs for b in rs if (a["strategy"], a["seed"])
                            == (b["strategy"], b["seed"]) and b["round"] == a["round"] + 1}) or [n_add]
            intro = (f"Each round adds the scribbles of {'/'.join(map(str, steps))} images (the uncertain ones or "
                     "random ones); `--variant images`.")
        else:
            header = ["strategy", "seed", "round", "images", "boxes", "added px", "target px", "scribbled px", "IoU",
                      "DSB score", "train s"]
            setting = rs[-1]
            intro = (f"Each round adds, on the {setting['n_images']} images scribbled at the start, every piece "
                     "(8-connected, per class) of the denser automatic scribble "
                     f"({setting.get('dense_datalist', args.dense_datalist)}; merged with the strokes drawn so far, "
                     "which are kept) that intersects a box: `uncertain`, the suggested regions of `s2l suggest`'s "
                     "ranking of the round's training (the "
                     f"{setting.get('region_images', n_regions)} most uncertain images, up to "
                     f"{setting.get('max_regions', args.max_regions)} regions each); `random`, pixel-matched to it: "
                     "boxes of the sizes `s2l suggest` gives its own model (cycled), placed at random on random "
                     "scribbled images and drawn one by one until the pieces they add reach the pixels the uncertain "
                     "arm added at the same seed and round (`target px`; the last box reaches or passes it, "
                     "*exhausted* where every piece of the scribbled images was used before), so the two arms compare "
                     "at equal annotation effort. Round 0 is the images variant's. `boxes` and `added px`: those "
                     "that made the round's scribbles; `--variant regions`.")
        rows = []
        for r in rs:
            row = [r["strategy"], str(r["seed"]), str(r["round"]), str(r["n_images"])]
            if variant == "regions":
                target = r.get("target_pixels")
                row += [str(r.get("n_boxes", 0)), f"{r.get('added_pixels', 0):,}"
                        + (" (exhausted)" if r.get("stop") == "exhausted" else ""),
                        "" if target is None else f"{target:,}"]
            row += [f"{r['scribbled_pixels']:,}", f"{r['iou']:.4f}", f"{r['dsb']:.4f}",
                    "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"]
            rows.append(row)
        commands = sorted({r.get("command") or "python benchmarks/active_learning.py" for r in rs})
        intro += " Made with " + ", ".join(f"`{c}`" for c in commands) + "."
        sections += [f"## Variant {variant}: {VARIANT_TITLES[variant]}", "", intro, "", markdown_table(header, rows),
                     "", "### Targets", "",
                     markdown_table(["target", "status", "measured"],
                                    [list(t) for t in targets(records, reference, variant)]), ""]
    text = "\n".join([
        "# Where to scribble next: a simulated annotator (issue 18)",
        "",
        f"Command (this invocation): `{args.command}`  ",
        f"Machine: {machine_line(machine_info())}  ",
        f"Date: {now_iso()}; wall time of this invocation {(time.perf_counter() - start_time) / 60:.1f} min; peak RSS "
        f"of a training {peak:.0f} MB",
        "",
        f"Dataset: {dataset_dir.name} ({args.datalist_name}), {len(training)} training and {len(test)} test images. "
        f"Start: the scribbles of {n_start} images (the same for both strategies at a seed); round 0 trains "
        f"{args.first_steps} steps from scratch, later rounds fine-tune the previous model for {args.round_steps} "
        "steps. Test split, flip-averaged inference, watershed instances. "
        f"Plot: [{svg.name}]({svg.name}) (one row per variant).",
        "",
        *([f"All scribbled (the plots' line and the targets' reference): Scribble2Label trained on every training "
           f"image's scribbles with the default recipe ({default_steps} optimiser steps), the DSB headline's records "
           f"(`dsb.json`, profile `default`, {len(all_records)} seed(s)): test IoU {reference['iou']:.4f}, DSB score "
           f"{reference['dsb']:.4f}, {reference['scribbled_pixels']:,} scribbled pixels. Round {args.rounds} here "
           f"has trained {args.first_steps + args.rounds * args.round_steps} steps in all ({args.first_steps} + "
           f"{args.rounds} x {args.round_steps}).", ""] if reference else []),
        *sections,
    ])
    write_text_atomic(args.results.with_suffix(".md"), text)
    print(f"[al] wrote {args.results.with_suffix('.md')} and {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
