"""Training with 1 and with N processes (``torchrun``, issue 17): optimiser steps per second and ensemble seconds.

    python benchmarks/distributed.py                    # 1 and 2 processes, the synthetic default set, 300 steps
    python benchmarks/distributed.py --procs 1 2 4 --steps 600

Each run is the default recipe (``configs/train.json``; with N > 1 plus ``configs/multi_gpu_train.json``, launched by
``torchrun --standalone --nproc_per_node N``) on the built-in synthetic set (24 training images of 256x256), with a
fixed step budget and no test evaluation. Every process takes ``batch_size`` crops per step, so N processes train
on N times the crops per step. From rank 0's log: the training time (schedule start to the end of training), the
ensembles' seconds; from the process tree: wall time and peak memory. Writes ``results/distributed.md``.
"""

from __future__ import annotations

import argparse
import re
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
    info = machine_info()
    text = "\n".join([
        "# Training with several processes (torchrun, issue 17)",
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
        "",
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
