"""The napari dock widget, headless: sample, strokes, Train, live pseudo-labels, Segment, Stop, Continue, bad input.

Every training here is the bundle's real one (``configs/train.json`` in a child process) with a tiny budget. Set
``S2L_NAPARI_SCREENSHOT=docs/images/napari_widget.png`` (and ``S2L_NAPARI_TEST_STEPS``) to rewrite the README's
picture from this code path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

# napari.qt, not napari: without napari installed, "napari" would import this test folder (a namespace package)
pytest.importorskip("napari.qt", reason="napari with a Qt binding is not installed (pip install -e '.[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (pip install pytest-qt)")

from qtpy.QtCore import Qt  # noqa: E402

from s2l_monai.napari.project import PSEUDO_NUCLEUS, PSEUDO_UNSURE, item_id  # noqa: E402
from s2l_monai.napari.sample import BACKGROUND, NUCLEUS, SAMPLE_NAME, sample_scribbles  # noqa: E402
from s2l_monai.napari.widget import ScribbleWidget  # noqa: E402

pytestmark = pytest.mark.slow

SCREENSHOT = os.environ.get("S2L_NAPARI_SCREENSHOT")
STEPS = int(os.environ.get("S2L_NAPARI_TEST_STEPS", "60"))
#: smaller patches than the recipe's 128 px, so the test trainings take seconds
SMALL = {"roi_size": [64, 64]}
SCRIBBLES = f"{SAMPLE_NAME} scribbles"


def _widget(viewer, project: Path, steps: int = STEPS) -> ScribbleWidget:
    _, widget = viewer.window.add_plugin_dock_widget("s2l-monai", "Scribble2Label")
    assert isinstance(widget, ScribbleWidget)
    widget.project_edit.setText(str(project))
    widget.steps.setValue(steps)
    widget.extra_overrides = {} if SCREENSHOT else dict(SMALL)
    return widget


def _open_sample(viewer) -> None:
    """``File > Open Sample > Synthetic nuclei with scribbles``, then the strokes wiped: the test paints its own."""
    layers = viewer.open_sample("s2l-monai", "synthetic_nuclei")
    assert [layer.name for layer in layers] == [SAMPLE_NAME, SCRIBBLES]
    assert set(np.unique(layers[1].data)) == {0, NUCLEUS, BACKGROUND}
    layers[1].data = np.zeros_like(layers[1].data)


def _paint(layer, strokes: np.ndarray, values=(NUCLEUS, BACKGROUND), every: int = 2) -> None:
    """Paint ``strokes`` (a map of label values) into a Labels layer with napari's brush, point by point."""
    layer.brush_size = 3
    for value in values:
        points = np.argwhere(strokes == value)[::every]
        for point in points:
            layer.paint(tuple(int(c) for c in point), value, refresh=False)
    layer.refresh()


