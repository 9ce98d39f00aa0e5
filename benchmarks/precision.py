"""Training-step time in float32 and in bfloat16 autocast (``--precision``), the default network and loss.

    python benchmarks/precision.py                      # 2 threads, 5 rounds of 10 steps per precision
    python benchmarks/precision.py --threads 1 --rounds 3

One optimiser step as the default training takes it: ``configs/train.json``'s network (``network_def``), a batch of
``batch_size`` patches of ``roi_size`` (synthetic nuclei, ``s2l_monai.data.synthetic``; 30% of each nucleus and of
the background scribbled, the rest unlabelled; pseudo-labels on every pixel, so ``L_up`` is on as after the
warm-up), the default ``ScribbleLoss`` (class weights [3, 1], λ 0.5, the CRF term with weight 1), RAdam; forward
through :class:`s2l_monai.inferers.AutocastInferer` as the training does. The two precisions alternate in blocks of
``--steps`` steps for ``--rounds`` rounds, so that a machine whose speed drifts (a shared VM) slows both alike;
the table gives each one's median ms per step over the rounds, with the network's forward and backward timed alone
too. On CPUs without native bfloat16 it measures the emulated speed (``auto`` keeps float32 there). Writes
``results/precision.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    git_commit,
    machine_info,
    machine_line,
    markdown_table,
    now_iso,
    write_json_atomic,
    write_text_atomic,
)

RESULTS = REPO / "benchmarks" / "results"


def default_setup(in_channels: int = 1) -> dict[str, Any]:
    """The network, loss settings and batch geometry of ``configs/train.json``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.json"))
    parser["in_channels"] = in_channels
    cfg = {k: parser[k] for k in ("batch_size", "roi_size", "tau", "lambda_up", "crf_weight", "learning_rate")}
    cfg["network_def"] = parser.get_parsed_content("network_def", instantiate=True)
    return cfg


def make_batch(batch: int, roi: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``B1HW`` in [0, 1] and targets ``B(1+2+1)HW``: scribbles, pseudo-label probabilities, the image."""
    from s2l_monai.data.synthetic import synthetic_nuclei

    rng = np.random.default_rng(seed)
    images, targets = [], []
    for i in range(batch):
        image, labels = synthetic_nuclei(tuple(roi), seed=seed + i)
        image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
        fg = labels > 0
        scribble = np.full(fg.shape, 255, np.float32)
        scribble[fg & (rng.random(fg.shape) < 0.3)] = 1
        scribble[~fg & (rng.random(fg.shape) < 0.3)] = 0
        prob_fg = np.clip(fg.astype(np.float32) * 0.9 + 0.05 + rng.normal(0, 0.05, fg.shape), 0, 1)
        images.append(image[None].astype(np.float32))
        targets.append(np.stack([scribble, 1 - prob_fg, prob_fg, image.astype(np.float32)]))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def time_steps(network, loss, optimizer, inferer, images, targets, steps: int) -> tuple[float, float]:
    """Median ms of a whole optimiser step, and of the network's forward and backward alone, over ``steps``."""
    whole, net_only = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = inferer(images, network)
        value = loss(logits, targets)
        value.backward()
        optimizer.step()
        whole.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        inferer(images, network).float().square().mean().backward()
        net_only.append(time.perf_counter() - t1)
    optimizer.zero_grad(set_to_none=True)
    return statistics.median(whole) * 1e3, statistics.median(net_only) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--steps", type=int, default=10, help="steps per precision per round (default 10)")
    p.add_argument("--out", default=str(RESULTS / "precision.md"), help="markdown result (JSON beside it)")
    args = p.parse_args(argv)

    from monai.inferers import SimpleInferer

    from s2l_monai.inferers import AutocastInferer
    from s2l_monai.losses import ScribbleLoss
    from s2l_monai.precision import native_bf16

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    cfg = default_setup()
    network = cfg["network_def"]
    loss = ScribbleLoss(tau=cfg["tau"], lambda_up=cfg["lambda_up"], class_weights=[3.0, 1.0],
                        crf_weight=cfg["crf_weight"], image_channels=1)
    optimizer = torch.optim.RAdam(network.parameters(), lr=cfg["learning_rate"])
    images, targets = make_batch(int(cfg["batch_size"]), tuple(cfg["roi_size"]))
    inferers = {"float32": AutocastInferer(SimpleInferer(), None),
                "bfloat16": AutocastInferer(SimpleInferer(), torch.bfloat16)}
    for inferer in inferers.values():  # warm-up: oneDNN builds its kernels on first use
        time_steps(network, loss, optimizer, inferer, images, targets, 2)
    per_round: dict[str, list[tuple[float, float]]] = {k: [] for k in inferers}
    for r in range(args.rounds):
        for name, inferer in inferers.items():
            per_round[name].append(time_steps(network, loss, optimizer, inferer, images, targets, args.steps))
            print(f"[precision] round {r + 1}/{args.rounds} {name}: {per_round[name][-1][0]:.1f} ms/step "
                  f"(network {per_round[name][-1][1]:.1f} ms)", flush=True)
    wall = time.time() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {name: {"step_ms": statistics.median(v[0] for v in vals),
                      "network_ms": statistics.median(v[1] for v in vals),
                      "step_ms_rounds": [round(v[0], 1) for v in vals]} for name, vals in per_round.items()}
    native, reason = native_bf16("cpu")
    info = machine_info()
    command = "python benchmarks/precision.py" + "".join(
        f" --{k} {v}" for k, v in (("threads", args.threads), ("rounds", args.rounds), ("steps", args.steps)))
    speedup = summary["float32"]["step_ms"] / summary["bfloat16"]["step_ms"]
    rows = [[name, f"{s['step_ms']:.1f}", f"{s['network_ms']:.1f}", ", ".join(f"{x:.0f}" for x in s["step_ms_rounds"])]
            for name, s in summary.items()]
    text = "\n".join([
        "# Training-step time: float32 vs bfloat16 autocast",
        "",
        "Generated by `benchmarks/precision.py`; do not edit by hand.",
        "",
        f"- **Command:** `{command}`",
        f"- **Machine:** {machine_line(info)}; native bfloat16: {'yes' if native else 'no'} ({reason})",
        f"- **Step:** the default network and loss (`configs/train.json`: batch {cfg['batch_size']} of "
        f"{cfg['roi_size'][0]}×{cfg['roi_size'][1]}, ScribbleLoss with L_up and the CRF term), RAdam; "
        f"{args.rounds} alternating rounds of {args.steps} steps each, {args.threads} torch thread(s)",
        f"- **Wall time:** {wall:.0f} s; **peak memory:** {peak_mb:.0f} MB (RSS of the process)",
        f"- **Written:** {now_iso()} (git {git_commit(REPO) or '?'})",
        "",
        markdown_table(["precision", "ms per step (median)", "network fwd+bwd ms", "per round"], rows),
        "",
        f"bfloat16 autocast takes a step in {1 / speedup:.2f} of float32's time ({speedup:.2f}× as fast).",
        "",
    ])
    out = Path(args.out)
    write_text_atomic(out, text)
    write_json_atomic(out.with_suffix(".json"), {"command": command, "machine": info, "native_bf16": native,
                                                 "reason": reason, "wall_seconds": wall, "peak_rss_mb": peak_mb,
                                                 "summary": summary, "date": now_iso()})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
