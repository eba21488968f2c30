"""QC flags of a trained model on its own held-out test cases (false-flag rate) and on a scan of the other
modality (must be flagged), with the calibration that sets its limits.

The model is copied first and the copy calibrated (``calibrate_bundle_file``: limits from the manifest's
train split, uncertainty limits from its validation split), so the run folder is not changed. Then
``medseg predict``'s batch runner predicts the test split with statistics on; the lung CT's input flags are checked with an empty mask.

The record (bench/harness.py: machine, load average before and after, command, commit) holds flag counts
and rates and Dice, not times: nothing here is a speed figure. ``--json`` writes it (a relative path goes
under docs/benchmarks/).

    PYTHONPATH=$PWD python bench/qc_false_flags.py RUN --json qc_hippocampus.json
    PYTHONPATH=$PWD python bench/qc_false_flags.py --smoke --json /tmp/qc.json   # untrained model, few cases
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from medseg.data.manifest import load_manifest
from medseg.deploy.export import mask_agreement
from medseg.inference.predictor import Predictor
from medseg.inference.qc import uncertainty_limit
from medseg.inference.runner import predict_paths
from medseg.inference.statistics import assess_scan
from medseg.models.bundle import load_bundle, resolve_bundle_path
from medseg.training.qc_calibration import calibrate_bundle_file

ROOT = Path(__file__).resolve().parents[1]
DEGRADATIONS = ("noise", "blur")


def _flags(folder: Path) -> dict[str, set[str]]:
    with (folder / "statistics.csv").open() as f:
        out: dict[str, set[str]] = {}
        for row in csv.DictReader(f):
            out.setdefault(row["case_id"], set()).update(x for x in row["qc_flags"].split(";") if x)
    return out


def _dice(pred_path: Path, ref_path: Path, label_names: dict[int, str]) -> float:
    """Mean foreground Dice of a predicted mask against its reference (export's per-class agreement: a class
    absent from both counts 1)."""
    pred, ref = np.asarray(nib.load(pred_path).dataobj), np.asarray(nib.load(ref_path).dataobj)
    return round(float(np.mean(list(mask_agreement(pred, ref, label_names).values()))), 4)


def _degraded(image: nib.Nifti1Image, kind: str, rng: np.random.Generator) -> nib.Nifti1Image:
    """A scan made harder as acquisitions go wrong: ``noise`` (Gaussian, sigma = half the scan's SD) or
    ``blur`` (Gaussian, sigma = 2 voxels: a low-resolution or moving scan)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    if kind == "noise":
        data = data + rng.normal(0.0, 0.5 * float(data.std()), data.shape).astype(np.float32)
    else:
        data = ndimage.gaussian_filter(data, 2.0)
    return nib.Nifti1Image(data, image.affine)


def _uncertainty(folder: Path) -> dict[str, dict[str, float | None]]:
    cases = json.loads((folder / "statistics.json").read_text())["cases"]
    empty = {"foreground_entropy": None, "low_confidence_share": None}
    return {case: record.get("uncertainty") or empty for case, record in sorted(cases.items())}


def _rule_flags(values: dict[str, dict[str, float | None]], limits: dict[str, float | None]) -> list[str]:
    """Cases whose entropy or low-confidence share is above the given limits."""
    return sorted(case for case, v in values.items()
                  if any(v[k] is not None and limits[k] is not None and v[k] > limits[k] for k in limits))


def untrained_bundle(path: Path) -> Path:
    """configs/mr_hippocampus.yaml's network, untrained and seeded, as a bundle (``--smoke``'s model)."""
    from medseg.config import load_config
    from medseg.models.bundle import ModelBundle, build_model

    config = load_config(ROOT / "configs" / "mr_hippocampus.yaml")
    torch.manual_seed(0)
    net = build_model(config.model, 1, 3)
    bundle = ModelBundle.from_config(config, {0: "background", 1: "anterior", 2: "posterior"}, 1)
    return bundle.with_weights({k: v.clone() for k, v in net.state_dict().items()}).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help="run folder or bundle of a hippocampus model")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data_manifests" / "hippocampus.json")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--degraded-cases", type=int, default=20, help="test cases also predicted noisy and blurred")
    parser.add_argument("--smoke", action="store_true",
                        help="an untrained model, 4 train / 2 validation / 3 test / 2 degraded cases: checks the script")
    args = parser.parse_args()
    if args.run is None and not args.smoke:
        parser.error("a run folder or bundle is needed (or --smoke)")

    load_before = harness.load_average()
    manifest = load_manifest(args.manifest)
    labelled = lambda split: [c for c in manifest.split(split) if c.label]  # noqa: E731
    train, val, test = labelled("train"), labelled("val"), manifest.split("test")
    if args.smoke:
        train, val, test, args.degraded_cases = train[:4], val[:2], test[:3], 2
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "best.pt"
        if args.smoke:
            untrained_bundle(model)
        else:
            shutil.copy(resolve_bundle_path(args.run), model)
        print(f"calibrating on {len(train)} training and {len(val)} validation cases ...", flush=True)
        bundle = calibrate_bundle_file(model, manifest, train, val, "cpu")
        predictor = Predictor.from_checkpoint(model, "cpu")
        out = Path(tmp) / "test"
        print(f"calibrated; predicting {len(test)} test cases ...", flush=True)
        predict_paths(None, [manifest.image_path(c) for c in test], out, predictor=predictor)
        flags = _flags(out)
        # Each test case's mean foreground Dice against its reference: a flag on a case the model got right is
        # a false flag; on a case it got wrong, a useful one.
        dice = {c.id: _dice(out / f"{c.id}.nii.gz", manifest.label_path(c), manifest.labels) for c in test if c.label}
        test_uncertainty = _uncertainty(out)
        # The same test cases made harder: the uncertainty flags should fire where the masks got worse.
        degraded: dict[str, dict[str, object]] = {}
        rng = np.random.default_rng(0)
        for kind in DEGRADATIONS:
            folder = Path(tmp) / kind
            folder.mkdir()
            for c in test[:args.degraded_cases]:
                nib.save(_degraded(nib.load(manifest.image_path(c)), kind, rng), folder / f"{c.id}.nii.gz")
            predicted = Path(tmp) / f"{kind}_predicted"
            predict_paths(None, [folder], predicted, predictor=predictor)
            degraded[kind] = {"flags": _flags(predicted), "uncertainty": _uncertainty(predicted),
                              "dice": {c.id: _dice(predicted / f"{c.id}.nii.gz", manifest.label_path(c),
                                                   manifest.labels) for c in test[:args.degraded_cases]}}
        # The input checks alone (an empty mask): predicting a 512x512x48 CT at 1 mm takes minutes on a CPU.
        ct = nib.load(ROOT.parent / "shared" / "data" / "lung_ct" / "lung1_ct.nii.gz")
        empty = nib.Nifti1Image(np.zeros(ct.shape, np.uint8), ct.affine)
        ct_flags = assess_scan("lung1_ct", ct, empty, load_bundle(model)).qc_flags
    flagged = {k: sorted(v) for k, v in flags.items() if v}
    qc = bundle.spec.qc
    assert qc is not None
    # The shipped rule against the plain 99th percentile, from the validation values kept at calibration.
    measures = ("foreground_entropy", "low_confidence_share")
    validation = {k: [v for v in qc.calibration[f"validation_{k}"] if v is not None] for k in measures}
    rule_limits = {"shipped (max of p99 and Q3 + 3 IQR)": {k: uncertainty_limit(validation[k]) for k in measures},
                   "p99 only": {k: float(np.percentile(validation[k], 99)) if validation[k] else None for k in measures}}
    rules = {name: {"limits": limits, "clean_test_flagged": len(_rule_flags(test_uncertainty, limits)),
                    **{f"{kind}_flagged": len(_rule_flags(d["uncertainty"], limits)) for kind, d in degraded.items()}}
             for name, limits in rule_limits.items()}
    counts = Counter(f for v in flags.values() for f in v)
    measured = {"load_average_before": load_before, "load_average_after": harness.load_average()}
    result = {
        "model": "untrained (--smoke)" if args.smoke else harness.portable(str(args.run)), "smoke": args.smoke,
        "validation_mean_dice": bundle.spec.provenance.validation.mean_dice,
        "validation_epoch": bundle.spec.provenance.validation.epoch,
        "cases": {"train": len(train), "val": len(val), "test": len(test)},
        "qc_limits": qc.model_dump(mode="json"),
        "rules_compared": rules,
        "degraded_test_cases": {kind: {
            "cases": len(d["dice"]), "mean_dice": round(float(np.mean(list(d["dice"].values()))), 4),
            "flagged_uncertain": sum(bool({"uncertain_foreground", "low_confidence"} & f) for f in d["flags"].values()),
            "flag_counts": dict(Counter(x for f in d["flags"].values() for x in f)),
            "dice_flagged": [d["dice"][k] for k, f in d["flags"].items() if {"uncertain_foreground", "low_confidence"} & f],
            "dice_not_flagged": [d["dice"][k] for k, f in d["flags"].items()
                                 if not {"uncertain_foreground", "low_confidence"} & f],
        } for kind, d in degraded.items()},
        "test_mean_dice": round(float(np.mean(list(dice.values()))), 4) if dice else None,
        "test_dice_of_flagged_cases": {k: dice.get(k) for k in flagged},
        "test_dice_per_case": dice,
        "test_cases_flagged": len(flagged), "false_flag_rate": round(len(flagged) / max(1, len(flags)), 3),
        "flag_counts_on_test": dict(counts), "flagged_test_cases": flagged,
        "lung_ct_given_to_this_mr_model": ct_flags,
        # The distributions the uncertainty limits come from (validation) and are applied to (test).
        "validation_uncertainty": {k: qc.calibration.get(f"validation_{k}") for k in
                                   ("foreground_entropy", "low_confidence_share")},
        "test_uncertainty": {k: [u[k] for u in test_uncertainty.values()] for k in measures},
    }
    data = harness.record("qc_false_flags", measured, **result)
    print(json.dumps(data, indent=1))
    if args.json:
        print("written:", harness.write_record(data, args.json))


if __name__ == "__main__":
    main()
