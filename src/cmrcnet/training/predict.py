"""Load a run directory and predict expression for spots of any sample (or a tissue grid).

One prediction loop (:func:`predict_into`) serves every method and every input: batches of
patches come from the sample's patch cache (:func:`table_batches`) or are cut from the slide
as they are needed (:func:`slide_batches`); the method's
:class:`~cmrcnet.models.predictors.Predictor` turns them into rows; a sink keeps the rows in
memory (:class:`ArraySink`) or writes them into an ``.h5ad`` on disk (:class:`H5adSink`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import torch

import cmrcnet
from cmrcnet.config import RunConfig, apply_overrides, from_dict
from cmrcnet.data.batches import SpotTable, spot_loader, to_float_images
from cmrcnet.data.sample import Sample
from cmrcnet.errors import ConfigError, InputError
from cmrcnet.models.base import Batch, ExpressionModel
from cmrcnet.models.encoders import weights_from_state_dict
from cmrcnet.models.predictors import Predictor
from cmrcnet.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A completed run directory, loaded: everything prediction needs, nothing from the data folder."""

    run_dir: Path
    cfg: RunConfig
    model: ExpressionModel
    genes: list[str]
    predictor: Predictor
    info: dict[str, Any] = field(default_factory=dict)
    """The run's self-description (``run.json``): markers, gene sets, split, caller's description."""

    @property
    def markers(self) -> list[str]:
        return list(self.info.get("markers", []))

    def predictor_for(self, top_k: int | None) -> Predictor:
        """The run's predictor, or the same averaging ``top_k`` neighbours (retrieval methods only)."""
        if top_k is None:
            return self.predictor
        p = self.predictor.with_top_k(int(top_k))
        if p is None:
            raise ConfigError(f"--top-k applies to retrieval methods only; {self.cfg.method!r} regresses expression")
        return p


