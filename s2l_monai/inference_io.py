"""Inputs and outputs of inference: listing a folder of images, writing 2D label / probability images.

Everything here keeps numpy ``(row, col)`` orientation: the configs read images with
``PILReader(reverse_indexing=False)``, and :class:`SaveArrayd` writes the arrays back without transposing, so an
output file overlays its input pixel for pixel.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "BackgroundPostprocessing",
    "PostprocessingError",
    "SaveArrayd",
    "as_bool",
    "image_stem",
    "list_images",
    "source_name",
    "write_array",
]

#: File types read as input images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_OUTPUT_EXTENSIONS = (".png", ".tif", ".tiff")
_ZLIB_LEVEL = 1  # compression of written masks: fastest (see write_array)
# endings of image formats stored as a folder (one item in a listing)
_FOLDER_FORMATS = (".zarr",)
_STEM = re.compile(r"(\.ome\.tiff?|\.ome\.zarr|\.nii\.gz|\.[A-Za-z0-9]+)$", re.IGNORECASE)


def as_bool(value: Any) -> bool:
    """A config flag as a bool, whether it came from JSON (``true``) or the command line.

    ``python -m monai.bundle run ... --save_probabilities false`` hands the config the *string* ``"false"`` (fire
    only turns ``False`` into a bool), which plain ``not @flag`` would treat as true.

    Args:
        value: bool, number, or one of ``true/false, yes/no, on/off, 1/0`` in any case.

    Raises:
        ValueError: an unrecognised string.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0", ""):
            return False
        raise ValueError(f"expected a boolean flag, got {value!r}")
    return bool(value)


def image_stem(path: str | os.PathLike) -> str:
    """Base name of an image file without folder and extension (``a/b/x.ome.tif`` -> ``x``, ``x.nii.gz`` -> ``x``).

    An OME-Zarr volume is a folder: ``a/x.ome.zarr`` (or ``a/x.ome.zarr/``) -> ``x``, ``x.zarr`` -> ``x``.
    """
    return _STEM.sub("", Path(path).name)


def list_images(input_dir: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[dict[str, str]]:
    """Items ``{"image": path, "id": stem}`` for the images directly inside a folder, sorted by file name.

    A folder whose name ends with an accepted ending that names a folder format (``.zarr`` / ``.ome.zarr``: an
    OME-Zarr volume) is one item; other folders are skipped.

    Args:
        input_dir: folder of images (not searched recursively; hidden files are skipped).
        extensions: file name endings accepted (case-insensitive).

    Returns:
        One item per image, with an absolute path.

    Raises:
        DataError: the folder does not exist, holds no image, or two images share a base name (their outputs would
            overwrite each other).
    """
    from s2l_monai.errors import DataError

    root = Path(input_dir)
    if not root.is_dir():
        raise DataError([f"{root}: folder does not exist"], "input_dir")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        p
        for p in root.iterdir()
        if not p.name.startswith(".")
        and p.name.lower().endswith(exts)
        and (p.is_file() or (p.is_dir() and p.name.lower().endswith(_FOLDER_FORMATS)))
    )
    if not files:
        raise DataError([f"{root}: no images ({', '.join(exts)}) found"], "input_dir")
    seen: dict[str, str] = {}
    items = []
    for path in files:
        stem = image_stem(path)
        if stem in seen:
            raise DataError([f"{root}: {seen[stem]} and {path.name} share the base name {stem!r}"], "input_dir")
        seen[stem] = path.name
        items.append({"image": str(path.resolve()), "id": stem})
    return items


def source_name(data: Mapping[Hashable, Any], ref_key: str = "image") -> str:
    """Base name of the file an item was loaded from (``filename_or_obj`` in the metadata of ``ref_key``).

    Args:
        data: a (decollated) item holding ``ref_key`` as a ``MetaTensor`` or with a ``<ref_key>_meta_dict``.
        ref_key: key of the loaded image.

    Raises:
        KeyError: no file name can be found.
    """
    ref = data.get(ref_key)
    meta = ref.meta if isinstance(ref, MetaTensor) else data.get(f"{ref_key}_meta_dict", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):  # a batch of size 1 that was not decollated
        name = name[0] if len(name) == 1 else None
    if not name:
        raise KeyError(f"no 'filename_or_obj' in the metadata of {ref_key!r}")
    return image_stem(str(name))


