"""The DSB benchmark harness without training: plan, resume, atomic result files, tables and targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, dsb  # noqa: E402


def fake(dataset: str, ratio: float | None, method: str, seed: int | None, iou: float, mdice: float = 0.8,
         dsb_cc: float = 0.5, dsb_ws: float = 0.55, **extra: object) -> dict:
    """A record as dsb.py writes it, with made-up numbers (tests only)."""
    rec = {
        "dataset": dataset, "ratio": ratio, "method": method, "seed": seed, "iou": iou, "mdice": mdice,
        "dsb_score": dsb_cc, "pq": 0.6, "train_seconds": 100.0, "peak_rss_mb": 900.0,
        "images_per_second": 12.5, "mdice_paper": 0.81, "aji": 0.55, "f1_50": 0.7,
        "dsb_score_watershed": dsb_ws, "pq_watershed": 0.62, "profile": "default",
    }
    rec.update(extra)
    return rec


# ------------------------------------------------------------------------------------------------ plan / resume


def test_plan_order_and_size() -> None:
    plan = dsb.build_plan()
    ids = [r.run_id for r in plan]
    # DSB-Fluo 30%: seed 0 of all three scribble methods first, then seed 1, then seed 2; then Full and Otsu
    assert ids[:13] == [
        "fluorescence:30:s2l:0", "fluorescence:30:pce:0", "fluorescence:30:pseudo:0",
        "fluorescence:30:s2l:1", "fluorescence:30:pce:1", "fluorescence:30:pseudo:1",
        "fluorescence:30:s2l:2", "fluorescence:30:pce:2", "fluorescence:30:pseudo:2",
        "fluorescence:full:full:0", "fluorescence:full:otsu:-", "fluorescence:10:s2l:0",
        "brightfield:30:s2l:0",
    ]
    for modality in ("brightfield", "histopathology"):
        i = ids.index(f"{modality}:30:s2l:0")
        zoo = [f"{modality}:30:s2l_zoo:0"] if modality == "brightfield" else []  # fine-tuned from the zoo weights
        assert ids[i:i + 5 + len(zoo)] == [f"{modality}:30:s2l:0", f"{modality}:30:pce:0",
                                           f"{modality}:30:pseudo:0", *zoo, f"{modality}:full:full:0",
                                           f"{modality}:full:otsu:-"]
    assert ids.index("histopathology:full:otsu:-") + 1 == ids.index("fluorescence:30:rloss:0")
    # Table 2's 50% and 100% last
    assert ids[-6:] == [f"fluorescence:{r}:{m}:0" for r in (50, 100) for m in ("s2l", "pce", "pseudo")]
    trainings = [r for r in plan if r.method != "otsu"]
    assert len(trainings) == 27 and len(plan) == 30
    assert len({r.key for r in plan}) == len(plan)
    assert sorted(r.dataset for r in plan if r.method == "otsu") == ["dsb_bf", "dsb_fluo", "dsb_histo"]
    assert [r.run_id for r in plan if r.method == "rloss"] == ["fluorescence:30:rloss:0"]
    assert {r.seed for r in plan if r.method == "full"} == {0}


def test_only_patterns() -> None:
    plan = dsb.build_plan()
    sel = dsb.select_plan(plan, ["fluorescence:30:pce:0"])
    assert [r.run_id for r in sel] == ["fluorescence:30:pce:0"]
    sel = dsb.select_plan(plan, ["dsb_fluo:*:s2l:*"])
    assert {r.ratio for r in sel} == {0.1, 0.3, 0.5, 1.0} and len(sel) == 6
    assert [r.run_id for r in dsb.select_plan(plan, ["brightfield:full:otsu:-"])] == ["brightfield:full:otsu:-"]
    with pytest.raises(ValueError):
        dsb.select_plan(plan, ["fluorescence:30:s2l"])
    with pytest.raises(ValueError):
        dsb.select_plan(plan, ["fluorescence:20:s2l:0"])


def test_resume_skips_recorded_runs() -> None:
    plan = dsb.build_plan()
    records = [fake("dsb_fluo", 0.30000000000000004, "s2l", 0, 0.85), fake("dsb_fluo", None, "otsu", None, 0.82)]
    todo = dsb.pending_runs(plan, records)
    assert len(todo) == len(plan) - 2
    assert all(r.run_id not in ("fluorescence:30:s2l:0", "fluorescence:full:otsu:-") for r in todo)
    assert todo[0].run_id == "fluorescence:30:pce:0"
    # a record of another (retired) profile in the same file is not the default's: that run is still to do
    old = [fake("dsb_fluo", 0.3, "s2l", 0, 0.81, profile="default-nocrf")]
    assert dsb.pending_runs(plan, old)[0].run_id == "fluorescence:30:s2l:0"
    assert dsb.pending_runs(plan, old, "default-nocrf")[0].run_id == "fluorescence:30:pce:0"


def test_a_cell_shows_the_default_records_where_it_has_them() -> None:
    """A retired recipe's records stand in, marked, until the default's are measured; then they are not averaged in."""
    old = [fake("dsb_fluo", 0.3, "s2l", s, 0.80, profile="default-nocrf") for s in (0, 1)]
    cell = dsb.ours_cell(dsb._select(old, "dsb_fluo", "s2l", 0.3))
    assert cell.startswith("0.8000") and cell.endswith("`default-nocrf`")
    new = old + [fake("dsb_fluo", 0.3, "s2l", 0, 0.90), fake("dsb_fluo", 0.3, "pce", 0, 0.70, profile="default-b16")]
    chosen = dsb._select(new, "dsb_fluo", "s2l", 0.3)
    assert [r["iou"] for r in chosen] == [0.90]
    assert dsb.ours_cell(chosen).startswith("0.9000") and "`" not in dsb.ours_cell(chosen)
    assert dsb.ours_cell(dsb._select(new, "dsb_fluo", "pce", 0.3)).endswith("`default-b16`")
    smoke = fake("dsb_fluo", 0.3, "s2l", 2, 0.9, profile="default+smoke")
    assert [r["iou"] for r in common.current_recipe([*old, smoke])] == [0.9]


def test_a_cell_never_averages_two_retired_recipes() -> None:
    """Without a default record, the cell shows the retired recipe measured last, alone (not a mean of two)."""
    older = [fake("dsb_fluo", 0.3, "s2l", s, 0.80, profile="default-nocrf", date="2026-12-02T10:00:00+00:00")
             for s in (0, 1)]
    newer = [fake("dsb_fluo", 0.3, "s2l", s, 0.84, profile="default-1200", date="2026-12-03T08:00:00+00:00")
             for s in (0, 1, 2)]
    chosen = dsb._select([*newer, *older], "dsb_fluo", "s2l", 0.3)
    assert [r["iou"] for r in chosen] == [0.84, 0.84, 0.84]
    cell = dsb.ours_cell(chosen)
    assert cell.startswith("0.8400") and "(n=3)" in cell and cell.endswith("`default-1200`")
    assert common.current_recipe([]) == []


def test_append_record_atomic_and_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "res" / "dsb.json"
    assert common.load_records(path) == []
    assert common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.85), dsb.KEY_FIELDS)
    assert common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 1, float("nan")), dsb.KEY_FIELDS)
    assert not common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.10), dsb.KEY_FIELDS)
    assert common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.10, profile="default-nocrf"), dsb.KEY_FIELDS)
    data = json.loads(path.read_text())
    assert [r["seed"] for r in data] == [0, 1, 0] and data[0]["iou"] == 0.85
    assert data[1]["iou"] is None  # NaN is written as null, never as a number
    assert not list(path.parent.glob(".*tmp"))

    # a crash while writing leaves the previous file intact
    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        common.append_record(path, fake("dsb_fluo", 0.3, "pce", 0, 0.8), dsb.KEY_FIELDS)
    assert json.loads(path.read_text()) == data


def test_load_records_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "dsb.json"
    path.write_text("{not json")
    with pytest.raises(ValueError):
        common.load_records(path)
    path.write_text("{}")
    with pytest.raises(ValueError):
        common.load_records(path)


def test_make_record_has_required_keys() -> None:
    run = dsb.RunSpec("fluorescence", 0.3, "pce", 0)
    cc = {"n_images": 3, "n_nuclei": 40, "iou": 0.8, "mdice": 0.7, "mdice_paper": 0.75, "dsb": 0.4, "f1_50": 0.6,
          "pq": 0.5, "sq": 0.8, "rq": 0.6, "aji": 0.45}
    ws = {**cc, "dsb": 0.45, "pq": 0.55}
    train = {"train_seconds": 10.0, "peak_rss_mb": 500.0, "images_per_second": 3.0, "command": "x"}
    rec = dsb.make_record(run, cc, ws, train, {"profile": "cpu"})
    for key in dsb.REQUIRED_KEYS:
        assert key in rec
    assert rec["dataset"] == "dsb_fluo" and rec["ratio"] == 0.3 and rec["method"] == "pce" and rec["seed"] == 0
    assert rec["dsb_score"] == 0.4 and rec["dsb_score_watershed"] == 0.45 and rec["pq_watershed"] == 0.55


def _parsed(cmd: list[str], key: str):
    """The value of ``--key`` as the config sees it: parsed by python-fire (the MONAI bundle CLI), then a ``$``
    expression evaluated as the bundle's ConfigParser does (``$None`` reaches the config as None)."""
    import fire
    from monai.bundle import ConfigParser

    value = fire.Fire(lambda **kw: kw[key], command=[f"--{key}", cmd[cmd.index(f"--{key}") + 1]])
    return ConfigParser({"v": value}).get_parsed_content("v") if isinstance(value, str) else value


