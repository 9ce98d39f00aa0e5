"""What the uncertainty maps add to the time of an EMA ensemble (issue 18's target: under 5%).

    python benchmarks/uncertainty_overhead.py [--dataset_dir DIR] [--repeats 5] [--out FILE.md]

Builds the ensemble of ``configs/train.json`` (its evaluator, EMA store and handler, parsed by MONAI's
``ConfigParser``) on a dataset (default: the built-in synthetic set, generated into the work folder), runs it
``--repeats`` times with the uncertainty maps on and off, alternating, with the network's random initial weights (the
time does not depend on them), and writes the median seconds of each and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    write_text_atomic,
)


def build(dataset_dir: str, output_dir: str, uncertainty: bool, datalist_name: str | None, num_figures: int):
    """The parsed ensemble handler of configs/train.json and a stand-in trainer engine."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser["bundle_root"] = str(REPO)
    parser["dataset_dir"] = dataset_dir
    parser["output_dir"] = output_dir
    parser["uncertainty_maps"] = uncertainty
    parser["num_figures"] = num_figures
    if datalist_name:
        parser["datalist_name"] = datalist_name
    handler = parser.get_parsed_content("ensemble#handler")
    parser.get_parsed_content("ema_store").clear()
    trainer = Engine(lambda engine, batch: None)
    trainer.network = parser.get_parsed_content("network")
    return handler, trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_dir", default=None, help="a dataset folder (default: the synthetic set, generated)")
    p.add_argument("--datalist_name", default=None, help="its datalist file, if not datalist.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num_figures", type=int, default=4, help="pseudo-label pictures per ensemble (the default 4)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "uncertainty_overhead.md"))
    args = p.parse_args(argv)
    import os

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        dataset = args.dataset_dir
        if dataset is None:
            from s2l_monai.data.synthetic import make_synthetic_dataset

            dataset = str(Path(work) / "synthetic")
            make_synthetic_dataset(dataset)
        runs = {flag: build(dataset, str(Path(work) / f"out_{flag}"), flag, args.datalist_name, args.num_figures)
                for flag in (False, True)}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        items = 0
        for epoch in range(1, args.repeats + 2):
            for flag in (False, True) if epoch % 2 else (True, False):
                handler, trainer = runs[flag]
                trainer.state.epoch, trainer.state.iteration = epoch, epoch
                start = time.perf_counter()
                handler(trainer)
                if epoch > 1:  # the first round fills caches and starts the averages
                    seconds[flag].append(time.perf_counter() - start)
                items = handler._seen
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    # the median of the paired differences: each round runs both, back to back, so slow phases of a shared machine
    # fall on both
    share = statistics.median((b - a) / a for a, b in zip(seconds[False], seconds[True]))
    rows = [["maps off", f"{off:.3f}", ", ".join(f"{s:.2f}" for s in seconds[False])],
            ["maps on", f"{on:.3f}", ", ".join(f"{s:.2f}" for s in seconds[True])]]
    text = "\n".join([
        "# Uncertainty maps: cost per ensemble",
        "",
        f"- command: `python benchmarks/uncertainty_overhead.py{' ' + ' '.join(argv or sys.argv[1:])}`",
        f"- date: {now_iso()}, commit {git_commit(REPO)}",
        f"- machine: {machine_line(machine_info())}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- dataset: {args.dataset_dir or 'the built-in synthetic set (24 training images of 256x256)'}, "
        f"{items} items per ensemble; the ensemble of configs/train.json, {args.num_figures} pseudo-label pictures "
        f"(with maps: three panels instead of two), {args.repeats} runs each, alternating, after one warm-up run",
        "",
        markdown_table(["ensemble", "median s", "runs (s)"], rows),
        "",
        f"**The maps add {100 * share:+.1f}% to an ensemble's time** (median of the {len(seconds[True])} paired "
        f"differences; medians {off:.3f} s off, {on:.3f} s on; target: under 5%).",
        "",
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
