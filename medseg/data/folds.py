"""Seeded cross-validation folds with a held-out test set, written into a manifest's ``folds``/``splits``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import ManifestError


def cross_validation_folds(case_ids: Sequence[str], num_folds: int = 5, seed: int = 0,
                           num_test: int = 0) -> tuple[list[dict[str, list[str]]], list[str]]:
    """``num_folds`` train/val folds over the cases left after holding out ``num_test`` for testing.

    Deterministic for a given seed and set of ids (their order does not matter): ids are sorted, then
    permuted with ``numpy.random.default_rng(seed)``. Each case is in exactly one fold's ``val``; the test
    cases are in no fold. Returns ``(folds, test_ids)``, each list sorted.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ManifestError("case ids must be unique to make folds")
    if num_folds < 2:
        raise ManifestError(f"need at least 2 folds, got {num_folds}")
    if len(ids) - num_test < num_folds:
        raise ManifestError(f"{len(ids)} cases minus {num_test} held out are too few for {num_folds} folds")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    test, rest = sorted(order[:num_test]), order[num_test:]
    chunks = [sorted(c.tolist()) for c in np.array_split(np.array(rest, dtype=object), num_folds)]
    folds = [{"train": sorted(x for j, c in enumerate(chunks) if j != k for x in c), "val": chunks[k]}
             for k in range(num_folds)]
    return folds, test
