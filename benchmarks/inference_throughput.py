"""Inference throughput (issue 17, item 0): images/s and Mpx/s end to end, and the network alone.

    python benchmarks/inference_throughput.py                          # synthetic sets, both instance methods
    python benchmarks/inference_throughput.py --repeats 3 --variant "inline=--postprocessing_workers 0"
    python benchmarks/inference_throughput.py --ckpt models/model.pt --sets 59x520x696 --methods watershed

Data: synthetic fluorescence nuclei (``s2l_monai.data.synthetic.synthetic_nuclei``; by default 59 images of
520x696 with 60-140 nuclei, and 200 of 256x256 with 15-35), generated once into ``--work``. Model: ``--ckpt``, or
else the default recipe trained for ``--train-steps`` steps on the built-in synthetic set (once, cached in
``--work``): the post-processing's cost depends on what the network predicts, so random weights would not do.

Each measurement is one real bundle run, ``configs/inference.json`` with ``--instance_method`` and the variant's
overrides, in a child process (``OMP_WAIT_POLICY=PASSIVE``, or ``--omp-wait-policy default`` for OpenMP's own
spinning, as a user runs it). The child times ``evaluator.run()`` (reading, network, instances, writing: "end to
end"; the ~10 s of imports and config parsing before it are in the wall time only), then the network alone: the same
inferer (test-time flips and sliding window as configured) on the preprocessed images held in memory. The parent
measures the process tree's wall time and peak summed RSS (shared pages of forked workers counted once per process)
and the CPU share other processes took meanwhile (``/proc/stat`` busy time minus this benchmark's own), so contended
figures are labelled as such. Runs are interleaved (variant by variant, repeat by repeat) so that contention hits
each alike; the table gives the median.
Writes ``results/inference_throughput.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    run_measured,
    write_json_atomic,
    write_text_atomic,
)

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SETS = ("59x520x696", "200x256x256")


# --------------------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------------------


def parse_set(text: str) -> tuple[int, int, int]:
    """``"59x520x696"`` -> ``(59, 520, 696)`` (count, height, width)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected COUNTxHEIGHTxWIDTH, got {text!r}")
    return parts[0], parts[1], parts[2]


def make_images(folder: Path, count: int, shape: tuple[int, int]) -> Path:
    """``count`` synthetic nuclei images of ``shape`` (the same files on every machine), written once."""
    import numpy as np
    from PIL import Image

    from s2l_monai.data.synthetic import synthetic_nuclei

    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    area = shape[0] * shape[1] / 65536  # nuclei per image scale with the area (15-35 on 256x256)
    n_nuclei = (round(15 * area), round(35 * area))
    for i in range(count):
        image, _ = synthetic_nuclei(shape, seed=np.random.default_rng([17, i]), n_nuclei=n_nuclei)
        Image.fromarray(image).save(folder / f"img_{i:04d}.png")
    done.write_text("")
    return folder


def trained_model(work: Path, steps: int) -> Path:
    """The default recipe trained ``steps`` steps on the built-in synthetic set (cached in ``work``)."""
    from s2l_monai.data.synthetic import make_synthetic_dataset

    ckpt = work / "model" / "model.pt"
    if ckpt.is_file():
        return ckpt
    data = work / "train_data"
    if not (data / "datalist.json").is_file():
        make_synthetic_dataset(data, seed=0)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(data), "--output_dir", str(work / "train"), "--ckpt_dir", str(work / "model"),
           "--max_steps", str(steps), "--test_evaluation", "false"]
    print(f"[throughput] training a model: {' '.join(cmd)}", flush=True)
    result = run_measured(cmd, cwd=REPO, log_path=work / "train.log")
    if result.returncode != 0 or not ckpt.is_file():
        raise RuntimeError(f"training failed; see {work / 'train.log'}")
    return ckpt


# --------------------------------------------------------------------------------------------------------------
# The child: one bundle run, timed inside
# --------------------------------------------------------------------------------------------------------------


def use_checkout(repo: Path) -> None:
    """Put ``repo`` first on ``sys.path``, so that ``s2l_monai`` comes from that checkout (a ``NAME@CHECKOUT``
    variant) rather than from this script's repository, which the module put first for ``benchmarks.common``."""
    loaded = sys.modules.get("s2l_monai")
    if loaded is not None and not str(Path(loaded.__file__ or "").resolve()).startswith(str(repo.resolve())):
        raise RuntimeError(f"s2l_monai is already imported from {loaded.__file__}, not from {repo}")
    sys.path.insert(0, str(repo))


