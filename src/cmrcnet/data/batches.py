"""From spot tables to batches: the one batch format every method reads, and fast loaders.

Patches stay uint8 in RAM; a batch is gathered with one fancy-indexing call and
converted to float on the fly, so the loader never touches AnnData or HDF5 per item.
A batch is a dict (see :mod:`cmrcnet.models.base`): ``img`` float32 ``(B, 3, H, W)``
normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`, ``expr``, ``pos``, ``index``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

#: ImageNet channel statistics every batch is normalised with (0-1 pixel scale).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_STD_255 = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0


@dataclass
class SpotTable:
    """All spots of a set of samples, concatenated: the unit every loader reads from.

    ``features`` holds per-spot arrays with a view axis, ``(N, V, ...)``: precomputed encoder
    outputs of a frozen encoder (``feat``, ``tokens``), one per dihedral view. A batch carries
    one view per spot (a random one when augmenting). A table of features needs no images
    (``imgs`` None): training epochs then never touch a patch.
    """

    imgs: np.ndarray | None  # (N, S, S, 3) uint8
    expr: np.ndarray  # (N, G) float32 (zeros when unknown)
    pos: np.ndarray  # (N, 2) int64
    sample_ids: np.ndarray  # (N,) str
    barcodes: np.ndarray  # (N,) str
    slide_index: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.expr.shape[0])

    def subset(self, rows: np.ndarray) -> "SpotTable":
        rows = np.asarray(rows)
        imgs = None if self.imgs is None else self.imgs[rows]
        t = SpotTable(imgs, self.expr[rows], self.pos[rows], self.sample_ids[rows], self.barcodes[rows],
                      features={k: v[rows] for k, v in self.features.items()})
        t.slide_index = _slide_index(t.sample_ids)
        return t

    def with_features(self, features: dict[str, np.ndarray], keep_images: bool = False) -> "SpotTable":
        """This table with ``features`` (``(N, V, ...)`` arrays), its images dropped unless kept."""
        for k, v in features.items():
            if v.shape[0] != len(self):
                raise ValueError(f"feature {k!r} has {v.shape[0]} rows for {len(self)} spots")
        t = SpotTable(self.imgs if keep_images else None, self.expr, self.pos, self.sample_ids, self.barcodes,
                      dict(self.slide_index), dict(features))
        return t

    @property
    def spot_ids(self) -> np.ndarray:
        return np.char.add(np.char.add(self.sample_ids.astype(str), ":"), self.barcodes.astype(str))


def _slide_index(sample_ids: np.ndarray) -> dict[str, np.ndarray]:
    return {sid: np.flatnonzero(sample_ids == sid) for sid in dict.fromkeys(sample_ids.tolist())}


def concat_tables(parts: list[SpotTable]) -> SpotTable:
    keys = set(parts[0].features)
    if any(set(p.features) != keys for p in parts) or len({p.imgs is None for p in parts}) > 1:
        raise ValueError("cannot concatenate spot tables holding different inputs (images vs features)")
    t = SpotTable(
        None if parts[0].imgs is None else np.concatenate([p.imgs for p in parts]),
        np.concatenate([p.expr for p in parts]).astype(np.float32, copy=False),
        np.concatenate([p.pos for p in parts]).astype(np.int64, copy=False),
        np.concatenate([p.sample_ids for p in parts]),
        np.concatenate([p.barcodes for p in parts]),
        features={k: np.concatenate([p.features[k] for p in parts]) for k in keys},
    )
    t.slide_index = _slide_index(t.sample_ids)
    return t


def to_float_images(imgs_uint8: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, ImageNet-normalised."""
    x = imgs_uint8.permute(0, 3, 1, 2).float()
    return (x - _MEAN_255) / _STD_255


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/90-degree rotations of (..., H, W) images (k in 0..7)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


class BatchedSpots(Dataset):
    """Dataset whose ``__getitem__`` takes a list of rows and returns a whole batch."""

    def __init__(self, table: SpotTable, augment: bool = False, seed: int = 0) -> None:
        self.table = table
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows_arr = np.asarray(rows, dtype=np.int64)
        out = {
            "expr": torch.from_numpy(self.table.expr[rows_arr]),
            "pos": torch.from_numpy(self.table.pos[rows_arr]),
            "index": torch.from_numpy(rows_arr),
        }
        if self.table.imgs is not None:
            imgs = torch.from_numpy(np.ascontiguousarray(self.table.imgs[rows_arr]))
            if self.augment:
                ks = self.rng.integers(0, 8, size=len(rows_arr))
                imgs = torch.stack([dihedral(im.permute(2, 0, 1), int(k)).permute(1, 2, 0) for im, k in zip(imgs, ks)])
            out["img"] = to_float_images(imgs)
        if self.table.features:
            n_views = next(iter(self.table.features.values())).shape[1]
            views = self.rng.integers(0, n_views, size=len(rows_arr)) if self.augment and n_views > 1 else np.zeros(len(rows_arr), np.int64)
            for key, arr in self.table.features.items():
                out[key] = torch.from_numpy(np.asarray(arr[rows_arr, views], dtype=np.float32))
        return out


class SlideSampler(Sampler[list[int]]):
    """Yields all rows of one slide per batch (HisToGene-style sequence models)."""

    def __init__(self, table: SpotTable, shuffle: bool, seed: int = 0) -> None:
        self.groups = list(table.slide_index.values())
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        order = self.rng.permutation(len(self.groups)) if self.shuffle else np.arange(len(self.groups))
        for i in order:
            yield self.groups[int(i)].tolist()


def spot_loader(
    table: SpotTable,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of ``batch_size`` spots (in table order unless ``shuffle``)."""
    ds = BatchedSpots(table, augment=augment, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    base = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
    return _loader(ds, BatchSampler(base, batch_size=batch_size, drop_last=drop_last), num_workers)


def slide_loader(
    table: SpotTable, *, shuffle: bool = False, augment: bool = False, seed: int = 0, num_workers: int = 0
) -> DataLoader:
    """One batch per slide holding all of its spots (for slide-level sequence models)."""
    ds = BatchedSpots(table, augment=augment, seed=seed)
    return _loader(ds, SlideSampler(table, shuffle=shuffle, seed=seed), num_workers)


def _loader(ds: Dataset, sampler: Sampler, num_workers: int) -> DataLoader:
    return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def concat_batches(batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch holding the rows of ``batches`` in order (empty dict when there are none)."""
    parts = list(batches)
    if not parts:
        return {}
    return {key: torch.cat([b[key] for b in parts]) for key in parts[0]}
