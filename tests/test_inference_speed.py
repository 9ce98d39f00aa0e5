"""The faster inference paths (issue 17, item 0) give the outputs of the plain ones, byte for byte.

Post-processing in worker processes (:class:`BackgroundPostprocessing`) writes every file, the same bytes as the
inline chain, and an error in a worker surfaces in the parent with the item's name; :class:`Argmaxd` equals MONAI's
``AsDiscreted(argmax=True)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Compose
from PIL import Image
from s2l_testing import default_network

from s2l_monai.data.synthetic import synthetic_nuclei
from s2l_monai.inference_io import BackgroundPostprocessing, PostprocessingError, SaveArrayd
from s2l_monai.transforms import Argmaxd, channel_argmax

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Argmax
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_argmax_equals_torch_argmax_with_ties_and_nan(channels, dtype):
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 3, (channels, 40, 50), generator=g).to(dtype)  # small integers: many ties
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:300]] = float("nan")
    expected = torch.argmax(x, dim=0, keepdim=True).to(dtype)
    got = channel_argmax(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_argmaxd_equals_asdiscreted_and_keeps_metadata():
    prob = MetaTensor(torch.softmax(torch.randn(2, 33, 47), 0), meta={"filename_or_obj": "/d/a.png"})
    ours = Argmaxd("pred")({"pred": prob})["pred"]
    monai = AsDiscreted("pred", argmax=True)({"pred": prob})["pred"]
    assert isinstance(ours, MetaTensor) and ours.meta["filename_or_obj"] == "/d/a.png"
    assert ours.dtype == monai.dtype and torch.equal(ours.as_tensor(), monai.as_tensor())


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing in workers
# ---------------------------------------------------------------------------------------------------------------------


def _items(n: int, shape: tuple[int, int] = (37, 29)) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": MetaTensor(torch.zeros(1, *shape), meta={"filename_or_obj": f"/in/img_{i}.png"}),
             "pred": MetaTensor(torch.as_tensor(rng.integers(0, 300, (1, *shape)), dtype=torch.float32))}
            for i in range(n)]


@pytest.mark.parametrize("start_method", ["fork", "thread"])
def test_background_postprocessing_writes_every_file_as_inline(tmp_path, start_method):
    if start_method == "fork" and "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork on this platform")
    items = _items(9)
    for workers, folder in ((0, "inline"), (2, "pool")):
        chain = Compose([SaveArrayd("pred", tmp_path / folder, "_x", ".png", np.uint16)])
        post = BackgroundPostprocessing(chain, workers=workers, max_pending=3, start_method=start_method)
        for item in items:
            out = post(item)
            assert out is not None
        post.wait()
    inline = sorted(p.name for p in (tmp_path / "inline").iterdir())
    assert inline == [f"img_{i}_x.png" for i in range(9)]
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == inline
    for name in inline:
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()


@pytest.mark.parametrize("start_method", ["fork", "thread"])
def test_background_postprocessing_error_names_the_file(tmp_path, start_method):
    items = _items(6)
    items[2]["pred"] = items[2]["pred"] + 70000  # does not fit uint16: SaveArrayd raises ValueError
    chain = Compose([SaveArrayd("pred", tmp_path, "_x", ".png", np.uint16)])
    post = BackgroundPostprocessing(chain, workers=1, start_method=start_method)
    with pytest.raises(PostprocessingError, match=r"'img_2'.*ValueError.*beyond uint16") as info:
        for item in items:
            post(item)
        post.wait()
    assert info.value.name == "img_2"
    assert (tmp_path / "img_0_x.png").is_file() and not (tmp_path / "img_2_x.png").exists()
    assert post._executor is None  # the pool was shut down


def test_background_postprocessing_zero_workers_is_the_chain():
    post = BackgroundPostprocessing(lambda d: {**d, "seen": True}, workers=0)
    assert post({"a": 1}) == {"a": 1, "seen": True}
    with pytest.raises(ValueError, match="workers"):
        BackgroundPostprocessing(lambda d: d, workers=-1)


# ---------------------------------------------------------------------------------------------------------------------
# The bundle: default (workers, fast argmax) against the inline chain with MONAI's argmax
# ---------------------------------------------------------------------------------------------------------------------


def _model_and_images(root: Path, shapes: tuple[tuple[int, int], ...]) -> Path:
    """A random-init default network saved as ``root/model.pt`` and one synthetic image per shape in ``root/images``."""
    torch.manual_seed(0)
    torch.save(default_network().state_dict(), root / "model.pt")
    images = root / "images"
    images.mkdir()
    for i, shape in enumerate(shapes):
        image, _ = synthetic_nuclei(shape, seed=i)
        Image.fromarray(image).save(images / f"im{i}.png")
    return images


def _bundle_inference(root: Path, images: Path, out: Path, *extra: str) -> None:
    """``monai.bundle run inference`` with ``root/model.pt`` on ``images`` into ``out``, probabilities saved."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--ckpt_path", str(root / "model.pt"), "--input_dir", str(images), "--output_dir", str(out),
           "--save_probabilities", "true", *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["watershed", "connected"])