def test_default_profile_adds_only_the_method_overrides(tmp_path: Path) -> None:
    """``default``: configs/train.json as it is; every flag after the run's own (data, folders, seed, channels) is
    one of the method's overrides."""
    own = {"--config_file", "--dataset_dir", "--datalist_name", "--output_dir", "--ckpt_dir", "--seed",
           "--in_channels", "--test_evaluation"}
    for method in ("s2l", "pce", "pseudo", "rloss", "full"):
        run = dsb.RunSpec("brightfield", None if method == "full" else 0.3, method, 1)
        cmd = dsb.train_command(run, "default", tmp_path, tmp_path / "r")
        assert cmd[cmd.index("--config_file") + 1] == "configs/train.json"
        flags = {c for c in cmd if c.startswith("--")}
        assert flags - own == {f"--{k}" for k in dsb.METHOD_OVERRIDES[method]}
        for key, value in dsb.METHOD_OVERRIDES[method].items():
            assert _parsed(cmd, key) == value
    s2l = dsb.train_command(dsb.RunSpec("fluorescence", 0.1, "s2l", 0), "default", tmp_path, tmp_path / "r")
    # no override but the start from scratch (the shipped weights are this benchmark's own DSB-Fluo model)
    assert {c for c in s2l if c.startswith("--")} - own == {"--pretrained_weights"}
    assert s2l[s2l.index("--pretrained_weights") + 1] == ""
    assert all(dsb.METHOD_OVERRIDES[m]["pretrained_weights"] == "" for m in dsb.METHOD_OVERRIDES if m != "s2l_zoo")
    assert dsb.METHOD_OVERRIDES["s2l_zoo"] == {"pretrained_weights": "bundle/models/model.pt"}
    assert s2l[s2l.index("--datalist_name") + 1] == "datalist_10.json"
    pce = dsb.train_command(dsb.RunSpec("fluorescence", 0.3, "pce", 1), "default", tmp_path, tmp_path / "r")
    assert pce[pce.index("--lambda_up") + 1] == "0" and pce[pce.index("--seed") + 1] == "1"
    rloss = dsb.train_command(dsb.RunSpec("fluorescence", 0.3, "rloss", 0), "default", tmp_path, tmp_path / "r")
    assert _parsed(rloss, "crf_weight") == 1.0 and _parsed(rloss, "lambda_up") == 0
    assert _parsed(rloss, "ema_every") == 100000
    full = dsb.train_command(dsb.RunSpec("histopathology", None, "full", 0), "default", tmp_path, tmp_path / "r")
    assert full[full.index("--datalist_name") + 1] == "datalist_full.json"
    assert full[full.index("--in_channels") + 1] == "3"
    assert _parsed(full, "class_weights") is None and _parsed(full, "pseudo_class_weights") is None
    pseudo = dsb.train_command(dsb.RunSpec("brightfield", 0.3, "pseudo", 0), "default", tmp_path, tmp_path / "r")
    assert _parsed(pseudo, "ema_alpha") == 1.0
    # each profile trains in its own folder and writes its own results; default -> dsb.json
    assert dsb.runs_dir(tmp_path, "default") == tmp_path / "runs_default"
    assert dsb.runs_dir(tmp_path, "paper-short") == tmp_path / "runs_paper-short"
    assert dsb.default_results("default", False, tmp_path) == dsb.RESULTS_DIR / "dsb.json"
    assert dsb.default_results("paper-short", False, tmp_path).name == "dsb_paper-short.json"
    assert dsb.default_results("default", True, tmp_path) == tmp_path / "results_smoke" / "dsb.json"
    assert dsb.build_parser().parse_args([]).profile == "default"
    assert set(dsb.PROFILES) == {"default", "default-nocrf", "default-b16", "default-pcw", "default-1200",
                                 "default-lam1", "default-nodc", "default-argmax", "default-l2", "paper",
                                 "paper-short", "paper-short-balanced"}
    # the retired defaults all ran 1200 steps: their overrides keep them true whatever the default's budget is now
    assert dsb.PROFILES["default-nocrf"] == {"crf_weight": 0.0, "batch_size": 16, "max_steps": 1200}
    assert dsb.PROFILES["default-b16"] == {"batch_size": 16, "max_steps": 1200}
    assert dsb.PROFILES["default-pcw"] == {"pseudo_class_weights": "auto", "max_steps": 1200}
    assert dsb.PROFILES["default-1200"] == {"max_steps": 1200}
    # the records with L_up weight 1 (the default on 2026-12-05): 2400 steps like the default
    assert dsb.PROFILES["default-lam1"] == {"lambda_up": 1.0}
    assert dsb.PROFILES["default-nodc"] == {"drift_control": False}
    # the 2-level UNet (the default network until v0.14)
    assert dsb.PROFILES["default-l2"] == {"network_def#channels": [16, 32, 64], "network_def#strides": [2, 2]}