def load_run(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainedRun:
    """Load a completed run; ``overrides`` may change its ``retrieval.*`` settings (nothing else)."""
    from cmrcnet.training.fit import build_model

    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise InputError("not a completed run directory (model.pt missing; was training interrupted?)", run_dir)
    try:
        payload = torch.load(model_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise InputError(f"cannot read the trained model ({type(e).__name__}: {e})", model_path) from None
    cfg = from_dict(payload["config"])
    bad = [k for k in (overrides or {}) if not k.startswith("retrieval.")]
    if bad:
        raise InputError(f"predict can only override retrieval.* settings, not {', '.join(bad)}")
    apply_overrides(cfg, dict(overrides or {}))
    genes = list(payload["genes"])
    info = payload.get("run") or _legacy_run_info(cfg, genes, run_dir)
    with weights_from_state_dict():  # the encoder's weights are in the state dict: no weights file needed
        model = build_model(cfg, len(genes))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return TrainedRun(run_dir, cfg, model, genes, model.load_predictor(run_dir, cfg), info)


def _legacy_run_info(cfg: RunConfig, genes: list[str], run_dir: Path) -> dict[str, Any]:
    """Runs saved before runs described themselves: markers are re-derived once, with a warning."""
    from cmrcnet.training.fit import resolve_markers

    markers = resolve_markers(cfg)
    warnings.warn(
        f"{run_dir}: run saved by an older cmrcnet without its markers; re-derived from the config and "
        f"data folder ({len(markers)} markers). Re-train it (cmrcnet train) to record them with the run.",
        UserWarning,
        stacklevel=3,
    )
    return {"method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "genes": genes, "markers": markers,
            "gene_selection": cfg.genes.selection}


# -- batch sources ----------------------------------------------------------------------------
def table_batches(table: SpotTable, batch_size: int = 256) -> Iterator[Batch]:
    """Batches of a sample's spot table (patches already cut and cached), in row order."""
    return iter(spot_loader(table, batch_size))


def slide_batches(sample: Sample, cfg: RunConfig, pos: np.ndarray, batch_size: int = 256,
                  prefetch: int = 2) -> Iterator[Batch]:
    """Batches cut from the slide as they are needed: memory does not grow with the number of spots.

    Reading and decoding (OpenSlide, JPEG, resampling: C code that releases the GIL) run in a
    background thread up to ``prefetch`` batches ahead, so they overlap the model's forward pass
    instead of adding to it; ``prefetch=0`` reads in the caller's thread.
    """
    from cmrcnet.data.patches import iter_patches

    side_px = cfg.patches.size_um / sample.um_per_px
    chunks = iter_patches(sample.image, sample.coords_px, side_px, cfg.patches.size_px, batch_size)
    start = 0
    for chunk in (read_ahead(chunks, prefetch) if prefetch > 0 else chunks):
        n = len(chunk)
        yield {
            "img": to_float_images(torch.from_numpy(np.ascontiguousarray(chunk))),
            "pos": torch.from_numpy(pos[start : start + n]),
            "index": torch.arange(start, start + n),
        }
        start += n


def read_ahead(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead; its exceptions are re-raised
    here, and stopping early (an error, Ctrl-C) stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((done, e))

    t = threading.Thread(target=produce, name="cmrcnet-read-ahead", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.1)


def _counted(batches: Iterable[Batch], progress: Callable[[int], None] | None) -> Iterator[Batch]:
    for b in batches:
        yield b
        if progress is not None:
            progress(len(b["index"]))


# -- sinks ------------------------------------------------------------------------------------
def _rows(rows: np.ndarray) -> slice | np.ndarray:
    """A slice for contiguous rows (fast h5py writes), else the index array."""
    rows = np.asarray(rows)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


class ArraySink:
    """Prediction rows kept in memory; the uncertainty matrix exists only if a predictor yields one."""

    def __init__(self, n: int, g: int) -> None:
        self.shape = (n, g)
        self.x = np.zeros(self.shape, np.float32)
        self.spread: np.ndarray | None = None

    def write(self, rows: np.ndarray, pred: np.ndarray, spread: np.ndarray | None) -> None:
        r = _rows(rows)
        self.x[r] = pred
        if spread is not None:
            if self.spread is None:
                self.spread = np.zeros(self.shape, np.float32)
            self.spread[r] = spread


class H5adSink:
    """Prediction rows written into ``X`` of an open ``.h5ad`` as they come, with
    ``layers["predicted"]`` a hard link to the same dataset (one copy on disk, two names for
    anndata) and ``layers["uncertainty"]``: the predictor's spread, or NaN where it has none."""

    def __init__(self, h5: Any, n: int, g: int) -> None:
        self.h5 = h5
        self.shape = (n, g)
        self.chunk_rows = max(1, min(n, (4 << 20) // max(1, 4 * g)))  # ~4 MB chunks
        self.x = self._dataset(h5, "X")
        layers = h5.require_group("layers")
        layers.attrs.setdefault("encoding-type", "dict")
        layers.attrs.setdefault("encoding-version", "0.1.0")
        layers["predicted"] = self.x  # HDF5 hard link: the same data under a second name
        self.spread = None

    def _dataset(self, group: Any, name: str, fill: float | None = None):
        ds = group.create_dataset(name, shape=self.shape, dtype="float32", chunks=(self.chunk_rows, self.shape[1]),
                                  fillvalue=fill)
        ds.attrs["encoding-type"] = "array"
        ds.attrs["encoding-version"] = "0.2.0"
        return ds

    def write(self, rows: np.ndarray, pred: np.ndarray, spread: np.ndarray | None) -> None:
        r = _rows(rows)
        self.x[r] = pred
        if spread is not None:
            if self.spread is None:
                self.spread = self._dataset(self.h5["layers"], "uncertainty")
            self.spread[r] = spread

    def close(self) -> None:
        """A predictor without uncertainty: a NaN layer, stored as its fill value (no disk space)."""
        self.had_spread = self.spread is not None
        if self.spread is None:
            self.spread = self._dataset(self.h5["layers"], "uncertainty", fill=np.nan)


def predict_into(
    run: TrainedRun,
    batches: Iterable[Batch],
    sink: ArraySink | H5adSink,
    predictor: Predictor | None = None,
    chunk_spots: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """The prediction loop of every method: batches -> the model's grouping -> predictor -> sink."""
    predictor = predictor or run.predictor
    with torch.no_grad():
        grouped = run.model.prediction_batches(_counted(batches, progress))
        for rows, pred, spread in predictor.predict(grouped, chunk_spots):
            sink.write(rows, pred, spread)
    if hasattr(sink, "close"):
        sink.close()


# -- outputs ----------------------------------------------------------------------------------
def _clean_uns(d: dict[str, Any]) -> dict[str, Any]:
    """h5ad cannot store None: drop such entries recursively."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _clean_uns(v) if isinstance(v, dict) else v
    return out


#: Fewest full-resolution pixels a patch may span (a wrong pixel size gives sub-pixel patches).
MIN_PATCH_SIDE_PX = 4

#: ``uns["cmrcnet"]["uncertainty"]`` of a predictor that yields no per-spot uncertainty.
NO_UNCERTAINTY = ("none: this method gives no per-spot uncertainty; layers['uncertainty'] is NaN "
                  "(not 0, which would claim certainty)")
WITH_UNCERTAINTY = "the predictor's per-spot spread (retrieval: sd of the k neighbours' expression)"


def prediction_anndata(
    run: TrainedRun,
    sample: Sample,
    barcodes: np.ndarray,
    pred: np.ndarray | None,
    spread: np.ndarray | None,
    observed: np.ndarray | None,
    predictor: Predictor | None = None,
    extra: dict[str, Any] | None = None,
) -> ad.AnnData:
    """The prediction file's AnnData; ``pred=None`` gives the skeleton a sink streams into.

    The contract, whatever the input and the method: ``layers["predicted"]`` (= ``X``),
    ``layers["uncertainty"]`` (NaN where the method has none), ``layers["observed"]`` when the
    sample has counts, ``obsm["spatial"]`` (full-resolution px), ``uns["spatial"][sample_id]``
    with ``hires`` and ``lowres`` images and their scale factors, ``var["gene_ids"]`` when the
    training data had ids, ``uns["cmrcnet"]`` describing the run.
    """
    from cmrcnet.data.readers import attach_images

    obs = pd.DataFrame(index=pd.Index(np.asarray(barcodes).astype(str), name="barcode"))
    src_obs = sample.adata.obs
    for col in ("array_row", "array_col", "in_tissue"):
        if col in src_obs:
            obs[col] = src_obs[col].reindex(obs.index).to_numpy()
    var = pd.DataFrame(index=pd.Index(run.genes, name="gene"))
    gene_ids = _gene_ids(run, sample)
    if gene_ids is not None:
        var["gene_ids"] = gene_ids
    if pred is None:  # matrices streamed to disk by an H5adSink
        out = ad.AnnData(obs=obs, var=var)
    else:
        out = ad.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=var)  # no copy when float32
        out.layers["predicted"] = out.X  # same array; written twice to disk, held once in memory
        out.layers["uncertainty"] = (np.asarray(spread, dtype=np.float32) if spread is not None
                                     else np.full(out.shape, np.nan, np.float32))
    if observed is not None:
        out.layers["observed"] = np.asarray(observed, dtype=np.float32)
    coords = sample.adata.obsm["spatial"]
    idx = sample.adata.obs_names.get_indexer(obs.index)
    out.obsm["spatial"] = np.asarray(coords, dtype=np.float64)[idx] if (idx >= 0).all() else np.asarray(coords)
    if sample.image is not None and not _has_both_images(sample):
        attach_images(sample)
    if "spatial" in sample.adata.uns:
        out.uns["spatial"] = dict(sample.adata.uns["spatial"])
    meta = {k: v for k, v in run.info.items() if k not in ("genes", "gene_ids")}
    meta.update(
        method=run.cfg.method,
        sample_id=sample.sample_id,
        patient_id=sample.patient_id,
        run_dir=str(run.run_dir),
        seed=run.cfg.seed,
        preset=run.cfg.preset,
        gene_selection=run.cfg.genes.selection,
        markers=run.markers,
        um_per_px=float(sample.um_per_px),
        pixel_size_source=sample.pixel_size_source,
        cmrcnet_version=cmrcnet.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    if "slide" in sample.meta:
        meta["slide"] = sample.meta["slide"]
    meta.update((predictor or run.predictor).describe())
    if pred is not None:
        meta["uncertainty"] = WITH_UNCERTAINTY if spread is not None else NO_UNCERTAINTY
    if observed is not None:
        measured = set(sample.adata.var_names)
        meta["unmeasured_genes"] = [g for g in run.genes if g not in measured]
    meta.update(extra or {})
    out.uns["cmrcnet"] = _clean_uns(meta)
    return out


def _has_both_images(sample: Sample) -> bool:
    entry = (sample.adata.uns.get("spatial") or {}).get(sample.sample_id) or {}
    return {"hires", "lowres"} <= set(entry.get("images") or {})


def _gene_ids(run: TrainedRun, sample: Sample) -> list[str] | None:
    """Ids of the run's genes: recorded with the run, else from the sample's ``var["gene_ids"]``."""
    ids = run.info.get("gene_ids")
    if ids is not None and len(ids) == len(run.genes):
        return [str(i) for i in ids]
    var = sample.adata.var
    if "gene_ids" in var.columns:
        by_name = dict(zip(map(str, var.index), var["gene_ids"].astype(str)))
        if any(g in by_name for g in run.genes):
            return [by_name.get(g, "") for g in run.genes]
    return None


def predict_sample(
    run: TrainedRun,
    sample: Sample,
    predictor: Predictor | None = None,
    table: SpotTable | None = None,
    extra: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predict every spot of ``sample`` from its cached patches; ``layers["observed"]`` holds its
    measured expression when known. ``predictor`` defaults to the run's (see :meth:`TrainedRun.predictor_for`)."""
    from cmrcnet.training.fit import check_gene_overlap, spot_table

    has_counts = sample.adata.n_vars > 0
    if has_counts:
        check_gene_overlap([sample], run.genes)  # e.g. a mouse section given to a human run
    if table is None:
        table = spot_table(sample, run.genes, run.cfg, with_expr=has_counts)
    sink = ArraySink(len(table), len(run.genes))
    predict_into(run, table_batches(table), sink, predictor)
    observed = table.expr if has_counts else None
    return prediction_anndata(run, sample, table.barcodes, sink.x, sink.spread, observed, predictor, extra)


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


@torch.no_grad()
def predict_streaming(
    run: TrainedRun,
    sample: Sample,
    predictor: Predictor | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    out: str | Path | None = None,
    chunk_spots: int = 4096,
    prefetch: int = 2,
) -> ad.AnnData:
    """Predict without holding all patches in memory (whole-slide grids).

    Patches are cut from the slide batch by batch; a retrieval predictor searches every
    ``chunk_spots`` embeddings. With ``out`` the prediction is written to that ``.h5ad`` as it
    is computed (``X`` = ``layers["predicted"]`` and ``layers["uncertainty"]`` filled block by
    block; atomic: the file appears only when complete, and a failure or interrupt removes the
    temporary file) and returned opened backed (:func:`open_backed`): peak memory is then
    independent of the number of spots. Without ``out`` the matrices are returned in memory.
    A model that predicts from the whole slide at once (HisToGene) regroups the batches
    itself (:meth:`ExpressionModel.prediction_batches`), and holds the slide's patches.
    """
    from cmrcnet.training.fit import spot_positions

    if sample.image is None:
        raise InputError("sample has no image to predict from", sample.sample_id)
    side_px = run.cfg.patches.size_um / sample.um_per_px
    if not side_px >= MIN_PATCH_SIDE_PX:
        raise InputError(
            f"a {run.cfg.patches.size_um:g} um patch is only {side_px:.3g} px at {sample.um_per_px:g} um/px (at least "
            f"{MIN_PATCH_SIDE_PX} px needed): is the pixel size (--um-per-px) right?", sample.image.path)
    n, g = sample.n_spots, len(run.genes)
    observed = None
    if sample.adata.n_vars > 0:
        from cmrcnet.data.genes import expression_matrix

        observed = expression_matrix(sample, run.genes, run.cfg.genes.target_sum)
    pos = spot_positions(sample)
    barcodes = np.asarray(sample.adata.obs_names.astype(str))
    batches = slide_batches(sample, run.cfg, pos, batch_size, prefetch)
    if out is None:
        sink = ArraySink(n, g)
        predict_into(run, batches, sink, predictor, chunk_spots, progress)
        sample.image.release()
        return prediction_anndata(run, sample, barcodes, sink.x, sink.spread, observed, predictor)
    import h5py

    out = Path(out)
    skeleton = prediction_anndata(run, sample, barcodes, None, None, observed, predictor)
    with atomic_path(out) as tmp:
        skeleton.write_h5ad(tmp)
        del skeleton
        with h5py.File(tmp, "a") as h5:
            sink = H5adSink(h5, n, g)
            predict_into(run, batches, sink, predictor, chunk_spots, progress)
            _write_uns_entry(h5, "uncertainty", WITH_UNCERTAINTY if sink.had_spread else NO_UNCERTAINTY)
    sample.image.release()
    return open_backed(out)


def _elem_io():
    try:
        from anndata.io import read_elem, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, write_elem
    return read_elem, write_elem


def _write_uns_entry(h5: Any, key: str, value: str) -> None:
    _, write_elem = _elem_io()
    write_elem(h5["uns"]["cmrcnet"], key, value)


def open_backed(path: str | Path) -> ad.AnnData:
    """A prediction file opened backed: ``X`` (= the predicted matrix) stays on disk and is read
    on access; obs, var, obsm and uns are loaded; the layers are not (``ad.read_h5ad(path)``
    reads everything). Memory is then independent of the number of spots, unlike
    ``ad.read_h5ad(path, backed="r")``, which loads every layer."""
    import h5py

    read_elem, _ = _elem_io()
    path = Path(path)
    with h5py.File(path, "r") as f:
        parts = {k: read_elem(f[k]) for k in ("obs", "var", "obsm", "uns") if k in f}
    return ad.AnnData(**parts, filename=path, filemode="r")
