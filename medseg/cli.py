"""The ``medseg`` command: parses arguments and calls one pipeline function per verb.

User errors (:class:`medseg.errors.MedsegError`) are printed without a traceback, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medseg import __version__
from medseg.errors import MedsegError


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """``--set section.key=value`` items (and the shorthand flags, which win) as dotted keys."""
    from medseg.config import parse_set

    overrides = dict(parse_set(item) for item in args.set)
    for flag, key in (("output_dir", "train.output_dir"), ("epochs", "train.epochs"), ("fold", "data.fold")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.training.distributed import launched_by_torchrun, relaunch_with_torchrun
    from medseg.training.trainer import train

    if args.nproc is not None and not launched_by_torchrun():
        return relaunch_with_torchrun(args.nproc, _without_nproc(args.argv))
    config = load_config(args.config, _overrides(args))
    result = train(config, resume=args.resume, device=args.device)
    if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
        return 0
    if getattr(result, "already_finished", False):  # a TrainResult; tests stand in simpler results
        print(f"{result.run_dir}: already finished ({result.epochs_run} epochs), nothing to do")
    print(f"best checkpoint: {result.best_checkpoint}  (mean foreground Dice {result.best_dice:.4f} at epoch {result.best_epoch})")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from medseg.planning.planner import PlanOptions, write_plan

    def intensity_kinds(intensity) -> str:
        return "/".join(i.kind for i in intensity) if isinstance(intensity, list) else intensity.kind

    target = {"auto": None, "cpu": False, "cuda": True}[args.target]
    options = PlanOptions(name=args.name or args.output.stem, output_dir=args.run_dir, memory_gib=args.memory_gib,
                          base_features=args.base_features, cuda=target)
    config_path, fingerprint_path, config = write_plan(args.manifest, args.output, args.fingerprint, options,
                                                       max_cases=args.max_cases, overwrite=args.overwrite)
    print(f"wrote {fingerprint_path}\nwrote {config_path}: {config.model.spatial_dims}D {config.model.name}, "
          f"patch {config.train.patch_size}, batch {config.train.batch_size}, spacing {list(config.preprocessing.spacing or [])} mm, "
          f"{intensity_kinds(config.preprocessing.intensity)} normalisation")
    return 0


def _cmd_predict_dicomweb(args: argparse.Namespace) -> int:
    from medseg.inference.pacs import describe, predict_study
    from medseg.inference.predictor import Predictor
    from medseg.io.dicomweb import DicomWebSettings

    if not args.study:
        raise MedsegError("--dicomweb needs --study UID (the study to segment)")
    if args.input:
        raise MedsegError("give either --input (local scans) or --dicomweb/--study (a study on a PACS), not both")
    settings = DicomWebSettings(args.dicomweb, auth_file=args.dicomweb_auth_file, ca_file=args.dicomweb_ca_file,
                                client_cert=args.dicomweb_client_cert, client_key=args.dicomweb_client_key,
                                timeout_s=args.dicomweb_timeout)
    predictor = Predictor.from_checkpoint(args.model if len(args.model) > 1 else args.model[0], args.device,
                                          mirror=True if args.mirror else None, backend=args.backend,
                                          model_file=args.model_file, precision=args.precision)
    outcomes = predict_study(predictor, settings, args.study, args.output, modalities=args.modality,
                             formats=args.output_format)
    print(describe(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _split_cases(args: argparse.Namespace, required: bool) -> tuple[Path | None, list | None]:
    """``--manifest M.json --split NAME [--split-fold K]`` as the manifest path and the split's scans
    (:func:`medseg.data.manifest.split_scans`); (None, None) without ``--manifest``. ``required``: the split
    must be named (predict), else all labelled cases are meant (evaluate)."""
    if args.manifest is None:
        if args.split is not None or args.split_fold is not None:
            raise MedsegError("--split and --fold choose cases of a manifest: pass --manifest M.json too")
        return None, None
    if args.split is None:
        if required or args.split_fold is not None:
            raise MedsegError(f"--manifest {args.manifest}: name the cases with --split train|val|test")
        return args.manifest, None
    from medseg.data.manifest import load_manifest, split_scans

    return args.manifest, split_scans(load_manifest(args.manifest), args.split, args.split_fold)


def describe_models(models: list[Path]) -> str:
    """Which model a command runs: each bundle's name and weights SHA-256 (read from its spec alone)."""
    from medseg.errors import CheckpointError
    from medseg.models.bundle import read_bundle_spec

    lines = []
    for model in models:
        try:
            spec = read_bundle_spec(model)
        except CheckpointError:
            continue  # reported, with the reason, when the model is loaded
        lines.append(f"model: {spec.name}  weights SHA-256 {spec.provenance.weights_sha256 or 'not recorded'}  ({model})")
    return "\n".join(lines)


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.dicomweb:
        if args.manifest is not None:
            raise MedsegError("give either --manifest/--split (a manifest's cases) or --dicomweb/--study, not both")
        return _cmd_predict_dicomweb(args)
    if args.study:
        raise MedsegError("--study names a study on a PACS: give the server with --dicomweb URL")
    _, scans = _split_cases(args, required=True)
    if scans is not None and args.input:
        raise MedsegError("give either --input (scans) or --manifest/--split (a manifest's cases), not both")
    if scans is None and not args.input:
        raise MedsegError("give the scans with --input, a manifest's cases with --manifest M.json --split test, "
                          "or a PACS study with --dicomweb URL --study UID")
    described = describe_models(list(args.model))
    if described:
        print(described, flush=True)
    reporter = None
    if args.report:
        from medseg.evaluation.scan_report import ReportOptions, ScanReportWriter
        from medseg.models.bundle import load_bundle

        # Every model of an ensemble shares the config and labels. One default with the service's report:
        # --lesion-classes, else the config's evaluate.lesion_classes, else every foreground class.
        bundle = load_bundle(args.model[0])
        reporter = ScanReportWriter(ReportOptions.from_bundle(bundle, args.lesion_classes))
    common = {"model": args.model if len(args.model) > 1 else args.model[0], "inputs": args.input or [], "scans": scans,
              "output_dir": args.output, "overwrite": args.overwrite, "device": args.device,
              "mirror": True if args.mirror else None, "statistics": not args.no_statistics,
              "preview": args.preview, "output_format": args.output_format, "backend": args.backend,
              "model_file": args.model_file, "precision": args.precision, "max_memory_gib": args.max_memory_gib,
              "reporter": reporter}
    if args.ray is not None:
        from medseg.inference.ray_runner import predict_paths_ray  # imports Ray only now

        summary = predict_paths_ray(**common, address=args.ray, actors=args.ray_actors,
                                    cpus_per_actor=args.ray_cpus_per_actor or 1)
    else:
        if args.ray_actors is not None or args.ray_cpus_per_actor is not None:
            raise MedsegError("--ray-actors and --ray-cpus-per-actor need --ray auto|ADDRESS")
        from medseg.inference.runner import predict_paths

        summary = predict_paths(**common)
    print(summary.describe())
    if reporter is not None:
        from medseg.evaluation.runner import lesion_inventory

        evaluate = bundle.config.evaluate
        inventory = lesion_inventory(args.output, reporter.options.lesion_classes, label_names=bundle.label_names,
                                     config=evaluate)
        print("per-scan reports: <case>.report.json; lesion inventory:\n" + inventory.describe())
    return 0 if not summary.failed else 1