def test_gpu_profiles_keep_their_recipe(tmp_path: Path) -> None:
    run = dsb.RunSpec("fluorescence", 0.3, "s2l", 0)
    for profile in ("paper", "paper-short", "paper-short-balanced"):
        cmd = dsb.eval_command(run, profile, tmp_path, tmp_path / "m.pt", tmp_path / "o", "connected")
        configs = cmd[cmd.index("--config_file") + 1]
        assert configs == "['configs/inference.json','configs/evaluate.json','configs/paper.json']"
        train = dsb.train_command(run, profile, tmp_path, tmp_path / "r")
        assert train[train.index("--config_file") + 1] == "['configs/train.json','configs/paper.json']"
    cmd = dsb.eval_command(run, "default", tmp_path, tmp_path / "m.pt", tmp_path / "o", "watershed")
    assert "paper.json" not in cmd[cmd.index("--config_file") + 1]
    short = dsb.train_command(run, "paper-short", tmp_path, tmp_path / "r")
    assert short[short.index("--max_epochs") + 1] == "100" and short[short.index("--warmup_epochs") + 1] == "30"
    assert "--roi_size" not in short  # the paper's 256x256 crops come from configs/paper.json
    balanced = dsb.train_command(run, "paper-short-balanced", tmp_path, tmp_path / "r")
    assert _parsed(balanced, "class_weights") == [3.0, 1.0] and _parsed(balanced, "max_train_seconds") == 190
    full = dsb.train_command(dsb.RunSpec("fluorescence", None, "full", 0), "paper-short-balanced", tmp_path,
                             tmp_path / "r")
    assert _parsed(full, "class_weights") is None  # the method's override wins over the profile's


