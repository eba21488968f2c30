"""Exported backends vs eager PyTorch on the CPU: seconds per scan end to end and the Dice change.

Two parts; in each, every variant is built and warmed up, then all are timed over the same scans in
interleaved repeats (bench/harness.py: A B C A B C ..., ``--repeats``, median and min-max):

* ``ct``: the ct_lung network (untrained: seeded random weights; speed does not depend on the weights)
  on a real-sized chest CT: ../shared/data/lung_ct/lung1_ct.nii.gz (512x512x48, 5 mm slices)
  interpolated along z to 512x512xN (``--ct-slices``, default 200; 1.2 mm slices). No trained lung
  model exists, so "Dice" here is the agreement of each variant's mask with the eager fp32 mask.
* ``hippocampus``: a trained hippocampus run (``--hippo-run``) on the test cases of
  data_manifests/hippocampus.json (``--hippo-cases``, default all 40): Dice against the reference labels,
  and its change from eager fp32.

Variants: eager fp32, ``torch.compile`` (inductor; compile time reported apart), eager bf16 autocast
(CPUs with bf16), ONNX Runtime fp32, OpenVINO fp32 and bf16, int8 (static, calibrated on training patches)
under ONNX Runtime and OpenVINO, and (hippocampus) a 50 % L1-unstructured-pruned eager network.
"End to end" is ``Predictor.predict_scan``: read, preprocess, sliding window, invert, keep-largest.
Each variant predicts one scan (or, for the big CT, one batch of each window-batch size) untimed first
(warm-up, compilation). Masks are compared with eager fp32's two ways, named apart in the table: the share
of voxels with the same label, and the Dice (mean over classes).

Usage::

    PYTHONPATH=$PWD python bench/export_backends.py --part ct --docs
    PYTHONPATH=$PWD python bench/export_backends.py --part hippocampus --hippo-run runs/mr_hippocampus --docs

Results go to docs/benchmarks/export_backends.json (one record per part, with machine, load, command and
commit) and, with ``--docs``, to the section
of docs/benchmarks.md between the export-backends markers.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
import torch
from docs_section import replace_section
from scipy import ndimage
from torch import nn

from medseg.config import load_config
from medseg.data.manifest import load_manifest
from medseg.deploy.export import export_model, mask_agreement
from medseg.inference.backends import (
    AutocastNetwork,
    MainOutput,
    OnnxRuntimeNetwork,
    OpenVinoNetwork,
    bf16_supported,
)
from medseg.inference.predictor import Predictor
from medseg.models import build_model
from medseg.models.bundle import ModelBundle, load_bundle

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DOCS_BEGIN, DOCS_END = "<!-- export-backends:begin -->", "<!-- export-backends:end -->"
CPU = torch.device("cpu")
log = logging.getLogger("bench")


def big_ct(slices: int, folder: Path) -> Path:
    """lung1_ct interpolated (linear) along z to ``slices`` slices over the same extent: a real-sized CT."""
    src = nib.load(str(SHARED / "lung_ct" / "lung1_ct.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    zoom = slices / data.shape[2]
    out = ndimage.zoom(data, (1, 1, zoom), order=1).round().astype(np.int16)
    affine = src.affine.copy()
    affine[:3, 2] /= zoom
    path = folder / f"lung1_ct_z{slices}.nii.gz"
    nib.save(nib.Nifti1Image(out, affine), str(path))
    return path


def parity_crop(slices: int, folder: Path) -> Path:
    """The middle ``slices`` slices of lung1_ct: a real scan small enough for the exports' parity checks."""
    src = nib.load(str(SHARED / "lung_ct" / "lung1_ct.nii.gz"))
    start = (src.shape[2] - slices) // 2
    path = folder / f"lung1_ct_mid{slices}.nii.gz"
    nib.save(src.slicer[:, :, start:start + slices], str(path))
    return path


def ct_lung_run(folder: Path) -> Path:
    """A run folder with the shipped ct_lung network, seeded random weights."""
    config = load_config("ct_lung.yaml")
    torch.manual_seed(0)
    bundle = ModelBundle.from_config(config, load_manifest(config.data.manifest).labels, in_channels=1)
    bundle.with_weights(build_model(config.model, 1, 2).state_dict()).save(folder / "best.pt")
    return folder


def pruned(bundle: ModelBundle, amount: float) -> nn.Module:
    """The eager network with ``amount`` of each conv's weights zeroed by magnitude (no fine-tuning)."""
    from torch.nn.utils import prune

    net = bundle.build_network()
    for module in net.modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d | nn.Conv2d | nn.ConvTranspose2d):
            prune.l1_unstructured(module, "weight", amount)
            prune.remove(module, "weight")
    return MainOutput(net).eval()


