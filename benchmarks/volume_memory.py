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

``--format zarr`` (issue 17, item 4: volumes larger than memory): writes an OME-Zarr volume of ``--shape`` /
``--dtype`` / ``--chunks`` chunk row by chunk row (never whole in memory), runs only step 3 on it (semantic,
instances 'slice' and probability volumes written as OME-Zarr) and checks the peak RSS against ``--limit-mb``;
results in ``benchmarks/results/volume_memory_zarr.md`` (and ``.json``). The generated volume and the outputs are
deleted afterwards (``--keep`` keeps them).

Usage::

    .venv/bin/python benchmarks/volume_memory.py --work /tmp/s2l_volmem            # 512^3
    .venv/bin/python benchmarks/volume_memory.py --work /tmp/s2l_volmem --size 256 # a quicker check, labelled so
    .venv/bin/python benchmarks/volume_memory.py --format zarr --work /tmp/s2l_volmem \
        --shape 64 4096 4096 --dtype float32 --chunks 8 512 512 --limit-mb 1536     # a 4 GB OME-Zarr volume
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
ZARR_RESULTS = RESULTS_DIR / "volume_memory_zarr.json"


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


def make_zarr_volume(
    path: Path, shape: Sequence[int], dtype: Any = "uint8", chunks: Sequence[int] = (8, 512, 512), seed: int = 0
) -> Path:
    """Write a synthetic OME-Zarr volume chunk row by chunk row (memory: one row of chunks along z).

    The content is a smoothed random 512 x 512 tile (blob-like structures at about the nuclei scale), tiled over the
    plane and shifted from slice to slice; values span 0..255 whatever the dtype.
    """
    import numpy as np
    from scipy import ndimage as ndi

    from s2l_monai.ome_zarr import create_ome_zarr

    dtype = np.dtype(dtype)
    z, y, x = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    tile = ndi.gaussian_filter(rng.random((512, 512)), 6, mode="wrap")
    tile = ((tile - tile.min()) / (np.ptp(tile) + 1e-9) * 255).astype(np.float32)
    base = np.tile(tile, (-(-y // 512), -(-x // 512)))[:y, :x]
    array = create_ome_zarr(path, (z, y, x), dtype, chunks=chunks, spacing=(0.05, 0.004, 0.004), unit="micrometer")
    cz = int(array.chunks[0])
    for start in range(0, z, cz):
        stop = min(start + cz, z)
        row = np.empty((stop - start, y, x), dtype)
        for k in range(start, stop):
            row[k - start] = np.roll(base, (3 * k, 5 * k), axis=(0, 1))
        array[start:stop] = row
        del row
    return path


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main_zarr(args: argparse.Namespace) -> int:
    """``--format zarr``: slice-wise inference on a generated OME-Zarr volume, peak RSS against ``--limit-mb``."""
    import shutil

    import numpy as np
    import torch
    from monai.bundle import ConfigParser

    shape = tuple(args.shape)
    work = args.work / ("zarr_" + "x".join(map(str, shape)) + f"_{args.dtype}")
    images, out, model, log = work / "images", work / "infer", work / "model.pt", work / "log.txt"
    shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        make_zarr_volume(images / "vol.ome.zarr", shape, args.dtype, args.chunks)
        prepare_seconds = time.perf_counter() - t0
        volume_mb = float(np.prod(shape)) * np.dtype(args.dtype).itemsize / 2**20
        disk_mb = _tree_bytes(images) / 2**20
        torch.manual_seed(0)
        parser = ConfigParser()
        parser.read_config(str(REPO_ROOT / "configs" / "inference.json"))
        torch.save(parser.get_parsed_content("network_def").state_dict(), model)
        cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
               "--slice_axis", "0", "--input_dir", str(images), "--ckpt_path", str(model), "--output_dir", str(out),
               "--instance_mode", "slice", "--instance_method", args.instance_method, "--save_probabilities", "true"]
        res = common.run_measured(cmd, REPO_ROOT, log)
        if res.returncode != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            return 1
        outputs_mb = _tree_bytes(out) / 2**20
        written = sorted(p.name for p in out.iterdir() if p.name.endswith(".zarr"))
    finally:
        if not args.keep:
            shutil.rmtree(images, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    record = {
        "format": "zarr", "shape": list(shape), "dtype": args.dtype, "chunks": list(args.chunks),
        "volume_mb": round(volume_mb, 1), "volume_on_disk_mb": round(disk_mb, 1),
        "outputs_on_disk_mb": round(outputs_mb, 1), "outputs": written,
        "seconds": round(res.seconds, 1), "peak_rss_mb": res.peak_rss_mb, "limit_mb": args.limit_mb,
        "pass": res.peak_rss_mb < args.limit_mb, "prepare_seconds": round(prepare_seconds, 1),
        "instance_method": args.instance_method, "machine": common.machine_info(), "date": common.now_iso(),
        "git_commit": common.git_commit(REPO_ROOT), "command": " ".join(["python", *cmd[1:]]),
        "benchmark_command": "python benchmarks/volume_memory.py " + " ".join(sys.argv[1:]),
    }
    results = args.results if args.results != RESULTS_DIR / "volume_memory.json" else ZARR_RESULTS
    key = (tuple(record["shape"]), record["dtype"])
    records = [r for r in common.load_records(results) if (tuple(r["shape"]), r["dtype"]) != key] + [record]
    common.write_json_atomic(results, records)
    md = results.with_suffix(".md")
    common.write_text_atomic(md, render_zarr(records))
    print(md.read_text())
    return 0 if record["pass"] else 1


def render_zarr(records: Sequence[dict[str, Any]]) -> str:
    """The markdown report of the OME-Zarr runs."""
    import numpy as np

    lines = ["# Volumes larger than memory: slice-wise inference on an OME-Zarr volume", "",
             "Generated by `benchmarks/volume_memory.py --format zarr`; do not edit by hand. The volume is written",
             "chunk row by chunk row into `/tmp` and deleted after the run. Measured: the bundle's own command",
             "(below), peak RSS = max over 0.5 s polls of the summed VmRSS of that process and its children.",
             "Outputs: `vol_semantic` (uint8), `vol_instances` (uint32, instance_mode 'slice') and `vol_prob`",
             "(float32), all OME-Zarr with the input's chunks and scale. Random network weights. A float64 volume",
             "has 8 bytes a voxel: 4 GiB for 537 Mvoxel, a network workload a 2-core CPU finishes in under an hour",
             "(memory does not depend on the dtype beyond the chunk rows held). The 2 cores were shared with",
             "other jobs during the measured runs, so the wall times are pessimistic.", ""]
    for r in sorted(records, key=lambda r: -float(r["volume_mb"])):
        lines += [f"## {' x '.join(map(str, r['shape']))} {r['dtype']} ({r['volume_mb'] / 1024:.2f} GiB), "
                  f"chunks {' x '.join(map(str, r['chunks']))}", "",
                  f"- **Machine:** {common.machine_line(r.get('machine', {}))}",
                  f"- **Command:** `{r['command']}`",
                  f"- **Benchmark:** `{r['benchmark_command']}`; {r['date']}; commit {r['git_commit']}",
                  f"- **Result:** {'PASS' if r['pass'] else 'FAIL'}: peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(limit {r['limit_mb']:.0f} MB) for a {r['volume_mb']:.0f} MB volume "
                  f"({r['volume_mb'] / r['peak_rss_mb']:.1f}x the peak; outputs {r['outputs_on_disk_mb']:.0f} MB on "
                  f"disk); wall time {r['seconds']:.0f} s "
                  f"({float(np.prod(r['shape'])) / 1e6 / max(r['seconds'], 1e-9):.2f} Mvoxel/s)",
                  f"- Volume written in {r['prepare_seconds']:.0f} s ({r['volume_on_disk_mb']:.0f} MB on disk, "
                  "compressed); instances: " + r["instance_method"], ""]
    return "\n".join(lines)


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
    p.add_argument("--format", default="tiff", choices=["tiff", "zarr"],
                   help="tiff: the 512^3 ensemble + inference check; zarr: inference on a generated OME-Zarr volume")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 4096, 4096], help="zarr: Z Y X of the volume")
    p.add_argument("--dtype", default="float32", help="zarr: dtype of the volume")
    p.add_argument("--chunks", type=int, nargs=3, default=[8, 512, 512], help="zarr: chunk shape")
    p.add_argument("--limit-mb", type=float, default=1536.0, help="zarr: peak RSS allowed")
    p.add_argument("--keep", action="store_true", help="zarr: keep the generated volume and the outputs")
    p.add_argument("--child", choices=["ensemble"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.format == "zarr":
        return main_zarr(args)
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