def test_training_volume_by_hand() -> None:
    """10 training images, batch 16 of 4 patches per image: 4 images a step, 3 steps an epoch (4 + 4 + 2)."""
    cfg = {"batch_size": 16, "num_samples": 4, "max_steps": 1200, "max_epochs": None}
    # 7 steps = 2 epochs (20 images) + 1 step of 4 images = 24 images = 96 patches
    assert dsb.training_volume(10, cfg, 7, 3) == {"steps": 7, "epochs": 2.33, "patches": 96}
    # no trainer state: the configured budget, in steps (1200 = 400 epochs of 10 images)
    assert dsb.training_volume(10, cfg, None, None) == {"steps": 1200, "epochs": 400.0, "patches": 16000}
    # an epoch override: max_epochs x steps per epoch
    assert dsb.training_volume(10, {**cfg, "max_epochs": 2}, None, None) == {"steps": 6, "epochs": 2.0,
                                                                              "patches": 80}
    assert dsb.training_volume(10, {"batch_size": 16, "num_samples": 4}, None, None)["steps"] is None


def test_class_prior_is_read_from_the_run_folder(tmp_path: Path) -> None:
    assert dsb.read_class_prior(tmp_path) is None
    (tmp_path / "train").mkdir()
    prior = {"items": 200, "scribble_foreground_share": 0.36, "image_foreground_share": 0.14,
             "class_weights": [3.46, 1.0]}
    (tmp_path / "train" / "class_prior.json").write_text(json.dumps(prior))
    prior = dsb.read_class_prior(tmp_path)
    assert prior is not None and prior["class_weights"] == [3.46, 1.0]
    run = dsb.RunSpec("fluorescence", 0.3, "s2l", 0)
    rec = dsb.make_record(run, {"iou": 0.8}, {}, {"train_seconds": 1.0, "steps": 1200, "epochs": 14.63,
                                                   "class_prior": prior, "overrides": {}}, {"profile": "default"})
    assert rec["steps"] == 1200 and rec["class_prior"]["class_weights"] == [3.46, 1.0]
    assert dsb.class_weights_cell(rec) == "auto [3.46, 1]"
    assert dsb.class_weights_cell({"overrides": {"class_weights": None}}) == "none"
    assert dsb.class_weights_cell({"overrides": {"class_weights": [3.0, 1.0]}}) == "[3, 1]"
    assert dsb.class_weights_cell({"method": "otsu"}) == "–"
    table = dsb.records_table([{**rec, "mdice": 0.7}])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row[header.index("steps")] == "1200" and row[header.index("class w.")] == "auto [3.46, 1]"
    # archived records know their steps as "iterations"
    archived = {k: v for k, v in rec.items() if k != "steps"}
    old = dsb.records_table([{**archived, "iterations": 738}]).splitlines()[2]
    assert [c.strip() for c in old.strip("|").split("|")][header.index("steps")] == "738"


def test_foreground_threshold_of_a_run(tmp_path: Path) -> None:
    """Records say which threshold their model was read at; a reused training from before calibration is calibrated
    by the given command, a recipe with calibration off reads the argmax (its stale file removed)."""
    run = dsb.RunSpec("fluorescence", 0.3, "s2l", 0)
    rec = dsb.make_record(run, {"iou": 0.8}, {}, {"foreground_threshold": 0.35}, {"profile": "default"})
    assert dsb.threshold_cell(rec) == "0.35" and dsb.threshold_cell({"method": "s2l"}) == "0.5"
    assert dsb.threshold_cell({"method": "otsu"}) == "–"
    table = dsb.records_table([rec])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert [c.strip() for c in table.splitlines()[2].strip("|").split("|")][header.index("thr.")] == "0.35"
    assert dsb.PROFILES["default-argmax"] == {"calibrate_threshold": False}
    cmd = dsb.calibrate_command(run, tmp_path / "data", tmp_path / "model.pt")
    assert cmd[1:4] == ["-m", "s2l_monai", "calibrate"] and cmd[cmd.index("--in_channels") + 1] == "1"

    ckpt = tmp_path / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    sidecar = tmp_path / "ckpt" / "model.calibration.json"
    write = [sys.executable, "-c", f"open({str(sidecar)!r}, 'w').write('{{\"foreground_threshold\": 0.4}}')"]
    assert common.ensure_calibration(ckpt, True, write, tmp_path) == 0.4  # calibrated now
    assert common.ensure_calibration(ckpt, True, [sys.executable, "-c", "raise SystemExit(3)"], tmp_path) == 0.4
    assert common.ensure_calibration(ckpt, False, write, tmp_path) == 0.5 and not sidecar.exists()
    with pytest.raises(RuntimeError, match="calibration of"):
        common.ensure_calibration(ckpt, True, [sys.executable, "-c", "raise SystemExit(3)"], tmp_path)
    assert common.ensure_calibration(ckpt, True, write, tmp_path, can_calibrate=False) == 0.5

    # boundary refinement: a calibration made with another refine_weight than the recipe's is made again
    refined = [sys.executable, "-c", f"open({str(sidecar)!r}, 'w').write("
               f"'{{\"foreground_threshold\": 0.25, \"refine_weight\": 2.0}}')"]
    assert common.ensure_calibration(ckpt, True, write, tmp_path) == 0.4  # exists: kept (no refine_weight asked)
    assert common.calibrated_refinement(ckpt) == 0.0  # calibrated before refinement: none applied
    assert common.ensure_calibration(ckpt, True, refined, tmp_path, refine_weight=2.0) == 0.25  # stale: redone
    assert common.calibrated_refinement(ckpt) == 2.0
    assert common.ensure_calibration(ckpt, True, write, tmp_path, refine_weight=2.0) == 0.25  # current: kept
    sidecar.write_text('{"foreground_threshold": 0.5, "not_calibrated": "membranes"}')
    assert common.ensure_calibration(ckpt, True, refined, tmp_path, refine_weight=2.0) == 0.5  # EM-like: kept
    rec = dsb.make_record(run, {"iou": 0.8}, {}, {"foreground_threshold": 0.25, "refine_weight": 2.0},
                          {"profile": "default"})
    assert rec["refine_weight"] == 2.0 and dsb.threshold_cell(rec) == "0.25 +CRF"