def variants(bundle: ModelBundle, fp32: Path, int8: Path, prune_amount: float | None) -> dict[str, Callable[[], nn.Module]]:
    """Name -> factory of the network each variant runs (the Predictor around it is the same)."""
    out: dict[str, Callable[[], nn.Module]] = {
        "eager fp32": lambda: MainOutput(bundle.build_network()).eval(),
        "onnxruntime fp32": lambda: OnnxRuntimeNetwork(fp32),
        "openvino fp32": lambda: OpenVinoNetwork(fp32),
    }
    if bf16_supported():
        out["openvino bf16"] = lambda: OpenVinoNetwork(fp32, "bfloat16")
    out["onnxruntime int8"] = lambda: OnnxRuntimeNetwork(int8)
    out["openvino int8"] = lambda: OpenVinoNetwork(int8)
    out["torch.compile fp32"] = lambda: torch.compile(MainOutput(bundle.build_network()).eval(), dynamic=False)
    if bf16_supported():
        out["eager bf16 (autocast)"] = lambda: AutocastNetwork(MainOutput(bundle.build_network()), torch.bfloat16).eval()
    if prune_amount:
        out[f"eager fp32, {prune_amount:.0%} pruned"] = lambda: pruned(bundle, prune_amount)
    return out


class BatchSizes(nn.Module):
    """Records the window-batch sizes the sliding window feeds a network (to warm up the others on them)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.sizes: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(int(x.shape[0]))
        return self.network(x)


def selected(all_variants: dict[str, Callable[[], nn.Module]], wanted: list[str] | None) -> dict[str, Callable[[], nn.Module]]:
    """The variants named in ``wanted`` (substrings), eager fp32 always first; all when None."""
    if not wanted:
        return all_variants
    keep = {k: v for k, v in all_variants.items() if k == "eager fp32" or any(w in k for w in wanted)}
    return keep


def build_variant(bundle: ModelBundle, factory: Callable[[], nn.Module], warm_scan: Path | None,
                  warm_batches: set[int] | None = None) -> tuple[Predictor, float, float]:
    """The variant's predictor, built and warmed up (untimed by the repeats): (predictor, build s, warm-up s).

    Warm-up is one scan, or (big scans) zero batches of the sizes in ``warm_batches``: what a
    compiler specialises on is the batch shape, so one pass over each size compiles everything.
    """
    t0 = time.perf_counter()
    network = factory()
    predictor = Predictor(network, bundle, CPU, mirror_axes=[])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if warm_batches:
        with torch.no_grad():
            for size in sorted(warm_batches, reverse=True):
                network(torch.zeros(size, bundle.network.in_channels, *bundle.inference.roi_size))
    elif warm_scan is not None:
        predictor.predict_scan(warm_scan)
    return predictor, build_s, time.perf_counter() - t0


def measure(bundle: ModelBundle, factories: dict[str, Callable[[], nn.Module]], scans: list[Path], repeats: int,
            warm_scan: Path | None, warm_batches: set[int] | None = None) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Every variant built and warmed up, then timed over ``scans`` in interleaved repeats (bench/harness.py):
    the harness's results (``sec_per_scan`` per variant) and each variant's masks from its first repeat."""
    built = {name: build_variant(bundle, factory, warm_scan, warm_batches) for name, factory in factories.items()}
    masks: dict[str, list[np.ndarray]] = {}

    def repeat(name: str) -> Callable[[int], dict]:
        predictor = built[name][0]

        def run(r: int) -> dict:
            seconds, out = [], []
            for scan in scans:
                t0 = time.perf_counter()
                mask = predictor.predict_scan(scan)
                seconds.append(time.perf_counter() - t0)
                out.append(np.asarray(mask.dataobj))
            masks.setdefault(name, out)
            return {"sec_per_scan": statistics.mean(seconds), "seconds": sum(seconds)}
        return run

    results = harness.run_interleaved({name: repeat(name) for name in built}, repeats, progress=log.info)
    for name, (_, build_s, warmup_s) in built.items():
        results["variants"][name] |= {"build_s": build_s, "warmup_s": warmup_s}
    return results, masks


