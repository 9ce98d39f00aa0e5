"""Command line interface: ``s2l <command> ...`` (also ``python -m s2l_monai``).

Each command is one function ``_cmd_<group>_<name>(args) -> int`` registered by one ``_add_<group>`` function;
to add a command (e.g. ``synthetic`` or ``evaluate``), write both and call the ``_add_...`` function from
:func:`build_parser`. Commands import their heavy modules lazily so ``s2l --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _add_prepare(subparsers: Any) -> None:
    """Register ``s2l prepare {dsb2018,folder}``."""
    prepare = subparsers.add_parser("prepare", help="prepare a dataset: folders, splits, scribbles and datalists")
    kinds = prepare.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    dsb = kinds.add_parser(
        "dsb2018",
        help="BBBC038v1 / DSB2018 stage1_train.zip -> per-modality folders with automatic scribbles",
        description="Prepare BBBC038v1 (Kaggle DSB2018 stage 1 train) for Scribble2Label, read straight from the zip.",
    )
    dsb.add_argument("--zip", required=True, help="stage1_train.zip from https://bbbc.broadinstitute.org/BBBC038")
    dsb.add_argument("--out", required=True, help="output folder")
    dsb.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0], help="scribble ratios")
    dsb.add_argument("--seed", type=int, default=0, help="seed of the split and the scribbles (default 0)")
    dsb.add_argument("--limit", type=int, default=None, help="only the first N ids of each modality")
    dsb.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    dsb.add_argument(
        "--modalities",
        nargs="+",
        default=["fluorescence", "histopathology", "brightfield"],
        choices=["fluorescence", "histopathology", "brightfield"],
        help="modalities to write (default all)",
    )
    dsb.set_defaults(func=_cmd_prepare_dsb2018)

    folder = kinds.add_parser(
        "folder",
        help="your own images + scribbles -> checked datalist.json with a seeded split",
        description="Check a folder of images and scribbles (paired by base name) and write datalist.json.",
    )
    folder.add_argument("--images", required=True, help="folder of images (.png .tif .tiff .jpg)")
    folder.add_argument("--scribbles", required=True, help="folder of scribbles (a.png or a_scribble.png for a.png)")
    folder.add_argument("--labels", default=None, help="optional folder of full masks, for evaluation")
    folder.add_argument("--out", default=None, help="where datalist.json goes (default: common parent of the data)")
    folder.add_argument("--val-fraction", type=float, default=0.0,
                        help="validation share (default 0: training uses only the training list)")
    folder.add_argument("--test-fraction", type=float, default=0.0, help="test share (default 0)")
    folder.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    folder.add_argument("--background", type=int, default=0, help="scribble value of background (default 0)")
    folder.add_argument("--foreground", type=int, default=1, help="scribble value of foreground (default 1)")
    folder.add_argument("--unlabelled", type=int, default=255, help="scribble value of unlabelled (default 255)")
    folder.set_defaults(func=_cmd_prepare_folder)


def _cmd_prepare_dsb2018(args: argparse.Namespace) -> int:
    """Run :func:`s2l_monai.data.dsb2018.prepare_dsb2018` and print the counts."""
    from s2l_monai.data.dsb2018 import prepare_dsb2018

    summary = prepare_dsb2018(
        args.zip,
        args.out,
        ratios=tuple(args.ratios),
        seed=args.seed,
        modalities=tuple(args.modalities),
        limit=args.limit,
        workers=args.workers,
    )
    print(f"Prepared {summary['out_dir']} (seed {summary['seed']}; {summary['processed']} image(s) written, "
          f"{summary['skipped']} already done)")
    for modality, info in summary["modalities"].items():
        s = info["splits"]
        print(f"  {modality:15s} {info['n_images']:4d} images (training {s['training']}, validation "
              f"{s['validation']}, test {s['test']}), {info['n_nuclei']} nuclei -> {info['dir']}")
    return 0


def _cmd_prepare_folder(args: argparse.Namespace) -> int:
    """Run :func:`s2l_monai.data.folder.prepare_folder` and print where the datalist went."""
    import json

    from s2l_monai.data.folder import prepare_folder

    path = prepare_folder(
        args.images,
        args.scribbles,
        out_dir=args.out,
        labels_dir=args.labels,
        values={"background": args.background, "foreground": args.foreground, "unlabelled": args.unlabelled},
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    content = json.loads(path.read_text())
    counts = ", ".join(f"{k} {len(content[k])}" for k in ("training", "validation", "test"))
    print(f"Wrote {path} ({counts})")
    return 0


def _add_evaluate(subparsers: Any) -> None:
    """Register ``s2l evaluate``."""
    evaluate = subparsers.add_parser(
        "evaluate",
        help="score instance label images already on disk against full masks (IoU, mDice, DSB, F1, PQ, AJI)",
        description=(
            "Compare predicted instance label images <name>_instances.* (e.g. from configs/inference.json or "
            "another tool) with ground-truth label images <name>.* (instance maps, or binary masks split into "
            "connected components) and write metrics.csv, summary.json and summary.md."
        ),
    )
    evaluate.add_argument("--pred", required=True, help="folder of predictions <name><pred-suffix>.png|tif")
    evaluate.add_argument("--gt", required=True, help="folder of ground-truth label images <name>.png|tif")
    evaluate.add_argument("--out", default=None, help="folder for the reports (default: the --pred folder)")
    evaluate.add_argument(
        "--pred-suffix", default="_instances", help="suffix of the prediction base names (default _instances)"
    )
    evaluate.add_argument(
        "--require-all", action="store_true", help="fail if a ground-truth image has no prediction (default: warn)"
    )
    evaluate.set_defaults(func=_cmd_evaluate)


def _print_summary(paths: dict[str, Any]) -> None:
    """Print the written report paths and the Markdown summary."""
    print(paths["md"].read_text().rstrip())
    print(f"Wrote {paths['csv']}, {paths['json']} and {paths['md']}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Run :func:`s2l_monai.evaluation.evaluate_folders` and write the reports."""
    from s2l_monai.evaluation import evaluate_folders
    from s2l_monai.metrics import write_reports

    records = evaluate_folders(args.pred, args.gt, pred_suffix=args.pred_suffix, require_all=args.require_all)
    _print_summary(write_reports(records, args.out if args.out is not None else args.pred))
    return 0