def test_bundle_outputs_identical_with_and_without_workers(tmp_path, method):
    images = _model_and_images(tmp_path, ((96, 80), (300, 270), (64, 72)))
    outputs = {}
    # inline: MONAI's AsDiscreted in place of Argmaxd (index 4: after the softmax, the boundary refinement, the
    # instances and the probability copy); both with the boundary refinement on, which runs in the workers too
    for name, extra in (("inline", ["--postprocessing_workers", "0", "--postprocessing_transforms#4",
                                    "{'_target_': 'AsDiscreted', 'keys': 'pred', 'argmax': True}"]),
                        ("workers", ["--postprocessing_workers", "2"])):
        out = tmp_path / name
        _bundle_inference(tmp_path, images, out, "--instance_method", method, "--refine_weight", "2", *extra)
        outputs[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outputs["inline"]) == 9
    assert outputs["workers"] == outputs["inline"]


@pytest.mark.slow
def test_bundle_compiled_network_gives_the_eager_outputs(tmp_path):
    """``--compile_network true`` (MONAI's ``SupervisedEvaluator(compile=True)``, ``torch.compile``) on images of three
    sizes, whole-image inference (so the compiled graph meets new shapes): probabilities within float tolerance of the
    eager network's, the same masks."""
    tifffile = pytest.importorskip("tifffile")
    from monai.bundle import ConfigParser

    images = _model_and_images(tmp_path, ((96, 80), (160, 130), (64, 72)))
    for flag, compiled_type in (("false", False), ("true", True)):  # the evaluator only built, not run
        parser = ConfigParser()
        parser.read_config(str(REPO / "configs" / "inference.json"))
        parser["compile_network"] = flag
        parser["input_dir"] = str(images)
        net = parser.get_parsed_content("evaluator").network
        assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) is compiled_type
    for flag in ("false", "true"):
        _bundle_inference(tmp_path, images, tmp_path / flag, "--infer_whole_image", "true", "--test_time_flips",
                          "false", "--compile_network", flag)
    for i in range(3):
        eager = tifffile.imread(tmp_path / "false" / f"im{i}_prob.tif")
        compiled = tifffile.imread(tmp_path / "true" / f"im{i}_prob.tif")
        assert eager.shape == compiled.shape and eager.shape[-2:] == Image.open(images / f"im{i}.png").size[::-1]
        np.testing.assert_allclose(compiled, eager, atol=1e-5)
        ambiguous = np.abs(eager - 0.5) < 1e-4  # where rounding may flip the argmax
        for kind in ("semantic", "instances"):
            a = np.asarray(Image.open(tmp_path / "false" / f"im{i}_{kind}.png"))
            b = np.asarray(Image.open(tmp_path / "true" / f"im{i}_{kind}.png"))
            if kind == "semantic":
                assert np.array_equal(a[~ambiguous.reshape(a.shape)], b[~ambiguous.reshape(a.shape)])
            elif not ambiguous.any():
                assert np.array_equal(a, b)