def exports(run: Path, work: Path, scan: Path | None, calibration: int, needed: bool = True) -> tuple[Path, Path, dict]:
    """fp32 and int8 ONNX exports of ``run`` into ``work`` (parity-checked by ``export_model``); none if not ``needed``."""
    if not needed:
        return work / "model.onnx", work / "model.int8.onnx", {}
    t0 = time.perf_counter()
    fp32 = export_model(run, "onnx", output=work / "model.onnx", scan=scan, overwrite=True)
    t1 = time.perf_counter()
    int8 = export_model(run, "onnx", output=work / "model.int8.onnx", scan=scan, int8=True,
                        calibration_patches=calibration, overwrite=True, min_dice=0.0)
    t2 = time.perf_counter()
    info = {"fp32_export_s": t1 - t0, "int8_export_s": t2 - t1,
            "parity_fp32": [p.describe() for p in fp32.parity], "parity_int8": [p.describe() for p in int8.parity]}
    return fp32.path, int8.path, info


def summarise(bundle: ModelBundle, results: dict, masks: dict[str, list[np.ndarray]],
              references: list[np.ndarray] | None) -> dict:
    """Per variant: seconds per scan (median and range over the repeats), speed-up over eager fp32 (ratio of
    medians), the share of voxels equal to eager fp32's mask, Dice with eager's mask (mean per-class Dice), and
    with ``references`` the Dice against the reference labels and its change from eager fp32."""
    names = bundle.label_names
    eager = masks["eager fp32"]
    out: dict[str, dict] = {}
    for name, stats in results["variants"].items():
        pairs = list(zip(masks[name], eager, strict=True))
        dice_vs_eager = [statistics.mean(mask_agreement(m, e, names).values()) for m, e in pairs]
        equal = [float((m == e).mean()) for m, e in pairs]
        row = {
            "sec_per_scan": stats["sec_per_scan"],
            "speedup_vs_eager": harness.ratio(results, "eager fp32", name, "sec_per_scan"),
            "build_s": stats["build_s"], "warmup_s": stats["warmup_s"],
            "voxels_equal_to_eager_mean": statistics.mean(equal), "voxels_equal_to_eager_min": min(equal),
            "dice_vs_eager_mean": statistics.mean(dice_vs_eager), "dice_vs_eager_min": min(dice_vs_eager),
        }
        if references is not None:
            dice = [mask_agreement(m, r, names) for m, r in zip(masks[name], references, strict=True)]
            per_class = {k: statistics.mean(d[k] for d in dice) for k in dice[0]}
            row["dice_per_class"] = per_class
            row["dice_mean"] = statistics.mean(per_class.values())
        out[name] = row
    if references is not None:
        base = out["eager fp32"]["dice_mean"]
        for row in out.values():
            row["dice_change"] = row["dice_mean"] - base
    return out


def _needs_exports(args: argparse.Namespace) -> bool:
    return not args.variants or any(w in name for w in args.variants for name in ("onnxruntime", "openvino", "int8"))


def part_ct(args: argparse.Namespace, work: Path) -> dict:
    scan = big_ct(args.ct_slices, work)
    run = ct_lung_run(work / "ct_lung")
    bundle = load_bundle(run)
    shape = list(nib.load(str(scan)).shape)
    log.info("ct: %s, scan %s", bundle.spec.name, shape)
    # Parity on the middle 16 slices (80 mm) of the real CT: the checks cost 5 full-scan predictions.
    fp32, int8, info = exports(run, work, parity_crop(16, work), args.calibration, _needs_exports(args))
    head = {"scan_shape": shape, "network": "ct_lung (MONAI UNet 16-256, 2 res units; random weights)",
            "roi_size": bundle.inference.roi_size, "sw_batch_size": bundle.inference.sw_batch_size,
            "overlap": bundle.inference.overlap, "exports": info}
    factories = selected(variants(bundle, fp32, int8, None), args.variants)
    # Eager fp32 tells the window-batch sizes the sliding window uses; the others warm up on those sizes.
    recorder = BatchSizes(MainOutput(bundle.build_network()).eval())
    Predictor(recorder, bundle, CPU, mirror_axes=[]).predict_scan(scan)
    results, masks = measure(bundle, factories, [scan], args.repeats, None, recorder.sizes)
    return head | results | {"variants": summarise(bundle, results, masks, None)}


def part_hippocampus(args: argparse.Namespace, work: Path) -> dict:
    bundle = load_bundle(args.hippo_run)
    manifest = load_manifest(REPO / "data_manifests" / "hippocampus.json")
    cases = manifest.split("test")[: args.hippo_cases]
    scans = [manifest.image_path(c) for c in cases]
    labels = [np.asarray(nib.load(str(manifest.label_path(c))).dataobj).astype(np.uint8) for c in cases]
    fp32, int8, info = exports(args.hippo_run, work, scans[0], args.calibration, _needs_exports(args))
    head = {"cases": len(scans), "network": f"{bundle.network.architecture.name} (trained run {args.hippo_run.name})",
            "roi_size": bundle.inference.roi_size, "exports": info}
    factories = selected(variants(bundle, fp32, int8, args.prune), args.variants)
    results, masks = measure(bundle, factories, scans, args.repeats, scans[0])
    return head | results | {"variants": summarise(bundle, results, masks, labels)}


