"""Memory at scale: one EMA ensemble update and one slice-wise inference over a synthetic N^3 uint8 volume.

Issue 4, item 4: for a 512x512x512 uint8 volume, one ensemble update of the EMA store and a full slice-wise
inference with instance output must keep the peak RSS under 4 GB. This script

1. writes a synthetic uint8 ``N^3`` volume as a TIFF stack (ImageJ, uncompressed, so it is memory-mapped when read)
   and a scribble volume with a few strokes on EVERY slice (the worst case: the ensemble covers all N slices);
2. in a child process, builds ``configs/train.json`` with ``--slice_axis 0`` (random network weights) and runs its
   ``ensemble#handler`` once, i.e. one full ensemble pass that writes the ``(1, N, N, N)`` float16 EMA volume;
3. in a child process, runs ``python -m monai.bundle run inference --config_file configs/inference.json
   --slice_axis 0`` on the volume (semantic, instances and probability volumes written);

measuring each child's wall time and the peak summed RSS of its process tree (:func:`benchmarks.common.run_measured`),
and writes ``benchmarks/results/volume_memory.md`` (and ``.json``).

Usage::

    .venv/bin/python benchmarks/volume_memory.py --work /tmp/s2l_volmem            # 512^3
    .venv/bin/python benchmarks/volume_memory.py --work /tmp/s2l_volmem --size 256 # a quicker check, labelled so
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
LIMIT_MB = 4096.0


def make_volume(data_dir: Path, size: int, seed: int = 0) -> dict[str, str]:
    """Write ``images/vol.tif`` (uint8 ``size^3``), ``scribbles/vol.tif`` and ``datalist.json``; slice by slice."""
    import numpy as np
    from scipy import ndimage as ndi

    from s2l_monai.volumes import VolumeGeometry, VolumeWriter

    data_dir.mkdir(parents=True, exist_ok=True)
    item = {"image": "images/vol.tif", "scribble": "scribbles/vol.tif"}
    if not (data_dir / "datalist.json").is_file():
        rng = np.random.default_rng(seed)
        base = ndi.gaussian_filter(rng.random((size, size)), 6)
        base = ((base - base.min()) / (np.ptp(base) + 1e-9) * 255).astype(np.uint8)
        geometry = VolumeGeometry(shape=(size, size, size), spacing=(0.05, 0.004, 0.004), unit="micron")
        img = VolumeWriter(data_dir / item["image"], (size,) * 3, np.uint8, geometry)
        scr = VolumeWriter(data_dir / item["scribble"], (size,) * 3, np.uint8, geometry)
        for k in range(size):
            sl = np.roll(base, (k, 2 * k), axis=(0, 1))
            img.write_slice(0, k, sl)
            s = np.full((size, size), 255, np.uint8)
            s[sl > 170] = 1
            s[sl < 60] = 0
            s[:, : size // 2] = 255  # strokes on half of each slice only
            scr.write_slice(0, k, s)
        img.close()
        scr.close()
        (data_dir / "datalist.json").write_text(json.dumps({"training": [item], "test": [{"image": item["image"]}]}))
    return item


def child_ensemble(data_dir: Path, out_dir: Path, model: Path) -> None:
    """One ensemble pass of configs/train.json (slice_axis 0) with the weights in ``model``."""
    import torch
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    torch.set_num_threads(max(1, torch.get_num_threads()))
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(REPO_ROOT), "dataset_dir": str(data_dir), "output_dir": str(out_dir),
                   "slice_axis": 0, "num_figures": 0, "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(model, map_location="cpu"))
    handler = parser.get_parsed_content("ensemble#handler")
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 1
    start = time.perf_counter()
    handler(engine)
    print(json.dumps({"ensemble_seconds": time.perf_counter() - start, "items": handler._seen,
                      "ema_coverage": engine.state.metrics.get("ema_coverage")}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the volume, measure both steps, write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_volmem"))
    p.add_argument("--size", type=int, default=512, help="edge of the cubic volume (default 512)")
    p.add_argument("--instance-mode", default="slice", choices=["slice", "3d"])
    p.add_argument("--instance-method", default="connected", choices=["connected", "watershed"])
    p.add_argument("--results", type=Path, default=RESULTS_DIR / "volume_memory.json")
    p.add_argument("--child", choices=["ensemble"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = args.work / f"n{args.size}"
    data_dir, model = work / "data", work / "model.pt"
    if args.child == "ensemble":
        child_ensemble(data_dir, work / "train", model)
        return 0

    import torch
    from monai.bundle import ConfigParser

    t0 = time.perf_counter()
    make_volume(data_dir, args.size)
    prepare_seconds = time.perf_counter() - t0
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    net = parser.get_parsed_content("network_def")  # the shipped default network
    torch.save(net.state_dict(), model)
    log = work / "log.txt"
    rows: list[dict[str, Any]] = []

    import shutil

    shutil.rmtree(work / "train", ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(args.work), "--size", str(args.size),
           "--child", "ensemble"]
    res = common.run_measured(cmd, REPO_ROOT, log)
    if res.returncode != 0:
        print(f"ensemble step failed; see {log}", file=sys.stderr)
        return 1
    rows.append({"step": f"one EMA ensemble update ({args.size} slices)", "seconds": round(res.seconds, 1),
                 "peak_rss_mb": res.peak_rss_mb})

    shutil.rmtree(work / "infer", ignore_errors=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--slice_axis", "0", "--input_dir", str(data_dir / "images"), "--ckpt_path", str(model),
           "--output_dir", str(work / "infer"), "--instance_mode", args.instance_mode,
           "--instance_method", args.instance_method, "--save_probabilities", "true"]
    res = common.run_measured(cmd, REPO_ROOT, log)
    if res.returncode != 0:
        print(f"inference step failed; see {log}", file=sys.stderr)
        return 1
    rows.append({"step": f"slice-wise inference, instances '{args.instance_mode}' ({args.instance_method}), "
                         "semantic + instances + probability volumes written",
                 "seconds": round(res.seconds, 1), "peak_rss_mb": res.peak_rss_mb})

    machine = common.machine_info()
    record = {"size": args.size, "shape": [args.size] * 3, "dtype": "uint8", "rows": rows,
              "prepare_seconds": round(prepare_seconds, 1), "limit_mb": LIMIT_MB,
              "pass": all(r["peak_rss_mb"] < LIMIT_MB for r in rows), "machine": machine, "date": common.now_iso(),
              "git_commit": common.git_commit(REPO_ROOT),
              "command": "python benchmarks/volume_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    records = [r for r in common.load_records(args.results) if r.get("size") != args.size] + [record]
    common.write_json_atomic(args.results, records)
    md = args.results.with_suffix(".md")
    common.write_text_atomic(md, render(records))
    print(md.read_text())
    return 0


def render(records: Sequence[dict[str, Any]]) -> str:
    """The markdown report of all measured sizes."""
    lines = ["# Memory at scale: slice-wise ensemble and inference on a synthetic uint8 volume", "",
             "Generated by `benchmarks/volume_memory.py`; do not edit by hand. Peak RSS = max over 0.5 s polls of the",
             "summed VmRSS of the measured process and its children (file-backed pages of memory-mapped files",
             "count while resident, so this is an upper bound). Random network weights (the cost does not depend on",
             "them, except the number of instances). Target (issue 4): peak RSS < 4096 MB for 512^3.", ""]
    for r in sorted(records, key=lambda r: -int(r["size"])):
        n = r["size"]
        label = "" if n == 512 else " (NOT the 512^3 target size)"
        lines += [f"## {n}x{n}x{n} uint8{label}", "",
                  f"- **Machine:** {common.machine_line(r.get('machine', {}))}",
                  f"- **Command:** `{r.get('command')}`; {r.get('date')}; commit {r.get('git_commit')}",
                  f"- **Result:** {'PASS' if r.get('pass') else 'FAIL'} (every step under {r['limit_mb']:.0f} MB)"
                  + ("" if n == 512 else "; this size does NOT establish the 512^3 target"),
                  ""]
        lines += common.markdown_table(["step", "wall s", "peak RSS MB"],
                                       [[x["step"], common.fmt(x["seconds"], 1), common.fmt(x["peak_rss_mb"], 0)]
                                        for x in r["rows"]]).splitlines()
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
