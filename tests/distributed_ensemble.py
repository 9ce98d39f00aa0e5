"""Run the bundle's EMA ensemble twice with given network weights, in one process or under ``torchrun``.

Used by ``tests/test_distributed.py`` (not a test module itself):

    python tests/distributed_ensemble.py DATA OUT WEIGHTS [SNAPSHOT]
    torchrun --nproc_per_node 2 tests/distributed_ensemble.py DATA OUT WEIGHTS [SNAPSHOT]

It builds ``configs/train.json`` + ``configs/multi_gpu_train.json`` as the bundle does (``initialize`` included),
loads ``WEIGHTS`` into the network, runs ``ensemble#handler`` on the trainer, copies the EMA store to ``SNAPSHOT``
(rank 0, after a barrier), and runs the ensemble a second time.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    data, out, weights = argv[:3]
    snapshot = argv[3] if len(argv) > 3 else None
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), str(REPO / "configs" / "multi_gpu_train.json")])
    parser.update({
        "bundle_root": str(REPO), "dataset_dir": data, "output_dir": out, "ckpt_dir": f"{out}/models",
        "infer_roi_size": [64, 64], "roi_size": [64, 64], "num_workers": 0, "batch_size": 4, "num_samples": 2,
    })
    parser.get_parsed_content("initialize")
    from s2l_monai import distributed

    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(weights, map_location="cpu"))
    trainer = parser.get_parsed_content("train#trainer")
    handler = parser.get_parsed_content("ensemble#handler")
    handler(trainer)
    distributed.barrier()
    if snapshot and distributed.is_main_process():
        shutil.copytree(Path(out) / "ema", snapshot)
    distributed.barrier()
    handler(trainer)
    parser.get_parsed_content("finalize")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
