"""A simulated annotator (issue 18, item 4): does "where to scribble next" beat scribbling images at random?

    python benchmarks/active_learning.py                       # DSB-Fluo 30%, 4 rounds, uncertain and random x 3 seeds
    python benchmarks/active_learning.py --seeds 0 --rounds 2  # a shorter sitting; resumable

The annotator starts with the automatic scribbles (30% of the nuclei, ``s2l prepare dsb2018``) of a random
``--start`` share of the training images (the same images for both strategies at a seed). Each round it trains
(round 0 from scratch with ``--first_steps``; later rounds fine-tune the previous round's model for
``--round_steps`` with ``--pretrained_weights``), evaluates the model on the test split (flip-averaged inference,
watershed instances), then adds the scribbles of ``--add`` more training images, chosen

* ``uncertain``: by the trained model's uncertainty on the unscribbled images (``s2l suggest --candidates``:
  :func:`s2l_monai.suggestions.candidate_uncertainty`, the share of pixels at or above the run's threshold), most
  uncertain first;
* ``random``: at random (seeded).

Writes ``results/active_learning.json`` (one record per strategy, seed and round: images, scribbled pixels, IoU, DSB
score), ``.md`` (table, targets, command, machine, wall time, peak memory) and ``.svg`` (IoU and DSB score against
scribbled pixels; random as mean with its seed range). ``--dataset_dir``/``--datalist_name`` run it on any datalist
with scribbles and a labelled test split (the tests use the synthetic set).
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
COLOURS = {"uncertain": "#d62728", "random": "#1f77b4", "all": "#000000"}


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


def train(dataset: Path, out: Path, seed: int, steps: int, in_channels: int, start_from: Path | None) -> dict:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(dataset), "--datalist_name", "datalist.json", "--output_dir", str(out / "train"),
           "--ckpt_dir", str(out / "ckpt"), "--seed", str(seed), "--max_steps", str(steps),
           "--in_channels", str(in_channels), "--test_evaluation", "false", "--num_figures", "0"]
    if start_from is not None:
        cmd += ["--pretrained_weights", str(start_from)]
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


def svg_plot(records: list[dict[str, Any]], reference: dict[str, float] | None) -> str:
    """IoU and DSB score against scribbled pixels: one line per strategy (random: mean, its seed range as a band)."""
    width, height, pad = 420, 300, 55
    xs = [r["scribbled_pixels"] for r in records] or [0, 1]
    x_lo, x_hi = min(xs), max(xs)
    parts = []
    for index, (key, title) in enumerate((("iou", "foreground IoU (test)"), ("dsb", "DSB score (test, watershed)"))):
        values = [r[key] for r in records if r.get(key) is not None] + ([reference[key]] if reference else [])
        lo, hi = (min(values) - 0.01, max(values) + 0.01) if values else (0.0, 1.0)
        ref = (reference[key], COLOURS["all"]) if reference and reference.get(key) is not None else None
        ticks = [(x, f"{x:,.0f}") for x in (x_lo, (x_lo + x_hi) / 2, x_hi)]
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
    legend = [f'<text x="{60 + 160 * i}" y="{height + 15}" font-size="12" fill="{COLOURS[s]}">{label}</text>'
              for i, (s, label) in enumerate((("uncertain", "where to scribble next"), ("random", "random images"),
                                               ("all", "every image scribbled (dashed)")))]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 20}" height="{height + 25}">'
            + "".join(parts + legend) + "</svg>\n")


def targets(records: list[dict[str, Any]], reference: dict[str, float] | None) -> list[tuple[str, str, str]]:
    """Issue 18's targets, measured: ``(target, PASS|FAIL|pending, figures)``."""
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
    out.append(("uncertain beats random at every round by more than random's seed std (IoU)", status,
                "; ".join(t for _, _, t in wins) or "needs random with 2+ seeds"))
    if reference:
        reached = [r for r in records if r["strategy"] == "uncertain" and r["iou"] >= reference["iou"]]
        need = min((r["scribbled_pixels"] for r in reached), default=None)
        full = reference.get("scribbled_pixels")
        ok = need is not None and full and need <= 0.5 * full
        out.append(("uncertain reaches the all-scribbled IoU with at most half the scribbled pixels",
                    "PASS" if ok else "FAIL",
                    f"all scribbled: IoU {reference['iou']:.4f} with {full:,} px; uncertain reached it with "
                    + (f"{need:,} px" if need is not None else "no round")))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zip", type=Path, default=dsb.DEFAULT_ZIP)
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_dsb"), help="data and run folder (shared with dsb.py)")
    p.add_argument("--dataset_dir", type=Path, default=None, help="default: WORK/data/fluorescence (prepared)")
    p.add_argument("--datalist_name", default="datalist_30.json")
    p.add_argument("--in_channels", type=int, default=1)
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4, help="rounds after the first training")
    p.add_argument("--start", type=float, default=0.1, help="share of training images scribbled at first")
    p.add_argument("--add", type=float, default=0.1, help="share of training images added per round")
    p.add_argument("--first_steps", type=int, default=1200)
    p.add_argument("--round_steps", type=int, default=300)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "active_learning.json")
    args = p.parse_args(argv)
    start_time = time.perf_counter()
    dataset_dir = args.dataset_dir
    if dataset_dir is None:
        dsb.ensure_data(args.zip, args.work / "data", ["fluorescence"], None, 2)
        dataset_dir = args.work / "data" / "fluorescence"
    values, training, test = absolute_items(dataset_dir, args.datalist_name)
    unlabelled = int(values.get("unlabelled", 255))
    n_start = max(1, round(args.start * len(training)))
    n_add = max(1, round(args.add * len(training)))
    records = load_records(args.results)
    reference = None
    peak = 0.0
    for seed in args.seeds:
        rng0 = np.random.default_rng(seed)
        first = [training[int(i)] for i in sorted(rng0.choice(len(training), n_start, replace=False))]
        for strategy in args.strategies:
            rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
            chosen = list(first)
            previous: Path | None = None
            for rnd in range(args.rounds + 1):
                key = (strategy, seed, rnd)
                done = next((r for r in records if (r["strategy"], r["seed"], r["round"]) == key), None)
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
                        print(f"[al] {strategy} seed {seed} round {rnd}: {len(chosen)} images, {steps} steps",
                              flush=True)
                        info = train(dataset, run, seed, steps, args.in_channels, previous)
                    scores = evaluate(dataset, model, run / "eval", args.in_channels)
                    pixels = sum(scribbled_pixels(i, unlabelled) for i in chosen)
                    done = {"strategy": strategy, "seed": seed, "round": rnd, "n_images": len(chosen),
                            "scribbled_pixels": pixels, **scores, **info, "images": [i["image"] for i in chosen],
                            "date": now_iso()}
                    records = [r for r in records if (r["strategy"], r["seed"], r["round"]) != key] + [done]
                    write_json_atomic(args.results, records)
                    print(f"[al] {strategy} seed {seed} round {rnd}: {pixels:,} scribbled px, IoU {scores['iou']:.4f}, "
                          f"DSB {scores['dsb']:.4f}", flush=True)
                peak = max(peak, float(done.get("peak_rss_mb") or 0))
                previous = model
                if rnd == args.rounds:
                    break
                pool = [i for i in training if i["image"] not in {c["image"] for c in chosen}]
                picks, _ = choose_next(strategy, pool, n_add, rng, model, args.in_channels)
                chosen = chosen + picks
    all_records = [r for r in load_records(dsb.RESULTS_DIR / "dsb.json")
                   if r.get("dataset") == "dsb_fluo" and r.get("method") == "s2l" and r.get("ratio") == 0.3
                   and str(r.get("profile")) == "default"] if args.dataset_dir is None else []
    if all_records:
        reference = {"iou": statistics.mean(r["iou"] for r in all_records),
                     "dsb": statistics.mean(r["dsb_score_watershed"] for r in all_records),
                     "scribbled_pixels": sum(scribbled_pixels(i, unlabelled) for i in training)}
    svg = args.results.with_suffix(".svg")
    write_text_atomic(svg, svg_plot(records, reference))
    rows = [[r["strategy"], str(r["seed"]), str(r["round"]), str(r["n_images"]), f"{r['scribbled_pixels']:,}",
             f"{r['iou']:.4f}", f"{r['dsb']:.4f}",
             "" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}"]
            for r in sorted(records, key=lambda r: (r["strategy"], r["seed"], r["round"]))]
    text = "\n".join([
        "# Where to scribble next: a simulated annotator (issue 18)",
        "",
        f"Command: `python benchmarks/active_learning.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine_line(machine_info())}  ",
        f"Date: {now_iso()}; wall time of this invocation {(time.perf_counter() - start_time) / 60:.1f} min; peak RSS "
        f"of a training {peak:.0f} MB",
        "",
        f"Dataset: {dataset_dir.name} ({args.datalist_name}), {len(training)} training and {len(test)} test images. "
        f"Start: the scribbles of {n_start} images (the same for both strategies at a seed); each round adds "
        f"{n_add}; round 0 trains {args.first_steps} steps from scratch, later rounds fine-tune the previous model "
        f"for {args.round_steps} steps. Test split, flip-averaged inference, watershed instances. "
        f"Plot: [{svg.name}]({svg.name}).",
        "",
        markdown_table(["strategy", "seed", "round", "images", "scribbled px", "IoU", "DSB score", "train s"], rows),
        "",
        "## Targets",
        "",
        markdown_table(["target", "status", "measured"], [list(t) for t in targets(records, reference)]),
        "",
    ])
    write_text_atomic(args.results.with_suffix(".md"), text)
    print(f"[al] wrote {args.results.with_suffix('.md')} and {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
