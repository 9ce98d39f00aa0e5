"""The ISBI 2012 benchmark harness (benchmarks/em.py) without training: plan, profiles, commands, report, targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, em  # noqa: E402


def rec(method: str, seed: int | None, iou: float, profile: str = "cpu", gpu: str | None = None) -> dict:
    """A record as em.py writes it, with made-up numbers (tests only)."""
    return {
        "dataset": em.DATASET, "ratio": None if method in ("full", "otsu") else em.RATIO, "method": method,
        "seed": seed, "iou": iou, "mdice": 0.5, "dsb_score": 0.3, "pq": 0.5, "train_seconds": 300.0,
        "peak_rss_mb": 1200.0, "images_per_second": 40.0, "profile": profile, "epochs": 70,
        "machine": {"cores": 16 if gpu else 2, "gpu": gpu},
    }


def _flag(cmd: list[str], key: str) -> str:
    return cmd[cmd.index(f"--{key}") + 1]


def test_plan_is_three_methods_two_seeds_and_otsu() -> None:
    plan = em.build_plan()
    assert [r.run_id for r in plan] == ["s2l:0", "pce:0", "full:0", "otsu:-", "s2l:1", "pce:1", "full:1"]
    assert [r.run_id for r in em.select_plan(plan, ["*:1"])] == ["s2l:1", "pce:1", "full:1"]
    # --seeds 0 1 2: the default plan plus a third seed of each method; S2L-only profiles grow by one run
    assert [r.run_id for r in em.build_plan("cpu", (0, 1, 2))] == [r.run_id for r in plan] + ["s2l:2", "pce:2",
                                                                                            "full:2"]
    assert [r.run_id for r in em.build_plan("cpu-a05", (0, 1, 2))] == ["s2l:0", "s2l:1", "s2l:2"]
    with pytest.raises(ValueError):
        em.select_plan(plan, ["nonsense"])


@pytest.mark.parametrize("profile", sorted(em.PROFILES))
def test_commands_are_slice_wise_overrides_of_train_json(tmp_path: Path, profile: str) -> None:
    for method in ("s2l", "pce", "full"):
        run = em.EMRun(method, 1)
        cmd = em.train_command(run, tmp_path / "data", tmp_path / "run", profile=profile)
        assert cmd[1:5] == ["-m", "monai.bundle", "run", "training"]
        assert _flag(cmd, "config_file") == "configs/train.json" and _flag(cmd, "slice_axis") == "0"
        assert _flag(cmd, "seed") == "1"
        assert _flag(cmd, "datalist_name") == ("datalist_full.json" if method == "full" else "datalist_10.json")
        prof = em.PROFILES[profile]
        assert json.loads(_flag(cmd, "roi_size")) == prof["roi_size"]
        assert int(_flag(cmd, "max_epochs")) == prof["max_epochs"]
        assert int(_flag(cmd, "max_train_seconds")) == prof["max_train_seconds"]
        # the method's override wins over the profile (no pseudo-label loss for the baselines)
        assert ("--lambda_up" in cmd) == (method != "s2l")
        if method != "s2l":
            assert _flag(cmd, "lambda_up") == "0"


def test_profiles_have_their_own_results_and_run_folders(tmp_path: Path) -> None:
    assert em.results_path("cpu").name == "em.json"
    assert em.results_path("gpu-short").name == "em_gpu-short.json"
    assert em.runs_dir(tmp_path, "cpu") == tmp_path / "runs"  # where em_analysis.py reads the cpu runs
    assert em.runs_dir(tmp_path, "gpu-short") == tmp_path / "runs_gpu-short"
    assert em.train_overrides(em.EMRun("s2l", 0), profile="gpu-short")["roi_size"] == [256, 256]
    assert em.train_overrides(em.EMRun("s2l", 0), smoke=True, profile="gpu-short")["max_epochs"] == 1


def test_targets() -> None:
    recs = [rec("s2l", 0, 0.90), rec("s2l", 1, 0.91), rec("pce", 0, 0.89), rec("pce", 1, 0.88),
            rec("full", 0, 0.92), rec("full", 1, 0.92)]
    assert [s for _, s, _ in em.check_targets(recs)] == ["PASS", "PASS"]
    # pCE with S2L's own two numbers: equal means are not "above"
    tie = [r for r in recs if r["method"] != "pce"] + [rec("pce", 0, 0.90), rec("pce", 1, 0.91)]
    assert [s for _, s, _ in em.check_targets(tie)] == ["PASS", "FAIL"]
    far = [dict(r, iou=0.95) if r["method"] == "full" else r for r in recs]
    assert [s for _, s, _ in em.check_targets(far)] == ["FAIL", "PASS"]
    assert [s for _, s, _ in em.check_targets([])] == [em.dsb.NOT_MEASURED] * 2


def test_report_names_the_profile_and_gpu_runs(tmp_path: Path) -> None:
    cpu = [rec("s2l", 0, 0.88), rec("pce", 0, 0.87)]
    text = em.render_report(cpu, {"results_name": "em.json"})
    assert "Profile `cpu` (2 CPU cores, 128x128 patches): up to 72 epochs" in text
    assert "GPU machine" not in text and "| S2L IoU above pCE-only | PASS |" in text

    gpu = [rec(m, 0, 0.9, profile="gpu-short", gpu="NVIDIA H200") for m in ("s2l", "pce", "full")]
    text = em.render_report(gpu, {"results_name": "em_gpu-short.json"})
    assert "Profile `gpu-short` (one lent GPU shared by the six trainings, 256x256 patches)" in text
    assert "shared it with the other runs" in text and "GPU (H200, 16 cores)" in text

    results = tmp_path / "em_gpu-short.json"
    for r in gpu:
        common.append_record(results, r, em.KEY_FIELDS)
    md = em.write_report(results, {"profile": "gpu-short"})
    assert md == tmp_path / "em_gpu-short.md" and "Runs:** 3 of 7 planned" in md.read_text()


def test_list_reads_the_profile_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "em_gpu-short.json"
    common.append_record(results, rec("pce", 1, 0.9, profile="gpu-short"), em.KEY_FIELDS)
    assert em.main(["--profile", "gpu-short", "--results", str(results), "--list", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "done     pce:1" in lines and "pending  s2l:0" in lines and len(lines) == 7
    with pytest.raises(SystemExit):  # argparse refuses a profile em.py does not define
        em.main(["--profile", "no-such-profile", "--list"])


def test_s2l_only_profile_reports_beside_the_base_profile(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``cpu-a05`` trains Scribble2Label alone (with ``ema_alpha 0.5``) and takes pCE / Full / Otsu from ``cpu``."""
    assert em.BASELINE_PROFILES["cpu-a05"] == "cpu"
    assert [r.run_id for r in em.build_plan("cpu-a05")] == ["s2l:0", "s2l:1"]
    cmd = em.train_command(em.EMRun("s2l", 0), tmp_path / "data", tmp_path / "run", profile="cpu-a05")
    assert _flag(cmd, "ema_alpha") == "0.5" and "--ema_alpha" not in em.train_command(
        em.EMRun("s2l", 0), tmp_path / "data", tmp_path / "run", profile="cpu")
    # every other override is the cpu profile's: the two S2L trainings differ in alpha alone
    assert {k: v for k, v in em.CPU_A05_PROFILE.items() if k != "ema_alpha"} == em.CPU_PROFILE
    assert em.runs_dir(tmp_path, "cpu-a05") == tmp_path / "runs_cpu-a05"

    base = tmp_path / "em.json"  # the cpu records: S2L 0.870 and 0.872, pCE 0.880 and 0.878, Full 0.89
    for r in (rec("s2l", 0, 0.870), rec("s2l", 1, 0.872), rec("pce", 0, 0.880), rec("pce", 1, 0.878),
              rec("full", 0, 0.89), rec("full", 1, 0.89), rec("otsu", None, 0.64)):
        common.append_record(base, r, em.KEY_FIELDS)
    results = tmp_path / "em_cpu-a05.json"
    common.append_record(results, rec("s2l", 0, 0.881, profile="cpu-a05"), em.KEY_FIELDS)
    text = em.write_report(results, {"profile": "cpu-a05"}).read_text()
    assert "Runs:** 1 of 2 planned (seeds 0, 1) have a record (1 records in all)" in text
    assert "records of profile `cpu` (`em.json`): this profile changes Scribble2Label only" in text
    # the targets compare this profile's S2L (0.881, not cpu's 0.871) with cpu's pCE (0.879) and Full (0.89)
    assert "| S2L IoU above pCE-only | PASS | S2L 0.8810 (n=1) vs pCE 0.8790 (n=2) |" in text
    assert "| S2L IoU within 0.02 of Full | PASS | S2L 0.8810 (n=1) vs Full 0.8900 (n=2) |" in text
    assert "| isbi2012 | 10% | pce | 0 | 0.8800 |" in text  # the baseline rows appear in the records table
    assert "0.8700" not in text  # cpu's own S2L records do not
    assert em.main(["--profile", "cpu-a05", "--results", str(results), "--list", "--work", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["done     s2l:0", "pending  s2l:1"]
    assert em.main(["--profile", "cpu-a05", "--results", str(results), "--list", "--work", str(tmp_path),
                    "--seeds", "0", "1", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["done     s2l:0", "pending  s2l:1", "pending  s2l:2"]


def test_base_profile_report_points_to_the_s2l_only_profile() -> None:
    text = em.render_report([rec("s2l", 0, 0.88), rec("pce", 0, 0.88)], {"results_name": "em.json"})
    assert "reports its Scribble2Label beside these records in `em_cpu-a05.md`" in text
    gpu = em.render_report([rec("s2l", 0, 0.9, profile="gpu-short")], {"results_name": "em_gpu-short.json"})
    assert "em_cpu-a05.md" not in gpu