def test_recipe_line_reads_the_configs() -> None:
    """The report says what the default recipe is, from configs/train.json, not from constants in dsb.py."""
    import math

    cfg = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    line = dsb.recipe_line("default")
    for key in ("max_steps", "batch_size", "warmup_share", "ensemble_share"):
        if cfg.get(key) is not None and cfg.get("max_epochs") is None:
            assert f"`{key} {cfg[key]}" in line
    if isinstance(cfg.get("ema_memory_share"), float) and cfg.get("ema_alpha") is None:
        alpha = 1 - math.exp(-min(cfg["ensemble_share"], 1.0) / cfg["ema_memory_share"])
        assert f"(ema_alpha {alpha:.3f})" in line
    assert f"`class_weights {cfg['class_weights']}`" in line
    paper = dsb.recipe_line("paper")
    assert "`max_epochs 300`" in paper and "max_steps" not in paper and "`ema_alpha 0.2`" in paper
    assert "ema_memory_share" not in paper and "`class_weights null`" in paper
    md = dsb.render_report([], {"profile": "default"})
    assert "- **Default recipe** (configs/train.json at report time" in md and line in md


def test_a_retired_network_reaches_training_evaluation_and_report(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``default-l2`` (the 2-level UNet) overrides ``network_def`` keys: its evaluation builds the same network, the
    report shows its channels, and ``s2l calibrate`` (which builds configs/train.json's network) is not used on it."""
    from benchmarks import em

    cfg = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    assert cfg["network_def"]["channels"] != [16, 32, 64]  # the profile differs from the default network
    run = dsb.RunSpec("fluorescence", 0.3, "s2l", 0)
    for profile, expect in (("default-l2", [16, 32, 64]), ("default", cfg["network_def"]["channels"])):
        effective = dsb._effective_config(profile, dsb.train_overrides(run, profile))
        assert effective["network_def"]["channels"] == expect
        assert effective["network_def"]["num_res_units"] == cfg["network_def"]["num_res_units"]  # merged, not replaced
        assert f"`network UNet [{','.join(map(str, expect))}]`" in dsb.recipe_line(profile)
    train = dsb.train_command(run, "default-l2", tmp_path, tmp_path / "run")
    evaluate = dsb.eval_command(run, "default-l2", tmp_path, tmp_path / "model.pt", tmp_path / "eval", "watershed")
    for cmd in (train, evaluate):
        i = cmd.index("--network_def#channels")
        assert json.loads(cmd[i + 1]) == [16, 32, 64]
        assert json.loads(cmd[cmd.index("--network_def#strides") + 1]) == [2, 2]
    default_eval = dsb.eval_command(run, "default", tmp_path, tmp_path / "model.pt", tmp_path / "eval", "watershed")
    assert not any(a.startswith("--network_def") for a in default_eval)
    em_run = em.build_plan()[0]
    em_eval = em.eval_command(em_run, tmp_path, tmp_path / "model.pt", tmp_path / "eval", "connected", "default-l2")
    assert json.loads(em_eval[em_eval.index("--network_def#channels") + 1]) == [16, 32, 64]
    assert em.effective_config(em.PROFILES["default-l2"])["network_def"]["strides"] == [2, 2]

    calls: list = []
    ckpt = tmp_path / "ckpt" / "model.pt"

    def fake_ensure(path, enabled, command, cwd, log, can_calibrate=True, refine_weight=None):
        calls.append(can_calibrate)
        return 0.5

    monkeypatch.setattr(common, "ensure_calibration", fake_ensure)
    dsb.calibrate_for_evaluation(run, "default-l2", tmp_path, ckpt, None)
    dsb.calibrate_for_evaluation(run, "default", tmp_path, ckpt, None)
    assert calls == [False, True]


# ------------------------------------------------------------------------------------------------ report


def test_cells_mean_std_and_dash() -> None:
    recs = [fake("dsb_fluo", 0.3, "s2l", 0, 0.84, mdice=0.80), fake("dsb_fluo", 0.3, "s2l", 1, 0.86, mdice=0.82)]
    cell = dsb.ours_cell(recs)
    assert cell == "0.8500±0.0141 [0.8100±0.0141] (n=2)"
    assert dsb.ours_cell(recs[:1]) == "0.8400 [0.8000]"
    assert dsb.ours_cell([]) == "–"
    assert dsb.paper_cell(dsb.PAPER_TABLE2["s2l"][0.3]) == "0.8539 [0.8407]"


def test_report_tables(tmp_path: Path) -> None:
    recs = [fake("dsb_fluo", 0.3, "s2l", 0, 0.84), fake("dsb_fluo", 0.3, "s2l", 1, 0.86),
            fake("dsb_fluo", None, "otsu", None, 0.82, train_seconds=0.0),
            fake("dsb_bf", 0.3, "pce", 0, 0.70)]
    md = dsb.render_report(recs, {"command": "python benchmarks/dsb.py", "machine": common.machine_info(False)})
    t1 = md.split("## Table 1")[1].split("## Table 2")[0]
    s2l_row = next(line for line in t1.splitlines() if line.startswith("| Scribble2Label"))
    cells = [c.strip() for c in s2l_row.strip("|").split("|")]
    # method, BF ours, BF paper, Fluo ours, Fluo paper, Histo ours, Histo paper
    assert cells[1] == "–" and cells[2] == "0.8236 [0.7663]"
    assert cells[3].startswith("0.8500±0.0141") and cells[4] == "0.8426 [0.8443]"
    assert cells[5] == "–"
    rloss_row = next(line for line in t1.splitlines() if line.startswith("| rLoss (CRF loss)"))
    assert [c.strip() for c in rloss_row.strip("|").split("|")][1:] == [
        "–", "0.7993 [0.7280]", "–", "0.8334 [0.8394]", "–", "0.7873 [0.7177]"]
    otsu_row = next(line for line in t1.splitlines() if line.startswith("| Otsu"))
    assert "0.8200 [0.8000]" in otsu_row
    t2 = md.split("## Table 2")[1].split("## All records")[0]
    pce_row = next(line for line in t2.splitlines() if line.startswith("| pCE only"))
    assert pce_row.count("–") == 4  # no ours at any ratio, the paper's four present
    assert "0.8180 [0.8251]" in pce_row
    assert md.count("| DSB-Fluo |") == 3  # the records table


def test_write_report_next_to_json(tmp_path: Path) -> None:
    path = tmp_path / "dsb.json"
    common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.86), dsb.KEY_FIELDS)
    md = dsb.write_report(path, {"command": "c", "machine": common.machine_info(False)})
    assert md == tmp_path / "dsb.md" and "0.8600" in md.read_text()
    assert "Other profiles" not in md.read_text()
    other = tmp_path / "dsb_paper-short.json"
    common.append_record(other, fake("dsb_fluo", 0.3, "s2l", 0, 0.7), dsb.KEY_FIELDS)
    dsb.write_report(other, {"command": "c", "machine": common.machine_info(False)})
    md = dsb.write_report(path, {"command": "c", "machine": common.machine_info(False)})
    assert "- **Other profiles:** `dsb_paper-short.md`" in md.read_text()
    assert dsb.main(["--report-only", "--results", str(path)]) == 0


