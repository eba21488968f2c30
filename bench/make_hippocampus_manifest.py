"""Write data_manifests/hippocampus.json: the 208 MSD Task04 cases in ../shared/data/hippocampus, 40 held
out for testing and 5 seeded cross-validation folds over the other 168 (``splits`` = fold 0 + test).

Run from the repository root:  python bench/make_hippocampus_manifest.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.data.folds import cross_validation_folds
from medseg.data.manifest import Manifest, ManifestCase, load_manifest, save_manifest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--output", type=Path, default=REPO / "data_manifests" / "hippocampus.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=40, help="cases held out of every fold")
    args = parser.parse_args()

    images = sorted((args.data / "images").glob("hippocampus_*.nii.gz"))
    rel = Path("../../shared/data/hippocampus")  # relative to data_manifests/, as the repo sits beside shared/
    cases = [ManifestCase(id=p.name.removesuffix(".nii.gz"), image=(rel / "images" / p.name).as_posix(),
                          label=(rel / "labels" / p.name).as_posix()) for p in images]
    folds, test = cross_validation_folds([c.id for c in cases], num_folds=5, seed=args.seed, num_test=args.test)
    manifest = Manifest(
        name="hippocampus",
        description=("MSD Task04 Hippocampus (208 of the 260 public training cases, T2 MRI, 1 mm, cropped): "
                     f"{len(test)} held-out test cases, 5 folds over the other {len(cases) - len(test)} "
                     f"(seed {args.seed}, bench/make_hippocampus_manifest.py). CC BY-SA 4.0; Antonelli et al., "
                     "Nature Communications 13, 4128 (2022); Simpson et al., arXiv:1902.09063 (2019)."),
        modality="MR",
        labels={0: "background", 1: "anterior", 2: "posterior"},
        cases=cases,
        splits={"train": folds[0]["train"], "val": folds[0]["val"], "test": test},
        folds=folds,
        allow_paths_outside_root=True,
    )
    save_manifest(manifest, args.output)
    load_manifest(args.output)  # every listed file exists
    print(f"wrote {args.output}: {len(cases)} cases, {len(test)} test, folds of "
          f"{[len(f['val']) for f in folds]} validation cases")


if __name__ == "__main__":
    main()
