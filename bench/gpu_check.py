"""The GPU checks of bench/gpu_check.sh, one JSON line per check (see that script for how to run it).

1. ``amp_train``: AMP (bfloat16 autocast) training steps of the ct_lung network: finite loss, steps/s.
2. ``compile``: ``torch.compile`` of the network: same output as eager (max abs difference), first-call and
   steady-state seconds.
3. ``sliding_window``: the predictor's sliding window keeps windows and stitched probabilities on the device
   (probability tensor device, peak device memory), labels equal to float32 eager on a small CT crop.
4. ``ct_end_to_end``: ``predict_paths`` on a 512x512x300 CT (built from ../shared/data/lung_ct, else a
   synthetic CT of that size): seconds, peak device memory.

The timed checks (AMP steps, the compiled network's steady call, the CT end to end) are the variants of
bench/harness.py: interleaved, ``--repeats`` rounds, median and min-max. Each check's JSON line (its first
repeat) is printed as before; ``--json`` writes the harness record (machine, load average, command,
commit) with all repeats, and ``--out OUT`` also writes it as ``OUT/gpu_check.json``.

``--small`` shrinks everything (network, patch, CT) so that the script's logic can be checked on a CPU:

    PYTHONPATH=$PWD python bench/gpu_check.py --small --skip-compile --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

from medseg.config import config_from_dict  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.inference.runner import predict_paths  # noqa: E402
from medseg.models.bundle import ModelBundle, build_model  # noqa: E402


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with (out / "gpu_check.jsonl").open("a") as f:
            f.write(line + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def make_config(small: bool):
    raw = yaml.safe_load((REPO / "configs" / "ct_lung.yaml").read_text())
    raw["data"]["manifest"] = str(REPO / "data_manifests" / "lung_ct.json")
    if small:
        raw["model"]["channels"] = [4, 8, 16, 32, 64]
        raw["train"]["patch_size"] = [64, 64, 16]
    return config_from_dict(raw, source="ct_lung.yaml (gpu check)")


def amp_train(config, device: torch.device, steps: int) -> dict:
    torch.manual_seed(0)
    net = build_model(config.model, 1, 2).to(device).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(config.train.batch_size, 1, *config.train.patch_size, device=device)
    y = (x > 0.5).long()[:, 0]
    losses, start = [], 0.0
    for step in range(steps + 1):
        if step == 1:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    sync(device)
    return {"check": "amp_train", "steps_per_s": steps / (time.perf_counter() - start), "loss_first": losses[0],
            "loss_last": losses[-1], "finite": bool(np.isfinite(losses).all()), "peak_gib": peak_gib(device)}


def compiled(config, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = build_model(config.model, 1, 2).to(device).eval()
    x = torch.randn(2, 1, *config.train.patch_size, device=device)
    fast = torch.compile(net)
    with torch.no_grad():
        eager = net(x)
        start = time.perf_counter()
        first = fast(x)
        sync(device)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(5):
            fast(x)
        sync(device)
        steady = (time.perf_counter() - start) / 5
    return {"check": "compile", "max_abs_diff": float((first - eager).abs().max()), "first_call_s": first_s,
            "steady_call_s": steady}


def bundle_file(config, work: Path) -> Path:
    torch.manual_seed(0)
    net = build_model(config.model, 1, 2)
    path = work / "gpu_check_model.pt"
    ModelBundle.from_config(config, {0: "background", 1: "lesion"}, 1).with_weights(net.state_dict()).save(path)
    return path


def ct(shape: tuple[int, int, int], work: Path) -> Path:
    """A CT of ``shape``: the real lung CT (centre crop in-plane, resampled along z) when ../shared is
    present, else synthetic."""
    path = work / f"ct_{'x'.join(map(str, shape))}.nii.gz"
    lung = REPO.parent / "shared" / "data" / "lung_ct" / "lung1_ct.nii.gz"
    if lung.is_file():
        from scipy import ndimage

        img = nib.load(lung)
        x0, y0 = (img.shape[0] - shape[0]) // 2, (img.shape[1] - shape[1]) // 2
        z0 = max(img.shape[2] - shape[2], 0) // 2  # small CTs: a crop in z too, at the scan's spacing
        crop = img.slicer[x0:x0 + shape[0], y0:y0 + shape[1], z0:z0 + min(shape[2], img.shape[2])]
        data = np.asarray(crop.dataobj).astype(np.float32)
        ratio = shape[2] / data.shape[2]
        data = ndimage.zoom(data, (1, 1, ratio), order=1, grid_mode=True, mode="nearest")
        affine = crop.affine.copy()
        affine[:3, 2] /= ratio
        affine[:3, 3] += crop.affine[:3, 2] * (1 / ratio - 1) / 2  # same extent along z
    else:
        rng = np.random.default_rng(0)
        data = rng.normal(-700, 200, shape).astype(np.float32)
        affine = np.diag([0.7, 0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), path)
    return path


def sliding_window(model: Path, device: torch.device, work: Path, shape: tuple[int, int, int]) -> dict:
    scan = nib.load(ct(shape, work))
    scan = nib.Nifti1Image(np.asarray(scan.dataobj), scan.affine)
    predictor = Predictor.from_checkpoint(model, str(device))
    seen: dict[str, str] = {}
    probabilities = predictor.probabilities

    def spy(image: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = probabilities(image, *args, **kwargs)
        seen["device"] = out.device.type
        return out

    predictor.probabilities = spy  # type: ignore[method-assign]
    labels = np.asarray(predictor.predict_image(scan).dataobj)
    reference = Predictor.from_checkpoint(model, "cpu")
    reference.settings = reference.settings.model_copy(update={"precision": "float32"})
    expected = np.asarray(reference.predict_image(scan).dataobj)
    return {"check": "sliding_window", "probabilities_on": seen.get("device"), "device": device.type,
            "agreement_with_cpu_float32": float((labels == expected).mean()), "peak_gib": peak_gib(device)}


def end_to_end(model: Path, device: torch.device, work: Path, shape: tuple[int, int, int]) -> dict:
    path = ct(shape, work)
    predictor = Predictor.from_checkpoint(model, str(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = predict_paths(model, [path], work / "masks", overwrite=True, predictor=predictor)
    sync(device)
    return {"check": "ct_end_to_end", "shape": list(shape), "seconds": time.perf_counter() - start,
            "written": len(summary.written), "failed": [f.message for f in summary.failed], "peak_gib": peak_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes: checks the logic on a CPU")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_gpu_check"))
    parser.add_argument("--out", type=Path, default=None,
                        help="also append the JSON lines to OUT/gpu_check.jsonl and write the record to OUT/gpu_check.json")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    config = make_config(args.small)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    emit({"check": "device", "device": device.type, "name": name, "torch": torch.__version__}, args.out)
    model = bundle_file(config, args.work)
    emit(sliding_window(model, device, args.work, (96, 96, 12) if args.small else (192, 192, 48)), args.out)
    steps = 1 if args.small else 20
    shape = (96, 96, 12) if args.small else (512, 512, 300)
    checks = {"amp_train": lambda: amp_train(config, device, steps=steps),
              "compile": lambda: compiled(config, device),
              "ct_end_to_end": lambda: end_to_end(model, device, args.work, shape)}
    if args.skip_compile:
        checks.pop("compile")
    seconds_of = {"amp_train": lambda r: steps / r["steps_per_s"], "compile": lambda r: r["steady_call_s"],
                  "ct_end_to_end": lambda r: r["seconds"]}

    def variant(check: str):
        def run(repeat: int) -> dict:
            result = checks[check]()
            if repeat == 0:
                emit(result, args.out)
            return {**{k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)},
                    "seconds": seconds_of[check](result)}
        return run

    measured = harness.run_interleaved({check: variant(check) for check in checks}, args.repeats)
    record = harness.record("gpu_check", measured, device=device.type, device_name=name, small=args.small,
                            notes="seconds: amp_train: the timed steps (after one warm-up step); compile: one steady "
                                  "call of the compiled network; ct_end_to_end: predict_paths on the CT")
    if args.json:
        print("written:", harness.write_record(record, args.json))
    if args.out is not None:
        harness.write_record(record, args.out.resolve() / "gpu_check.json")


if __name__ == "__main__":
    main()