def _sample_strokes(viewer) -> np.ndarray:
    """Strokes for the sample image: the paper's automatic scribbles of its nuclei (what a user would draw)."""
    from s2l_monai.data.synthetic import synthetic_nuclei

    image = viewer.layers[SAMPLE_NAME].data
    again, labels = synthetic_nuclei(image.shape, seed=np.random.default_rng([7, 0, 0]))
    assert np.array_equal(again, image)  # the sample's own nuclei
    return sample_scribbles(labels, ratio=0.3, seed=1), labels


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def _wait(qtbot, widget: ScribbleWidget, timeout_s: float = 600) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout_s * 1000))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One project folder for the module: Continue and Stop work on what Train made."""
    return tmp_path_factory.mktemp("napari") / "project"


def test_train_shows_live_pseudo_labels_then_segment(viewer, qtbot, project):
    _open_sample(viewer)
    widget = _widget(viewer, project)
    strokes, truth = _sample_strokes(viewer)
    _paint(viewer.layers[SCRIBBLES], strokes)
    painted = viewer.layers[SCRIBBLES].data
    assert np.count_nonzero(painted == NUCLEUS) > 100 and np.count_nonzero(painted == BACKGROUND) > 100

    started = time.perf_counter()
    qtbot.mouseClick(widget.train_button, Qt.LeftButton)
    assert widget.busy and widget.stop_button.isEnabled() and not widget.train_button.isEnabled()
    _wait(qtbot, widget)
    seconds = time.perf_counter() - started
    kinds = [e["event"] for e in widget.events]
    assert kinds[-1] == "done", widget.message
    assert widget.events[-1] == {"event": "done", "stopped": False, "step": STEPS}
    print(f"\nheadless training of {STEPS} steps: {seconds:.1f} s")

    # progress, loss terms and Omega_g while it ran
    steps = [e for e in widget.events if e["event"] == "step"]
    assert len(steps) >= STEPS // 5 and steps[-1]["step"] == STEPS
    assert all(np.isfinite(e["loss_sp"]) for e in steps)
    assert any(e["loss_up"] > 0 and e["omega_g"] > 0 for e in steps)  # L_up on after warm-up, on Omega_g
    assert widget.progress.value() == widget.progress.maximum() == STEPS
    assert "L_sp" in widget.metrics_label.text() and "Ωg" in widget.metrics_label.text()

    # the pseudo-label layer after every ensemble (the schedule's five), and it moved between them
    ensembles = [e for e in widget.events if e["event"] == "ensemble"]
    assert len(ensembles) == 5
    assert len(widget.pseudo_updates) == 5
    assert any(not np.array_equal(a, b) for a, b in zip(widget.pseudo_updates, widget.pseudo_updates[1:]))
    layer = viewer.layers[f"{SAMPLE_NAME} pseudo-label"]
    assert np.array_equal(layer.data, widget.pseudo_updates[-1])
    assert set(np.unique(layer.data)) <= {0, PSEUDO_NUCLEUS, PSEUDO_UNSURE}
    # it is the run's EMA store, read back: nuclei where the average is confident
    from s2l_monai.ensemble import EMAStore

    prob = EMAStore(project / "run" / "ema").probabilities(item_id(SAMPLE_NAME))
    assert np.array_equal(layer.data == PSEUDO_NUCLEUS, (prob[1] > 0.8))
    # the last ensemble's statistics are this store's: confident pixels, and confident nuclei, among the unscribbled
    unscribbled = painted == 0
    assert ensembles[-1]["coverage"] == pytest.approx((prob.max(0) > 0.8)[unscribbled].mean(), abs=1e-6)
    assert ensembles[-1]["foreground"] == pytest.approx((prob[1] > 0.8)[unscribbled].mean(), abs=1e-6)
    assert ensembles[-1]["foreground"] < ensembles[-1]["coverage"]
    # drift control: 1 up to the warm-up's last ensemble (the reference), then w_k = clip(w_(k-1) * f_k / f_0, 1, 4)
    # with f the foreground share of the pseudo-labelled pixels, from the events' own statistics
    shares = [e["foreground"] / e["coverage"] for e in ensembles]
    expected = [1.0, 1.0]
    for share in shares[2:]:
        expected.append(min(max(expected[-1] * share / shares[1], 1.0), 4.0))
    assert [e["background_weight"] for e in ensembles] == pytest.approx(expected, rel=1e-6)
    uncertainty = viewer.layers[f"{SAMPLE_NAME} uncertainty"].data
    assert uncertainty.shape == layer.data.shape and 0 <= uncertainty.min() and uncertainty.max() <= 1
    assert np.all(uncertainty[painted > 0] == 0)  # scribbled pixels are certain

    # what was written: one training item, the bundle's model
    datalist = json.loads((project / "dataset" / "datalist.json").read_text())
    assert [i["id"] for i in datalist["training"]] == [item_id(SAMPLE_NAME)]
    assert (project / "models" / "model.pt").is_file() and (project / "models" / "checkpoint_final.pt").is_file()
    # the model's foreground threshold, calibrated after training, is said and used by Segment
    calibration = json.loads((project / "models" / "model.calibration.json").read_text())
    if calibration.get("not_calibrated"):
        assert "Read at the argmax" in widget.message, widget.message
    else:
        assert f"Read at foreground threshold {calibration['foreground_threshold']:.2f}" in widget.message

    qtbot.mouseClick(widget.segment_button, Qt.LeftButton)
    _wait(qtbot, widget)
    assert "Segmented" in widget.message, widget.message
    mask = viewer.layers[f"{SAMPLE_NAME} mask"].data
    nuclei = viewer.layers[f"{SAMPLE_NAME} nuclei"].data
    assert mask.shape == nuclei.shape == truth.shape
    assert set(np.unique(mask)) == {0, 1}
    ids = np.unique(nuclei)
    assert np.issubdtype(nuclei.dtype, np.integer) and ids[0] == 0
    assert np.array_equal(ids, np.arange(len(ids)))  # 0 = background, nuclei 1..n
    assert len(ids) - 1 >= 5  # separated nuclei (the sample holds about 25)
    assert _iou(nuclei > 0, mask == 1) > 0.8  # the nuclei are the mask's (less small objects, holes filled)
    assert _iou(mask == 1, truth > 0) > 0.3  # a short training already finds the nuclei

    viewer.layers[f"{SAMPLE_NAME} mask"].visible = False
    viewer.layers[f"{SAMPLE_NAME} pseudo-label"].visible = False
    viewer.layers[f"{SAMPLE_NAME} nuclei"].contour = 2
    viewer.window._qt_window.resize(1500, 860)
    shot = Path(SCREENSHOT) if SCREENSHOT else project.parent / "napari_widget.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    picture = viewer.screenshot(str(shot), canvas_only=False, flash=False)
    assert shot.is_file() and picture.shape[0] > 300 and picture.shape[1] > 600
    assert picture[..., :3].std() > 10  # not a blank window


def test_continue_after_more_strokes_then_stop_keeps_a_usable_model(viewer, qtbot, project):
    model = project / "models" / "model.pt"
    assert model.is_file(), "needs the model of test_train_shows_live_pseudo_labels_then_segment"
    before = model.read_bytes()
    _open_sample(viewer)
    widget = _widget(viewer, project, steps=100_000)
    strokes, labels = _sample_strokes(viewer)
    _paint(viewer.layers[SCRIBBLES], strokes)
    extra = sample_scribbles(labels, ratio=0.6, seed=5)
    _paint(viewer.layers[SCRIBBLES], np.where(strokes > 0, 0, extra))  # strokes added since the last training

    qtbot.mouseClick(widget.continue_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: any(e["event"] == "step" and e["step"] >= 5 for e in widget.events), timeout=300_000)
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    assert "Stopping" in widget.message
    _wait(qtbot, widget, 300)
    done = widget.events[-1]
    assert done["event"] == "done" and done["stopped"] is True and 5 <= done["step"] < 100_000, widget.events[-3:]
    assert "Training stopped after" in widget.message
    # Continue kept the pseudo-labels of the unchanged image and started from the project's model
    assert {"event": "ema_store", "reused": [SAMPLE_NAME], "reset": []} in widget.events
    log = (project / "train.log").read_text()
    assert f"Restored all variables from {model}" in log
    # the stopped run wrote its model and final checkpoint; the model segments
    assert model.read_bytes() != before
    assert (project / "models" / "checkpoint_final.pt").is_file()
    import torch

    state = torch.load(model, map_location="cpu", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    qtbot.mouseClick(widget.segment_button, Qt.LeftButton)
    _wait(qtbot, widget)
    assert "Segmented" in widget.message and viewer.layers[f"{SAMPLE_NAME} nuclei"].data.max() >= 1


def test_stack_trains_slice_by_slice(viewer, qtbot, tmp_path):
    from s2l_monai.data.synthetic import synthetic_nuclei

    pairs = [synthetic_nuclei((96, 96), seed=np.random.default_rng([3, k, 0])) for k in range(3)]
    stack = np.stack([image for image, _ in pairs])
    viewer.add_image(stack, name="stack")
    viewer.add_labels(np.zeros(stack.shape, dtype=np.uint8), name="stack scribbles")
    widget = _widget(viewer, tmp_path / "p", steps=20)
    assert widget._rows() == [{"image": "stack", "checked": True, "scribbles": "stack scribbles"}]
    layer = viewer.layers["stack scribbles"]
    for k in (0, 2):  # strokes on two of the three slices
        strokes = np.zeros(stack.shape, dtype=np.uint8)
        strokes[k] = sample_scribbles(pairs[k][1], seed=k)
        _paint(layer, strokes, every=3)
    assert widget.train()
    _wait(qtbot, widget)
    assert widget.events[-1]["event"] == "done", widget.message
    pseudo = viewer.layers["stack pseudo-label"].data
    assert pseudo.shape == stack.shape
    assert np.all(pseudo[1] == PSEUDO_UNSURE)  # the unscribbled slice is not trained on, so never ensembled
    assert np.any(pseudo[0] == PSEUDO_NUCLEUS)
    assert widget.segment()
    _wait(qtbot, widget)
    nuclei = viewer.layers["stack nuclei"].data
    assert nuclei.shape == stack.shape and all(nuclei[k].max() >= 1 for k in range(3)), widget.message


@pytest.mark.parametrize(
    "case, expected",
    [
        ("other shape", "scribble layer 'wrong' has shape (100, 120) but image 'synthetic nuclei' is (256, 256)"),
        ("no scribbles", "no scribbles yet: paint some nuclei with label 1 and some background with label 2"),
        ("one class", "only nucleus strokes (label 1) found: paint some background with label 2 too"),
        ("no layer", "image 'synthetic nuclei' has no scribble layer"),
    ],
)
def test_bad_input_is_a_message_and_writes_nothing(viewer, qtbot, tmp_path, case, expected):
    _open_sample(viewer)
    widget = _widget(viewer, tmp_path / "p")
    strokes, _ = _sample_strokes(viewer)
    if case == "other shape":
        viewer.add_labels(np.where(strokes[:100, :120] > 0, strokes[:100, :120], 0), name="wrong")
        widget.set_scribble_layer(SAMPLE_NAME, "wrong")
    elif case == "one class":
        _paint(viewer.layers[SCRIBBLES], strokes, values=(NUCLEUS,))
    elif case == "no layer":
        widget.set_scribble_layer(SAMPLE_NAME, None)
    for button in (widget.train_button, widget.continue_button):
        qtbot.mouseClick(button, Qt.LeftButton)
        assert not widget.busy and widget.worker is None
        assert widget.message.startswith("Cannot train:") and expected in widget.message, widget.message
        assert "Traceback" not in widget.message
    assert not (tmp_path / "p").exists()  # nothing written


def test_continue_and_segment_without_a_model_say_so(viewer, qtbot, tmp_path):
    _open_sample(viewer)
    widget = _widget(viewer, tmp_path / "p")
    _paint(viewer.layers[SCRIBBLES], _sample_strokes(viewer)[0], every=4)
    qtbot.mouseClick(widget.continue_button, Qt.LeftButton)
    assert "nothing to continue" in widget.message and not widget.busy
    qtbot.mouseClick(widget.segment_button, Qt.LeftButton)
    assert "no model in" in widget.message and not widget.busy
    assert not (tmp_path / "p").exists()
    assert not widget.load_model(tmp_path / "missing.pt") and "cannot load the model" in widget.message


def test_zoo_weights_are_the_default_and_colour_images_train_from_scratch(viewer, qtbot, tmp_path):
    from s2l_monai.data.synthetic import synthetic_nuclei

    image, labels = synthetic_nuclei((64, 64), seed=1)
    viewer.add_image(np.stack([image] * 3, axis=-1), name="rgb", rgb=True)
    viewer.add_labels(sample_scribbles(labels), name="rgb scribbles")
    widget = _widget(viewer, tmp_path / "p")
    assert widget.start_from.currentText() == "the zoo's pretrained weights"  # the bundle's default, first
    assert widget.train() and widget.busy
    assert "take 1-channel images, these are 3-channel: training from scratch" in widget.message
    assert widget.process.overrides["pretrained_weights"] == ""  # explicit: the bundle's "auto" is not left to guess
    assert widget.process.overrides["in_channels"] == 3
    qtbot.mouseClick(widget.stop_button, Qt.LeftButton)
    _wait(qtbot, widget, 300)
    assert widget.events[-1]["event"] in ("done", "error"), widget.events[-3:]


def test_new_scribble_layers_and_paint_buttons(viewer, qtbot, tmp_path):
    viewer.add_image(np.zeros((40, 50, 3), dtype=np.uint8), name="rgb", rgb=True)
    widget = _widget(viewer, tmp_path / "p")
    qtbot.mouseClick(widget.new_layers_button, Qt.LeftButton)
    layer = viewer.layers["rgb scribbles"]
    assert layer.data.shape == (40, 50) and widget._rows()[0]["scribbles"] == "rgb scribbles"
    widget.background_value.setValue(5)
    qtbot.mouseClick(widget.paint_background_button, Qt.LeftButton)
    assert layer.selected_label == 5 and layer.mode == "paint" and viewer.layers.selection.active is layer