def child(spec: dict[str, Any]) -> None:
    """Run ``configs/inference.json`` as ``monai.bundle run inference`` does, timing ``evaluator.run()``; then
    the network alone on the preprocessed images. Writes ``spec["result"]`` (JSON)."""
    use_checkout(Path(spec["repo"]))
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    repo = Path(spec["repo"])
    workflow = ConfigWorkflow(config_file=str(repo / "configs" / "inference.json"), workflow_type=None,
                              run_id="inference", **spec["overrides"])
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    marks: dict[str, float] = {}
    evaluator.add_event_handler(Events.STARTED, lambda _: marks.setdefault("start", time.perf_counter()))
    evaluator.add_event_handler(Events.COMPLETED, lambda _: marks.setdefault("end", time.perf_counter()))
    workflow.run()
    workflow.finalize()
    pixels = 0
    data = workflow.parser.get_parsed_content("data")
    preprocessing = workflow.parser.get_parsed_content("preprocessing")
    images = [preprocessing(dict(item))["image"] for item in data]
    pixels = sum(int(image.shape[-2]) * int(image.shape[-1]) for image in images)
    result = {"images": len(images), "pixels": pixels, "loop_s": marks["end"] - marks["start"]}
    if spec.get("network"):
        network = evaluator.network  # the module the run used: compiled (and warmed up) with --compile_network
        inferer = workflow.parser.get_parsed_content("inferer")
        network.eval()
        begin = time.perf_counter()
        with torch.no_grad():
            for image in images:
                inferer(image[None].as_tensor(), network)
        result["network_s"] = time.perf_counter() - begin
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------------------------


def _busy_jiffies() -> int:
    """All CPUs' busy time (user+nice+system+irq+softirq+steal) from ``/proc/stat``, in clock ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def child_env(repo: Path, omp_wait_policy: str = "PASSIVE") -> dict[str, str]:
    """The child's environment: ``repo`` first on the path, and ``OMP_WAIT_POLICY`` set to ``omp_wait_policy``, or
    removed for ``"default"`` (OpenMP's own spinning, what a user who sets nothing gets: 6.9 against 10.8 ms per
    256x256 forward pass on 2 idle cores, measured 2026-12-05; PASSIVE keeps contended timings sane)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "ignore"}
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def measure(
    repo: Path, overrides: dict[str, str], result_path: Path, log: Path, network: bool, omp_wait_policy: str = "PASSIVE"
) -> dict[str, Any]:
    """One child run; its timings, wall time, peak RSS and the CPU share other processes took meanwhile."""
    spec = {"repo": str(repo), "overrides": overrides, "result": str(result_path), "network": network}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = child_env(repo, omp_wait_policy)
    usage0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies()
    result = run_measured(cmd, cwd=repo, log_path=log, env=env)
    usage1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), _busy_jiffies()
    if result.returncode != 0:
        raise RuntimeError(f"inference failed; see {log}")
    found = json.loads(result_path.read_text())
    ours = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    busy = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
    cores = len(os.sched_getaffinity(0))
    return {**found, "wall_s": result.seconds, "peak_mb": result.peak_rss_mb, "cpu_s": ours,
            "others_share": max(0.0, (busy - ours) / (result.seconds * cores))}


