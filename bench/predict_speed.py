"""medseg predict vs the plain MONAI pipeline: same weights, same CTs, interleaved repeats (bench/harness.py).

The plain pipeline is the one MONAI's tutorials write: LoadImaged -> EnsureChannelFirstd -> Orientationd ->
Spacingd -> ScaleIntensityRanged -> sliding_window_inference -> softmax -> Invertd (linear) -> argmax ->
SaveImage. medseg is ``predict_paths`` (separable resampling, slab-wise inverse with running argmax,
read-ahead and background writing, channels-last network on the CPU), run twice: its default path
(statistics and QC on, what ``medseg predict`` does) and with ``--no-statistics`` (masks only, like the
plain pipeline). All use the ct_lung config's network (untrained, seeded: speed does not depend on the
weights), patch, overlap and window.

Scans: the real chest CT of ../shared/data/lung_ct (512x512x48), two real-sized volumes built from it by
resampling along z (512x512x200 at 1.2 mm, and 512x512x300 at 0.8 mm stored in RAS voxel order rather than
the file's LPS), and the real DICOM series ../shared/data/dicom/series/torchio_ct_17 (88x128x17).

Each variant runs in its own process over all scans (so its ru_maxrss is its own peak), the variants
interleaved (monai, medseg, medseg --no-statistics, monai, ...) for ``--repeats`` rounds; the network's
forward calls are timed inside each, so "non-network" = total - network. The peak is also given per voxel
of the largest scan, beside the estimate medseg.inference.memory uses to refuse scans. Masks of the
pipelines are compared voxel by voxel (share of equal voxels) and by Dice.

    PYTHONPATH=$PWD python bench/predict_speed.py --json predict_speed.json
    PYTHONPATH=$PWD python bench/predict_speed.py --smoke --json /tmp/smoke.json   # tiny: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
import torch
import yaml
from torch import nn

from medseg.deploy.export import mask_agreement
from medseg.inference.memory import nifti_header_size
from medseg.models.bundle import read_bundle_spec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LUNG = SHARED / "lung_ct" / "lung1_ct.nii.gz"
DICOM = SHARED / "dicom" / "series" / "torchio_ct_17"


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timed(nn.Module):
    """The network, with the seconds spent in its forward calls added up."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.net(x)
        self.seconds += time.perf_counter() - start
        return out


def _resample_z(img: nib.Nifti1Image, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """The CT linearly resampled along z to ``slices`` slices over the same extent (int16 HU)."""
    from scipy import ndimage

    data = np.asarray(img.dataobj)
    n = data.shape[2]
    out = ndimage.zoom(data.astype(np.float32), (1, 1, slices / n), order=1, grid_mode=True, mode="nearest")
    affine = img.affine.copy()
    affine[:3, 2] *= n / slices
    affine[:3, 3] += img.affine[:3, 2] * (n / slices - 1) / 2  # same extent: first slice centre moves in
    return np.round(out).astype(np.int16), affine


def benchmark_bundle(work: Path, channels: list[int] | None) -> Path:
    """The ct_lung config's network, untrained and seeded (speed does not depend on the weights), as a bundle
    in ``work`` (built once; ``channels`` for a lighter network of the same shape)."""
    from medseg.config import config_from_dict
    from medseg.models.bundle import ModelBundle, build_model

    work.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "configs" / "ct_lung.yaml").read_text())
    raw["data"]["manifest"] = str(REPO / "data_manifests" / "lung_ct.json")
    if channels:
        raw["model"]["channels"] = channels
    config = config_from_dict(raw, source="ct_lung.yaml (benchmark)")
    torch.manual_seed(0)
    net = build_model(config.model, 1, 2)
    model = work / f"model_{'_'.join(map(str, config.model.channels))}.pt"
    if not model.exists():
        bundle = ModelBundle.from_config(config, {0: "background", 1: "lesion"}, 1)
        bundle.with_weights({k: v.clone() for k, v in net.state_dict().items()}).save(model)
    return model


def prepare(work: Path, channels: list[int] | None, build_scans: bool = True) -> tuple[Path, list[Path]]:
    """The model bundle (same weights for both pipelines) and the scans, built once into ``work``."""
    model = benchmark_bundle(work, channels)
    if not build_scans:
        return model, [DICOM]
    scans = work / "scans"
    scans.mkdir(exist_ok=True)
    lung = nib.load(LUNG)
    built = {"lung1_512x512x48": None, "lung1_512x512x200": 200, "lung1_ras_512x512x300": 300}
    for name, slices in built.items():
        path = scans / f"{name}.nii.gz"
        if path.exists():
            continue
        if slices is None:
            data, affine = np.asarray(lung.dataobj), lung.affine
        else:
            data, affine = _resample_z(lung, slices)
        if "ras" in name:  # the same anatomy stored in RAS voxel order: flips x and y
            data = data[::-1, ::-1]
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
            affine = affine @ flip
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return model, [*sorted(scans.glob("*.nii.gz")), DICOM]