def _add_otsu(subparsers: Any) -> None:
    """Register ``s2l otsu``."""
    otsu = subparsers.add_parser(
        "otsu",
        help="no-learning baseline: Otsu threshold + the same instance post-processing and metrics",
        description=(
            "Segment the labelled images of a datalist split by Otsu's threshold on the preprocessed grey image "
            "(nuclei = the side with less area), post-process to instances like the network and write "
            "metrics.csv, summary.json and summary.md."
        ),
    )
    otsu.add_argument("--datalist", required=True, help="datalist.json, or the dataset folder holding it")
    otsu.add_argument("--split", default="test", help="datalist section to evaluate (default test)")
    otsu.add_argument("--out", default="runs/otsu", help="folder for the reports (default runs/otsu)")
    otsu.add_argument(
        "--instance-method", default="watershed", choices=["watershed", "connected"], help="default watershed"
    )
    otsu.add_argument("--min-size", type=int, default=64, help="remove objects under this many pixels (default 64)")
    otsu.add_argument(
        "--save-predictions", action="store_true", help="also write <name>_semantic.png / _instances.png to OUT"
    )
    otsu.set_defaults(func=_cmd_otsu)


def _cmd_otsu(args: argparse.Namespace) -> int:
    """Run :func:`s2l_monai.evaluation.otsu_baseline` on a datalist split and write the reports."""
    from s2l_monai.evaluation import labelled_items, otsu_baseline
    from s2l_monai.metrics import write_reports

    items = labelled_items(args.datalist, args.split)
    records = otsu_baseline(
        items,
        instance_method=args.instance_method,
        min_size=args.min_size,
        prediction_dir=args.out if args.save_predictions else None,
    )
    _print_summary(write_reports(records, args.out))
    return 0


def _add_balance(subparsers: Any) -> None:
    """Register ``s2l balance``."""
    balance = subparsers.add_parser(
        "balance",
        help="class balance of the scribbles and the class_weights that correct it",
        description=(
            "Count scribbled pixels per class over a datalist section and compare their foreground share with "
            "the images' (from full masks where every item has one, or --foreground-fraction, your estimate). "
            "Prints the class_weights override for configs/train.json that gives the scribbled pixels the images' "
            "class frequencies (importance weights; see docs/configuration.md, 'Class prior')."
        ),
    )
    balance.add_argument("--datalist", required=True, help="datalist.json, or the dataset folder holding it")
    balance.add_argument("--split", default="training", help="datalist section to count (default training)")
    balance.add_argument(
        "--foreground-fraction", type=float, default=None,
        help="share of image pixels that are foreground, e.g. 0.15; overrides the full masks' share",
    )
    balance.set_defaults(func=_cmd_balance)


