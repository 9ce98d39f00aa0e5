"""Training and inference with 1 and with N processes (``torchrun``, issue 17): steps/s, ensemble s, images/s.

    python benchmarks/distributed.py                    # 1 and 2 processes, the synthetic default set, 300 steps
    python benchmarks/distributed.py --procs 1 2 4 --steps 600

Each run is the default recipe (``configs/train.json``; with N > 1 plus ``configs/multi_gpu_train.json``, launched by
``torchrun --standalone --nproc_per_node N``) on the built-in synthetic set (24 training images of 256x256), with a
fixed step budget and no test evaluation. Every process takes ``batch_size`` crops per step, so N processes train
on N times the crops per step. From rank 0's log: the training time (schedule start to the end of training), the
ensembles' seconds; from the process tree: wall time and peak memory.

Then sharded inference (``configs/inference.json``, with N > 1 plus ``configs/multi_gpu_inference.json``) with the
1-process run's model, on a folder of synthetic images (dealt out image by image) and on one OME-Zarr volume (its
chunk rows split into one block per rank): wall time of the whole command, images (slices) and megapixels per
second, peak memory, and whether the N-process outputs equal the 1-process ones byte for byte. Writes
``results/distributed.md``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    run_measured,
    write_text_atomic,
)

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_log(text: str) -> dict[str, float]:
    """Training seconds, steps and ensemble seconds from rank 0's log of a bundle training."""
    start = re.search(_STAMP + r" - ScheduleHandler - INFO - schedule: (\d+) steps", text)
    end = re.search(_STAMP + r" - s2l - INFO - training finished after (\d+) steps", text)
    if not start or not end:
        raise ValueError("the log has no schedule or no end-of-training line")
    ensembles = [float(s) for s in re.findall(r"ensemble of \d+ items in ([\d.]+) s", text)]
    return {
        "train_seconds": _time(end.group(1)) - _time(start.group(1)),
        "steps": int(end.group(2)),
        "ensembles": len(ensembles),
        "ensemble_seconds": sum(ensembles),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_distributed"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distributed.md")
    p.add_argument("--infer_images", type=int, default=48, help="inference: synthetic images of 256x256 in the folder")
    p.add_argument("--infer_volume", type=int, nargs=3, default=[48, 512, 512], metavar=("Z", "Y", "X"),
                   help="inference: shape of the OME-Zarr volume (chunks of 4 slices x 256 x 256)")
    args = p.parse_args(argv)
    from s2l_monai.data.synthetic import make_synthetic_dataset

    begin = time.perf_counter()
    data = args.work / "data"
    if not (data / "datalist.json").is_file():
        make_synthetic_dataset(data, seed=0)
    rows, results = [], {}
    for n in args.procs:
        run = args.work / f"procs{n}"
        log = run / "train.log"
        if log.exists():
            log.unlink()
        head = [sys.executable, "-m", "monai.bundle"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
            "monai.bundle"]
        config = "configs/train.json" if n == 1 else "['configs/train.json','configs/multi_gpu_train.json']"
        cmd = [*head, "run", "training", "--config_file", config, "--dataset_dir", str(data), "--output_dir",
               str(run / "out"), "--ckpt_dir", str(run / "models"), "--max_steps", str(args.steps),
               "--test_evaluation", "false"]
        print(f"[distributed] {n} process(es): {' '.join(cmd)}", flush=True)
        result = run_measured(cmd, cwd=REPO, log_path=log)
        if result.returncode != 0:
            raise RuntimeError(f"{n} process(es) failed; see {log}")
        found = parse_log(log.read_text())
        results[n] = {**found, "wall": result.seconds, "peak_mb": result.peak_rss_mb}
    base = results[args.procs[0]]
    for n in args.procs:
        r = results[n]
        steps_s = r["steps"] / r["train_seconds"]
        crops_s = steps_s * 12 * n
        rows.append([str(n), str(r["steps"]), f"{r['wall']:.0f}", f"{r['train_seconds']:.0f}", f"{steps_s:.2f}",
                     f"{crops_s:.1f}", f"{crops_s / (base['steps'] / base['train_seconds'] * 12):.2f}",
                     f"{r['ensemble_seconds'] / max(1, r['ensembles']):.2f}", f"{r['peak_mb']:.0f}"])
    infer_rows = inference_rows(args, args.work / f"procs{args.procs[0]}" / "models" / "model.pt")
    info = machine_info()
    text = "\n".join([
        "# Training and inference with several processes (torchrun, issue 17)",
        "",
        f"Command: `python benchmarks/distributed.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {machine_line(info)}  ",
        f"Date: {now_iso()}; commit {git_commit(REPO)}; wall time of this benchmark "
        f"{(time.perf_counter() - begin) / 60:.1f} min",
        "",
        f"Default recipe on the synthetic set (24 training images of 256x256), {args.steps} optimiser steps, no test "
        "evaluation; N > 1: `torchrun --standalone --nproc_per_node N -m monai.bundle run training --config_file "
        "\"['configs/train.json','configs/multi_gpu_train.json']\"` (gloo on CPUs; torchrun gives each process one "
        "OpenMP thread). Each process takes 12 crops per step, so N processes train on 12 N crops per step. "
        "Training s: rank 0's clock from the schedule's start to the end of training (start-up excluded); "
        "ensemble s: mean per ensemble (each process predicts its share of the 24 images); peak memory: the whole "
        "process tree (all ranks and their data-loader workers).",
        "",
        markdown_table(["processes", "steps", "wall s", "training s", "steps/s", "crops/s", "crops/s vs 1",
                        "ensemble s", "peak MB"], rows),
        "",
        "## Inference",
        "",
        f"The {args.procs[0]}-process run's model, `configs/inference.json` as it is (flip-averaged prediction, "
        "watershed instances, semantic and instance outputs); N > 1: `torchrun --standalone --nproc_per_node N -m "
        "monai.bundle run inference --config_file \"['configs/inference.json','configs/multi_gpu_inference.json']\"`. "
        f"Folder: {args.infer_images} synthetic images of 256x256 (PNG), dealt out image by image. Volume: one "
        f"OME-Zarr volume of {' x '.join(map(str, args.infer_volume))} voxels in chunks of 4 x "
        f"{min(args.infer_volume[1], 256)} x {min(args.infer_volume[2], 256)}, "
        "`--slice_axis 0`: its chunk rows are cut into one contiguous block per rank, every rank writes its chunks "
        "into the same output stores. Wall s: the whole command (start-up, model loading, process group included); "
        "identical: every output file equals the 1-process run's, byte for byte.",
        "",
        markdown_table(["input", "processes", "wall s", "images/s", "Mpx/s", "vs 1", "peak MB", "identical"],
                       infer_rows),
        "",
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path (OME-Zarr stores are folders of chunk files)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def inference_rows(args: argparse.Namespace, model: Path) -> list[list[str]]:
    """Run the inference bundle with each number of processes on a folder and on one OME-Zarr volume."""
    import numpy as np

    from s2l_monai.data.synthetic import _write_png, synthetic_nuclei
    from s2l_monai.volumes import VolumeGeometry, write_volume

    folder = args.work / "infer_images"
    if len(list(folder.glob("*.png"))) != args.infer_images:
        for k in range(args.infer_images):
            _write_png(folder / f"img_{k:03d}.png", synthetic_nuclei((256, 256), seed=1000 + k)[0])
    z, y, x = args.infer_volume
    volume_dir = args.work / f"infer_volume_{z}x{y}x{x}"
    if not (volume_dir / "vol.ome.zarr").exists():
        slices = [synthetic_nuclei((y, x), seed=2000 + k, n_nuclei=(60, 140))[0] for k in range(z)]
        geometry = VolumeGeometry(shape=(z, y, x), spacing=(0.05, 0.004, 0.004), unit="micrometer",
                                  extra={"chunks": (4, min(y, 256), min(x, 256))})
        write_volume(volume_dir / "vol.ome.zarr", np.stack(slices), geometry)
    inputs = [("folder", f"folder, {args.infer_images} x 256x256", ["--input_dir", str(folder)], args.infer_images,
               args.infer_images * 256 * 256),
              ("volume", f"OME-Zarr volume {z}x{y}x{x}", ["--input_dir", str(volume_dir), "--slice_axis", "0"], z,
               z * y * x)]
    rows = []
    for tag, name, overrides, images, pixels in inputs:
        first: tuple[float, dict[str, bytes]] | None = None
        for n in args.procs:
            out = args.work / f"infer_{tag}_procs{n}"
            shutil.rmtree(out, ignore_errors=True)
            head = [sys.executable, "-m", "monai.bundle"] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
                "monai.bundle"]
            config = "configs/inference.json" if n == 1 else \
                "['configs/inference.json','configs/multi_gpu_inference.json']"
            cmd = [*head, "run", "inference", "--config_file", config, "--ckpt_path", str(model), "--output_dir",
                   str(out), *overrides]
            print(f"[distributed] inference, {name}, {n} process(es): {' '.join(cmd)}", flush=True)
            log = args.work / f"infer_procs{n}.log"
            result = run_measured(cmd, cwd=REPO, log_path=log)
            if result.returncode != 0:
                raise RuntimeError(f"inference with {n} process(es) failed; see {log}")
            tree = _tree(out)
            if first is None:
                first = (result.seconds, tree)
            same = "–" if n == args.procs[0] else ("yes" if tree == first[1] else "NO")
            rows.append([name, str(n), f"{result.seconds:.1f}", f"{images / result.seconds:.2f}",
                         f"{pixels / 1e6 / result.seconds:.2f}", f"{first[0] / result.seconds:.2f}",
                         f"{result.peak_rss_mb:.0f}", same])
    return rows


if __name__ == "__main__":
    sys.exit(main())
