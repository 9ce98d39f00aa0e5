"""The DSB benchmark harness without training: plan, resume, atomic result files, tables and targets."""

from __future__ import annotations

import json
import os
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
        "dsb_score_watershed": dsb_ws, "pq_watershed": 0.62, "profile": "cpu",
    }
    rec.update(extra)
    return rec


# ------------------------------------------------------------------------------------------------ plan / resume


def test_plan_order_and_size() -> None:
    plan = dsb.build_plan()
    first = [(r.modality, r.ratio, r.method, r.seed) for r in plan[:4]]
    assert first == [("fluorescence", 0.3, "s2l", 0), ("fluorescence", 0.3, "pce", 0),
                     ("fluorescence", 0.3, "pseudo", 0), ("fluorescence", None, "full", 0)]
    trainings = [r for r in plan if r.method != "otsu"]
    assert len(trainings) == 25
    assert len({r.key for r in plan}) == len(plan)
    assert sorted(r.dataset for r in plan if r.method == "otsu") == ["dsb_bf", "dsb_fluo", "dsb_histo"]
    fluo30 = {(r.method, r.seed) for r in plan if r.dataset == "dsb_fluo" and r.ratio == 0.3}
    assert fluo30 == {(m, s) for m in ("s2l", "pce", "pseudo") for s in (0, 1)}
    assert {r.seed for r in plan if r.method == "full" and r.dataset == "dsb_fluo"} == {0, 1}


def test_only_patterns() -> None:
    plan = dsb.build_plan()
    sel = dsb.select_plan(plan, ["fluorescence:30:pce:0"])
    assert [r.run_id for r in sel] == ["fluorescence:30:pce:0"]
    sel = dsb.select_plan(plan, ["dsb_fluo:*:s2l:*"])
    assert {r.ratio for r in sel} == {0.1, 0.3, 0.5, 1.0} and len(sel) == 5
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


def test_append_record_atomic_and_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "res" / "dsb.json"
    assert common.load_records(path) == []
    assert common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.85), dsb.KEY_FIELDS)
    assert common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 1, float("nan")), dsb.KEY_FIELDS)
    assert not common.append_record(path, fake("dsb_fluo", 0.3, "s2l", 0, 0.10), dsb.KEY_FIELDS)
    data = json.loads(path.read_text())
    assert [r["seed"] for r in data] == [0, 1] and data[0]["iou"] == 0.85
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


def test_commands_are_overrides_of_train_json(tmp_path: Path) -> None:
    pce = dsb.train_command(dsb.RunSpec("fluorescence", 0.3, "pce", 1), "cpu", tmp_path, tmp_path / "r")
    assert pce[pce.index("--config_file") + 1] == "configs/train.json"
    assert pce[pce.index("--lambda_up") + 1] == "0" and pce[pce.index("--seed") + 1] == "1"
    assert pce[pce.index("--datalist_name") + 1] == "datalist_30.json"
    assert pce[pce.index("--roi_size") + 1] == "[128,128]"
    full = dsb.train_command(dsb.RunSpec("histopathology", None, "full", 0), "paper", tmp_path, tmp_path / "r")
    assert full[full.index("--datalist_name") + 1] == "datalist_full.json"
    assert full[full.index("--in_channels") + 1] == "3"
    assert full[full.index("--config_file") + 1] == "['configs/train.json','configs/paper.json']"
    pseudo = dsb.train_command(dsb.RunSpec("brightfield", 0.3, "pseudo", 0), "cpu", tmp_path, tmp_path / "r")
    assert pseudo[pseudo.index("--ema_alpha") + 1] == "1.0"
    assert pseudo[pseudo.index("--num_samples") + 1] == str(dsb.CPU_MODALITY_OVERRIDES["brightfield"]["num_samples"])
    s2l = dsb.train_command(dsb.RunSpec("fluorescence", 0.1, "s2l", 0), "cpu", tmp_path, tmp_path / "r")
    assert "--lambda_up" not in s2l and "--ema_alpha" not in s2l
    assert "--class_weights" not in s2l  # the cpu profile keeps the paper's unweighted loss


def test_evaluation_uses_the_network_of_its_training_profile(tmp_path: Path) -> None:
    run = dsb.RunSpec("fluorescence", 0.3, "s2l", 0)
    for profile in ("paper", "paper-short"):
        cmd = dsb.eval_command(run, profile, tmp_path, tmp_path / "m.pt", tmp_path / "o", "connected")
        configs = cmd[cmd.index("--config_file") + 1]
        assert configs == "['configs/inference.json','configs/evaluate.json','configs/paper.json']"
    cmd = dsb.eval_command(run, "cpu", tmp_path, tmp_path / "m.pt", tmp_path / "o", "watershed")
    assert "paper.json" not in cmd[cmd.index("--config_file") + 1]
    short = dsb.train_command(run, "paper-short", tmp_path, tmp_path / "r")
    assert short[short.index("--max_epochs") + 1] == "100" and short[short.index("--warmup_epochs") + 1] == "30"
    assert "--roi_size" not in short  # the paper's 256x256 crops come from configs/paper.json


