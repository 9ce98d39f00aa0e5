#!/usr/bin/env python
"""Build the model-zoo package ``scribble2label_v<version>.zip`` with one command.

    python bundle/build.py --model models/model.pt [--version 0.3.0] [--out dist] [--repo OWNER/REPO]
                           [--metrics summary.json]

The zip holds one top-level folder ``scribble2label/``: ``configs/`` (train, inference, evaluate, paper, metadata,
logging.conf, schema/), ``scripts/`` (``__init__.py`` from ``bundle/templates`` and a copy of the ``s2l_monai``
package, taken from where it is imported at build time, so the code is never edited in two places),
``docs/README.md`` (zoo template, performance table from ``--metrics``), ``docs/data_license.txt``, ``LICENSE``,
``large_files.yml`` (GitHub release URL and sha256 of the weights), ``models/model.pt`` and its copy
``models/pretrained.pt`` (where training starts by default; training writes ``models/model.pt``). No file may
exceed 25 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import string
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"
BUNDLE_NAME = "scribble2label"
PACKAGE = "s2l_monai"
DEFAULT_REPO = "OWNER/REPO"
MAX_FILE_BYTES = 25_000_000
#: The released pretrained weights and their measured test metrics (see README.md, "The shipped weights").
SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "model.pt"
SHIPPED_METRICS = Path(__file__).resolve().parent / "models" / "metrics.json"
CONFIG_FILES = ("train.json", "inference.json", "evaluate.json", "paper.json", "multi_gpu_train.json",
                "multi_gpu_inference.json", "metadata.json", "logging.conf")
SCHEMA_FILE = "schema/meta_schema.json"
METRICS = (
    ("iou", "IoU (foreground)"),
    ("mdice", "mDice (pooled over nuclei)"),
    ("dsb", "DSB score (mAP over IoU 0.5-0.95)"),
    ("f1_50", "F1 at IoU 0.5"),
    ("pq", "PQ"),
    ("sq", "SQ"),
    ("rq", "RQ"),
    ("aji", "AJI"),
)
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give the same zip

__all__ = ["build", "main", "load_metrics", "performance_section", "release_url", "sha256"]


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_url(repo: str, version: str, filename: str = "model.pt") -> str:
    """URL of a GitHub release asset of tag ``v<version>``."""
    return f"https://github.com/{repo}/releases/download/v{version}/{filename}"


def source_package() -> Path:
    """Folder of the ``s2l_monai`` package as Python imports it (the repository's ``s2l_monai/`` when installed -e)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not importable: install the repository (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def load_metrics(path: Path | None) -> dict[str, Any]:
    """Read a metrics JSON: ``summary.json`` of ``configs/evaluate.json``, or ``{"metrics": {...}, ...}``.

    The second form may add ``dataset``, ``split``, ``model``, ``seconds_per_image`` and ``notes`` (free text shown
    with the table). Returns ``{}`` when ``path`` is None.
    """
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    info = dict(data) if isinstance(data.get("metrics"), dict) else {"metrics": data}
    numbers = {k: v for k, v in info["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not any(k in numbers for k, _ in METRICS):
        raise ValueError(f"{path}: none of the metrics {[k for k, _ in METRICS]} found")
    info["metrics"] = numbers
    return info


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def performance_section(info: dict[str, Any]) -> str:
    """Markdown of the README's "Performance" section: the measured table, or "not yet measured"."""
    if not info:
        return (
            "Not yet measured: the weights in `models/model.pt` of this package come without a measured "
            "evaluation. Measure them with the evaluation command below."
        )
    metrics = info["metrics"]
    lines = []
    what = ", ".join(
        f"{label}: {info[key]}" for key, label in (("dataset", "data"), ("split", "split"), ("model", "model"))
        if info.get(key)
    )
    if what:
        lines += [f"Measured with `configs/evaluate.json` ({what}).", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(metrics[key])} |" for key, label in METRICS if key in metrics]
    for key in ("n_images", "n_nuclei"):
        if key in metrics:
            lines.append(f"| {key.replace('_', ' ')} | {int(metrics[key])} |")
    if info.get("seconds_per_image") is not None:
        lines.append(f"| inference time per image (s) | {float(info['seconds_per_image']):.3f} |")
    if info.get("notes"):
        lines += ["", str(info["notes"])]
    return "\n".join(lines)


def package_metadata(meta: dict[str, Any], version: str, info: dict[str, Any]) -> dict[str, Any]:
    """The package's metadata.json: the repository's, at ``version``, with measured ``eval_metrics``."""
    if meta.get("name") != BUNDLE_NAME:
        raise ValueError(f"configs/metadata.json name is {meta.get('name')!r}, the package is {BUNDLE_NAME!r}")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"version {version} has no changelog entry in configs/metadata.json: add one first")
    out = dict(meta)
    out["version"] = version
    if info:
        out["eval_metrics"] = {k: info["metrics"][k] for k, _ in METRICS if k in info["metrics"]}
    return out


def check_model(model: Path) -> None:
    """Load ``model`` (a state dict) into the ``network_def`` of ``configs/inference.json``, strictly."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    state = torch.load(model, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        raise ValueError(f"{model} is a checkpoint dict; pass the plain state dict (models/model.pt)")
    net.load_state_dict(state, strict=True)


def _stage(root: Path, model: Path, version: str, repo: str, info: dict[str, Any]) -> None:
    configs = REPO_ROOT / "configs"
    (root / "configs" / "schema").mkdir(parents=True)
    for name in CONFIG_FILES:
        if name == "metadata.json":
            meta = package_metadata(json.loads((configs / name).read_text()), version, info)
            (root / "configs" / name).write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n")
        else:
            shutil.copy2(configs / name, root / "configs" / name)
    shutil.copy2(configs / SCHEMA_FILE, root / "configs" / SCHEMA_FILE)

    scripts = root / "scripts"
    shutil.copytree(source_package(), scripts / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    shutil.copy2(TEMPLATES / "scripts_init.py", scripts / "__init__.py")

    (root / "docs").mkdir()
    readme = string.Template((TEMPLATES / "README.md").read_text()).substitute(
        version=version, repo=repo, performance=performance_section(info)
    )
    (root / "docs" / "README.md").write_text(readme)
    shutil.copy2(TEMPLATES / "data_license.txt", root / "docs" / "data_license.txt")
    shutil.copy2(REPO_ROOT / "LICENSE", root / "LICENSE")

    (root / "models").mkdir()
    shutil.copy2(model, root / "models" / "model.pt")
    # where every training starts (train.json's pretrained_weights "auto", s2l_monai.pretrained): models/model.pt
    # is what a training of the package writes, so the shipped weights keep a copy of their own
    shutil.copy2(model, root / "models" / "pretrained.pt")
    # the weights' foreground threshold (s2l_monai.calibration), read by the package's inference
    from s2l_monai.calibration import calibration_path

    if calibration_path(model).is_file():
        shutil.copy2(calibration_path(model), root / "models" / "model.calibration.json")
    (root / "large_files.yml").write_text(
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        f'    url: "{release_url(repo, version)}"\n'
        f'    hash_val: "{sha256(model)}"\n'
        '    hash_type: "sha256"\n'
    )


def build(
    model: str | Path,
    version: str | None = None,
    out: str | Path = "dist",
    repo: str = DEFAULT_REPO,
    metrics: str | Path | None = None,
    check: bool = True,
) -> Path:
    """Build ``<out>/scribble2label_v<version>.zip`` and return its path.

    Args:
        model: the weights (state dict of ``network_def``), copied to ``models/model.pt``.
        version: package version; defaults to ``configs/metadata.json`` ``version``; must be in its changelog.
        out: output folder.
        repo: ``OWNER/REPO`` of the GitHub repository whose release ``v<version>`` carries ``model.pt``.
        metrics: metrics JSON (see :func:`load_metrics`); without it the README says "not yet measured".
        check: load the weights into ``configs/inference.json`` ``network_def`` first.

    Raises:
        ValueError: a file over 25 MB, weights that do not fit the network, a version without changelog entry.
    """
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(model)
    if repo.count("/") != 1:
        raise ValueError(f"--repo must be OWNER/REPO, got {repo!r}")
    meta = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    version = version or meta["version"]
    info = load_metrics(Path(metrics) if metrics else None)
    if check:
        check_model(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{BUNDLE_NAME}_v{version}.zip"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / BUNDLE_NAME
        _stage(root, model, version, repo, info)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        too_big = [f"{p.relative_to(root)} ({p.stat().st_size / 1e6:.1f} MB)" for p in files
                   if p.stat().st_size > MAX_FILE_BYTES]
        if too_big:
            raise ValueError(f"files over {MAX_FILE_BYTES / 1e6:.0f} MB are not allowed in a zoo package: {too_big}")
        partial = target.with_suffix(".zip.part")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in files:
                entry = zipfile.ZipInfo(path.relative_to(root.parent).as_posix(), date_time=_ZIP_DATE)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                zf.writestr(entry, path.read_bytes())
        partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help=f"weights to ship (state dict of network_def); default: the shipped pretrained weights "
                             f"{SHIPPED_MODEL.relative_to(REPO_ROOT)} with their measured metrics")
    parser.add_argument("--version", default=None, help="package version (default: configs/metadata.json)")
    parser.add_argument("--out", default="dist", help="output folder (default: dist)")
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"GitHub OWNER/REPO of the releases ({DEFAULT_REPO})")
    parser.add_argument("--metrics", default=None, help="metrics JSON for the README's performance table")
    parser.add_argument("--no-check", action="store_true", help="skip loading the weights into network_def")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = SHIPPED_MODEL
        args.metrics = args.metrics or SHIPPED_METRICS
    path = build(args.model, args.version, args.out, args.repo, args.metrics, check=not args.no_check)
    with zipfile.ZipFile(path) as zf:
        largest = max(zf.infolist(), key=lambda i: i.file_size)
        count = len(zf.infolist())
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {count} files, largest {largest.filename} "
          f"{largest.file_size / 1e6:.2f} MB)")
    if args.repo == DEFAULT_REPO:
        print(f"note: large_files.yml points at the placeholder repository {DEFAULT_REPO}; pass --repo OWNER/REPO")
    return 0


if __name__ == "__main__":
    sys.exit(main())