def _value(text: str) -> Any:
    """A command-line override's value as ``monai.bundle run`` (fire) reads it: a Python literal, else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(text: str, repo: Path) -> tuple[str, Path, list[str]]:
    """``"name[@checkout]=--key value ..."`` -> ``(name, checkout, [--key, value, ...])`` (checkout: ``repo``)."""
    head, _, rest = text.partition("=")
    name, _, where = head.partition("@")
    return name.strip(), Path(where).resolve() if where else repo, shlex.split(rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sets", type=parse_set, nargs="+", default=[parse_set(s) for s in DEFAULT_SETS],
                   help="COUNTxHEIGHTxWIDTH synthetic sets (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=["watershed", "connected"], choices=["watershed", "connected"])
    p.add_argument("--variant", action="append", default=None,
                   help="NAME[@CHECKOUT]=OVERRIDES: bundle overrides (and another checkout, e.g. the code before a "
                        "change) to compare, interleaved (repeatable; default: 'default=', the config as is)")
    p.add_argument("--repo", type=Path, default=REPO,
                   help="checkout whose configs and s2l_monai are run (e.g. another branch, for before/after)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--network-for", nargs="*", default=None, metavar="VARIANT",
                   help="variants whose network alone is timed (default: all; it is the same for variants that differ "
                        "only after the network)")
    p.add_argument("--ckpt", type=Path, default=None)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--work", type=Path, default=Path("/tmp/s2l_inference_throughput"))
    p.add_argument("--out", type=Path, default=RESULTS / "inference_throughput.md")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY of the measured runs: PASSIVE (default; robust where other work runs) or "
                        "'default' (unset: OpenMP's spinning, what a user gets; faster on idle cores)")
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    begin = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt.resolve() if args.ckpt else trained_model(args.work, args.train_steps)
    variants = [parse_variant(v, args.repo.resolve()) for v in (args.variant or ["default="])]
    records: list[dict[str, Any]] = []
    for count, height, width in args.sets:
        folder = make_images(args.work / f"images_{count}x{height}x{width}", count, (height, width))
        for repeat in range(args.repeats):
            for method in args.methods:
                for name, checkout, extra in variants:
                    out = args.work / "out" / f"{name}_{method}_{count}x{height}x{width}"
                    overrides = {"ckpt_path": str(ckpt), "input_dir": str(folder), "output_dir": str(out),
                                 "instance_method": method}
                    overrides.update({k.lstrip("-"): _value(v) for k, v in zip(extra[::2], extra[1::2])})
                    print(f"[throughput] {count}x{height}x{width} {method} {name} (repeat {repeat + 1})", flush=True)
                    rec = measure(checkout, overrides, args.work / "result.json", args.work / "runs.log",
                                  network=repeat == 0 and method == args.methods[0]
                                  and (args.network_for is None or name in args.network_for),
                                  omp_wait_policy=args.omp_wait_policy)
                    rec.update(set=f"{count}x{height}x{width}", method=method, variant=name, repeat=repeat,
                               overrides=" ".join(extra), checkout=str(checkout), commit=git_commit(checkout))
                    print(f"[throughput]   {rec['images'] / rec['loop_s']:.1f} images/s, "
                          f"{rec['pixels'] / rec['loop_s'] / 1e6:.2f} Mpx/s, others took "
                          f"{100 * rec['others_share']:.0f}% of the CPUs", flush=True)
                    records.append(rec)
    info = machine_info()
    rows = []
    for set_name in dict.fromkeys(r["set"] for r in records):
        for method in args.methods:
            for name, checkout, extra in variants:
                runs = [r for r in records if (r["set"], r["method"], r["variant"]) == (set_name, method, name)]
                loop = statistics.median(r["loop_s"] for r in runs)
                images, pixels = runs[0]["images"], runs[0]["pixels"]
                nets = [r["network_s"] for r in records
                        if (r["set"], r["variant"]) == (set_name, name) and "network_s" in r]
                net = f"{pixels / statistics.median(nets) / 1e6:.2f}" if nets else "–"
                where = "" if checkout == args.repo.resolve() else f" ({checkout})"
                rows.append([set_name, method, name + where, f"`{' '.join(extra)}`" if extra else "(config as is)",
                             str(len(runs)), f"{loop:.1f}", f"{images / loop:.1f}", f"{pixels / loop / 1e6:.2f}",
                             net, f"{statistics.median(r['wall_s'] for r in runs):.1f}",
                             f"{max(r['peak_mb'] for r in runs):.0f}",
                             f"{100 * statistics.median(r['others_share'] for r in runs):.0f}%"])
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        "# Inference throughput (issue 17, item 0)",
        "",
        f"Command: `python benchmarks/inference_throughput.py {command}`  ",
        f"Machine: {machine_line(info)}  ",
        f"Date: {now_iso()}; commit {git_commit(args.repo)} ({args.repo.name}); wall time of this benchmark "
        f"{(time.perf_counter() - begin) / 60:.1f} min; model {ckpt}",
        "",
        "End to end = `evaluator.run()` of `configs/inference.json` (read, network with the configured test-time "
        "flips and sliding window, instances, write); network alone = the same inferer on the preprocessed images "
        "held in memory (measured in the first method's runs). Wall = the whole process (imports, config parsing, "
        "model loading included). Peak MB: summed RSS of the process tree. Others' CPU: share of all cores other "
        "processes used during the run (contention; 0% = an idle machine). Medians over the repeats.",
        "",
        markdown_table(["set", "instances", "variant", "overrides", "runs", "end-to-end s", "images/s", "Mpx/s",
                        "network alone Mpx/s", "wall s", "peak MB", "others' CPU"], rows),
        "",
        "",
    ])
    write_text_atomic(args.out, text)
    write_json_atomic(args.out.with_suffix(".json"), {"command": command, "machine": info, "records": records})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