def run_medseg(model: Path, scans: list[Path], out: Path, statistics: bool = True, precision: str = "float32") -> dict:
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_paths

    predictor = Predictor.from_checkpoint(model, "cpu", precision=precision)
    timed = [Timed(m) for m in predictor.models]
    predictor.models, predictor.model = timed, timed[0]
    baseline = _rss()
    start = time.perf_counter()
    summary = predict_paths(model, scans, out, overwrite=True, predictor=predictor, statistics=statistics)
    total = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(summary.describe())
    return {"seconds": total, "network_seconds": sum(t.seconds for t in timed), "baseline_rss": baseline,
            "peak_rss": _peak()}


def run_monai(model: Path, scans: list[Path], out: Path) -> dict:
    from monai import transforms as mt
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    from medseg.io.scans import ScanReader
    from medseg.models.bundle import load_bundle

    bundle = load_bundle(model)
    timed = Timed(bundle.build_network())
    pre, infer = bundle.spec.preprocessing, bundle.inference
    transform = mt.Compose([
        mt.LoadImaged("image", reader=ScanReader(), image_only=True),  # reads DICOM folders too; same decoder
        mt.EnsureChannelFirstd("image", channel_dim="no_channel"),
        mt.Orientationd("image", axcodes=pre.orientation),
        mt.Spacingd("image", pixdim=pre.spacing, mode="bilinear"),
        mt.ScaleIntensityRanged("image", a_min=pre.intensity.a_min, a_max=pre.intensity.a_max, b_min=0.0, b_max=1.0,
                                clip=True),
    ])
    out.mkdir(parents=True, exist_ok=True)
    baseline = _rss()
    start = time.perf_counter()
    per_scan = []
    for path in scans:
        t0 = time.perf_counter()
        data = transform({"image": str(path)})
        with torch.no_grad():
            logits = sliding_window_inference(data["image"][None], infer.roi_size, infer.sw_batch_size, timed,
                                              overlap=infer.overlap, mode=infer.mode)
        data["pred"] = MetaTensor(torch.softmax(logits[0], 0).as_tensor(), meta=dict(data["image"].meta))
        inverted = mt.Invertd("pred", transform=transform, orig_keys="image", nearest_interp=False)(data)["pred"]
        labels = mt.AsDiscrete(argmax=True)(inverted).to(torch.uint8)
        name = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name
        mt.SaveImage(output_dtype=np.uint8, resample=False, print_log=False)(labels, filename=str(out / name))
        per_scan.append(time.perf_counter() - t0)
    return {"seconds": time.perf_counter() - start, "per_scan_seconds": per_scan,
            "network_seconds": timed.seconds, "baseline_rss": baseline, "peak_rss": _peak()}


def _worker(args: argparse.Namespace) -> None:
    scans = [Path(p) for p in args.scans]
    if args.worker == "monai":
        result = run_monai(Path(args.model), scans, Path(args.out))
    else:
        result = run_medseg(Path(args.model), scans, Path(args.out), statistics=args.worker != "medseg-no-statistics",
                            precision="bfloat16" if args.worker == "medseg-bf16" else "float32")
    print(json.dumps(result))


def _mask(folder: Path, scan: Path) -> np.ndarray:
    name = scan.name[: -len(".nii.gz")] if scan.name.endswith(".nii.gz") else scan.name
    return np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj)


#: Variant name -> worker mode. The default medseg path first among medseg's: it is the one users run.
VARIANTS = {"monai (plain pipeline)": "monai", "medseg (default: statistics on)": "medseg",
            "medseg --no-statistics": "medseg-no-statistics"}