def write_array(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a ``HW`` array as PNG (uint8 / uint16) or TIFF (any dtype), in numpy orientation.

    Args:
        path: output file; ``.png``, ``.tif`` or ``.tiff``.
        array: ``HW`` array; PNG needs uint8 or uint16 (16-bit grey PNG).

    Returns:
        The path written.

    Raises:
        ValueError: not 2D, an unsupported extension, or a dtype PNG cannot hold.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.ndim != 2:
        raise ValueError(f"expected a HW array for {path.name}, got shape {arr.shape}")
    ext = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".png":
        if arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"PNG holds uint8 or uint16, got {arr.dtype} for {path.name}")
        # zlib level 1 instead of PIL's 6: 1.4 instead of 5.1 ms per 256x256 mask pair (semantic + instances) on one
        # core, for files ~1.5x as large (6 instead of 4 KB); the writer is on the inference's critical path
        Image.fromarray(arr).save(path, format="PNG", compress_level=_ZLIB_LEVEL)
    elif ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, arr, compression="zlib", compressionargs={"level": _ZLIB_LEVEL})
    else:
        raise ValueError(f"unsupported output extension {ext!r}; expected one of {_OUTPUT_EXTENSIONS}")
    return path


class SaveArrayd(MapTransform):
    """Write channel-first ``1HW`` predictions to ``<output_dir>/<name><postfix><ext>``, untransposed.

    ``<name>`` is the base name of the file the item was loaded from (``ref_key``'s ``filename_or_obj``), so
    outputs sit beside each other under the input's name: ``x.png`` -> ``x_semantic.png``, ``x_instances.png``.

    Hand-written rather than MONAI's ``SaveImaged`` because its ``PILWriter`` swaps the first two axes when writing
    (``reverse_indexing=True`` is the writer's default and ``SaveImaged`` has no argument to change it), so a
    ``96x80`` mask read with ``PILReader(reverse_indexing=False)`` is written as an ``80x96`` file (checked with
    monai 1.6.1, for ``.png`` and ``.tif`` alike, both served by ``PILWriter``).

    Args:
        keys: keys of ``1HW`` (or ``HW``) arrays / tensors to write; the item is returned unchanged.
        output_dir: output folder (created).
        output_postfix: appended to the base name, one per key or one for all (e.g. ``"_semantic"``).
        output_ext: ``".png"`` or ``".tif"`` (``".tiff"``), one per key or one for all.
        output_dtype: numpy dtype written, one per key or one for all; values are checked to fit integer dtypes.
        scale: factor applied before the cast, one per key or one for all (e.g. 255 for a viewable 0/255 mask).
        ref_key: key whose metadata names the source file.
        allow_missing_keys: do not raise for absent keys.

    Raises:
        ValueError: an unsupported extension, or values that do not fit ``output_dtype``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str | Sequence[str] = "",
        output_ext: str | Sequence[str] = ".png",
        output_dtype: Any = np.uint8,
        scale: float | Sequence[float] = 1,
        ref_key: str = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.output_dir = Path(output_dir)
        self.postfixes = ensure_tuple_rep(output_postfix, n)
        self.exts = tuple(e if e.startswith(".") else f".{e}" for e in ensure_tuple_rep(output_ext, n))
        for ext in self.exts:
            if ext.lower() not in _OUTPUT_EXTENSIONS:
                raise ValueError(f"unsupported output extension {ext!r}; expected one of {_OUTPUT_EXTENSIONS}")
        dtypes = output_dtype if isinstance(output_dtype, (list, tuple)) else (output_dtype,) * n
        self.dtypes = tuple(np.dtype(d) for d in dtypes)
        self.scales = ensure_tuple_rep(scale, n)
        self.ref_key = ref_key

    def filename(self, data: Mapping[Hashable, Any], postfix: str, ext: str) -> Path:
        """Output path of one key of an item: ``<output_dir>/<name><postfix><ext>``."""
        # Not MONAI's FolderLayout: it strips anything after the last dot of the name as an extension, so an input
        # "img.v2.png" would be written as "img.png".
        return self.output_dir / f"{source_name(data, self.ref_key)}{postfix}{ext}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        per_key = (self.postfixes, self.exts, self.dtypes, self.scales)
        for key, postfix, ext, dtype, scale in self.key_iterator(d, *per_key):
            value = d[key]
            arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            arr = arr * scale if scale != 1 else arr
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise ValueError(f"{key!r} spans {arr.min()}..{arr.max()}, beyond {dtype} ({info.min}..{info.max})")
                arr = np.rint(arr) if np.issubdtype(arr.dtype, np.floating) else arr
            write_array(self.filename(d, postfix, ext), arr.astype(dtype, copy=False))
        return d


class PostprocessingError(RuntimeError):
    """Post-processing of one item failed in a worker; the message names the item and the worker's error.

    A plain, picklable exception: the worker's own exception may not survive pickling (an exception class whose
    constructor takes other arguments than its message cannot be rebuilt in the parent process).

    Args:
        name: the item's base name (its input file without extension).
        message: the worker's error, ``Type: message``, with the worker's traceback for errors that are not
            :class:`~s2l_monai.errors.S2LError` (those describe the input and are complete without one).
    """

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        self.message = message
        super().__init__(f"post-processing of {name!r} failed: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.message)


# The post-processing chain of a worker process, set once by the pool's initializer: the chain holds objects that
# do not pickle (the configs' ``$lambda`` transforms), so workers are forked with it rather than sent it per item.
_WORKER_TRANSFORM: Callable[[Any], Any] | None = None


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Exit this worker when its parent is gone (killed): a forked worker holds both ends of the pool's task queue,
    so it would otherwise wait for tasks forever (torch's DataLoader workers watch their parent the same way)."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _init_worker(transform: Callable[[Any], Any], parent: int) -> None:
    global _WORKER_TRANSFORM
    _WORKER_TRANSFORM = transform
    # one thread per worker: the parent's network already uses the cores, and the chain's torch steps are small
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="s2l-parent-watch", daemon=True).start()


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the innermost cause of ``exc`` (MONAI wraps a transform's error in a RuntimeError)."""
    from s2l_monai.errors import find_user_error

    user = find_user_error(exc)
    if user is not None:
        return f"{type(user).__name__}: {user}"
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = "".join(traceback.format_exception(exc)).rstrip()
    return f"{type(inner).__name__}: {inner}\n--- worker traceback ---\n{text}"


