"""Evaluation gene sets, chosen per held-out sample from its own ground truth.

The paper (and the authors' code) score the top-k highly expressed genes (HEG)
and highly variable genes (HVG) *of the held-out sample*, among the genes the
model predicts, plus a fixed per-dataset list of marker genes. Choosing the
sets on the test sample's ground truth is deliberate: it is what the published
numbers mean, and it does not leak into training (only into which genes are
scored).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from cmrcnet.errors import InputError

DEFAULT_KS: tuple[int, ...] = (50, 150, 250)
"""Sizes of the HEG / HVG sets scored for every prediction."""

TABLE2_TOP_K: dict[int, int] = {150: 250, 250: 500}
"""The paper's Table 2: HEG/HVG-150 are scored on predictions averaging k = 250 neighbours,
HEG/HVG-250 on k = 500 (the benchmark writes those predictions for retrieval methods)."""


def _check(observed: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    obs = np.asarray(observed, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[1] != len(genes):
        raise InputError(f"observed has shape {obs.shape}, expected (spots, {len(genes)} genes)")
    return obs


def _top(scores: np.ndarray, genes: Sequence[str], k: int) -> list[str]:
    """Genes with the k largest scores, best first; ties keep the input gene order."""
    if k <= 0:
        return []
    order = np.argsort(-scores, kind="stable")[:k]
    return [str(genes[i]) for i in order]


def top_expressed(observed: np.ndarray, genes: Sequence[str], k: int) -> list[str]:
    """HEG: the k genes with the highest mean expression in the held-out ground truth.

    Mean and total give the same ranking (the authors rank by total). Fewer than k
    genes are returned when fewer are predicted.
    """
    obs = _check(observed, genes)
    return _top(np.nanmean(obs, axis=0), genes, k)


def top_variable(observed: np.ndarray, genes: Sequence[str], k: int) -> list[str]:
    """HVG: the k genes with the highest variance across spots in the held-out ground truth."""
    obs = _check(observed, genes)
    return _top(np.nanvar(obs, axis=0), genes, k)


def marker_genes(markers: Sequence[str], genes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``markers`` into (present, missing) among the predicted ``genes``.

    An exact match wins; otherwise a case-insensitive match is accepted (mouse
    symbols such as ``Gata3`` vs human ``GATA3``), reported under the predicted
    name. Missing markers are warned about, never silently dropped.
    """
    exact = {str(g) for g in genes}
    lower: dict[str, str] = {}
    for g in genes:
        lower.setdefault(str(g).lower(), str(g))
    present: list[str] = []
    missing: list[str] = []
    for m in markers:
        m = str(m)
        hit = m if m in exact else lower.get(m.lower())
        if hit is None:
            missing.append(m)
        elif hit not in present:
            present.append(hit)
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(markers)} marker genes are not among the predicted genes: "
            + ", ".join(missing),
            stacklevel=2,
        )
    return present, missing


def evaluation_sets(
    observed: np.ndarray,
    genes: Sequence[str],
    markers: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, list[str]]:
    """All evaluation sets of one held-out sample.

    Keys: ``HEG{k}`` and ``HVG{k}`` for each k, ``markers`` (possibly empty) and
    ``all`` (every predicted gene, the set behind most published averages).
    """
    obs = _check(observed, genes)
    mean, var = np.nanmean(obs, axis=0), np.nanvar(obs, axis=0)  # once, not per k
    sets: dict[str, list[str]] = {}
    for k in ks:
        sets[f"HEG{k}"] = _top(mean, genes, k)
        sets[f"HVG{k}"] = _top(var, genes, k)
    sets["markers"] = marker_genes([] if markers is None else list(markers), genes)[0]
    sets["all"] = [str(g) for g in genes]
    return sets