def _cmd_calibrate_qc(args: argparse.Namespace) -> int:
    from medseg.training.qc_calibration import calibrate_run

    bundle = calibrate_run(args.run, manifest_path=args.manifest, device=args.device)
    qc = bundle.spec.qc
    assert qc is not None
    print(f"QC limits written to {bundle.path}: modality {qc.modality}, spacing {qc.spacing_mm_low}-{qc.spacing_mm_high} mm, "
          f"max foreground entropy {qc.max_foreground_entropy}, max low-confidence share {qc.max_low_confidence_share}")
    _print_parity(bundle.spec.precision_check.get("bfloat16"))
    return 0


def _print_parity(parity) -> None:
    if parity is not None:
        print(f"bf16 parity check {'passed' if parity.passed else 'failed'} on {parity.cases} validation case(s): "
              f"mean Dice change {parity.mean_dice_change:+.4f}, largest class change {parity.max_class_dice_change:.4f} "
              f"(--precision auto runs {'bfloat16' if parity.passed else 'float32'} on bf16 CPUs)")


def _cmd_export(args: argparse.Namespace) -> int:
    from medseg.deploy.export import export_model

    result = export_model(args.run, args.format, output=args.output, scan=args.scan, int8=args.int8, atol=args.atol,
                          min_dice=args.min_dice, calibration_patches=args.calibration_patches,
                          overwrite=args.overwrite)
    print(result.describe())
    if not args.no_parity:
        from medseg.deploy.parity import record_bf16_parity

        _print_parity(record_bf16_parity(args.run, device="cpu"))  # older runs get the record --precision auto needs
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation.runner import evaluate_folders

    config = None
    if args.config is not None:
        from medseg.config import load_config

        config = load_config(args.config, _overrides(args)).evaluate
    elif args.set:
        raise MedsegError("--set changes a config: pass --config too")
    options: dict[str, object] = {}
    for flag, key in (("lesion_classes", "lesion_classes"), ("connectivity", "connectivity"),
                      ("min_lesion_ml", "min_lesion_volume_ml"), ("match_min_iou", "match_min_iou"),
                      ("size_buckets", "size_buckets_mm"), ("size_by", "size_by"), ("nsd_tolerance", "nsd_tolerance_mm")):
        if getattr(args, flag) is not None:
            options[key] = getattr(args, flag)
    if args.nsd_tolerance_class:
        per_class: dict[int, float] = dict(config.nsd_tolerance_mm_per_class) if config else {}
        for item in args.nsd_tolerance_class:
            try:
                k, mm = item.split("=")
                per_class[int(k)] = float(mm)
            except ValueError:
                raise MedsegError(f"--nsd-tolerance-class expects CLASS=MM (e.g. 2=1.5), got {item!r}") from None
        options["nsd_tolerance_mm_per_class"] = per_class
    if args.missing_as_empty:
        options["missing_as_empty"] = True
    if args.no_html:
        options["html_report"] = False
    manifest, scans = _split_cases(args, required=False)
    if (manifest is None) == (args.labels is None):
        raise MedsegError("give the reference labels with --labels (a folder or manifest) or --manifest M.json "
                          "[--split test], one of them")
    result = evaluate_folders(pred_dir=args.pred, labels=manifest or args.labels, output_dir=args.output,
                              label_names_from=args.model, images_dir=args.images, config=config,
                              cases=[s.case_id for s in scans] if scans is not None else None, **options)
    print(result.describe())
    return 1 if result.failures else 0  # some cases failed: the others are written (docs/evaluation.md)


