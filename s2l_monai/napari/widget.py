"""The Scribble2Label dock widget: choose images and scribble layers, Train / Stop / Continue, Segment.

The widget runs the bundle (``configs/train.json``, ``configs/inference.json``) in a child process
(:mod:`s2l_monai.napari.runner`, started by :class:`s2l_monai.napari.process.BundleProcess`) and follows it from a
napari worker thread (``napari.qt.threading``): the worker writes the datalist, reads the run's events (steps,
loss terms, Ωg, ensembles), and after each ensemble reads the active image's pseudo-label from the run's EMA store
and its uncertainty map; the GUI thread only updates widgets and layers. Why a process: see the runner's notes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from s2l_monai.napari.process import BundleProcess, configs_dir, zoo_weights
from s2l_monai.napari.project import (
    PSEUDO_NUCLEUS,
    PSEUDO_UNSURE,
    LayerImage,
    Project,
    TrainingSet,
    check_training_set,
    image_kind,
    model_in_channels,
    read_result,
)

if TYPE_CHECKING:
    import napari

__all__ = ["ScribbleWidget"]

_NONE = "—"
_FROM_SCRATCH, _FROM_ZOO = "scratch", "the zoo's pretrained weights"
DEFAULT_PROJECT = Path.home() / "s2l-napari"
#: patches per optimiser step in the default recipe (``batch_size`` of configs/train.json)
_BATCH = 12


def _train_defaults() -> dict[str, Any]:
    """``max_steps``, ``tau`` and ``num_samples`` of ``configs/train.json``."""
    try:
        config = json.loads((configs_dir() / "train.json").read_text())
    except (OSError, ValueError):
        config = {}
    return {"max_steps": int(config.get("max_steps", 2400)), "tau": float(config.get("tau", 0.8)),
            "num_samples": int(config.get("num_samples", 4)), "batch_size": int(config.get("batch_size", _BATCH))}


def _direct_colormap(colors: dict[int, str]) -> Any:
    """A napari label colormap with fixed colours (transparent elsewhere)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", **colors})


def _on_destroyed(layer_events: Any, refresh: Any, stop: Any) -> Any:
    """The widget's clean-up once Qt deleted it; holds no reference to the Qt object itself."""

    def clean_up(*_: Any) -> None:
        for emitter in (layer_events.inserted, layer_events.removed):
            try:
                emitter.disconnect(refresh)
            except (TypeError, ValueError, RuntimeError):
                pass
        stop()

    return clean_up