def _targets(records: list[dict]) -> list[tuple[str, str]]:
    return [(status, measured) for _, status, measured in dsb.check_targets(records)]


def test_targets_pending_without_records() -> None:
    targets = dsb.check_targets([])
    assert len(targets) == 9
    assert all(status == "– pending" for _, status, _ in targets)
    names = [name for name, _, _ in targets]
    assert names[0] == "DSB-Fluo 30%: S2L IoU ≥ 0.854" and names[-1] == "Every training ≤ 600 s (2 CPU cores)"


def _fluo30(s2l: tuple[float, ...], pce: tuple[float, ...], pseudo: tuple[float, ...], ws: float = 0.56) -> list[dict]:
    recs = [fake("dsb_fluo", 0.3, "s2l", i, v, dsb_ws=ws) for i, v in enumerate(s2l)]
    recs += [fake("dsb_fluo", 0.3, "pce", i, v) for i, v in enumerate(pce)]
    recs += [fake("dsb_fluo", 0.3, "pseudo", i, v) for i, v in enumerate(pseudo)]
    return recs


def test_seed_std_rule_by_hand() -> None:
    """S2L 0.86/0.84/0.85: mean 0.85, sample std sqrt((0.01² + 0.01² + 0) / 2) = 0.01. Pseudo-label 0.80/0.86:
    mean 0.83, std 0.06 / sqrt(2) = 0.0424. Lead 0.02: above S2L's own std, not above the larger one -> FAIL."""
    s2l = _fluo30((0.86, 0.84, 0.85), (), ())
    pseudo = _fluo30((), (), (0.80, 0.86))
    lead, std = dsb.seed_std_lead(s2l, pseudo)
    assert lead == pytest.approx(0.02) and std == pytest.approx(0.06 / 2 ** 0.5)
    # pCE 0.82/0.83/0.84: mean 0.83, std 0.01; lead 0.02 > 0.01 -> PASS
    pce = _fluo30((), (0.82, 0.83, 0.84), ())
    lead, std = dsb.seed_std_lead(s2l, pce)
    assert lead == pytest.approx(0.02) and std == pytest.approx(0.01)
    assert dsb.seed_std_lead(s2l, pce[:1]) is None  # one pCE seed: no std
    status = _targets(s2l + pce + pseudo)
    assert status[3][0] == "PASS" and "+0.0200" in status[3][1] and "0.0100" in status[3][1]
    assert status[4][0] == "FAIL" and "larger seed-std 0.0424" in status[4][1]
    # pCE 0.84/0.845: mean 0.8425, std 0.0035; lead 0.0075 is below S2L's std 0.01, the larger one -> FAIL
    close = _fluo30((0.86, 0.84, 0.85), (0.84, 0.845), ())
    assert _targets(close)[3][0] == "FAIL"
    # two S2L seeds but one pCE seed -> pending, whatever the means
    assert _targets(_fluo30((0.90, 0.91), (0.5,), ()))[3] == (
        "– pending", "seeds with a record: S2L 2, pCE-only 1 (≥ 2 each needed)")