def _cmd_balance(args: argparse.Namespace) -> int:
    """Print :func:`s2l_monai.data.balance.scribble_class_balance` and the suggested weights."""
    from s2l_monai.data.balance import scribble_class_balance, suggested_class_weights

    counts = scribble_class_balance(args.datalist, split=args.split)
    s = counts.scribble_foreground_share
    print(f"{counts.items} items, {counts.pixels} pixels; scribbled: {counts.scribbled_foreground} foreground, "
          f"{counts.scribbled_background} background ({100 * counts.scribbled_share:.2f}% of the pixels)")
    print(f"foreground share of the scribbled pixels: {s:.3f}")
    f, source = args.foreground_fraction, "--foreground-fraction"
    if f is None:
        f, source = counts.label_foreground_share, "full masks"
    if f is None:
        print("no full mask for every item: pass --foreground-fraction (your estimate) for suggested class_weights")
        return 0
    print(f"foreground share of the images ({source}): {f:.3f}")
    weights = suggested_class_weights(s, f)
    print(f"suggested: --class_weights \"{weights}\"")
    return 0


def _add_calibrate(subparsers: Any) -> None:
    """Register ``s2l calibrate``."""
    sub = subparsers.add_parser(
        "calibrate",
        help="choose a trained model's foreground threshold from its training images (no labels needed)",
        description=(
            "Segment up to 64 training images of a datalist with a saved model.pt and choose the foreground "
            "threshold whose outlines lie on the strongest image edges; write it to <model>.calibration.json, "
            "which inference reads (foreground_threshold auto). Training does this by itself at its end; use this "
            "for weights trained before it existed or trained elsewhere."
        ),
    )
    sub.add_argument("--ckpt", required=True, help="the trained weights (model.pt)")
    sub.add_argument("--dataset_dir", required=True, help="the dataset folder holding the datalist")
    sub.add_argument("--datalist_name", default="datalist.json", help="the datalist's file name")
    sub.add_argument("--in_channels", type=int, default=1, help="the model's input channels (default 1)")
    sub.add_argument("--slice_axis", type=int, default=None, help="volumes: the slice axis (as in training)")
    sub.add_argument("--refine_weight", type=float, default=None,
                     help="boundary refinement (mean-field CRF) to calibrate with and record for inference; 0 = none "
                          "(default: configs/train.json's refine_weight)")
    sub.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """Run :func:`s2l_monai.calibration.calibrate_model` and print its choice."""
    from s2l_monai.calibration import calibrate_model, calibration_path

    overrides = {} if args.refine_weight is None else {"refine_weight": args.refine_weight}
    record = calibrate_model(args.ckpt, args.dataset_dir, args.datalist_name, in_channels=args.in_channels,
                             slice_axis=args.slice_axis, **overrides)
    if record.get("not_calibrated"):
        print(f"foreground threshold 0.50: {record['not_calibrated']}; wrote {calibration_path(args.ckpt)}")
    else:
        print(f"foreground threshold {record['foreground_threshold']:.2f} ({record['items']} training images, "
              f"boundary refinement weight {record['refine_weight']:g}; 0.5 = argmax); wrote "
              f"{calibration_path(args.ckpt)}")
    return 0


def _add_suggest(subparsers: Any) -> None:
    """Register ``s2l suggest``."""
    sub = subparsers.add_parser(
        "suggest",
        help="the images (slices) to scribble next, best first, with the regions to draw in",
        description=(
            "Rank the training images of a run by the uncertainty its last ensemble left (the share of unscribbled "
            "pixels the pseudo-labels cannot decide, or whose prediction still moves) and find in each the largest "
            "uncertain regions. Prints the ranking and writes suggestions.json, suggestions.csv and one picture per "
            "image (image | scribbles and boxes | uncertainty and boxes) into --out."
        ),
    )
    sub.add_argument("--run", default="runs/train", help="the training's output_dir (default runs/train)")
    sub.add_argument("--top", type=int, default=5, help="how many images to suggest (default 5)")
    sub.add_argument("--regions", type=int, default=3, help="regions per image (default 3)")
    sub.add_argument("--out", default=None, help="output folder (default <run>/suggestions)")
    sub.add_argument("--candidates", default=None,
                     help="a folder of images without scribbles to rank as well (predicted by the trained model "
                          "under the four flips)")
    sub.add_argument("--ckpt", default="models/model.pt", help="the trained weights, for --candidates "
                     "(default models/model.pt)")
    sub.add_argument("--in_channels", type=int, default=1, help="the model's input channels, for --candidates")
    sub.set_defaults(func=_cmd_suggest)


