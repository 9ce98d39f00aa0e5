"""Scale-out with ``torchrun`` (gloo, 2 processes on the CPU): training, the sharded EMA ensemble, sharded inference.

Real ``torchrun --nproc_per_node 2`` subprocesses throughout; the comparisons are against the same work done in
one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from s2l_testing import default_network

from s2l_monai.data.datalist import item_id
from s2l_monai.data.synthetic import make_synthetic_dataset
from s2l_monai.distributed import ShardSampler, chunk_blocks, shard_indices

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRAIN = "['configs/train.json','configs/multi_gpu_train.json']"
INFER = "['configs/inference.json','configs/multi_gpu_inference.json']"
SMALL = ["--num_workers", "0", "--roi_size", "[64,64]", "--infer_roi_size", "[64,64]", "--batch_size", "4",
         "--num_samples", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "S2L_FAULT_AT")}
    return {**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(**env), timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _bundle(run_id: str, config: str, *overrides: str, processes: int = 2, ok: bool = True, **env: str):
    head = TORCHRUN if processes == 2 else [sys.executable]
    return _run([*head, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides], ok=ok, **env)


# ------------------------------------------------------------------------------------------------ sharing out
def test_shard_indices_every_item_once_volumes_whole():
    items = [{"image": f"{i}.png"} for i in range(5)]
    shares = [shard_indices(items, 2, r) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert shard_indices(items, 1, 0) == list(range(5))
    assert shard_indices(items, 8, 7) == []  # more ranks than items: nothing repeated
    # slices of a volume stay together; 2D items and volumes are dealt out as units, in order
    vol = [{"id": "a", "image": "a.tif", "slice": k} for k in range(3)] + [{"id": "b", "image": "b.tif", "slice": 0}]
    mixed = [{"image": "x.png"}, *vol, {"image": "y.png"}]
    assert [shard_indices(mixed, 2, r) for r in range(2)] == [[0, 4], [1, 2, 3, 5]]
    assert [shard_indices(mixed, 3, r) for r in range(3)] == [[0, 5], [1, 2, 3], [4]]
    sampler = ShardSampler(mixed, num_replicas=2, rank=1)
    assert list(sampler) == [1, 2, 3, 5] and len(sampler) == 4


def test_chunk_blocks_contiguous_chunk_aligned_every_slice_once():
    # hand-computed: rows of `extent` slices shared out in order, the first ranks taking the extra rows
    assert chunk_blocks(10, 3, 2) == [(0, 6), (6, 10)]  # rows 0-2 3-5 | 6-8 9 (the last row is short)
    assert chunk_blocks(10, 4, 3) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_blocks(16, 2, 3) == [(0, 6), (6, 12), (12, 16)]  # 8 rows: 3, 3, 2
    assert chunk_blocks(5, 4, 3) == [(0, 4), (4, 5), (5, 5)]  # more ranks than rows: an empty block
    assert chunk_blocks(7, 1, 2) == [(0, 4), (4, 7)]
    assert chunk_blocks(6, 8, 2) == [(0, 6), (6, 6)]
    for n, extent, ranks in [(1, 1, 1), (17, 4, 2), (33, 5, 4), (9, 9, 3), (100, 7, 8)]:
        blocks = chunk_blocks(n, extent, ranks)
        assert len(blocks) == ranks
        assert [k for start, stop in blocks for k in range(start, stop)] == list(range(n))  # each slice once, in order
        assert all(start % extent == 0 for start, stop in blocks if stop > start)  # whole chunk rows per rank
    with pytest.raises(ValueError):
        chunk_blocks(4, 0, 2)


def test_shard_indices_splits_marked_volumes_in_chunk_blocks():
    vol_a = [{"id": "a", "image": "a.ome.zarr", "slice": k, "num_slices": 10, "slice_block": 3} for k in range(10)]
    vol_b = [{"id": "b", "image": "b.tif", "slice": k, "num_slices": 2} for k in range(2)]  # no key: one writer
    vol_c = [{"id": "c", "image": "c.ome.zarr", "slice": k, "num_slices": 2, "slice_block": 4} for k in range(2)]
    items = [{"image": "x.png"}, *vol_a, *vol_b, *vol_c, {"image": "y.png"}]
    # a (4 chunk rows) is split: slices 0-5 (items 1-6) on rank 0, 6-9 (items 7-10) on rank 1; the others are
    # dealt out whole as before, c too (a single chunk row): x, c on rank 0, b, y on rank 1
    shares = [shard_indices(items, 2, r, split_key="slice_block") for r in range(2)]
    assert shares == [[0, 1, 2, 3, 4, 5, 6, 13, 14], [7, 8, 9, 10, 11, 12, 15]]
    assert sorted(shares[0] + shares[1]) == list(range(len(items)))
    # without split_key (training, the EMA store) every volume stays whole
    assert [shard_indices(items, 2, r) for r in range(2)] == [[0, 11, 12, 15], [*range(1, 11), 13, 14]]
    assert shard_indices(items, 1, 0, split_key="slice_block") == list(range(len(items)))
    sampler = ShardSampler(items, num_replicas=2, rank=1, split_key="slice_block")
    assert list(sampler) == shares[1] and sampler.rank == 1 and sampler.num_replicas == 2
    share = sampler.shares["a.ome.zarr"]
    assert list(sampler.shares) == ["a.ome.zarr"] and share.blocks == ((0, 6), (6, 10)) and share.counts == (6, 4)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_synthetic_dataset(root / "data", n_train=5, n_val=0, n_test=1, shape=(96, 96), seed=3)
    common = ["--dataset_dir", str(root / "data"), "--output_dir", str(root / "out"), "--ckpt_dir",
              str(root / "models"), *SMALL, "--max_steps", "24", "--keep_checkpoints", "12"]
    proc = _bundle("training", TRAIN, *common)
    return root, common, proc


@pytest.mark.slow
def test_torchrun_training_two_processes(ddp_run):
    root, _, proc = ddp_run
    log = proc.stdout + proc.stderr
    assert "torch.distributed: 2 processes, backend gloo" in log
    # rank 0 alone logs: one schedule line, one line per epoch (5 items over 2 ranks: 2 steps per epoch), one end
    assert log.count("ScheduleHandler - INFO - schedule: 24 steps (12.0 epochs of 2 steps)") == 1, log[-3000:]
    epochs = re.findall(r"s2l - INFO - epoch (\d+)/12 .*?L_sp ([\d.]+)", log)
    assert [int(e) for e, _ in epochs] == list(range(1, 13))
    assert log.count("training finished after 24 steps") == 1
    losses = [float(v) for _, v in epochs]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # the scribble loss falls
    # the ensembles covered every item (2 ranks' shares), and the checkpoint holds the whole store
    assert re.findall(r"ensemble of (\d+) items", log) and set(re.findall(r"ensemble of (\d+) items", log)) == {"5"}
    ckpt = torch.load(root / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert sorted(ckpt["ema_store"]["items"]) == sorted(item_id(f"images/synth_00{i}.png") for i in range(5))
    assert ckpt["trainer"]["iteration"] == 24 and ckpt["trainer"]["epoch_length"] == 2
    # a plain state dict (no DDP "module." prefix) that the single-process network loads
    default_network().load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu"))
    # rank-0-only outputs: one TensorBoard file, figures only of rank 0's share (items 0, 2, 4)
    assert len(list((root / "out" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    figures = {p.name.split("-")[0] for p in (root / "out" / "pseudo_labels").glob("*.png")}
    assert figures == {"synth_000", "synth_002", "synth_004"}
    # one uncertainty summary with every item, in the datalist's order
    summary = json.loads((root / "out" / "uncertainty" / "uncertainty.json").read_text())
    assert [e["id"] for e in summary["items"]] == [item_id(f"images/synth_00{i}.png") for i in range(5)]
    assert len(list((root / "out" / "uncertainty").glob("maps_*.u8"))) == 2  # one pack per rank
    assert not list((root / "out" / "ema").glob(".*tmp*"))
    assert (root / "out" / "test_evaluation" / "comparison.json").is_file()


@pytest.mark.slow
def test_resume_on_another_number_of_processes(ddp_run, tmp_path):
    root, common, _ = ddp_run
    epoch4 = tmp_path / "checkpoint_epoch=4.pt"
    shutil.copy(root / "models" / "checkpoint_epoch=4.pt", epoch4)  # step 8 of 24, 2 steps per epoch
    over = [*common[:2], "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models"), *common[6:]]
    proc = _bundle("training", "configs/train.json", *over, "--resume_from", str(epoch4), processes=1)
    log = proc.stdout + proc.stderr
    # one process: 5 items in batches of 2 are 3 steps per epoch; the 8 steps done are kept
    assert "resumed checkpoint had 2 steps per epoch, this run 3" in log and "epoch 4 -> 2" in log, log[-3000:]
    assert "training finished after 24 steps" in log
    ckpt = torch.load(tmp_path / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 24 and len(ckpt["ema_store"]["items"]) == 5


def test_torchrun_without_the_overlay_stops_with_a_message(tmp_path):
    proc = _bundle("training", "configs/train.json", "--dataset_dir", str(tmp_path / "none"), ok=False)
    assert proc.returncode != 0
    assert "without a process group: add the overlay" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ the ensemble
@pytest.fixture(scope="module")
def ensemble_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    make_synthetic_dataset(root / "data", n_train=5, n_val=0, n_test=0, shape=(96, 96), seed=4)
    torch.manual_seed(0)
    torch.save(default_network().state_dict(), root / "weights.pt")
    return root


def _store_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy")) if not p.name.startswith(".")}


@pytest.mark.slow
def test_sharded_ensemble_writes_the_single_process_store(ensemble_data):
    root = ensemble_data
    script = str(REPO / "tests" / "distributed_ensemble.py")
    args = [str(root / "data"), None, str(root / "weights.pt")]
    _run([sys.executable, script, *[str(root / "one") if a is None else a for a in args]])
    _run([*TORCHRUN, script, *[str(root / "two") if a is None else a for a in args]])
    one, two = _store_files(root / "one" / "ema"), _store_files(root / "two" / "ema")
    assert len(one) == 5 and one == two  # every item, every value (byte for byte), after two ensembles
    s1 = json.loads((root / "one" / "uncertainty" / "uncertainty.json").read_text())["items"]
    s2 = json.loads((root / "two" / "uncertainty" / "uncertainty.json").read_text())["items"]
    strip = ("map", "offset")
    assert [{k: v for k, v in e.items() if k not in strip} for e in s1] == \
           [{k: v for k, v in e.items() if k not in strip} for e in s2]


@pytest.mark.slow
def test_killed_rank_mid_ensemble_leaves_the_previous_store(ensemble_data):
    root = ensemble_data
    script = str(REPO / "tests" / "distributed_ensemble.py")
    out, snapshot = root / "killed", root / "after_first"
    # rank 1 holds items 1 and 3: its 3rd pass is the first item of the second ensemble
    proc = _run([*TORCHRUN, script, str(root / "data"), str(out), str(root / "weights.pt"), str(snapshot)], ok=False,
                S2L_FAULT_AT="ensemble_item:3", S2L_FAULT_RANK="1")
    assert proc.returncode != 0
    first = _store_files(snapshot)
    assert len(first) == 5 and _store_files(out / "ema") == first  # rank 0 finished its share: nothing published


# ------------------------------------------------------------------------------------------------ inference
@pytest.mark.slow
def test_sharded_inference_equals_single_process(ensemble_data, tmp_path):
    from test_volume_training import make_volume_dataset

    root = ensemble_data
    ckpt = ["--ckpt_path", str(root / "weights.pt"), "--infer_roi_size", "[64,64]"]
    folder = ["--input_dir", str(root / "data" / "images"), *ckpt]
    _bundle("inference", "configs/inference.json", *folder, "--output_dir", str(tmp_path / "one"), processes=1)
    _bundle("inference", INFER, *folder, "--output_dir", str(tmp_path / "two"))
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert len(one) == 10 and one == two
    # volumes (whole volumes per rank), 3D instances
    for name in ("va", "vb", "vc"):
        make_volume_dataset(tmp_path / "vol", shape=(4, 64, 64), scribbled=(1,), name=name)
    vol = ["--input_dir", str(tmp_path / "vol" / "images"), "--slice_axis", "0", "--instance_mode", "3d", *ckpt]
    _bundle("inference", "configs/inference.json", *vol, "--output_dir", str(tmp_path / "v1"), processes=1)
    _bundle("inference", INFER, *vol, "--output_dir", str(tmp_path / "v2"))
    v1 = {p.name: p.read_bytes() for p in (tmp_path / "v1").iterdir()}
    v2 = {p.name: p.read_bytes() for p in (tmp_path / "v2").iterdir()}
    assert len(v1) == 6 and v1 == v2


def test_benchmark_reads_rank_zero_log():
    sys.path.insert(0, str(REPO))
    from benchmarks.distributed import parse_log

    log = """2026-12-03 05:16:42,909 - ScheduleHandler - INFO - schedule: 8 steps (4.0 epochs of 2 steps); warm-up
