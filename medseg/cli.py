"""The ``medseg`` command: parses arguments and calls one pipeline function per verb.

User errors (:class:`medseg.errors.MedsegError`) are printed without a traceback, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medseg import __version__
from medseg.errors import MedsegError


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.training.trainer import train

    config = load_config(args.config)
    if args.output_dir is not None:
        config.train.output_dir = args.output_dir.resolve()
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.fold is not None:
        config.data.fold = args.fold
    result = train(config, resume=args.resume, device=args.device)
    print(f"best checkpoint: {result.best_checkpoint}  (mean foreground Dice {result.best_dice:.4f} at epoch {result.best_epoch})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from medseg.inference.runner import predict_paths

    summary = predict_paths(
        model=args.model,
        inputs=args.input,
        output_dir=args.output,
        overwrite=args.overwrite,
        device=args.device,
    )
    print(summary.describe())
    return 0 if not summary.failed else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation.runner import evaluate_folders

    result = evaluate_folders(pred_dir=args.pred, labels=args.labels, output_dir=args.output, label_names_from=args.model)
    print(result.describe())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from medseg.errors import OutputError
    from medseg.io.dicom import find_dicom_series, read_dicom_series_report
    from medseg.io.nifti import is_nifti_path, save_atomic
    from medseg.io.scans import load_scan

    output: Path = args.output
    if not is_nifti_path(output):
        raise OutputError(f"{output}: output must be a .nii or .nii.gz file")
    if output.exists() and not args.overwrite:
        raise OutputError(f"{output}: already exists (use --overwrite to replace it)")
    if args.input.is_dir():
        series = None
        if args.series is not None:
            found = find_dicom_series(args.input)
            if not 1 <= args.series <= len(found):
                raise OutputError(f"{args.input}: --series {args.series} asked, the folder holds {len(found)} series")
            series = found[args.series - 1]
        img, report = read_dicom_series_report(
            args.input, series, allow_gantry_tilt=args.allow_gantry_tilt, max_bytes=args.max_bytes
        )
        if not report.clean:
            logging.getLogger("medseg.convert").warning("%s", report.describe())
    else:
        img = load_scan(args.input, max_bytes=args.max_bytes)
    save_atomic(img, output)
    print(f"wrote {output}  (shape {tuple(img.shape)}, spacing {tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])} mm)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medseg.demo import run_demo

    result = run_demo(args.output_dir, num_cases=args.cases, minutes=args.minutes, overwrite=args.overwrite, seed=args.seed)
    print(result.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all verbs."""
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from an experiment YAML")
    p.add_argument("config", help="config file, or the name of a shipped config (e.g. ct_lung.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--fold", type=int, default=None, help="cross-validation fold of the manifest")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--output-dir", type=Path, default=None, help="override train.output_dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment NIfTI files, folders of them and DICOM series folders")
    p.add_argument("--model", required=True, type=Path, help="run folder or checkpoint file")
    p.add_argument("--input", required=True, nargs="+", type=Path, help="NIfTI files, folders, DICOM series folders")
    p.add_argument("--output", required=True, type=Path, help="folder for the masks (NIfTI, uint8)")
    p.add_argument("--overwrite", action="store_true", help="replace masks that already exist")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="compare predicted masks with reference labels")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted masks")
    p.add_argument("--labels", required=True, type=Path, help="folder of reference labels, or a manifest JSON")
    p.add_argument("--output", required=True, type=Path, help="folder for metrics CSV/JSON and the report")
    p.add_argument("--model", type=Path, default=None, help="run folder or checkpoint whose label names to use")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("convert", help="convert a DICOM series folder (or NIfTI) to NIfTI")
    p.add_argument("input", type=Path, help="DICOM series folder or NIfTI file")
    p.add_argument("output", type=Path, help="NIfTI file to write (.nii or .nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--series", type=int, default=None, help="which series (1, 2, ...) of a folder holding several")
    p.add_argument("--allow-gantry-tilt", action="store_true", help="resample a tilted CT series instead of refusing it")
    p.add_argument("--max-bytes", type=int, default=None, help="size cap of one scan (default 4 GiB)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("demo", help="synthetic CT phantoms: train, predict and evaluate end to end")
    p.add_argument("--output-dir", type=Path, default=Path("medseg_demo"))
    p.add_argument("--cases", type=int, default=16, help="number of phantoms (a quarter are held out)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in the output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
