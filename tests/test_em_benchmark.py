"""The ISBI 2012 benchmark harness (benchmarks/em.py) without training: plan, profiles, commands, report, targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, em, em_analysis  # noqa: E402

EPOCH_KEYS = ("max_epochs", "warmup_epochs", "ema_alpha", "max_train_seconds", "roi_size", "num_samples",
              "batch_size", "learning_rate")


def rec(method: str, seed: int | None, iou: float, profile: str = "default", gpu: str | None = None,
        train_seconds: float = 300.0) -> dict:
    """A record as em.py writes it, with made-up numbers (tests only)."""
    return {
        "dataset": em.DATASET, "ratio": None if method in ("full", "otsu") else em.RATIO, "method": method,
        "seed": seed, "iou": iou, "mdice": 0.5, "dsb_score": 0.3, "pq": 0.5,
        "train_seconds": 0.0 if method == "otsu" else train_seconds, "peak_rss_mb": 1200.0,
        "images_per_second": 40.0, "profile": profile, "steps": None if method == "otsu" else 1200,
        "machine": {"cores": 16 if gpu else 2, "gpu": gpu},
    }


def _flag(cmd: list[str], key: str) -> str:
    return cmd[cmd.index(f"--{key}") + 1]


def test_plan_is_three_methods_three_seeds_and_otsu() -> None:
    plan = em.build_plan()
    assert [r.run_id for r in plan] == ["s2l:0", "pce:0", "full:0", "otsu:-", "s2l:1", "pce:1", "full:1",
                                        "s2l:2", "pce:2", "full:2"]
    assert [r.run_id for r in em.select_plan(plan, ["*:1"])] == ["s2l:1", "pce:1", "full:1"]
    assert [r.run_id for r in em.build_plan((0, 1))] == [r.run_id for r in plan][:7]
    assert len({r.key for r in plan}) == len(plan)
    with pytest.raises(ValueError):
        em.select_plan(plan, ["nonsense"])


def test_default_profile_adds_only_the_volume_keys_and_the_method_overrides(tmp_path: Path) -> None:
    """No epoch, patch or learning-rate override: the default recipe of configs/train.json configures itself."""
    assert em.PROFILES["default"] == {}
    # the retired CPU profiles are gone
    assert set(em.PROFILES) == {"default", "default-nocrf", "default-b16", "default-pcw", "default-1200",
                                "default-lam1", "default-nodc", "default-argmax", "default-l2", "gpu-short"}
    for method in ("s2l", "pce", "full"):
        run = em.EMRun(method, 1)
        cmd = em.train_command(run, tmp_path / "data", tmp_path / "run")
        assert cmd[1:5] == ["-m", "monai.bundle", "run", "training"]
        assert _flag(cmd, "config_file") == "configs/train.json" and _flag(cmd, "slice_axis") == "0"
        assert _flag(cmd, "seed") == "1" and _flag(cmd, "output_dir") == str(tmp_path / "run" / "train")
        assert _flag(cmd, "datalist_name") == ("datalist_full.json" if method == "full" else "datalist_10.json")
        assert not any(f"--{k}" in cmd for k in EPOCH_KEYS)
        over = em.train_overrides(run)
        assert over == em.METHOD_OVERRIDES[method]
    assert em.train_overrides(em.EMRun("s2l", 0)) == {"pretrained_weights": ""}  # every method from scratch
    # the baselines as in dsb.py: no pseudo-label loss and no ensembles; Full unweighted
    assert em.METHOD_OVERRIDES["pce"] == {"pretrained_weights": "", "lambda_up": 0, "ema_every": 100000,
                                          "crf_weight": 0.0}
    assert em.METHOD_OVERRIDES["full"] == {"pretrained_weights": "", "lambda_up": 0, "ema_every": 100000,
                                           "class_weights": None, "pseudo_class_weights": None, "crf_weight": 0.0}
    cmd = em.train_command(em.EMRun("full", 0), tmp_path / "data", tmp_path / "run")
    # null as an expression: the bundle runner drops overrides whose value is None ("auto" would stay)
    assert _flag(cmd, "class_weights") == "$None" and _flag(cmd, "pseudo_class_weights") == "$None"
    assert _flag(cmd, "ema_every") == "100000"


def test_none_override_reaches_the_config() -> None:
    """``--class_weights None`` is dropped by ``monai.bundle run`` (update_kwargs ignores None); ``$None`` is not."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    parser.update(update_kwargs({}, class_weights=em.cli_value(None), crf_weight=None))
    assert parser.get_parsed_content("class_weights") is None
    assert parser.get_parsed_content("crf_weight") == 1.0  # what a plain None override leaves: the default