def test_targets_pass_and_fail() -> None:
    # S2L 0.87/0.85/0.86 (mean 0.86 ≥ 0.854); Otsu 0.82 + 0.03 = 0.85 ≤ 0.86; watershed DSB 0.56 ≥ 0.55;
    # pCE mean 0.83 and Pseudo-label mean 0.835, each std 0.01: leads 0.03 and 0.025 > 0.01
    good = _fluo30((0.87, 0.85, 0.86), (0.82, 0.83, 0.84), (0.845, 0.825, 0.835))
    good += [fake("dsb_fluo", None, "otsu", None, 0.82, train_seconds=0.0),
             fake("dsb_bf", 0.3, "s2l", 0, 0.81), fake("dsb_histo", 0.3, "s2l", 0, 0.80),
             fake("dsb_fluo", 0.1, "s2l", 0, 0.83), fake("dsb_fluo", None, "full", 0, 0.87, train_seconds=599.0)]
    status = _targets(good)
    assert [s for s, _ in status] == ["PASS"] * 9
    assert status[0][1] == "IoU 0.8600±0.0100 (mean of 3 seed(s))"
    assert status[1][1] == "S2L 0.8600±0.0100 (n=3) vs Otsu 0.8200 + 0.03 = 0.8500"
    assert status[2][1] == "DSB score 0.5600±0.0000 (mean of 3 seed(s))"
    assert status[8][1].startswith("max 599 s (DSB-Fluo full full s0) over 13 training(s)")
    assert "13 of 27 planned trainings recorded" in status[8][1]

    bad = [dict(r) for r in good]
    for r in bad:
        if r["method"] == "s2l" and r["dataset"] == "dsb_fluo" and r["ratio"] == 0.3:
            r.update(iou=r["iou"] - 0.01, dsb_score_watershed=0.5)  # mean 0.85 < 0.854, ws 0.5
        if r["method"] == "otsu":
            r["iou"] = 0.84  # 0.84 + 0.03 = 0.87 > 0.85
        if r["method"] == "pce":
            r["iou"] += 0.015  # mean 0.845: lead 0.005, below the std 0.01
        if r["method"] == "pseudo":
            r["iou"] += 0.02  # mean 0.855, above S2L
        if r["dataset"] in ("dsb_bf", "dsb_histo"):
            r["iou"] = 0.7999
        if r["ratio"] == 0.1:
            r["iou"] = 0.8299
        if r["method"] == "full":
            r["train_seconds"] = 612.0
    bad.append(fake("dsb_fluo", 0.5, "s2l", 0, 0.85, train_seconds=900.0,
                    machine={"cores": 16, "gpu": "NVIDIA H200"}))  # a GPU record is not timed against 600 s
    status = _targets(bad)
    assert [s for s, _ in status] == ["FAIL"] * 9
    assert "over: DSB-Fluo full full s0 612 s" in status[8][1] and "900" not in status[8][1]
    assert "1 record(s) measured on a GPU machine not counted" in status[8][1]

    # a retired profile's slow training of a cell the default has re-measured is not timed
    retired = [dict(r) for r in good] + [fake("dsb_fluo", 0.3, "s2l", 0, 0.80, train_seconds=1300.0,
                                               profile="default-1200")]
    status = _targets(retired)
    assert status[8][0] == "PASS" and "1300" not in status[8][1]

    only_s2l = [r for r in good if r["method"] == "s2l" and r["dataset"] == "dsb_fluo" and r["ratio"] == 0.3]
    status = _targets(only_s2l[:1])
    assert status[0] == ("PASS", "IoU 0.8700 (mean of 1 seed(s))")
    assert status[1][0] == "– pending" and status[3][0] == "– pending" and status[5][0] == "– pending"


def test_peak_rss_of_process_tree(tmp_path: Path) -> None:
    code = ("import subprocess, sys, time; b = bytearray(60 * 2**20); "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(60 * 2**20); time.sleep(1.5)']);"
            " p.wait()")
    res = common.run_measured([sys.executable, "-c", code], tmp_path, tmp_path / "log.txt", interval=0.1)
    assert res.returncode == 0
    assert res.peak_rss_mb > 120  # parent and child summed
    assert res.seconds > 1.0


# ------------------------------------------------------------------------------------------------ analysis