def test_balanced_profile_weights_scribble_methods_not_full(tmp_path: Path) -> None:
    import fire

    def parsed(cmd: list[str], key: str):
        # the value as python-fire (the MONAI bundle CLI) hands it to the config
        return fire.Fire(lambda **kw: kw[key], command=[f"--{key}", cmd[cmd.index(f"--{key}") + 1]])

    for method in ("s2l", "pce", "pseudo"):
        cmd = dsb.train_command(dsb.RunSpec("fluorescence", 0.3, method, 0), "cpu-balanced", tmp_path, tmp_path / "r")
        assert parsed(cmd, "class_weights") == [3.0, 1.0] and parsed(cmd, "pseudo_class_weights") == [3.0, 1.0]
        assert cmd[cmd.index("--max_epochs") + 1] == "9"  # the cpu budget
    full = dsb.train_command(dsb.RunSpec("fluorescence", None, "full", 0), "cpu-balanced", tmp_path, tmp_path / "r")
    assert parsed(full, "class_weights") is None and parsed(full, "pseudo_class_weights") is None
    # each profile trains in its own folder, so a balanced run never reuses an unweighted training
    assert dsb.runs_dir(tmp_path, "cpu") == tmp_path / "runs"
    assert dsb.runs_dir(tmp_path, "cpu-balanced") == tmp_path / "runs_cpu-balanced"
    assert dsb.default_results("cpu-balanced", False, tmp_path).name == "dsb_cpu-balanced.json"


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
    other = tmp_path / "dsb_cpu-balanced.json"
    common.append_record(other, fake("dsb_fluo", 0.3, "s2l", 0, 0.7), dsb.KEY_FIELDS)
    dsb.write_report(other, {"command": "c", "machine": common.machine_info(False)})
    md = dsb.write_report(path, {"command": "c", "machine": common.machine_info(False)})
    assert "- **Other profiles:** `dsb_cpu-balanced.md`" in md.read_text()
    assert dsb.main(["--report-only", "--results", str(path)]) == 0


def _status(records: list[dict]) -> dict[str, str]:
    return {name.split(" ")[0] + ":" + name.split(" ")[2]: status for name, status, _ in dsb.check_targets(records)}


def test_targets_not_measured_without_records() -> None:
    targets = dsb.check_targets([])
    assert len(targets) == 4
    assert all(status.startswith("not yet measured") for _, status, _ in targets)


def test_targets_pass_and_fail() -> None:
    good = [fake("dsb_fluo", 0.3, "s2l", 0, 0.86, mdice=0.80, dsb_cc=0.5, dsb_ws=0.6),
            fake("dsb_fluo", 0.3, "s2l", 1, 0.85, mdice=0.80, dsb_cc=0.5, dsb_ws=0.6),
            fake("dsb_fluo", None, "full", 0, 0.87, mdice=0.78)]
    for ratio in dsb.RATIOS:
        if ratio != 0.3:
            good.append(fake("dsb_fluo", ratio, "s2l", 0, 0.85))
        good += [fake("dsb_fluo", ratio, "pce", 0, 0.80), fake("dsb_fluo", ratio, "pseudo", 0, 0.79)]
    statuses = [status for _, status, _ in dsb.check_targets(good)]
    assert statuses == ["PASS", "PASS", "PASS", "PASS"]

    bad = [dict(r) for r in good]
    for r in bad:
        if r["method"] == "s2l" and r["ratio"] == 0.3:
            r.update(iou=0.80, mdice=0.70, dsb_score_watershed=0.4)  # below target, below Full, ws worse
        if r["method"] == "pseudo" and r["ratio"] == 0.5:
            r["iou"] = 0.95
    statuses = [status for _, status, _ in dsb.check_targets(bad)]
    assert statuses == ["FAIL", "FAIL", "FAIL", "FAIL"]

    partial = [r for r in good if r["ratio"] in (0.3, None)]
    statuses = [status for _, status, _ in dsb.check_targets(partial)]
    assert statuses[2].startswith("not yet measured (1/4")


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
    cpu_rec = {"profile": "cpu-balanced", "machine": {"cores": 2}}
    gpu_rec = {"profile": "paper-short", "machine": {"cores": 16, "gpu": "NVIDIA H200"}}
    assert dsb._gpu_note([cpu_rec], ["cpu-balanced"]) == []
    mixed = [cpu_rec, {**gpu_rec, "profile": "cpu"}]
    assert "same CPU profile" in " ".join(dsb._gpu_note(mixed, ["cpu", "cpu-balanced"]))
    assert "shared it with the other runs" in " ".join(dsb._gpu_note([gpu_rec], ["paper-short"]))


def test_report_points_to_the_analysis_of_its_profile() -> None:
    assert dsb.analysis_name("fluorescence", ["cpu"]) == "dsb_analysis.md"
    assert dsb.analysis_name("histopathology", ["cpu-balanced-e12"]) == (
        "dsb_analysis_histopathology_30_cpu-balanced-e12.md")
    assert dsb.analysis_name("fluorescence", ["cpu"], "50") == "dsb_analysis_fluorescence_50.md"
    assert dsb.analysis_name("fluorescence", ["cpu", "cpu-balanced"]) == "dsb_analysis.md"
    text = dsb.render_report([fake("dsb_fluo", 0.3, "s2l", 0, 0.8, profile="cpu-balanced-e12")], {})
    assert "`dsb_analysis_cpu-balanced-e12.md` (DSB-Fluo)" in text


def test_a05_profile_changes_only_the_s2l_ema_weight() -> None:
    """``cpu-balanced-e12-a05`` differs from ``cpu-balanced-e12`` by ema_alpha alone, which Pseudo-label overrides
    (alpha 1) and pCE / Full never use (no ensembles)."""
    for method in ("s2l", "pce", "pseudo", "full"):
        run = dsb.RunSpec("fluorescence", None if method == "full" else 0.3, method, 0)
        base, a05 = dsb.train_overrides(run, "cpu-balanced-e12"), dsb.train_overrides(run, "cpu-balanced-e12-a05")
        diff = {k for k in set(base) | set(a05) if base.get(k) != a05.get(k)}
        assert diff == ({"ema_alpha"} if method != "pseudo" else set())
        assert a05["ema_alpha"] == (1.0 if method == "pseudo" else 0.5)
        if method in ("pce", "full"):
            assert a05["lambda_up"] == 0 and a05["ema_every"] > a05["max_epochs"]