2026-12-03 05:16:43,579 - EMAEnsembleHandler - INFO - Epoch 2, step 4: ensemble of 5 items in 0.1 s; 11.7% of
2026-12-03 05:16:44,278 - EMAEnsembleHandler - INFO - Epoch 4, step 8: ensemble of 5 items in 0.25 s; 11.6% of
2026-12-03 05:16:46,409 - s2l - INFO - training finished after 8 steps in 0.1 min of training; model: m.pt
"""
    found = parse_log(log)
    assert found["steps"] == 8 and found["ensembles"] == 2
    assert found["train_seconds"] == pytest.approx(3.5) and found["ensemble_seconds"] == pytest.approx(0.35)
    with pytest.raises(ValueError):
        parse_log("nothing")


# ------------------------------------------------------------------------------------------------ one volume, 2 ranks
def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (chunks, ``.zarray``, ``.zattrs``, ``.zgroup``) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("instance_mode", ["slice", "3d"])
def test_one_ome_zarr_volume_split_across_ranks_equals_single_process(ensemble_data, tmp_path, instance_mode):
    """10 slices in chunk rows of 3: rank 0 writes slices 0-5, rank 1 slices 6-9 into the same stores; semantic,
    instances (per-slice ids numbered across the blocks, or 3D components labelled by rank 0 at the end) and
    probabilities equal the single-process outputs file for file. A killed rank leaves the previous outputs."""
    from s2l_monai.data.synthetic import synthetic_nuclei
    from s2l_monai.volumes import VolumeGeometry, read_volume, write_volume

    shape, chunks = (10, 64, 64), (3, 32, 32)
    image = np.stack([synthetic_nuclei(shape[1:], seed=k, n_nuclei=(4, 7))[0] for k in range(shape[0])])
    geometry = VolumeGeometry(shape=shape, spacing=(0.05, 0.004, 0.004), unit="micrometer", extra={"chunks": chunks})
    write_volume(tmp_path / "in" / "vol.ome.zarr", image, geometry)
    args = ["--input_dir", str(tmp_path / "in"), "--slice_axis", "0", "--ckpt_path", str(ensemble_data / "weights.pt"),
            "--infer_roi_size", "[64,64]", "--save_probabilities", "true", "--instance_method", "connected",
            "--min_size", "4", "--instance_mode", instance_mode]
    _bundle("inference", "configs/inference.json", *args, "--output_dir", str(tmp_path / "one"), processes=1)
    proc = _bundle("inference", INFER, *args, "--output_dir", str(tmp_path / "two"))
    log = proc.stdout + proc.stderr
    # each rank wrote its block of chunk rows (rank 0 logs what every rank wrote)
    assert ("Wrote vol_semantic.ome.zarr, vol_instances.ome.zarr, vol_prob.ome.zarr for vol.ome.zarr "
            "(slices 0-5 on rank 0, 6-9 on rank 1)") in log, log[-3000:]
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    for kind in ("semantic", "instances", "prob"):
        assert {f"vol_{kind}.ome.zarr/{name}" for name in (".zattrs", ".zgroup", "0/.zarray")} <= set(one)
    assert sorted(one) == sorted(two)  # the same chunk files, metadata files, and nothing left over
    assert one == two  # byte for byte
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        f"vol_{kind}.ome.zarr" for kind in ("semantic", "instances", "prob"))
    instances = read_volume(tmp_path / "two" / "vol_instances.ome.zarr")[0]
    if instance_mode == "3d":
        assert instances.max() > 0
        return
    # the ids of rank 1's block follow those of rank 0's (numbered across the ranks, as in one process)
    first, second = instances[:6], instances[6:]
    assert first.max() > 0 and second.max() > 0
    assert second[second > 0].min() > first.max()

    # rank 1 killed after its second slice: the outputs of the run before stay as they were (a marker in each
    # would be gone had a new folder been renamed into place), nothing half-written under the final names
    for kind in ("semantic", "instances", "prob"):
        (tmp_path / "two" / f"vol_{kind}.ome.zarr" / "previous").write_text(kind)
    before = _tree(tmp_path / "two")
    proc = _bundle("inference", INFER, *args, "--output_dir", str(tmp_path / "two"), ok=False,
                   S2L_FAULT_AT="volume_slice:2", S2L_FAULT_RANK="1")
    assert proc.returncode != 0
    assert {k: v for k, v in _tree(tmp_path / "two").items() if not k.startswith(".")} == before
