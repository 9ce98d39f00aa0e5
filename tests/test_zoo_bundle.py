"""The model-zoo package: build it, download it offline, run it where ``s2l_monai`` is not installed.

``bundle/build.py`` builds ``scribble2label_v<version>.zip`` from a random-init UNet; ``python -m monai.bundle
download --url file://...`` extracts it; then every command runs from the downloaded folder in a throwaway venv
whose only packages are the main venv's site-packages *without* its ``.pth`` files, so the editable install of
``s2l_monai`` is not active there (checked first). The bundle's own ``scripts/s2l_monai`` copy must carry it:
``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` (default and paper network), inference on one
image (a real BBBC038 fluorescence image when ``../shared/data`` has it, else a synthetic one) and one epoch of
training on a synthetic set that the bundle generates itself. The commands run concurrently to keep the file short.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet, UNet
from PIL import Image
from s2l_testing import default_network

from s2l_monai.data.dsb2018 import classify_modality
from s2l_monai.data.synthetic import synthetic_nuclei

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("S2L_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_DSB_ZIP = SHARED_DATA / "bbbc038" / "stage1_train.zip"
NAME = "scribble2label"
VERSION = json.loads((REPO / "configs" / "metadata.json").read_text())["version"]
PAPER = "['configs/inference.json','configs/paper.json']"

pytestmark = pytest.mark.slow


def _load_builder():
    spec = importlib.util.spec_from_file_location("s2l_bundle_build", REPO / "bundle" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_module = _load_builder()


def _isolated_python(root: Path) -> Path:
    """A venv of the base interpreter that sees the main venv's site-packages but runs none of its ``.pth`` files.

    A path line in a ``.pth`` file only appends that folder to ``sys.path``; the ``.pth`` files inside it (such as
    ``__editable__.s2l_monai-*.pth``, which installs the import hook of ``pip install -e``) are not processed.
    """
    env_dir = root / "isolated-venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(site) / "main_venv_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def _input_image(folder: Path) -> tuple[Path, str]:
    """One grey fluorescence image: a 256x256 BBBC038 one when the archive is there, else a synthetic one."""
    folder.mkdir(parents=True)
    if SHARED_DSB_ZIP.is_file():
        with zipfile.ZipFile(SHARED_DSB_ZIP) as zf:
            for member in sorted(m for m in zf.namelist() if "/images/" in m and m.endswith(".png")):
                rgb = np.asarray(Image.open(io.BytesIO(zf.read(member))).convert("RGB"))
                if rgb.shape[:2] == (256, 256) and classify_modality(rgb) == "fluorescence":
                    path = folder / Path(member).name
                    Image.fromarray(rgb[..., 0]).save(path)
                    return path, "bbbc038"
    image, _ = synthetic_nuclei((256, 256), seed=5)
    path = folder / "synthetic.png"
    Image.fromarray(np.asarray(image)).save(path)
    return path, "synthetic"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Build, download and run everything once; the tests below check one result each."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    model = root / "model.pt"
    torch.save(default_network().state_dict(), model)
    zip_path = build_module.build(model, out=root / "dist", repo="example/s2l-monai")
    python = _isolated_python(root)
    env = _env()

    bundle_dir = root / "downloaded"
    download = subprocess.run(
        [str(python), "-m", "monai.bundle", "download", "--name", NAME, "--version", VERSION,
         "--url", zip_path.resolve().as_uri(), "--bundle_dir", str(bundle_dir)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert download.returncode == 0, download.stdout[-2000:] + download.stderr[-3000:]
    bundle = bundle_dir / NAME
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('s2l_monai') is None);"
         "import scripts, s2l_monai; print(s2l_monai.__file__)"],
        cwd=bundle, env=env, capture_output=True, text=True, timeout=60,
    )

    torch.manual_seed(0)
    paper_model = root / "paper_model.pt"
    paper_net = FlexibleUNet(in_channels=1, out_channels=2, backbone="resnet50", pretrained=False, spatial_dims=2)
    torch.save(paper_net.state_dict(), paper_model)
    del paper_net
    image, image_source = _input_image(root / "inputs")

    bundle_cmd = [str(python), "-m", "monai.bundle"]
    meta = ["--meta_file", "configs/metadata.json"]
    commands = {
        "verify_metadata": ["verify_metadata", *meta, "--filepath", "configs/schema/meta_schema.json"],
        "verify_net_in_out": ["verify_net_in_out", "network_def", *meta, "--config_file", "configs/inference.json"],
        "verify_net_in_out_paper": ["verify_net_in_out", "network_def", *meta, "--config_file", PAPER],
        "ckpt_export": ["ckpt_export", "network_def", "--filepath", str(root / "model.ts"), "--ckpt_file",
                        "models/model.pt", *meta, "--config_file", "configs/inference.json"],
        "ckpt_export_paper": ["ckpt_export", "network_def", "--filepath", str(root / "paper_model.ts"), "--ckpt_file",
                              str(paper_model), *meta, "--config_file", PAPER],
        "inference": ["run", "inference", "--config_file", "configs/inference.json", "--bundle_root", ".",
                      "--input_dir", str(image.parent), "--output_dir", str(root / "predictions")],
        "training": ["run", "training", "--config_file", "configs/train.json", "--bundle_root", ".",
                     "--dataset_dir", str(root / "train_data"), "--output_dir", str(root / "train_out"),
                     "--ckpt_dir", str(root / "train_models"), "--max_epochs", "1", "--warmup_epochs", "1",
                     "--ema_every", "1", "--num_workers", "0", "--roi_size", "[64,64]", "--infer_roi_size", "[256,256]",
                     "--batch_size", "4", "--num_samples", "2", "--num_figures", "1",
                     "--train#datalist", "$s2l_monai.data.datalist.load_datalist(@dataset_dir, 'training')[:2]"],
    }
    procs = {
        name: subprocess.Popen([*bundle_cmd, *args], cwd=bundle, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        results[name] = (proc.returncode, output)
    return {
        "root": root, "zip": zip_path, "model": model, "bundle": bundle, "probe": probe, "results": results,
        "image": image, "image_source": image_source, "seconds": time.monotonic() - started,
    }


def _ok(zoo, name: str) -> str:
    code, output = zoo["results"][name]
    assert code == 0, f"{name} failed:\n{output[-5000:]}"
    return output


# ---------------------------------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------------------------------


def test_zip_layout_and_sizes(zoo):
    with zipfile.ZipFile(zoo["zip"]) as zf:
        names = set(zf.namelist())
        assert zoo["zip"].name == f"{NAME}_v{VERSION}.zip"
        assert all(n.startswith(f"{NAME}/") for n in names)
        for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                         "configs/evaluate.json", "configs/paper.json", "configs/logging.conf",
                         "configs/multi_gpu_train.json", "configs/multi_gpu_inference.json",
                         "configs/schema/meta_schema.json", "docs/README.md", "docs/data_license.txt",
                         "large_files.yml", "models/model.pt", "models/pretrained.pt", "scripts/__init__.py",
                         "scripts/s2l_monai/__init__.py", "scripts/s2l_monai/data/synthetic.py"):
            assert f"{NAME}/{required}" in names, required
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert max(i.file_size for i in zf.infolist()) <= 25_000_000
        # the vendored code is the repository's, byte for byte
        for path in (REPO / "s2l_monai").rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            assert zf.read(f"{NAME}/scripts/{rel}") == path.read_bytes(), rel
        meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
        assert meta["version"] == VERSION and VERSION in meta["changelog"] and meta["name"] == NAME
        large = zf.read(f"{NAME}/large_files.yml").decode()
        readme = zf.read(f"{NAME}/docs/README.md").decode()
    digest = hashlib.sha256(zoo["model"].read_bytes()).hexdigest()
    assert f"https://github.com/example/s2l-monai/releases/download/v{VERSION}/model.pt" in large
    assert f'hash_val: "{digest}"' in large and 'hash_type: "sha256"' in large
    assert "Not yet measured" in readme and "$import scripts" in readme and "${" not in readme
    for section in ("# Model Overview", "## Data", "## Performance", "## MONAI Bundle Commands", "# References"):
        assert section in readme
    assert f"--version {VERSION} --source github --repo example/s2l-monai/v{VERSION}" in readme


def test_builder_metrics_table_and_limits(tmp_path, monkeypatch):
    summary = {"n_images": 110, "n_nuclei": 4000, "iou": 0.8123, "mdice": 0.79, "dsb": 0.5, "f1_50": 0.8}
    info = build_module.load_metrics(_write(tmp_path / "summary.json", summary))
    table = build_module.performance_section(info)
    assert "| IoU (foreground) | 0.8123 |" in table and "| n images | 110 |" in table
    wrapped = {"metrics": summary, "dataset": "BBBC038v1 fluorescence", "split": "test", "seconds_per_image": 0.2}
    table = build_module.performance_section(build_module.load_metrics(_write(tmp_path / "m.json", wrapped)))
    assert "split: test" in table and "| inference time per image (s) | 0.200 |" in table
    with pytest.raises(ValueError, match="none of the metrics"):
        build_module.load_metrics(_write(tmp_path / "bad.json", {"loss": 1.0}))

    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.save(default_network().state_dict(), model)
    with pytest.raises(ValueError, match="changelog"):
        build_module.build(model, version="99.0.0", out=tmp_path / "dist", check=False)
    monkeypatch.setattr(build_module, "MAX_FILE_BYTES", 100_000)
    with pytest.raises(ValueError, match="models/model.pt"):
        build_module.build(model, out=tmp_path / "dist", check=False)
    assert not list((tmp_path / "dist").glob("*.zip"))
    wrong = tmp_path / "wrong.pt"
    torch.save(UNet(2, 1, 2, channels=(8, 16), strides=(2,)).state_dict(), wrong)
    with pytest.raises(RuntimeError):
        build_module.build(wrong, out=tmp_path / "dist")


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Downloaded and run where s2l_monai is not installed
# ---------------------------------------------------------------------------------------------------------------------


def test_downloaded_bundle_uses_its_own_code(zoo):
    probe = zoo["probe"]
    assert probe.returncode == 0, probe.stderr[-3000:]
    not_installed, location = probe.stdout.split()
    assert not_installed == "True", "s2l_monai must not be importable in the isolated environment"
    assert Path(location).resolve() == (zoo["bundle"] / "scripts" / "s2l_monai" / "__init__.py").resolve()
    assert (zoo["bundle"] / "models" / "model.pt").read_bytes() == zoo["model"].read_bytes()


def test_verify_metadata(zoo):
    assert "metadata is verified with no error" in _ok(zoo, "verify_metadata")


@pytest.mark.parametrize("name", ["verify_net_in_out", "verify_net_in_out_paper"])
def test_verify_net_in_out(zoo, name):
    assert "data shape of network is verified with no error" in _ok(zoo, name)


@pytest.mark.parametrize("name, net", [("ckpt_export", "model"), ("ckpt_export_paper", "paper_model")])
def test_ckpt_export(zoo, name, net):
    _ok(zoo, name)
    scripted = torch.jit.load(str(zoo["root"] / f"{net}.ts"), map_location="cpu")
    scripted.eval()
    with torch.no_grad():
        assert tuple(scripted(torch.rand(1, 1, 64, 64)).shape) == (1, 2, 64, 64)


def test_inference_from_downloaded_bundle(zoo):
    _ok(zoo, "inference")
    stem = zoo["image"].stem
    with Image.open(zoo["image"]) as im:
        shape = im.size[::-1]
    for suffix in ("_semantic", "_instances"):
        written = list((zoo["root"] / "predictions").rglob(f"{stem}{suffix}.png"))
        assert len(written) == 1, (suffix, sorted((zoo["root"] / "predictions").rglob("*")))
        with Image.open(written[0]) as im:
            assert np.asarray(im).shape == shape


def test_one_training_epoch_from_downloaded_bundle(zoo):
    output = _ok(zoo, "training")
    assert "s2l - INFO - epoch 1/1" in output and "ensemble of 2 items" in output, output[-3000:]
    # the default start: the package's own shipped weights (its copy of models/model.pt), not the repository's
    shipped = (zoo["bundle"] / "models" / "pretrained.pt").resolve()
    assert f"pretrained_weights=auto: the network starts from the shipped weights {shipped}" in output, output[-3000:]
    assert (zoo["root"] / "train_data" / "datalist.json").is_file()  # generated by the bundle's own copy
    state = torch.load(zoo["root"] / "train_models" / "model.pt", map_location="cpu")
    default_network().load_state_dict(state)
    print(f"zoo fixture: {zoo['seconds']:.0f} s, inference input {zoo['image_source']}")