def test_overrides_are_keys_of_train_json() -> None:
    """Every override names a key of configs/train.json (a typo would be silently ignored by the bundle)."""
    cfg = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    for over in [*em.PROFILES.values(), *em.METHOD_OVERRIDES.values(), em.SMOKE_OVERRIDES]:
        for key in over:  # "a#b": key b of the dictionary a, as the bundle CLI reads it
            node = cfg
            for part in key.split("#"):
                assert isinstance(node, dict) and part in node, key
                node = node[part]
    assert "slice_axis" in cfg


def test_gpu_profile_keeps_its_recipe_and_the_method_wins(tmp_path: Path) -> None:
    cmd = em.train_command(em.EMRun("s2l", 0), tmp_path / "data", tmp_path / "run", profile="gpu-short")
    assert json.loads(_flag(cmd, "roi_size")) == [256, 256] and _flag(cmd, "max_epochs") == "100"
    assert _flag(cmd, "ema_every") == "5"
    pce = em.train_overrides(em.EMRun("pce", 0), profile="gpu-short")
    assert pce["ema_every"] == 100000 and pce["lambda_up"] == 0  # no ensembles for pCE on any profile


def test_smoke_uses_a_step_budget(tmp_path: Path) -> None:
    """--smoke: a few steps of the share-based schedule, no epoch key left (they would override max_steps)."""
    for profile in em.PROFILES:
        for method in ("s2l", "pce", "full"):
            over = em.train_overrides(em.EMRun(method, 0), smoke=True, profile=profile)
            assert over["max_steps"] == em.SMOKE_OVERRIDES["max_steps"] and over["num_workers"] == 0
            assert not any(k in over for k in ("max_epochs", "warmup_epochs", "max_train_seconds", "ema_alpha"))
            # the method's own ensemble override is kept
            assert ("ema_every" in over) == (method != "s2l")
    assert em.results_path("default", smoke=True, work=tmp_path) == tmp_path / "results_smoke" / "em.json"


def test_profiles_have_their_own_results_and_run_folders(tmp_path: Path) -> None:
    assert em.results_path("default") == em.RESULTS_DIR / "em.json"
    assert em.results_path("gpu-short").name == "em_gpu-short.json"
    assert em.runs_dir(tmp_path, "default") == tmp_path / "runs_default"  # never the retired cpu runs in runs/
    assert em.runs_dir(tmp_path, "gpu-short") == tmp_path / "runs_gpu-short"


def test_recipe_line_reads_train_json() -> None:
    line = em.recipe_line("default")
    cfg = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    assert "`slice_axis 0`" in line and f"`max_steps {cfg['max_steps']}`" in line
    assert f"`warmup_share {cfg['warmup_share']}`" in line and "(ema_alpha " in line
    assert "max_epochs" not in line
    gpu = em.recipe_line("gpu-short")
    assert "`max_epochs 100`" in gpu and "`ema_every 5`" in gpu and "max_steps" not in gpu
    # ema_every 5 of 100 epochs with the default memory share: alpha = 1 - exp(-0.05 / share)
    import math

    assert f"(ema_alpha {1 - math.exp(-0.05 / cfg['ema_memory_share']):.3f})" in gpu


def test_targets() -> None:
    recs = [rec("s2l", 0, 0.900), rec("s2l", 1, 0.910), rec("pce", 0, 0.89), rec("pce", 1, 0.88),
            rec("full", 0, 0.908), rec("full", 1, 0.912)]
    names = [n for n, _, _ in em.check_targets(recs)]
    assert names == ["S2L IoU ≥ Full IoU − 0.005", "S2L IoU above pCE-only", "Every training ≤ 600 s (2 CPU cores)"]
    # S2L 0.905 vs Full 0.910 - 0.005 = 0.905: on the line passes
    assert [s for _, s, _ in em.check_targets(recs)] == ["PASS", "PASS", "PASS"]
    # pCE with S2L's own two numbers: equal means are not "above"
    tie = [r for r in recs if r["method"] != "pce"] + [rec("pce", 0, 0.90), rec("pce", 1, 0.91)]
    assert [s for _, s, _ in em.check_targets(tie)][:2] == ["PASS", "FAIL"]
    far = [dict(r, iou=0.92) if r["method"] == "full" else r for r in recs]
    status, measured = em.check_targets(far)[0][1:]
    assert status == "FAIL" and "Full 0.9200" in measured and "= 0.9150" in measured
    slow = recs + [rec("s2l", 2, 0.9, train_seconds=640.0)]
    status, measured = em.check_targets(slow)[2][1:]
    assert status == "FAIL" and "over: s2l s2 640 s" in measured and "7 of 9 planned trainings" in measured
    # a training measured on a GPU machine does not count for the CPU time target
    gpu_only = [rec("s2l", 0, 0.9, gpu="NVIDIA H200", train_seconds=900.0)]
    assert em.check_targets(gpu_only)[2][1] == em.dsb.PENDING
    assert [s for _, s, _ in em.check_targets([])] == [em.dsb.PENDING] * 3