#: ``--bf16``: the default path with the network in bf16 autocast, what ``--precision auto`` runs for a bundle
#: whose recorded parity check passed (this untrained bundle has none, so it is forced here).
BF16_VARIANT = "medseg default, bf16 network"
#: The variant of ``--base``: the default path of an earlier checkout.
BASE_VARIANT = "medseg @ base checkout (default)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_predict_speed"))
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="network channels (default: ct_lung's)")
    parser.add_argument("--base", type=Path, default=None, metavar="CHECKOUT",
                        help="also run the default path of the medseg in this checkout (e.g. a worktree of an earlier "
                             "commit), interleaved with the others: before/after on the same machine")
    parser.add_argument("--smoke", action="store_true",
                        help="the DICOM series only and a tiny network: checks the script in a minute, measures nothing")
    parser.add_argument("--bf16", action="store_true", help="also time the default path with a bf16 network")
    parser.add_argument("--worker", choices=sorted({*VARIANTS.values(), "medseg-bf16"}), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scans", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if not LUNG.is_file() or not DICOM.is_dir():
        raise SystemExit(f"real data not found under {SHARED}")
    channels = [4, 8, 16, 32, 64] if args.smoke and not args.channels else args.channels
    variants = dict(VARIANTS)
    if args.bf16:
        variants[BF16_VARIANT] = "medseg-bf16"
    if args.base is not None:
        # The earlier medseg must read the bundle: it is built by that checkout (later versions read older
        # bundles, not the other way round), then found in --work by this one.
        base = args.base.resolve()
        build = (f"import sys; sys.path.insert(0, {str(base / 'bench')!r}); from pathlib import Path; "
                 f"import predict_speed as p; p.prepare(Path({str(args.work)!r}), {channels!r})")
        subprocess.run([sys.executable, "-c", build], check=True, env={**os.environ, "PYTHONPATH": str(base)}, cwd=base)
        variants[BASE_VARIANT] = "medseg"
    model, scans = prepare(args.work, channels, build_scans=not args.smoke)
    voxels = {}
    for s in scans:
        img = nib.load(s) if s.is_file() else None
        voxels[s.name] = int(np.prod(img.shape)) if img is not None else None
    largest = max(v for v in voxels.values() if v) if any(voxels.values()) else 88 * 128 * 17

    def variant(name: str, mode: str):
        checkout = args.base.resolve() if name == BASE_VARIANT else REPO

        def run(repeat: int) -> dict:
            out = args.work / f"out_{mode}{'_base' if name == BASE_VARIANT else ''}"
            cmd = [sys.executable, __file__, "--worker", mode, "--model", str(model), "--out", str(out),
                   "--scans", *map(str, scans)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(checkout)})
            r = json.loads(done.stdout.strip().splitlines()[-1])
            r["non_network_seconds"] = r["seconds"] - r["network_seconds"]
            r["peak_bytes_per_voxel_of_largest_scan"] = (r["peak_rss"] - r["baseline_rss"]) / largest
            r.pop("per_scan_seconds", None)
            return r
        return run

    measured = harness.run_interleaved({name: variant(name, mode) for name, mode in variants.items()}, args.repeats)
    monai = "monai (plain pipeline)"
    agreement: dict = {}
    speedups = {name: {"end_to_end": harness.ratio(measured, monai, name),
                       "non_network": harness.ratio(measured, monai, name, "non_network_seconds")}
                for name in variants if name != monai}
    if args.base is not None:
        speedups["medseg (default) vs base"] = {
            "end_to_end": harness.ratio(measured, BASE_VARIANT, "medseg (default: statistics on)"),
            "non_network": harness.ratio(measured, BASE_VARIANT, "medseg (default: statistics on)", "non_network_seconds")}
        for s in scans:
            a, b = _mask(args.work / "out_medseg", s), _mask(args.work / "out_medseg_base", s)
            agreement.setdefault("_vs_base", {})[s.name] = float((a == b).mean())
    if args.bf16:
        for s in scans:
            a, b = _mask(args.work / "out_medseg", s), _mask(args.work / "out_medseg-bf16", s)
            agreement.setdefault("_bf16_vs_fp32", {})[s.name] = float((a == b).mean())
    label_names = {0: "background", 1: "lesion"}
    for s in scans:  # masks of each variant's last repeat (each run is deterministic)
        a, b = _mask(args.work / "out_medseg", s), _mask(args.work / "out_monai", s)
        agreement[s.name] = {"voxels": int(a.size), "share_of_voxels_equal": float((a == b).mean()),
                             "dice_per_class": mask_agreement(a, b, label_names),
                             "foreground_fraction_medseg": float((a > 0).mean())}
    estimates = {}
    pre = read_bundle_spec(model).preprocessing
    for s in scans:
        if s.is_file():
            size = nifti_header_size(s, pre.orientation, tuple(pre.spacing) if pre.spacing else None, len(label_names))
            if size is not None:
                estimates[s.name] = size.peak_bytes / size.voxels
    report = harness.record(
        "predict_speed", measured,
        network_channels=channels or "ct_lung default", smoke=args.smoke, scans={s.name: voxels[s.name] for s in scans},
        speedup_vs_monai=speedups, agreement_medseg_default_vs_monai=agreement,
        memory_estimate_bytes_per_voxel=estimates,
        notes="peak_bytes_per_voxel_of_largest_scan: (ru_maxrss - RSS before the first scan) / voxels of the largest "
              "scan; memory_estimate_bytes_per_voxel: medseg.inference.memory's peak estimate (the one that refuses "
              "scans) per voxel of each NIfTI scan, for this model's spacing and classes",
    )
    print(json.dumps(report, indent=2))
    if args.json:
        print("written:", harness.write_record(report, args.json))


if __name__ == "__main__":
    main()