class ScribbleWidget(QWidget):
    """Scribble2Label in napari: the whole loop from strokes to segmented nuclei.

    Args:
        napari_viewer: the viewer (napari passes it).

    Attributes:
        extra_overrides: further config overrides for the training (e.g. a smaller ``roi_size``); empty by default,
            so a run is the bundle's default recipe with the budget set in the widget.
        events: every event of the last run, in order (the runner's, plus ``pseudo_label`` updates).
        pseudo_updates: the pseudo-label arrays shown so far in this training, one per ensemble.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.defaults = _train_defaults()
        self.extra_overrides: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.pseudo_updates: list[np.ndarray] = []
        self.worker: Any = None
        self.process: BundleProcess | None = None
        self._mode = ""
        self._active = ""
        self._last_ensemble = ""
        self._build()
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self.refresh_layers)
        self.destroyed.connect(_on_destroyed(self.viewer.layers.events, self.refresh_layers, self._stop_run))
        self.refresh_layers()
        self._set_busy("")

    def _stop_run(self) -> None:
        """Stop a training still running when the widget goes away (it saves its model as at Stop)."""
        if self.process is not None:
            self.process.stop()

    # ---------------------------------------------------------------------------------------------------------------
    # layout
    # ---------------------------------------------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)

        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["image (ticked: train / segment)", "scribble layer"])
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(90)
        self.table.setMaximumHeight(160)
        self.table.currentCellChanged.connect(lambda *_: self._active_changed())
        layout.addWidget(self.table)

        row = QHBoxLayout()
        self.new_layers_button = QPushButton("New scribble layers")
        self.new_layers_button.setToolTip("add an empty Labels layer for every ticked image that has none")
        self.new_layers_button.clicked.connect(self.add_scribble_layers)
        row.addWidget(self.new_layers_button)
        self.paint_nucleus_button = QPushButton("Paint nucleus")
        self.paint_nucleus_button.clicked.connect(lambda: self._paint(self.nucleus_value.value()))
        row.addWidget(self.paint_nucleus_button)
        self.paint_background_button = QPushButton("Paint background")
        self.paint_background_button.clicked.connect(lambda: self._paint(self.background_value.value()))
        row.addWidget(self.paint_background_button)
        layout.addLayout(row)

        form = QFormLayout()
        values = QHBoxLayout()
        self.nucleus_value = QSpinBox()
        self.nucleus_value.setRange(1, 65535)
        self.nucleus_value.setValue(1)
        self.background_value = QSpinBox()
        self.background_value.setRange(1, 65535)
        self.background_value.setValue(2)
        values.addWidget(QLabel("nucleus"))
        values.addWidget(self.nucleus_value)
        values.addWidget(QLabel("background"))
        values.addWidget(self.background_value)
        values.addWidget(QLabel("(0 = not scribbled)"))
        form.addRow("label values", values)

        project = QHBoxLayout()
        self.project_edit = QLineEdit(str(DEFAULT_PROJECT))
        self.project_edit.setToolTip("folder for the datalist, the run (pseudo-labels) and the model")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._choose_project)
        project.addWidget(self.project_edit)
        project.addWidget(browse)
        form.addRow("project folder", project)

        self.steps = QSpinBox()
        self.steps.setRange(10, 1_000_000)
        self.steps.setSingleStep(100)
        self.steps.setValue(self.defaults["max_steps"])
        self.steps.setToolTip("optimiser steps of a training (max_steps); warm-up and ensembles are shares of it")
        form.addRow("training steps", self.steps)

        start = QHBoxLayout()
        self.start_from = QComboBox()
        if zoo_weights() is not None:
            # first, so the default: the bundle's own default (pretrained_weights auto), measured better than from
            # scratch on data the weights never saw (docs/configuration.md, "Starting from the shipped weights")
            self.start_from.addItem(_FROM_ZOO)
        self.start_from.addItem(_FROM_SCRATCH)
        self.start_from.setToolTip("what Train starts from (Continue always starts from the project's model)")
        start.addWidget(self.start_from)
        self.load_button = QPushButton("Load model…")
        self.load_button.clicked.connect(self._load_model_dialog)
        self.save_button = QPushButton("Save model…")
        self.save_button.clicked.connect(self._save_model_dialog)
        start.addWidget(self.load_button)
        start.addWidget(self.save_button)
        form.addRow("Train starts from", start)
        layout.addLayout(form)

        buttons = QGridLayout()
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("write the ticked images and scribbles and train the bundle on them")
        self.train_button.clicked.connect(lambda: self.train(resume=False))
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip("fine-tune the project's model after more strokes (pseudo-labels of "
                                         "unchanged images are kept)")
        self.continue_button.clicked.connect(lambda: self.train(resume=True))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("end the training after the current step; the model reached is saved")
        self.stop_button.clicked.connect(self.stop)
        self.segment_button = QPushButton("Segment")
        self.segment_button.setToolTip("segment the ticked images with the project's model")
        self.segment_button.clicked.connect(self.segment)
        buttons.addWidget(self.train_button, 0, 0)
        buttons.addWidget(self.continue_button, 0, 1)
        buttons.addWidget(self.stop_button, 0, 2)
        buttons.addWidget(self.segment_button, 1, 0, 1, 3)
        layout.addLayout(buttons)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.metrics_label = QLabel("")
        self.metrics_label.setWordWrap(True)
        layout.addWidget(self.metrics_label)
        self.status = QLabel("Tick images, choose their scribble layers, paint, then Train.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # ---------------------------------------------------------------------------------------------------------------
    # layers
    # ---------------------------------------------------------------------------------------------------------------
    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _labels_layers(self) -> list[Any]:
        from napari.layers import Labels

        ours = (" pseudo-label", " mask", " nuclei")
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels) and not layer.name.endswith(ours)]

    def refresh_layers(self, *_: Any) -> None:
        """Rebuild the table from the viewer's layers, keeping ticks and chosen scribble layers."""
        previous = {row["image"]: row for row in self._rows()}
        labels = [layer.name for layer in self._labels_layers()]
        images = [layer for layer in self._image_layers() if not layer.name.endswith(" uncertainty")]
        self.table.blockSignals(True)
        self.table.setRowCount(len(images))
        for index, layer in enumerate(images):
            item = QTableWidgetItem(layer.name)
            item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
            old = previous.get(layer.name)
            item.setCheckState(Qt.Checked if old is None or old["checked"] else Qt.Unchecked)
            self.table.setItem(index, 0, item)
            combo = self.table.cellWidget(index, 1)
            if combo is None:  # one combo per row, reused: replaced cell widgets linger until the event loop runs
                combo = QComboBox()
                self.table.setCellWidget(index, 1, combo)
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([_NONE, *labels])
            chosen = old["scribbles"] if old is not None and old["scribbles"] in labels else self._guess(layer, labels)
            combo.setCurrentText(chosen or _NONE)
            combo.blockSignals(False)
        self.table.blockSignals(False)
        if self._active not in [layer.name for layer in images]:
            self._active = images[0].name if images else ""

    def _guess(self, image: Any, labels: list[str]) -> str | None:
        """The scribble layer of an image: ``<image> scribbles``, else the only Labels layer of its shape."""
        if f"{image.name} scribbles" in labels:
            return f"{image.name} scribbles"
        shape = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
        fitting = [name for name in labels if tuple(self.viewer.layers[name].data.shape) == shape]
        return fitting[0] if len(fitting) == 1 else None

    def _rows(self) -> list[dict[str, Any]]:
        rows = []
        for index in range(self.table.rowCount()):
            item, combo = self.table.item(index, 0), self.table.cellWidget(index, 1)
            if item is None:
                continue
            scribbles = combo.currentText() if combo is not None else _NONE
            rows.append({"image": item.text(), "checked": item.checkState() == Qt.Checked,
                         "scribbles": None if scribbles == _NONE else scribbles})
        return rows

    def set_scribble_layer(self, image: str, scribbles: str | None) -> None:
        """Choose the scribble layer of an image (as the table's drop-down does)."""
        for index, row in enumerate(self._rows()):
            if row["image"] == image:
                self.table.cellWidget(index, 1).setCurrentText(scribbles or _NONE)
                return
        raise KeyError(f"no image layer {image!r} in the table")

    def set_checked(self, image: str, checked: bool) -> None:
        """Tick or untick an image (as the table's check box does)."""
        for index, row in enumerate(self._rows()):
            if row["image"] == image:
                self.table.item(index, 0).setCheckState(Qt.Checked if checked else Qt.Unchecked)
                return
        raise KeyError(f"no image layer {image!r} in the table")

    def _active_changed(self) -> None:
        row = self.table.currentRow()
        item = self.table.item(row, 0) if row >= 0 else None
        if item is not None:
            self._active = item.text()

    def _chosen(self) -> list[LayerImage]:
        """The ticked images with copies of their data and scribbles (taken in the GUI thread)."""
        chosen = []
        for row in self._rows():
            if not row["checked"] or row["image"] not in self.viewer.layers:
                continue
            layer = self.viewer.layers[row["image"]]
            scribbles = None
            if row["scribbles"] is not None and row["scribbles"] in self.viewer.layers:
                scribbles = np.array(self.viewer.layers[row["scribbles"]].data)
            chosen.append(LayerImage(name=layer.name, data=np.array(layer.data), rgb=bool(layer.rgb),
                                     scribbles=scribbles, scribble_name=row["scribbles"] or ""))
        return chosen

    def add_scribble_layers(self) -> None:
        """Add an empty ``<image> scribbles`` Labels layer for every ticked image without a scribble layer."""
        added = []
        for row in self._rows():
            if row["checked"] and row["scribbles"] is None and row["image"] in self.viewer.layers:
                layer = self.viewer.layers[row["image"]]
                shape = layer.data.shape[:-1] if layer.rgb else layer.data.shape
                name = f"{layer.name} scribbles"
                if name not in self.viewer.layers:
                    self.viewer.add_labels(np.zeros(shape, dtype=np.uint8), name=name, opacity=0.9)
                self.set_scribble_layer(layer.name, name)
                added.append(name)
        self._say(f"added {', '.join(added)}: paint nuclei with label {self.nucleus_value.value()} and background "
                  f"with label {self.background_value.value()}" if added else "every ticked image has a scribble layer")

    def _paint(self, value: int) -> None:
        """Select the active image's scribble layer in paint mode with ``value``."""
        rows = {row["image"]: row for row in self._rows()}
        row = rows.get(self._active) or next((r for r in rows.values() if r["scribbles"]), None)
        if row is None or row["scribbles"] is None:
            self._say("choose a scribble layer first (or press 'New scribble layers')", error=True)
            return
        layer = self.viewer.layers[row["scribbles"]]
        self.viewer.layers.selection.active = layer
        layer.selected_label = value
        layer.mode = "paint"

    # ---------------------------------------------------------------------------------------------------------------
    # messages and state
    # ---------------------------------------------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6b6b;" if error else "")

    @property
    def message(self) -> str:
        """The text of the status line (errors and results)."""
        return self.status.text()

    @property
    def busy(self) -> bool:
        """Whether a training or a segmentation is running."""
        return bool(self._mode)

    def _set_busy(self, mode: str) -> None:
        self._mode = mode
        for button in (self.train_button, self.continue_button, self.segment_button, self.load_button,
                       self.new_layers_button):
            button.setEnabled(not mode)
        self.stop_button.setEnabled(mode == "train")

    def _project(self) -> Project | None:
        text = self.project_edit.text().strip()
        if not text:
            self._say("choose a project folder", error=True)
            return None
        return Project(text)

    def _choose_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project folder", self.project_edit.text())
        if folder:
            self.project_edit.setText(folder)

    def _load_model_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load a model.pt (or a bundle's models/model.pt)", "",
                                              "PyTorch weights (*.pt)")
        if path:
            self.load_model(path)

    def _save_model_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the model as a bundle into", "")
        if folder:
            self.save_model(folder)

    def load_model(self, source: str | Path) -> bool:
        """Make a ``model.pt`` (or a bundle folder) the project's model: Segment and Continue then use it."""
        project = self._project()
        if project is None:
            return False
        try:
            path = project.load_model(source)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._say(f"cannot load the model: {exc}", error=True)
            return False
        self._say(f"model loaded into {path}: Segment, or Continue training from it")
        return True

    def save_model(self, target: str | Path) -> bool:
        """Save the project's model as a bundle folder (``models/model.pt`` and the bundle's ``configs/``)."""
        project = self._project()
        if project is None:
            return False
        try:
            path = project.save_bundle(target, configs_dir())
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._say(f"cannot save the model: {exc}", error=True)
            return False
        self._say(f"model saved: {path}")
        return True

    # ---------------------------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> bool:
        """Press Train (``resume=False``) or Continue (``resume=True``); returns whether a run started.

        Everything is checked first; a problem is shown in the status line and nothing is written.
        """
        if self.busy:
            self._say("a run is in progress: wait, or press Stop", error=True)
            return False
        project = self._project()
        if project is None:
            return False
        nucleus, background = self.nucleus_value.value(), self.background_value.value()
        found = check_training_set(self._chosen(), nucleus, background)
        if found.problems:
            self._say("Cannot train:\n- " + "\n- ".join(found.problems), error=True)
            return False
        overrides: dict[str, Any] = {"pretrained_weights": ""}
        start_note = ""
        if resume:
            if not project.model_path.is_file():
                self._say(f"nothing to continue: no model in {project.models_dir} yet; press Train first", error=True)
                return False
            channels = model_in_channels(project.model_path)
            if channels != found.in_channels:
                self._say(f"the model to continue takes {channels}-channel images, these are {found.in_channels}-"
                          "channel: press Train to train from scratch", error=True)
                return False
            overrides["pretrained_weights"] = str(project.model_path)
            overrides["reuse_ema_store"] = True
        elif self.start_from.currentText() == _FROM_ZOO:
            zoo = zoo_weights()
            channels = model_in_channels(zoo)
            if channels == found.in_channels:
                # the bundle's own rule decides and logs (s2l_monai.pretrained): also from scratch where the strokes
                # say the foreground fills most of the image (EM cell interiors), which the zoo's nuclei do not
                overrides["pretrained_weights"] = "auto"
            else:
                start_note = (f" The zoo's weights take {channels}-channel images, these are {found.in_channels}-"
                              "channel: training from scratch.")
        n_items = len(found.images)
        per_step = max(1, self.defaults["batch_size"] // self.defaults["num_samples"])
        overrides = {
            "dataset_dir": str(project.dataset_dir),
            "output_dir": str(project.run_dir),
            "ckpt_dir": str(project.models_dir),
            "bundle_root": str(project.root),
            "max_steps": int(self.steps.value()),
            "in_channels": found.in_channels,
            "slice_axis": 0 if found.volumes else None,
            "test_evaluation": False,
            # the recipe's batch of 12 patches also when fewer than 3 images are scribbled (4 patches per image)
            "num_samples": max(self.defaults["num_samples"], self.defaults["batch_size"] // min(n_items, per_step)),
            **overrides,
            **self.extra_overrides,
        }
        self.events = []
        self.pseudo_updates = []
        self._last_ensemble = ""
        if self._active not in [i.name for i in found.images]:
            self._active = found.images[0].name
        notes = (" " + " ".join(found.notes)) if found.notes else ""
        self._say(("Continuing" if resume else "Training") + f" on {n_items} image(s)…{notes}{start_note}")
        self.progress.setRange(0, int(overrides["max_steps"]))
        self.progress.setValue(0)
        self.metrics_label.setText("starting the bundle…")
        self.process = BundleProcess("training", configs_dir() / "train.json", overrides, project.log_path,
                                     project.root)
        self._start(self._train_steps(project, found, (nucleus, background), resume, self._active), "train")
        return True

    def _train_steps(
        self, project: Project, found: TrainingSet, values: tuple[int, int], resume: bool, active: str
    ) -> Iterator[dict]:
        """Worker thread: write the dataset, run the training, read the pseudo-labels after each ensemble."""
        nucleus, background = values
        try:
            project.write_training_set(found, nucleus, background)
            if resume:
                kept = project.refresh_ema_store(found)
                yield {"event": "ema_store", **kept}
            else:
                project.record_sources(found)
            assert self.process is not None
            for event in self.process.events():
                yield event
                if event["event"] == "ensemble":
                    label = project.pseudo_label(active, self.defaults["tau"])
                    if label is not None:
                        yield {"event": "pseudo_label", "layer": active, "data": label,
                               "uncertainty": project.uncertainty(active), "number": event.get("number")}
        except Exception as exc:  # noqa: BLE001 - shown to the user, never a traceback dialog
            yield {"event": "error", "message": f"{type(exc).__name__}: {exc}"}

    def stop(self) -> None:
        """Press Stop: the training ends after its current step and saves the model reached."""
        if self.process is not None and self._mode == "train":
            self.process.stop()
            self._say("Stopping after the current step; the model reached is saved…")

    # ---------------------------------------------------------------------------------------------------------------
    # segmentation
    # ---------------------------------------------------------------------------------------------------------------
    def segment(self) -> bool:
        """Press Segment: the project's model on every ticked image; adds ``<image> mask`` and ``<image> nuclei``."""
        if self.busy:
            self._say("a run is in progress: wait, or press Stop", error=True)
            return False
        project = self._project()
        if project is None:
            return False
        if not project.model_path.is_file():
            self._say(f"no model in {project.models_dir} yet: Train, or Load a model", error=True)
            return False
        images = self._chosen()
        if not images:
            self._say("no image chosen: tick the images to segment", error=True)
            return False
        channels = model_in_channels(project.model_path)
        problems = [f"image '{i.name}' has shape {i.data.shape}: expected a 2D image or a 3D stack" for i in images
                    if image_kind(i) is None]
        problems += [f"image '{i.name}' is {'colour' if i.rgb else 'grey'} but the model takes {channels}-channel "
                     "images" for i in images if image_kind(i) is not None and (3 if i.rgb else 1) != channels]
        if problems:
            self._say("Cannot segment:\n- " + "\n- ".join(problems), error=True)
            return False
        self.events = []
        self._say(f"Segmenting {len(images)} image(s)…")
        self.progress.setRange(0, 0)  # busy
        self._start(self._segment_steps(project, images, channels), "segment")
        return True

    def _segment_steps(self, project: Project, images: list[LayerImage], channels: int) -> Iterator[dict]:
        """Worker thread: write the images, run the inference bundle once per kind (2D, stacks), read the masks."""
        try:
            planned = project.write_segment_inputs(images)
            for folder in sorted({folder for folder, _ in planned.values()}):
                stack = folder.name.endswith("3d")
                out_dir = project.segment_dir / ("output_3d" if stack else "output_2d")
                overrides = {"input_dir": str(folder), "output_dir": str(out_dir),
                             "ckpt_path": str(project.model_path), "in_channels": channels,
                             "slice_axis": 0 if stack else None, "bundle_root": str(project.root)}
                self.process = BundleProcess("inference", configs_dir() / "inference.json", overrides,
                                             project.segment_dir / f"{folder.name}.log", project.root)
                for event in self.process.events():
                    if event["event"] == "error":
                        yield event
                        return
            for name, (_, results) in planned.items():
                yield {"event": "segmented", "layer": name, "mask": read_result(results["semantic"]),
                       "nuclei": read_result(results["instances"])}
            yield {"event": "done"}
        except Exception as exc:  # noqa: BLE001 - shown to the user
            yield {"event": "error", "message": f"{type(exc).__name__}: {exc}"}

    # ---------------------------------------------------------------------------------------------------------------
    # worker and events (GUI thread)
    # ---------------------------------------------------------------------------------------------------------------
    def _start(self, steps: Iterator[dict], mode: str) -> None:
        from napari.qt.threading import create_worker

        self._set_busy(mode)

        def work() -> Iterator[dict]:
            yield from steps

        self.worker = create_worker(work, _start_thread=False)
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        self.events.append({k: v for k, v in event.items() if not isinstance(v, np.ndarray)})
        if kind == "start":
            self.progress.setRange(0, max(1, int(event["total_steps"])))
        elif kind == "step":
            self.progress.setValue(int(event["step"]))
            self.metrics_label.setText(self._metrics_text(event))
        elif kind == "ensemble":
            coverage, foreground = event.get("coverage"), event.get("foreground")
            self._last_ensemble = (f"ensemble {event.get('number')} at step {event.get('step')}: "
                                   f"{100 * (coverage or 0):.1f}% of unscribbled pixels confident (pseudo-labels), "
                                   f"{100 * (foreground or 0):.1f}% as nuclei")
            weight = event.get("background_weight")
            if weight is not None and np.isfinite(weight) and weight > 1.0:
                # drift control leans L_up against pseudo-labels that grow past what the warm-up model said
                self._last_ensemble += f"; L_up background weight {weight:.2f} (drift control)"
        elif kind == "ema_store":
            kept = ", ".join(event.get("reused", [])) or "none"
            self._say(self.message + f" Pseudo-labels kept for unchanged images: {kept}.")
        elif kind == "pseudo_label":
            self._show_pseudo_label(event)
        elif kind == "segmented":
            self._show_segmentation(event)
        elif kind == "done":
            if self._mode == "train":
                stopped = "stopped" if event.get("stopped") else "finished"
                path = self._project().model_path if self._project() else "model.pt"
                self._say(f"Training {stopped} after {event.get('step')} steps; model: {path}.{_threshold_note(path)}"
                          " Segment, or add strokes and Continue.")
            else:
                self._say("Segmented: '<image> mask' (nucleus = 1) and '<image> nuclei' (one label per nucleus).")
        elif kind == "error":
            self._say(f"The run failed: {event.get('message')}", error=True)

    def _metrics_text(self, event: dict[str, Any]) -> str:
        def fmt(key: str) -> str:
            value = event.get(key)
            return "–" if value is None else f"{value:.3f}"

        omega = event.get("omega_g")
        text = (f"step {event['step']}/{event['total_steps']}: loss {fmt('loss')} (L_sp {fmt('loss_sp')}, "
                f"L_up {fmt('loss_up')}, L_crf {fmt('loss_crf')}); Ωg {100 * (omega or 0):.1f}% of unscribbled "
                "pixels")
        return text + (f"\n{self._last_ensemble}" if self._last_ensemble else "")

    def _show_pseudo_label(self, event: dict[str, Any]) -> None:
        name = f"{event['layer']} pseudo-label"
        data = event["data"]
        self.pseudo_updates.append(data)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            layer = self.viewer.add_labels(data, name=name, opacity=0.45)
            layer.colormap = _direct_colormap({PSEUDO_NUCLEUS: "yellow", PSEUDO_UNSURE: "red"})
        uncertainty = event.get("uncertainty")
        if uncertainty is not None and uncertainty.shape == data.shape:
            uname = f"{event['layer']} uncertainty"
            if uname in self.viewer.layers:
                self.viewer.layers[uname].data = uncertainty
            else:
                self.viewer.add_image(uncertainty, name=uname, colormap="magma", blending="additive",
                                      contrast_limits=(0.0, 1.0), opacity=0.6, visible=False)

    def _show_segmentation(self, event: dict[str, Any]) -> None:
        for suffix, key in ((" mask", "mask"), (" nuclei", "nuclei")):
            name = event["layer"] + suffix
            data = np.asarray(event[key])
            if name in self.viewer.layers:
                self.viewer.layers[name].data = data
            else:
                self.viewer.add_labels(data, name=name, opacity=0.5, visible=key == "nuclei")

    def _on_finished(self) -> None:
        mode = self._mode
        self._set_busy("")
        self.progress.setRange(0, max(1, self.progress.maximum()))
        if mode == "segment":
            self.progress.setValue(self.progress.maximum())
        self.worker = None


def _threshold_note(model_path: Any) -> str:
    """What the model's calibration record says (``s2l_monai.calibration``), for the message after training."""
    from s2l_monai.calibration import calibration_path

    try:
        record = json.loads(calibration_path(model_path).read_text())
    except (OSError, ValueError):
        return ""
    if record.get("not_calibrated"):
        return " Read at the argmax (foreground threshold 0.5): the nuclei fill most of the image."
    refined = ", refined against the image," if float(record.get("refine_weight") or 0) > 0 else ""
    return (f" Read at foreground threshold {float(record['foreground_threshold']):.2f}, where the mask outlines"
            f"{refined} lie on the image's edges.")
