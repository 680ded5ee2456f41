"""Load a run directory and predict expression for spots of any sample (or a tissue grid)."""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

import cmrcnet
from cmrcnet.config import RunConfig, from_dict
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError
from cmrcnet.models.base import ExpressionModel
from cmrcnet.training.data import SpotTable, make_loader
from cmrcnet.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: RunConfig
    model: ExpressionModel
    genes: list[str]
    bank: Any | None  # cmrcnet.retrieval.Bank for retrieval methods

    @property
    def kind(self) -> str:
        return type(self.model).kind


def load_run(run_dir: str | Path) -> TrainedRun:
    from cmrcnet.training.fit import build_model

    run_dir = Path(run_dir)
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise InputError("not a completed run directory (model.pt missing; was training interrupted?)", run_dir)
    payload = torch.load(model_path, map_location="cpu", weights_only=False)
    cfg = from_dict(payload["config"])
    genes = list(payload["genes"])
    model = build_model(cfg, len(genes))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    bank = None
    if type(model).kind == "retrieval":
        from cmrcnet.retrieval import Bank

        bank_path = run_dir / "bank.npz"
        if not bank_path.is_file():
            raise InputError("retrieval run has no reference bank (bank.npz)", run_dir)
        bank = Bank.load(bank_path)
    return TrainedRun(run_dir, cfg, model, genes, bank)


@torch.no_grad()
def embed_table(model: ExpressionModel, table: SpotTable, batch_size: int = 256) -> np.ndarray:
    loader = make_loader(table, batch_size, False, False, "spot", 0)
    out = [model.embed_images(b["img"]).float().cpu().numpy() for b in loader]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