def _cmd_suggest(args: argparse.Namespace) -> int:
    """Print and write :func:`s2l_monai.suggestions.suggest`."""
    from s2l_monai.suggestions import suggest

    candidates: list[str] = []
    if args.candidates:
        from s2l_monai.inference_io import list_images

        candidates = [item["image"] for item in list_images(args.candidates)]
    chosen, out = suggest(args.run, top=args.top, max_regions=args.regions, out_dir=args.out,
                          candidates=candidates, ckpt_path=args.ckpt, in_channels=args.in_channels)
    print(f"{len(chosen)} image(s) to scribble next (share of unscribbled pixels still uncertain; "
          "regions y0 x0 y1 x1):")
    for s in chosen:
        where = s.get("image") or s["id"]
        where += "" if s.get("slice") is None else f" slice {s['slice']}"
        where += " (no scribbles yet)" if s.get("source") else ""
        boxes = ", ".join("[" + " ".join(map(str, r["box"])) + "]" for r in s["regions"]) or "-"
        print(f"{s['rank']:>3}. {where}: {100 * s['uncertain_share']:.1f}% uncertain (mean {s['mean']:.3f}); {boxes}")
    print(f"wrote {out / 'suggestions.json'}, {out / 'suggestions.csv'} and the pictures in {out}")
    return 0


#: ``s2l <command>`` -> (bundle run id, config file in ``configs/``) of the bundle launchers.
BUNDLE_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training", "train.json"),
    "segment": ("inference", "inference.json"),
}


def _configs_dir() -> Path:
    """The bundle's ``configs/`` folder: next to the package (repository checkout), else ``./configs``."""
    here = Path(__file__).resolve().parents[1] / "configs"
    return here if (here / "train.json").is_file() else Path("configs").resolve()


def _add_bundle_commands(subparsers: Any) -> None:
    """Register ``s2l train`` and ``s2l segment``: the bundle's runs, launched for a shared machine."""
    for name, (run_id, config) in BUNDLE_COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=f"run the bundle's {run_id} (python -m monai.bundle run {run_id} --config_file configs/{config}); "
            "other options are passed to it, e.g. --dataset_dir DIR",
            description=f"Launch `python -m monai.bundle run {run_id} --config_file configs/{config}` with every "
            "other option passed through (--key value overrides of the config). The launcher sets "
            "OMP_WAIT_POLICY=PASSIVE unless it is set (PyTorch's spinning OpenMP threads make a run on a busy "
            "machine several times slower) and hides MONAI's notice about evaluating config files, which is "
            "about configs from elsewhere, not the bundle's own.",
        )
        sub.add_argument("--config_file", default=None, help=f"config file (default configs/{config} of the bundle)")
        sub.set_defaults(func=_cmd_bundle, run_id=run_id, config=config, passthrough=True)


def bundle_command(run_id: str, config_file: str, overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that ``s2l train`` / ``s2l segment`` execute."""
    import os

    cmd = [sys.executable, "-W", "ignore:parsing config_file:UserWarning", "-m", "monai.bundle", "run", run_id,
           "--config_file", config_file, *overrides]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return cmd, env


def _cmd_bundle(args: argparse.Namespace) -> int:
    """Replace this process by the bundle run (so signals, exit status and output are the run's own)."""
    import os

    config = args.config_file or str(_configs_dir() / args.config)
    cmd, env = bundle_command(args.run_id, config, args.overrides)
    os.execve(sys.executable, cmd, env)
    return 0  # pragma: no cover - execve does not return


def build_parser() -> argparse.ArgumentParser:
    """The ``s2l`` argument parser with all commands registered."""
    parser = argparse.ArgumentParser(
        prog="s2l", description="Scribble2Label on MONAI: scribble-supervised cell segmentation."
    )
    from s2l_monai import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_prepare(commands)
    _add_evaluate(commands)
    _add_otsu(commands)
    _add_balance(commands)
    _add_calibrate(commands)
    _add_suggest(commands)
    _add_bundle_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return its exit status.

    Data and argument problems (missing files, invalid data) are printed as ``s2l: error: ...`` with status 2
    instead of a traceback.
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
