"""Reliability benchmark (issue 15): the malformed-input corpus and kill -9 / resume, written as a markdown table.

Runs every case of ``tests/reliability_cases.py`` as a real ``python -m monai.bundle run training`` (expected: a
non-zero exit and one short message naming the broken file, no traceback, no input file changed), then a short
training (6 synthetic images of 64x64, 24 steps) killed with SIGKILL at seeded points (after an optimiser step,
mid-ensemble, between writing a checkpoint and renaming it) and resumed with ``--resume_from latest``; the resumed
run's final weights and EMA store are compared with an uninterrupted run's.

    python benchmarks/reliability.py            # ~6 min on 2 CPU cores; writes benchmarks/results/reliability.md
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.common import machine_info, machine_line, markdown_table, now_iso, write_text_atomic  # noqa: E402

KILL_STEPS = 24
#: point -> range of the pass that is killed (drawn with a seeded generator per point and repetition)
KILL_POINTS = {"step": (2, KILL_STEPS - 1), "ensemble_item": (1, 12), "checkpoint_write": (1, 5)}


def _first_lines(text: str, n: int = 2) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:n]).replace("|", "\\|")[:260]


def run_corpus(work: Path) -> list[list[str]]:
    from reliability_cases import TRAINING_CASES, error_text, run_training, snapshot, write_dataset

    rows = []
    for case in TRAINING_CASES:
        root = write_dataset(work / case.name / "data")
        expected, overrides = case.make(root)
        before = snapshot(root)
        start = time.perf_counter()
        proc = run_training(root, work / case.name / "run", *overrides)
        seconds = time.perf_counter() - start
        message = error_text(proc)
        ok = (
            proc.returncode != 0
            and expected in message
            and "Traceback" not in proc.stdout + proc.stderr
            and snapshot(root) == before
        )
        shown = message.replace(str(root), "<data>").replace(str(work), "<work>")
        rows.append([case.name, case.description, f"exit≠0, names `{Path(expected).name or expected}`",
                     f"exit {proc.returncode}: {_first_lines(shown, 3)}", f"{seconds:.1f}", "PASS" if ok else "FAIL"])
        print(f"[reliability] {case.name}: {'PASS' if ok else 'FAIL'} ({seconds:.1f} s)", flush=True)
    return rows


def _final(run: Path) -> dict:
    import torch

    ckpt = torch.load(run / "models" / "checkpoint_final.pt", weights_only=True)
    return {"network": ckpt["network"], "ema": ckpt["ema_store"]["items"], "iteration": ckpt["trainer"]["iteration"]}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")


def run_kills(work: Path, repeats: int) -> list[list[str]]:
    from reliability_cases import run_training, write_dataset

    from s2l_monai.faults import FAULT_ENV

    data = write_dataset(work / "data", n=6)
    args = ("--max_steps", str(KILL_STEPS), "--num_workers", "1", "--resume_from", "latest")
    start = time.perf_counter()
    proc = run_training(data, work / "reference", *args)
    reference_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    reference = _final(work / "reference")
    rows = [["uninterrupted", "–", "–", "–", f"{reference_s:.1f}", "–", "–", "–"]]
    for point, bounds in KILL_POINTS.items():
        for rep in range(repeats):
            n = random.Random(f"s2l-{point}-{rep}").randint(*bounds)
            run = work / f"{point}_{rep}"
            start = time.perf_counter()
            killed = run_training(data, run, *args, env={FAULT_ENV: f"{point}:{n}"})
            resumed = run_training(data, run, *args)
            seconds = time.perf_counter() - start
            ok = killed.returncode == -9 and resumed.returncode == 0
            final = _final(run) if resumed.returncode == 0 else None
            dw = _max_diff(reference["network"], final["network"]) if final else float("nan")
            de = _max_diff(reference["ema"], final["ema"]) if final else float("nan")
            kept = len(list((run / "models").glob("checkpoint_epoch=*.pt")))
            exact = ok and final is not None and final["iteration"] == KILL_STEPS and dw <= 1e-6 and de <= 1e-3
            rows.append([point, str(n), str(killed.returncode), str(resumed.returncode), f"{seconds:.1f}",
                         f"{dw:.2e}", f"{de:.2e}", f"{kept}; {'PASS' if exact and kept <= 2 else 'FAIL'}"])
            print(f"[reliability] kill at {point}:{n}: weights Δ {dw:.2e}, EMA Δ {de:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reliability.md")
    p.add_argument("--repeats", type=int, default=2, help="kills per point (default 2)")
    args = p.parse_args(argv)
    from benchmarks.common import ProcessTreeMonitor

    work = Path(tempfile.mkdtemp(prefix="s2l_reliability_"))
    start = time.perf_counter()
    import os

    with ProcessTreeMonitor(os.getpid()) as monitor:
        corpus = run_corpus(work / "corpus")
        kills = run_kills(work / "kills", args.repeats)
    wall = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    passed = sum(r[-1] == "PASS" for r in corpus)
    kills_ok = sum(r[-1].endswith("PASS") for r in kills[1:])
    text = "\n".join([
        "# Reliability: malformed inputs and kill -9 (issue 15)",
        "",
        f"Command: `python benchmarks/reliability.py --repeats {args.repeats}`  ",
        f"Machine: {machine_line(machine_info())}  ",
        f"Date: {now_iso()}; wall time {wall / 60:.1f} min; peak RSS {monitor.peak_mb:.0f} MB (all processes)",
        "",
        f"## Malformed training input: {passed} of {len(corpus)} cases as expected",
        "",
        "Each case is a 3-image dataset (64x64) with one thing broken, trained with `python -m monai.bundle run "
        "training --config_file configs/train.json --dataset_dir <data> ...`. Expected: a non-zero exit, one short "
        "message (no traceback) that names the broken file, and every input file unchanged (SHA-256 before/after).",
        "",
        markdown_table(["case", "input", "expected", "observed", "s", "result"], corpus),
        "",
        f"## kill -9 and resume: {kills_ok} of {len(kills) - 1} exact",
        "",
        f"6 images of 64x64, {KILL_STEPS} optimiser steps (4 epochs), data-loader worker on. Each run is killed "
        "with SIGKILL on the n-th pass through a point (`S2L_FAULT_AT=point:n`, n drawn with a seeded generator): "
        "`step` after an optimiser step, `ensemble_item` after one item's EMA update mid-ensemble, "
        "`checkpoint_write` after the checkpoint's temporary file is written and before it is renamed. It is then "
        "resumed with `--resume_from latest`. Δ columns: largest absolute difference to the uninterrupted run's "
        "final weights and EMA store (float16); exact means Δ weights ≤ 1e-6 and Δ EMA ≤ 1e-3 (one float16 step), "
        "at most `keep_checkpoints` (2) epoch checkpoints left.",
        "",
        markdown_table(["killed at", "n", "killed rc", "resumed rc", "s (both)", "Δ weights", "Δ EMA",
                        "checkpoints kept; result"], kills),
        "",
    ])
    write_text_atomic(args.out, text)
    print(f"[reliability] wrote {args.out}")
    return 0 if passed == len(corpus) and kills_ok == len(kills) - 1 else 1


if __name__ == "__main__":
    sys.exit(main())