@torch.no_grad()
def predict_table(
    run: TrainedRun, table: SpotTable, top_k: int | None = None, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted expression (N, G) and, for retrieval methods, the neighbours' spread (N, G)."""
    model = run.model
    model.eval()
    if run.kind == "retrieval":
        from cmrcnet.retrieval import predict_from_neighbours, search

        rc = run.cfg.retrieval
        k = int(top_k or rc.top_k)
        k = min(k, len(run.bank.embeddings))
        q = embed_table(model, table, batch_size)
        sims, idx = search(q, run.bank.embeddings, k, backend=rc.backend, auto_exact_max=rc.auto_exact_max)
        pred, spread = predict_from_neighbours(sims, idx, run.bank.expression, rc.weighting)
        return pred.astype(np.float32), spread.astype(np.float32)
    batching = type(model).batching
    loader = make_loader(table, batch_size, False, False, batching, 0)
    preds = np.zeros((len(table), len(run.genes)), np.float32)
    for b in loader:
        preds[b["index"].numpy()] = model.predict_expression(b).float().cpu().numpy()
    return preds, None


def _clean_uns(d: dict[str, Any]) -> dict[str, Any]:
    """h5ad cannot store None: drop such entries recursively."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _clean_uns(v) if isinstance(v, dict) else v
    return out


def prediction_anndata(
    run: TrainedRun,
    sample: Sample,
    table: SpotTable,
    pred: np.ndarray,
    spread: np.ndarray | None,
    observed: np.ndarray | None,
    top_k: int | None,
    extra: dict[str, Any] | None = None,
) -> ad.AnnData:
    from cmrcnet.data.readers import attach_lowres

    obs = pd.DataFrame(index=pd.Index(table.barcodes.astype(str), name="barcode"))
    src_obs = sample.adata.obs
    for col in ("array_row", "array_col", "in_tissue"):
        if col in src_obs:
            obs[col] = src_obs[col].reindex(obs.index).to_numpy()
    pred = np.asarray(pred, dtype=np.float32)  # no copy when already float32 (whole-slide memory)
    out = ad.AnnData(X=pred, obs=obs, var=pd.DataFrame(index=pd.Index(run.genes, name="gene")))
    out.layers["predicted"] = out.X  # same array; written twice to disk, held once in memory
    if observed is not None:
        out.layers["observed"] = np.asarray(observed, dtype=np.float32)
    if spread is not None:
        out.layers["uncertainty"] = np.asarray(spread, dtype=np.float32)
    coords = sample.adata.obsm["spatial"]
    idx = sample.adata.obs_names.get_indexer(obs.index)
    out.obsm["spatial"] = np.asarray(coords, dtype=np.float64)[idx] if (idx >= 0).all() else np.asarray(coords)
    if "spatial" not in sample.adata.uns and sample.image is not None:
        attach_lowres(sample)
    if "spatial" in sample.adata.uns:
        out.uns["spatial"] = dict(sample.adata.uns["spatial"])
    cfg = run.cfg
    from cmrcnet.training.fit import resolve_markers

    meta = {
        "method": cfg.method,
        "sample_id": sample.sample_id,
        "patient_id": sample.patient_id,
        "run_dir": str(run.run_dir),
        "top_k": int(top_k or cfg.retrieval.top_k) if run.kind == "retrieval" else -1,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "gene_selection": cfg.genes.selection,
        "markers": list(resolve_markers(cfg)),
        "um_per_px": float(sample.um_per_px),
        "cmrcnet_version": cmrcnet.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if observed is not None:
        measured = set(sample.adata.var_names)
        meta["unmeasured_genes"] = [g for g in run.genes if g not in measured]
    meta.update(extra or {})
    out.uns["cmrcnet"] = _clean_uns(meta)
    return out


def predict_sample(
    run: TrainedRun,
    sample: Sample,
    top_k: int | None = None,
    table: SpotTable | None = None,
    extra: dict[str, Any] | None = None,
) -> ad.AnnData:
    """Predict every spot of ``sample``; ``layers["observed"]`` holds its measured expression when known."""
    from cmrcnet.training.fit import sample_table

    has_counts = sample.adata.n_vars > 0
    if table is None:
        table = sample_table(sample, run.genes, run.cfg, with_expr=has_counts)
    pred, spread = predict_table(run, table, top_k)
    observed = table.expr if has_counts else None
    return prediction_anndata(run, sample, table, pred, spread, observed, top_k, extra)


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


@torch.no_grad()
def predict_streaming(
    run: TrainedRun, sample: Sample, top_k: int | None = None, batch_size: int = 256, progress=None
) -> ad.AnnData:
    """Predict without holding all patches in memory (whole-slide grids): patches are cut,
    embedded or regressed, and dropped batch by batch. Slide-level sequence models need the
    whole slide at once and fall back to :func:`predict_sample`."""
    from cmrcnet.data.patches import iter_patches
    from cmrcnet.training.data import to_float_images
    from cmrcnet.training.fit import spot_positions

    model = run.model
    if type(model).batching == "slide":
        return predict_sample(run, sample, top_k)
    if sample.image is None:
        raise InputError("sample has no image to predict from", sample.sample_id)
    side_px = run.cfg.patches.size_um / sample.um_per_px
    pos_all = spot_positions(sample)
    outs: list[np.ndarray] = []
    start = 0
    for chunk in iter_patches(sample.image, sample.coords_px, side_px, run.cfg.patches.size_px, batch_size):
        n = len(chunk)
        x = to_float_images(torch.from_numpy(np.ascontiguousarray(chunk)))
        if run.kind == "retrieval":
            outs.append(model.embed_images(x).float().numpy())
        else:
            b = {"img": x, "pos": torch.from_numpy(pos_all[start : start + n]), "index": torch.arange(start, start + n)}
            outs.append(model.predict_expression(b).float().numpy())
        start += n
        if progress is not None:
            progress(n)
    sample.image.release()
    spread = None
    if run.kind == "retrieval":
        from cmrcnet.retrieval import predict_from_neighbours, search

        rc = run.cfg.retrieval
        k = min(int(top_k or rc.top_k), len(run.bank.embeddings))
        sims, idx = search(np.concatenate(outs), run.bank.embeddings, k, backend=rc.backend, auto_exact_max=rc.auto_exact_max)
        pred, spread = predict_from_neighbours(sims, idx, run.bank.expression, rc.weighting)
    else:
        pred = np.concatenate(outs)
    table = SpotTable(
        imgs=np.zeros((len(pred), 1, 1, 3), np.uint8),
        expr=np.zeros((len(pred), 0), np.float32),
        pos=pos_all,
        sample_ids=np.array([sample.sample_id] * len(pred)),
        barcodes=np.asarray(sample.adata.obs_names.astype(str)),
    )
    observed = None
    if sample.adata.n_vars > 0:
        from cmrcnet.data.genes import expression_matrix

        observed = expression_matrix(sample, run.genes, run.cfg.genes.target_sum)
    return prediction_anndata(run, sample, table, pred, spread, observed, top_k)