def _cmd_compare(args: argparse.Namespace) -> int:
    from medseg.evaluation import compare_run as compare

    config = None
    if args.lesion_classes is not None:
        from medseg.config import EvaluateConfig

        config = EvaluateConfig(lesion_classes=args.lesion_classes)
    stats = {"resamples": args.bootstrap, "seed": args.seed}
    if args.pred:
        if args.models or args.manifest:
            raise MedsegError("give either MODELs with --manifest, or --pred folders with --labels, not both")
        if args.labels is None:
            raise MedsegError("--pred needs the reference labels: --labels M.json (or a folder of labels)")
        result = compare.compare_prediction_folders(args.pred, args.labels, args.output, names=args.names,
                                                    split=args.split, fold=args.split_fold, config=config, **stats)
    else:
        if len(args.models) < 2:
            raise MedsegError("give two or more models (run folders or bundle files), or --pred A_DIR B_DIR")
        if args.manifest is None or args.split is None:
            raise MedsegError("models are compared on a manifest's cases: pass --manifest M.json --split test")
        if args.names or args.labels:
            raise MedsegError("--names and --labels go with --pred; models are named by their bundles")
        options = compare.PredictOptions(device=args.device, mirror=True if args.mirror else None)
        result = compare.compare_models(args.models, args.manifest, args.split, args.output, fold=args.split_fold,
                                        options=options, config=config, forgetting=not args.no_forgetting_check,
                                        forgetting_tolerance=args.forgetting_tolerance, **stats)
    print(result.describe())
    if args.fail_if_worse is not None:
        reasons = result.worse_than(args.fail_if_worse)
        for reason in reasons:
            print(f"WORSE: {reason}")
        return 1 if reasons else 0
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from medseg.errors import OutputError
    from medseg.io.dicom import find_dicom_series, read_dicom_series_report
    from medseg.io.nifti import is_nifti_path, save_atomic
    from medseg.io.scans import load_scan
    from medseg.io.volume import Volume

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
    print(f"wrote {output}  (shape {tuple(img.shape)}, spacing {tuple(round(z, 4) for z in Volume(img).spacing)} mm)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from medseg.data.importers import import_dataset

    manifest = import_dataset(args.layout, args.folder, args.output, overwrite=args.overwrite, folds=args.folds,
                              seed=args.seed, name=args.name)
    print(f"wrote {args.output}: {len(manifest.cases)} cases ({', '.join(f'{len(v)} {k}' for k, v in manifest.splits.items())}), "
          f"{len(manifest.folds)} folds, modality {manifest.modality}, labels {manifest.labels}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from medseg.demo import run_demo

    result = run_demo(args.output_dir, num_cases=args.cases, minutes=args.minutes, overwrite=args.overwrite, seed=args.seed)
    print(result.describe())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from medseg.serving.app import MiB, ServeSettings
    from medseg.serving.auth import TokenSet
    from medseg.serving.server import serve

    ray = None
    if args.ray is not None:
        from medseg.serving.ray_serve import RayScaling

        ray = RayScaling(address=args.ray, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         cpus_per_replica=args.ray_cpus_per_replica, upscale_delay_s=args.ray_upscale_delay,
                         downscale_delay_s=args.ray_downscale_delay)
        ray.autoscaling_config()  # refuse a bad min/max before anything starts
    elif (args.min_replicas, args.max_replicas) != (1, 2):
        raise MedsegError("--min-replicas and --max-replicas need --ray auto|ADDRESS")
    settings = ServeSettings(
        model=args.run, data_dir=args.data_dir, tokens=TokenSet.from_sources(token_file=args.token_file),
        insecure_local=args.insecure_local, max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * MiB),
        workers=args.workers, device=args.device, rate_per_minute=args.rate_limit,
        request_timeout_s=args.request_timeout, cors_origins=args.cors_origin, lease_s=args.lease,
        output_format=args.output_format, max_memory_gib=args.max_memory_gib,
        job_store=args.job_store, retention_hours=args.retention_hours,
        result_retention_hours=args.result_retention_hours, ray=ray)
    serve(settings, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
          forwarded_allow_ips=args.forwarded_allow_ips, root_path=args.root_path or "")
    return 0


EXAMPLES = """\
examples:
  medseg demo                                    synthetic phantoms: train -> predict -> evaluate (a few minutes)
  medseg import msd Task04_Hippocampus --output hippocampus.json
  medseg plan hippocampus.json --output my_experiment.yaml
  medseg train ct_lung.yaml                      a bare name finds a shipped config
  medseg predict --model runs/ct_lung --input scans/ --output masks/
  medseg evaluate --pred masks/ --labels my_manifest.json --output eval/
  medseg predict --model runs/ct_lung --manifest my_manifest.json --split test --output masks/
  medseg compare runs/old runs/new --manifest my_manifest.json --split test --output cmp/   paired before/after
  MEDSEG_API_TOKENS=... medseg serve runs/ct_lung   HTTP service: POST a scan, GET its mask (docs/serving.md)
  medseg export runs/ct_lung --format onnx       then: medseg predict --backend onnxruntime ...

'medseg VERB --help' shows a verb's options and their defaults.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except the uninformative ones (None, off, empty), and keeps the examples' layout."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser with :class:`_HelpFormatter`; the verbs' parsers are of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _output_format_arg(value: str) -> str:
    """An ``--output-format`` value: a registered format, a comma list of them, or auto/both/all."""
    from medseg.io.output_formats import requested_formats

    try:
        requested_formats(value)
    except MedsegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _add_output_format(p: argparse.ArgumentParser, default: str) -> None:
    """``--output-format``, its choices and their help read from the output-format registry."""
    from medseg.io.output_formats import output_format_choices, registered_formats

    formats = "; ".join(f"{f.name}: {f.help}" for f in registered_formats())
    p.add_argument("--output-format", type=_output_format_arg, default=default, metavar="FORMAT[,FORMAT...]",
                   help=f"one of {', '.join(output_format_choices())}, or a comma list of formats. {formats}. "
                        "auto: nifti plus a DICOM-SEG for DICOM series; both: nifti,dicom-seg; all: every format the "
                        "scan can take (docs/dicom.md)")

def _add_split_arguments(p: argparse.ArgumentParser, split_help: str) -> None:
    """``--manifest``, ``--split`` and ``--fold`` (stored as ``split_fold``: not the config override ``data.fold``)."""
    p.add_argument("--manifest", type=Path, default=None, help="data manifest (JSON) whose cases and labels to use")
    p.add_argument("--split", default=None, metavar="train|val|test", help=split_help)
    p.add_argument("--fold", dest="split_fold", type=int, default=None, metavar="K",
                   help="with --split: the split of the manifest's cross-validation fold K (folds[K]) instead of its splits")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all verbs."""
    parser = _Parser(prog="medseg", epilog=EXAMPLES,
                     description="Train, run and evaluate segmentation models on CT and MR scans, one verb per step.")
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = sub.add_parser("train", help="train a model from an experiment YAML")
    p.add_argument("config", help="config file, or the name of a shipped config (e.g. ct_lung.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--fold", type=int, default=None, help="cross-validation fold of the manifest")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--output-dir", type=Path, default=None, help="override train.output_dir")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (read as YAML, checked like the file), repeatable: --set train.amp=false")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override train.device")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel in N processes on this machine (torchrun --standalone; one per GPU "
                        "on CUDA, gloo on CPU); for several machines run torchrun yourself (docs/training.md)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("plan", help="fingerprint a manifest's cases and write an experiment YAML planned from them")
    p.add_argument("manifest", type=Path, help="data manifest JSON")
    p.add_argument("--output", required=True, type=Path, help="config YAML to write, e.g. configs/NAME.yaml")
    p.add_argument("--fingerprint", type=Path, default=None,
                   help="where to write the fingerprint JSON (default: <output stem>.fingerprint.json beside it)")
    p.add_argument("--name", default=None, help="experiment name (default: the output file's stem)")
    p.add_argument("--run-dir", default=None, help="train.output_dir to write (default runs/<name>)")
    p.add_argument("--target", choices=["auto", "cpu", "cuda"], default="auto",
                   help="machine to plan for (memory budget, network width); auto: this one")
    p.add_argument("--memory-gib", type=float, default=None, help="memory budget of a training step, GiB")
    p.add_argument("--base-features", type=int, default=None, help="channels of the top level (default 32 CUDA, 16 CPU)")
    p.add_argument("--max-cases", type=int, default=None, help="fingerprint only the first N cases (quick look)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing config / fingerprint")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("predict", help="segment NIfTI files, folders of them and DICOM series folders")
    p.add_argument("--model", required=True, nargs="+", type=Path,
                   help="run folder or checkpoint file; several (e.g. one per fold) are ensembled")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring over every spatial axis")
    p.add_argument("--input", nargs="+", type=Path, help="NIfTI files, folders, DICOM series folders; a multi-channel model reads CASE_0000.nii.gz, CASE_0001.nii.gz... as one case")
    _add_split_arguments(p, "predict the cases of this split, named by their case ids (instead of --input)")
    p.add_argument("--output", required=True, type=Path, help="folder for the masks (NIfTI, uint8)")
    p.add_argument("--overwrite", action="store_true", help="replace masks that already exist")
    _add_output_format(p, "auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when PyTorch sees a GPU")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="memory cap for this run (GiB, default $MEDSEG_MAX_MEMORY_GIB, else the container limit or "
                        "available memory): scans needing more are refused before they are read and the batch goes on")
    p.add_argument("--no-statistics", action="store_true",
                   help="skip statistics.csv/json (per-class volume, intensities, box, components) and the QC flags")
    p.add_argument("--preview", action="store_true",
                   help="write <case>.preview.png: three planes through each predicted structure")
    p.add_argument("--report", action="store_true",
                   help="also write <case>.report.json per scan (class volumes, lesions: volume mL, diameters mm, "
                        "centroid; statistics and QC flags; as the service's job report) and a lesion inventory")
    p.add_argument("--lesion-classes", type=int, nargs="+", default=None,
                   help="classes for --report (default: the model config's evaluate.lesion_classes, else every "
                        "foreground class)")
    p.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="spread the scans over Ray actors (pip install 'medseg[ray]'): auto joins the cluster "
                        "started on this machine (or RAY_ADDRESS), else starts a local one; or a cluster address")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="Ray actors, each loading the model once (default: one per GPU of the cluster, else "
                        "one per --ray-cpus-per-actor CPUs)")
    p.add_argument("--ray-cpus-per-actor", type=int, default=None,
                   help="CPUs (torch threads) per Ray actor (default 1)")
    p.add_argument("--backend", choices=["torch", "torchscript", "onnxruntime", "openvino"], default="torch",
                   help="run the model's checked export (RUN/exports/, from `medseg export`) instead of its weights")
    p.add_argument("--model-file", type=Path, default=None,
                   help="the exported file to run (default: RUN/exports/model.onnx or model.torchscript.pt)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on a CPU with bf16 instructions when the model records a passed bf16 parity "
                        "check (docs/deploy.md), autocast as trained on CUDA, else float32; bfloat16: backends torch "
                        "and openvino")
    pacs = p.add_argument_group("a study on a PACS (DICOMweb), instead of --input; see docs/dicom.md")
    pacs.add_argument("--dicomweb", metavar="URL", default=None,
                      help="DICOMweb base URL, e.g. https://pacs.example.org/dicom-web; credentials come from "
                           "$MEDSEG_DICOMWEB_AUTH or --dicomweb-auth-file ('user:password' or 'Bearer TOKEN')")
    pacs.add_argument("--study", metavar="UID", default=None, help="StudyInstanceUID to segment; SEGs are stored back")
    pacs.add_argument("--dicomweb-auth-file", type=Path, default=None, help="file holding the credentials")
    pacs.add_argument("--dicomweb-ca-file", type=Path, default=None, help="CA bundle to verify the server's TLS certificate")
    pacs.add_argument("--dicomweb-client-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    pacs.add_argument("--dicomweb-client-key", type=Path, default=None, help="its private key, if not in the certificate file")
    pacs.add_argument("--dicomweb-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    pacs.add_argument("--modality", nargs="+", default=None,
                      help="series modalities to segment (default: CT for a CT-windowed model, else MR)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("calibrate-qc", help="set a trained model's QC limits from its training and validation cases")
    p.add_argument("run", type=Path, help="run folder (its best.pt) or model file")
    p.add_argument("--manifest", type=Path, default=None, help="manifest to read the cases from (default: the one it was trained on)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when PyTorch sees a GPU")
    p.set_defaults(func=_cmd_calibrate_qc)

    p = sub.add_parser("export", help="export a model to ONNX (fp32 or int8) or TorchScript, checked against eager")
    p.add_argument("run", type=Path, help="run folder or model file")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="file format")
    p.add_argument("--output", type=Path, default=None,
                   help="file to write (default RUN/exports/model.onnx, model.int8.onnx or model.torchscript.pt)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantization (ONNX), calibrated on patches of the model's training cases")
    p.add_argument("--scan", type=Path, default=None,
                   help="real scan to check parity on (default: first test case of the model's manifest)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| allowed on a real patch, times the largest |logit| if above 1 (fp32)")
    p.add_argument("--min-dice", type=float, default=None,
                   help="least Dice of the export's mask vs eager, per class (default 0.99; 0.97 with --int8)")
    p.add_argument("--calibration-patches", type=int, default=16, help="training patches for --int8 calibration")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the bf16 parity check on the validation cases that runs when the model records none")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("evaluate", help="compare predicted masks with reference labels")
    p.add_argument("--pred", required=True, type=Path, help="folder of predicted masks")
    p.add_argument("--labels", type=Path, default=None, help="folder of reference labels, or a manifest JSON")
    _add_split_arguments(p, "evaluate only this split's cases (default with --manifest: every labelled case)")
    p.add_argument("--output", required=True, type=Path, help="folder for metrics CSV/JSON and the report")
    p.add_argument("--model", type=Path, default=None, help="run folder or checkpoint whose label names to use")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of images (<case>.nii.gz or <case>_0000.nii.gz) for lesion intensities and report pictures")
    p.add_argument("--config", default=None, help="experiment YAML whose 'evaluate' section sets the defaults below")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of --config (read as YAML, checked like the file), repeatable")
    p.add_argument("--lesion-classes", type=int, nargs="+", default=None, help="classes reported lesion by lesion")
    p.add_argument("--connectivity", type=int, choices=[6, 18, 26], default=None, help="lesion connectivity (default 26)")
    p.add_argument("--min-lesion-ml", type=float, default=None, help="drop (and count) lesions smaller than this, mL")
    p.add_argument("--match-min-iou", type=float, default=None, help="least IoU for a lesion match (default 0.1)")
    p.add_argument("--size-buckets", type=float, nargs="+", default=None, help="lesion size bucket edges, mm (default 5 10 20)")
    p.add_argument("--size-by", choices=["axial", "3d"], default=None, help="diameter for size buckets (default axial)")
    p.add_argument("--nsd-tolerance", type=float, default=None, help="surface Dice tolerance, mm (default 2)")
    p.add_argument("--nsd-tolerance-class", action="append", default=[], metavar="CLASS=MM",
                   help="per-class surface Dice tolerance, repeatable")
    p.add_argument("--missing-as-empty", action="store_true", help="score missing predictions as empty masks")
    p.add_argument("--no-html", action="store_true", help="skip report.html")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="compare models case by case: paired differences, forgetting check, report")
    p.add_argument("models", nargs="*", type=Path, metavar="MODEL",
                   help="run folders or bundle files; the first is the baseline every other is paired with")
    p.add_argument("--manifest", type=Path, default=None, help="data manifest whose split the models are run on")
    p.add_argument("--split", default=None, metavar="train|val|test", help="the manifest's split to compare on")
    p.add_argument("--fold", dest="split_fold", type=int, default=None, metavar="K", help="with --split: that split of folds[K]")
    p.add_argument("--pred", nargs="+", type=Path, default=None, metavar="DIR",
                   help="compare existing prediction folders instead of running models (first: baseline)")
    p.add_argument("--labels", type=Path, default=None, help="with --pred: reference labels, a manifest or a folder")
    p.add_argument("--names", nargs="+", default=None, help="with --pred: a name per folder (default: folder names)")
    p.add_argument("--output", required=True, type=Path,
                   help="folder for comparison.csv, comparison.json, report.html, predictions/ and evaluations/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when PyTorch sees a GPU")
    p.add_argument("--mirror", action="store_true", help="test-time mirroring over every spatial axis")
    p.add_argument("--lesion-classes", type=int, nargs="+", default=None,
                   help="classes whose lesions are matched (default: the first model's evaluate.lesion_classes)")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples of the mean difference")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--forgetting-tolerance", type=float, default=0.02,
                   help="largest drop of mean Dice on the source model's test split that a fine-tuned model may show unflagged")
    p.add_argument("--no-forgetting-check", action="store_true",
                   help="skip evaluating fine-tuned models and their sources on the source's test split")
    p.add_argument("--fail-if-worse", type=float, default=None, metavar="DELTA",
                   help="exit 1 when a model's mean Dice is below the baseline's by more than DELTA, or forgetting is "
                        "flagged (otherwise the exit status does not depend on the result)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("convert", help="convert a DICOM series folder (or NIfTI) to NIfTI")
    p.add_argument("input", type=Path, help="DICOM series folder or NIfTI file")
    p.add_argument("output", type=Path, help="NIfTI file to write (.nii or .nii.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--series", type=int, default=None, help="which series (1, 2, ...) of a folder holding several")
    p.add_argument("--allow-gantry-tilt", action="store_true", help="resample a tilted CT series instead of refusing it")
    p.add_argument("--max-bytes", type=int, default=None, help="size cap of one scan (default 4 GiB)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("import", help="write a manifest for an nnU-Net v2 or Decathlon data set folder (no copies)")
    p.add_argument("layout", choices=["nnunet", "msd"], help="nnunet: v2 raw layout (imagesTr/CASE_0000.nii.gz); msd: Decathlon task")
    p.add_argument("folder", type=Path, help="the data set folder, holding dataset.json")
    p.add_argument("--output", required=True, type=Path, help="manifest JSON to write; its paths are relative to it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the training cases (0: no validation split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds")
    p.add_argument("--name", default=None, help="manifest name (default: dataset.json's name)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("serve", help="HTTP service: segment uploaded scans as jobs (docs/serving.md)")
    p.add_argument("run", type=Path, help="run folder or model file to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--data-dir", type=Path, default=Path("medseg_serve"),
                   help="job store, uploads, masks and audit log; replicas on one host share it")
    p.add_argument("--token-file", type=Path, default=None,
                   help="bearer tokens, one a line (added to $MEDSEG_API_TOKENS, comma-separated)")
    p.add_argument("--insecure-local", action="store_true", help="serve without tokens (loopback addresses only)")
    p.add_argument("--workers", type=int, default=1, help="inference threads in this process sharing one loaded model (0: API only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when PyTorch sees a GPU")
    p.add_argument("--max-queue", type=int, default=64, help="queued + running jobs before new uploads get 429")
    _add_output_format(p, "all")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="memory cap for one job's prediction, as medseg predict's (GiB, default $MEDSEG_MAX_MEMORY_GIB, "
                        "else the container limit or available memory): a scan needing more fails with predict's message")
    p.add_argument("--max-upload-mb", type=float, default=512, help="upload size cap, MiB (checked while reading)")
    p.add_argument("--rate-limit", type=float, default=120, help="requests per minute per token and process (0: none)")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds to receive an upload / answer a request")
    p.add_argument("--lease", type=float, default=30, help="seconds a worker's claim on a job lasts without renewal")
    p.add_argument("--retention-hours", type=float, default=None, metavar="H",
                   help="delete a job's uploaded scan H hours after the job finished (default: keep until DELETE)")
    p.add_argument("--result-retention-hours", type=float, default=None, metavar="H",
                   help="delete a job's results (mask, SEG, report) H hours after it finished (default: keep)")
    p.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="run the jobs on Ray Serve replicas that scale with the backlog (pip install 'medseg[ray]'); "
                        "auto joins this machine's cluster (or RAY_ADDRESS), else starts a local one")
    p.add_argument("--min-replicas", type=int, default=1, help="with --ray: replicas kept when idle")
    p.add_argument("--max-replicas", type=int, default=2, help="with --ray: replicas at most (one job each at a time)")
    p.add_argument("--ray-cpus-per-replica", type=int, default=1,
                   help="with --ray on a cluster without GPUs: CPUs per replica (with GPUs: one GPU each)")
    p.add_argument("--ray-upscale-delay", type=float, default=5.0,
                   help="with --ray: seconds the backlog must exceed the replicas before one is added")
    p.add_argument("--ray-downscale-delay", type=float, default=60.0,
                   help="with --ray: seconds of less demand before an idle replica is removed (about 70 s from "
                        "the last job with the default)")
    p.add_argument("--job-store", default=None, metavar="URL",
                   help="postgresql://user@host:port/db shared by replicas on several machines (default: SQLite in --data-dir)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN (CORS off by default)")
    p.add_argument("--ssl-certfile", type=Path, default=None, help="TLS certificate (PEM), with --ssl-keyfile: serve HTTPS")
    p.add_argument("--ssl-keyfile", type=Path, default=None, help="TLS private key (PEM)")
    p.add_argument("--forwarded-allow-ips", default=None, help="proxy addresses whose X-Forwarded-* headers are trusted")
    p.add_argument("--root-path", default=None, help="path prefix when served behind a reverse proxy under a sub-path")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="synthetic CT phantoms: train, predict and evaluate end to end")
    p.add_argument("--output-dir", type=Path, default=Path("medseg_demo"), help="folder for the phantoms, run, masks and report")
    p.add_argument("--cases", type=int, default=16, help="number of phantoms (a quarter are held out)")
    p.add_argument("--minutes", type=float, default=8.0,
                   help="cap on training time (the demo's 20 epochs normally finish well before it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in the output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
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