def _apply(transform: Callable[[Any], Any], name: str, data: Any) -> None:
    """Apply ``transform`` to one item; any error comes back as a :class:`PostprocessingError` naming it."""
    try:
        transform(data)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, named
        raise PostprocessingError(name, _describe(exc)) from None


def _run_in_worker(name: str, payload: bytes) -> None:
    """Apply the worker process's chain to one pickled item; what the chain returns is dropped (it writes files)."""
    if _WORKER_TRANSFORM is None:  # pragma: no cover - only if a worker was started without the initializer
        raise PostprocessingError(name, "worker has no post-processing chain")
    _apply(_WORKER_TRANSFORM, name, pickle.loads(payload))


def _cpu(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists, tuples) on the CPU, to be pickled for a worker."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class BackgroundPostprocessing:
    """Run the post-processing chain of inference (instances, writing files) in worker processes.

    MONAI's engines apply ``postprocessing`` to each item inside the iteration, so the network waits while the
    instances are computed and the files written. One worker process overlaps the two; ``configs/inference.json``
    uses one (``postprocessing_workers: 1``): on 2 idle CPU cores with watershed instances, 200 images of 256x256
    without test-time flips took 4.7 s against 6.6 s inline, 59 of 520x696 7.4 against 9.4 s, and with the default
    four flips 14.6 against 16.3 s and 34.9 against 38.9 s (``benchmarks/results/inference_throughput.md``, one run
    per figure; earlier runs of the same file, before the faster mask writing: 5.6 / 7.9, 8.4 / 11.0, 19.0 / 18.6,
    37.9 / 41.6 s and 6.1 / 8.9, 7.5 / 10.7, 16.6 / 18.3, 37.1 / 43.5 s). On
    cores other jobs already half filled it was within the noise with the flips and up to 30% slower without them
    (``benchmarks/results/archive/inference_throughput_contended.md``).

    With ``workers > 0`` each item is handed to a pool of forked worker processes instead, and the engine goes on
    with the next batch; ``attach`` makes the engine wait for every item at the end of the run
    (``Events.COMPLETED``), so all files exist when ``evaluator.run()`` returns. Processes rather than threads:
    the instance steps (SciPy, scikit-image) hold the GIL. MONAI has no asynchronous post-processing (its
    ``ThreadDataLoader`` and ``DataLoader`` workers overlap the *loading* only), hence this class.

    What the chain returns is dropped in the worker, so the engine's ``state.output`` keeps the network's output;
    use ``workers=0`` where handlers read the post-processed items (metrics) or where the chain keeps state across
    items (the slice-wise volume writer). With ``workers=0`` this is the chain itself, called inline.

    The outputs are those of the inline chain, byte for byte: the same code runs on the same tensors (moved to the
    CPU first: a forked process cannot use the parent's CUDA context). An error in a worker is raised in the
    parent as a :class:`PostprocessingError` naming the item, at the next item handed over or at the end of the
    run; the items not started yet are then cancelled.

    Args:
        transform: the post-processing chain applied to each decollated item (e.g. a ``Compose``).
        workers: worker processes; 0 runs ``transform`` inline and returns its result.
        max_pending: items handed over but not finished before the engine waits for the oldest (bounds memory;
            default ``2 * workers``).
        ref_key: key whose metadata names the item's input file, for error messages.
        start_method: ``multiprocessing`` start method; ``None`` forks on Linux, else threads (the chain is not
            pickled, so ``spawn`` is not offered; Python itself no longer forks by default on macOS, where system
            libraries are not fork-safe).

    Example::

        post = BackgroundPostprocessing(Compose([...]), workers=1)
        evaluator = SupervisedEvaluator(..., postprocessing=post)
        post.attach(evaluator)
    """

    def __init__(
        self,
        transform: Callable[[Any], Any],
        workers: int = 1,
        max_pending: int | None = None,
        ref_key: str = "image",
        start_method: str | None = None,
    ) -> None:
        if int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.transform = transform
        self.workers = int(workers)
        self.max_pending = max(1, int(max_pending) if max_pending is not None else 2 * self.workers)
        self.ref_key = ref_key
        if start_method is None:
            start_method = "fork" if sys.platform.startswith("linux") else "thread"
        if start_method not in ("fork", "thread"):
            raise ValueError(f"start_method must be 'fork' or 'thread', got {start_method!r}")
        self.start_method = start_method
        self._executor: Executor | None = None
        self._pending: deque[Future] = deque()
        self._count = 0

    def _pool(self) -> Executor:
        if self._executor is None:
            if self.start_method == "fork":
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("fork"),
                    initializer=_init_worker, initargs=(self.transform, os.getpid()),
                )
            else:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="s2l-post")
        return self._executor

    def _name(self, data: Mapping[Hashable, Any]) -> str:
        try:
            return source_name(data, self.ref_key)
        except KeyError:
            return f"item {self._count}"

    def __call__(self, data: Any) -> Any:
        """Hand ``data`` to a worker and return it unchanged (``workers=0``: return ``transform(data)``)."""
        if self.workers == 0:
            return self.transform(data)
        self._raise_finished()
        while len(self._pending) >= self.max_pending:
            self._result(self._pending.popleft())
        name = self._name(data) if isinstance(data, Mapping) else f"item {self._count}"
        self._count += 1
        pool = self._pool()
        if self.start_method == "thread":
            self._pending.append(pool.submit(_apply, self.transform, name, data))
        else:
            # pickled here (plain pickle, tensors as bytes) rather than by the pool: the pool's queue would move
            # tensors through shared memory, which small /dev/shm mounts (containers) run out of
            payload = pickle.dumps(_cpu(data), protocol=pickle.HIGHEST_PROTOCOL)
            self._pending.append(pool.submit(_run_in_worker, name, payload))
        return data

    def _result(self, future: Future) -> None:
        try:
            future.result()
        except BaseException:
            self.shutdown(cancel=True)
            raise

    def _raise_finished(self) -> None:
        """Raise the error of the oldest finished item that failed (finished items are dropped)."""
        while self._pending and self._pending[0].done():
            self._result(self._pending.popleft())
        for future in list(self._pending):
            if future.done() and future.exception() is not None:
                self._pending.remove(future)
                self._result(future)

    def wait(self, *_: Any) -> None:
        """Wait for every item handed over, then stop the workers; raise the first error (by hand-over order)."""
        try:
            while self._pending:
                self._result(self._pending.popleft())
        finally:
            self.shutdown()

    def shutdown(self, cancel: bool = False) -> None:
        """Stop the workers (``cancel``: drop the items not started yet); a later item starts a new pool."""
        if cancel:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def attach(self, engine: Any) -> None:
        """Make ``engine`` (an Ignite engine) wait for every item when its run completes (no-op with 0 workers)."""
        if self.workers == 0:
            return
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self.wait)