def test_scribble_balance_counts(tmp_path: Path) -> None:
    """Hand-made 4x4 scribble / label pair: 3 fg and 5 bg scribbled pixels, 6 true foreground pixels of 16."""
    import numpy as np
    from PIL import Image

    from benchmarks import dsb_analysis

    scribble = np.full((4, 4), 255, np.uint8)
    scribble[0, :3] = 1
    scribble[3, :] = 0
    scribble[2, 0] = 0
    label = np.zeros((4, 4), np.uint16)
    label[0:2, 0:3] = 7
    Image.fromarray(scribble).save(tmp_path / "s.png")
    Image.fromarray(label).save(tmp_path / "l.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "i.png")
    datalist = {"scribble_values": {"background": 0, "foreground": 1, "unlabelled": 255},
                "training": [{"image": "i.png", "scribble": "s.png", "label": "l.png"}]}
    (tmp_path / "datalist_30.json").write_text(json.dumps(datalist))
    rows = dsb_analysis.scribble_balance(tmp_path)
    # fg share 3/8 of the scribbles vs 6/16 of the pixels: already balanced, weights 1
    assert rows == [["30%", 3, 5, common.fmt(3 / 8, 3), common.fmt(8 / 16, 4), common.fmt(6 / 16, 3), "[1.00, 1]"]]
    label[0:2, 0:3] = 0
    label[0, 0:2] = 7  # 2 of 16 foreground: odds 1/7 against the scribbles' 3/5 -> background weight 4.2
    Image.fromarray(label).save(tmp_path / "l.png")
    assert dsb_analysis.scribble_balance(tmp_path)[0][-1] == "[4.20, 1]"


def test_em_pseudo_label_quality_by_hand() -> None:
    """4 unlabelled pixels: 3 confident (2 fg, 1 bg), 1 fg wrong; 1 not confident; 1 scribbled (ignored)."""
    import numpy as np

    from benchmarks import em_analysis

    prob = np.array([[[0.9, 0.95, 0.1, 0.5, 0.99]]])  # DHW = 1x1x5
    gt = np.array([[[True, False, False, True, True]]])
    unl = np.array([[[True, True, True, True, False]]])
    q = em_analysis.pseudo_label_quality(prob, gt, unl, tau=0.8)
    assert q["coverage"] == pytest.approx(3 / 4)
    assert q["accuracy"] == pytest.approx(2 / 3)
    assert q["fg_precision"] == pytest.approx(1 / 2)
    assert q["bg_precision"] == pytest.approx(1.0)
    assert q["fg_share"] == pytest.approx(2 / 3)
    e = em_analysis.test_errors(prob > 0.5, gt)
    # pred = [T, T, F, F, T], gt = [T, F, F, T, T]: tp 2, fp 1, fn 1
    assert (e["precision"], e["recall"], e["area_ratio"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 1.0)
    assert e["iou"] == pytest.approx(2 / 4)


def test_gpu_note_only_where_a_record_ran_on_a_gpu() -> None:
    cpu_rec = {"profile": "default", "machine": {"cores": 2}}
    gpu_rec = {"profile": "paper-short", "machine": {"cores": 16, "gpu": "NVIDIA H200"}}
    assert dsb._gpu_note([cpu_rec], ["default"]) == []
    mixed = [cpu_rec, {**gpu_rec, "profile": "default"}]
    assert "use the same recipe" in " ".join(dsb._gpu_note(mixed, ["default"]))
    assert "shared it with the other runs" in " ".join(dsb._gpu_note([gpu_rec], ["paper-short"]))


def test_report_points_to_the_analysis_of_its_profile() -> None:
    assert dsb.analysis_name("fluorescence", ["default"]) == "dsb_analysis.md"
    assert dsb.analysis_name("fluorescence", []) == "dsb_analysis.md"
    assert dsb.analysis_name("histopathology", ["paper-short"]) == "dsb_analysis_histopathology_30_paper-short.md"
    assert dsb.analysis_name("fluorescence", ["default"], "50") == "dsb_analysis_fluorescence_50.md"
    text = dsb.render_report([fake("dsb_fluo", 0.3, "s2l", 0, 0.8, profile="paper-short")], {})
    assert "`dsb_analysis_paper-short.md` (DSB-Fluo)" in text
    text = dsb.render_report([fake("dsb_fluo", 0.3, "s2l", 0, 0.8)], {})
    assert "`dsb_analysis.md` (DSB-Fluo)" in text


def test_analysis_reads_the_default_profile_runs(tmp_path: Path) -> None:
    """dsb_analysis.py reads WORK/runs_default by default, and its report of the default profile is
    results/dsb_analysis.md."""
    from benchmarks import dsb_analysis

    assert dsb_analysis.main(["--work", str(tmp_path)]) == 2  # no runs_default folder: a message, no report
    assert dsb_analysis.DEFAULT_OUT.name == dsb.analysis_name("fluorescence", ["default"]) == "dsb_analysis.md"
    row = dsb_analysis.prior_row("s2l (seed 0)", {"items": 200, "scribble_foreground_share": 0.36,
                                                  "image_foreground_share": 0.141, "class_weights": [3.4, 1.0]}, 0.14)
    assert row == ["s2l (seed 0)", 200, "0.360", "0.141", "0.140", "[3.4, 1]"]


def test_inference_throughput_child_imports_s2l_monai_from_the_variants_checkout(tmp_path):
    """A ``NAME@CHECKOUT`` variant runs that checkout's ``s2l_monai``, not the one of the script's repository (the
    module puts its own repository first on ``sys.path`` for ``benchmarks.common``)."""
    checkout = tmp_path / "old"
    (checkout / "s2l_monai").mkdir(parents=True)
    (checkout / "s2l_monai" / "__init__.py").write_text("MARK = 'old checkout'\n")
    code = (
        "import sys; from pathlib import Path; sys.argv = ['x']\n"
        "import benchmarks.inference_throughput as it\n"
        f"it.use_checkout(Path({str(checkout)!r}))\n"
        "import s2l_monai; print(getattr(s2l_monai, 'MARK', s2l_monai.__file__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "old checkout"


def test_inference_throughput_child_env_wait_policy(tmp_path, monkeypatch):
    """PASSIVE by default; 'default' removes the variable (OpenMP's own spinning, as a user runs it), even where the
    benchmark's own environment sets it."""
    import benchmarks.inference_throughput as it

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert it.child_env(tmp_path)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert it.child_env(tmp_path, "ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"
    env = it.child_env(tmp_path, "default")
    assert "OMP_WAIT_POLICY" not in env and env["PYTHONPATH"] == str(tmp_path)