def section(results: dict) -> str:
    """The docs/benchmarks.md section for the parts measured so far."""
    lines = [DOCS_BEGIN, "## Export and CPU backends (`medseg export`, `medseg predict --backend`)", ""]
    for part in ("ct", "hippocampus"):
        res = results.get("parts", {}).get(part)
        if res is None:
            continue
        if part == "ct":
            lines += [f"### ct_lung network on a real-sized chest CT {'×'.join(map(str, res['scan_shape']))}", "",
                      f"{res['network']}; patch {res['roi_size']}, sw_batch {res['sw_batch_size']}, overlap "
                      f"{res['overlap']}. Seconds for the scan end to end (read, preprocess, sliding window, invert). "
                      "No trained lung model exists: the last two columns compare each mask with eager fp32's "
                      "(an untrained network's margins are small, so this understates the agreement of a trained one)."]
        else:
            lines += [f"### Hippocampus (trained) on {res['cases']} test cases", "",
                      f"{res['network']}; patch {res['roi_size']}. Seconds per scan end to end (mean over the cases); "
                      "Dice against the reference labels (mean of the two classes, mean over cases) and its change "
                      "from eager fp32."]
        lines += ["", harness.conditions(res), ""]
        hippo = part == "hippocampus"
        lines += ["| variant | s/scan, median (min–max) | speed-up vs eager fp32 (ratio of medians) | "
                  + ("Dice vs reference | Dice change | " if hippo else "")
                  + "share of voxels equal to eager fp32 (mean / min) | Dice with eager fp32's mask, mean over classes "
                  "(mean / min) | warm-up s |",
                  "|---|---|---|" + ("---|---|" if hippo else "") + "---|---|---|"]
        for name, row in res["variants"].items():
            dice = f"{row['dice_mean']:.4f} | {row['dice_change']:+.4f} | " if hippo else ""
            lines.append(f"| {name} | {harness.cell(row['sec_per_scan'])} | {row['speedup_vs_eager']:.2f}× | {dice}"
                         f"{row['voxels_equal_to_eager_mean']:.5f} / {row['voxels_equal_to_eager_min']:.5f} | "
                         f"{row['dice_vs_eager_mean']:.4f} / {row['dice_vs_eager_min']:.4f} | {row['warmup_s']:.1f} |")
        ex = res["exports"]
        lines += [""] if not ex else ["", f"Export with parity check (one run, not repeated): fp32 "
                                          f"{ex['fp32_export_s']:.0f} s, int8 (with calibration) {ex['int8_export_s']:.0f} s.", ""]
    lines += ["All figures: [`benchmarks/export_backends.json`](benchmarks/export_backends.json).", "", DOCS_END]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ct", "hippocampus", "all"], default="all")
    parser.add_argument("--ct-slices", type=int, default=200)
    parser.add_argument("--hippo-run", type=Path, default=REPO / "runs" / "mr_hippocampus")
    parser.add_argument("--hippo-cases", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="interleaved rounds over all variants")
    parser.add_argument("--calibration", type=int, default=16, help="training patches for int8 calibration")
    parser.add_argument("--prune", type=float, default=0.5, help="pruned variant's share of zeroed weights (0: none)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks" / "export_backends.json")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only the variants whose names contain one of these (eager fp32 always runs)")
    parser.add_argument("--docs", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true", help="rewrite the docs section from --output, measure nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("medseg", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    results = json.loads(args.output.read_text()) if args.output.exists() else {"parts": {}}
    parts = ["ct", "hippocampus"] if args.part == "all" else [args.part]
    for part in [] if args.docs_only else parts:
        with tempfile.TemporaryDirectory(prefix=f"bench_export_{part}_") as tmp:
            res = part_ct(args, Path(tmp)) if part == "ct" else part_hippocampus(args, Path(tmp))
        results["parts"][part] = harness.record(f"export_backends/{part}", res, bf16=bf16_supported())
        harness.write_record(results, args.output)
        print(json.dumps({k: v for k, v in res.items() if k != "exports"}, indent=2))
    if args.docs or args.docs_only:
        replace_section(REPO / "docs" / "benchmarks.md", section(results), DOCS_BEGIN, DOCS_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