def test_report_of_the_default_profile(tmp_path: Path) -> None:
    recs = [rec("s2l", 0, 0.88), rec("pce", 0, 0.87), dict(rec("full", 0, 0.89), class_prior=None,
                                                            overrides={"class_weights": None})]
    recs[0]["class_prior"] = {"class_weights": [0.6, 1.0], "items": 20}
    text = em.render_report(recs, {"results_name": "em.json"})
    assert "- **Profile(s):** default" in text and "**Default recipe** (configs/train.json at report time" in text
    assert "`slice_axis 0`" in text and "Runs:** 3 of 10 planned (seeds 0, 1, 2)" in text
    assert "steps trained (per seed)" in text and "| 1200 |" in text
    assert "auto [0.6, 1]" in text and "| none |" in text  # estimated class weights; Full unweighted
    assert "GPU machine" not in text and "| S2L IoU above pCE-only | PASS |" in text
    assert "archive/" in text

    gpu = [rec(m, 0, 0.9, profile="gpu-short", gpu="NVIDIA H200") for m in ("s2l", "pce", "full")]
    text = em.render_report(gpu, {"results_name": "em_gpu-short.json"})
    assert "`gpu-short`: one lent GPU" in text and "Recipe of `gpu-short`" in text
    assert "shared it with the other runs" in text and "GPU (H200, 16 cores)" in text

    results = tmp_path / "em_gpu-short.json"
    for r in gpu:
        common.append_record(results, r, em.KEY_FIELDS)
    md = em.write_report(results, {"profile": "gpu-short"})
    assert md == tmp_path / "em_gpu-short.md" and "Runs:** 3 of 10 planned" in md.read_text()


def test_list_reads_the_profile_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "em_gpu-short.json"
    common.append_record(results, rec("pce", 1, 0.9, profile="gpu-short"), em.KEY_FIELDS)
    assert em.main(["--profile", "gpu-short", "--results", str(results), "--list", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "done     pce:1" in lines and "pending  s2l:0" in lines and len(lines) == 11
    assert lines[-1].startswith("1 of 10 done; profile gpu-short")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs_gpu-short").exists()  # --list never trains
    assert em.main(["--results", str(results), "--list", "--work", str(tmp_path), "--seeds", "0", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8
    assert em.main(["--results", str(results), "--list", "--work", str(tmp_path), "--smoke"]) == 0
    assert [ln.split()[-1] for ln in capsys.readouterr().out.splitlines()[:-1]] == ["s2l:0", "pce:0", "full:0",
                                                                                   "otsu:-"]
    for retired in ("cpu", "cpu-a05", "cpu-pcw", "no-such-profile"):
        with pytest.raises(SystemExit):  # argparse refuses a profile em.py does not define
            em.main(["--profile", retired, "--list"])


def test_analysis_reads_the_default_profile_runs(tmp_path: Path) -> None:
    (tmp_path / "runs_default" / "isbi2012_s2l_s0").mkdir(parents=True)
    (tmp_path / "runs_default" / "isbi2012_otsu_na").mkdir(parents=True)
    (tmp_path / "runs" / "isbi2012_s2l_s0").mkdir(parents=True)  # a retired cpu run: not read
    assert em_analysis.run_folders(tmp_path) == [("default", tmp_path / "runs_default" / "isbi2012_s2l_s0")]
    run = tmp_path / "runs_default" / "isbi2012_s2l_s0"
    assert em_analysis.ema_alpha_of(run, {"ema_alpha": 0.5}) == 0.5
    (run / "log.txt").write_text("... schedule: 1200 steps (240.0 epochs of 5 steps); ensembles at 0.50, 0.60; "
                                 "EMA alpha 0.487\n")
    assert em_analysis.ema_alpha_of(run, {}) == pytest.approx(0.487)
