"""Train one method on one fold and write a self-contained run directory.

Run directory layout::

    RUN/config.yaml    resolved configuration (seed included)
    RUN/split.json     train/test sample ids and validation spots
    RUN/genes.txt      the predicted genes, in model order
    RUN/run.json       what the run is: method, genes, markers, evaluation gene sets, split,
                       the caller's description (e.g. an ablation variant and its overrides)
    RUN/checkpoints/   Lightning checkpoints (best by validation loss, last)
    RUN/logs/          CSV logs
    RUN/model.pt       final weights + config + genes + run.json's content (what ``predict`` loads)
    RUN/bank.npz       retrieval methods: the predictor's artifacts (:meth:`Predictor.save`)
    RUN/done.json      written last: the run is complete (``--resume`` skips it)

Prediction needs only this folder: it never reads the training data again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import cmrcnet
from cmrcnet.config import RunConfig
from cmrcnet.data.batches import SpotTable, concat_tables
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputError
from cmrcnet.models import get_method
from cmrcnet.models.base import ExpressionModel
from cmrcnet.runtime import resolve_precision
from cmrcnet.utils import atomic_path, seed_everything, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """Everything a method needs for one fold, already in model space."""

    genes: list[str]
    train: SpotTable
    val: SpotTable | None
    test: dict[str, SpotTable]
    train_ids: list[str]
    test_ids: list[str]
    markers: list[str]
    samples: dict[str, SpotTable] = field(default_factory=dict)
    """Every spot of each training sample (before the validation split), in ``train_ids`` order."""
    val_masks: dict[str, np.ndarray] = field(default_factory=dict)
    """Per training sample: which of its spots are validation spots."""
    train_shuffled: np.ndarray | None = None
    """The permutation applied to training expression (``train.shuffle_labels``)."""

    @property
    def reference(self) -> SpotTable:
        """Every labelled training spot, validation spots included (a retrieval bank, a closed-form fit)."""
        return self.train if self.val is None else concat_tables([self.train, self.val])

    def with_features(self, encode: Callable[[str, SpotTable], dict[str, np.ndarray]]) -> "FoldData":
        """The same fold whose training and validation tables carry ``encode(sample_id, table)``'s
        per-spot features instead of patches (one call per whole training sample, so a cache keyed
        by sample is shared by every fold, seed and validation split)."""
        if not self.samples:
            raise ValueError("FoldData.with_features needs the per-sample tables (prepare_fold keeps them)")
        feats = {sid: t.with_features(encode(sid, t)) for sid, t in self.samples.items()}
        train, val = split_tables(feats, self.val_masks)
        if len(train) != len(self.train):
            raise ValueError("feature tables disagree with the fold's training spots")
        if self.train_shuffled is not None:  # the negative control keeps its shuffled labels
            train.expr = self.train.expr
        return dataclasses.replace(self, train=train, val=val, samples=feats)


def split_tables(parts: dict[str, SpotTable], val_masks: dict[str, np.ndarray]) -> tuple[SpotTable, SpotTable | None]:
    """Training and validation tables of per-sample tables and their validation masks."""
    tr = concat_tables([t.subset(np.flatnonzero(~val_masks[i])) for i, t in parts.items()])
    va_parts = [t.subset(np.flatnonzero(val_masks[i])) for i, t in parts.items() if val_masks[i].any()]
    return tr, (concat_tables(va_parts) if va_parts else None)


# -- samples ---------------------------------------------------------------------------------
def load_samples(cfg: RunConfig, sample_ids: list[str] | None = None) -> list[Sample]:
    """Read the dataset named by ``cfg.data`` (all samples, or the manifest's / the given ones)."""
    from cmrcnet.data.readers import read_dataset

    if not cfg.data.path:
        raise InputError("no dataset given (use --data PATH)")
    manifest = resolve_manifest(cfg)
    ids = sample_ids
    if ids is None and manifest is not None and cfg.data.dataset:
        from cmrcnet.data.manifest import check_hest_folder

        ids = check_hest_folder(cfg.data.path, manifest) if manifest.format == "hest" else manifest.sample_ids()
    samples = read_dataset(cfg.data.path, sample_ids=ids, dataset=manifest.name if manifest else "",
                           skip_bad=cfg.data.skip_bad_samples)
    samples = _usable(samples, cfg)
    if manifest is not None:
        patients = manifest.patients()
        for s in samples:
            if s.sample_id in patients and (not s.patient_id or s.patient_id == s.sample_id):
                s.patient_id = patients[s.sample_id]
    if not samples:
        raise InputError("the dataset holds no sample", cfg.data.path)
    return samples


def _usable(samples, cfg: RunConfig):
    """Degenerate samples (too few spots, all-zero counts): an error naming the sample and the
    numbers, or with ``data.skip_bad_samples`` left out with a warning; many zero-count spots warn."""
    from cmrcnet.data.readers import SKIP_HINT, SampleList
    from cmrcnet.data.sample import unusable_reason, zero_spot_fraction

    kept = SampleList(skipped=getattr(samples, "skipped", {}))
    for s in samples:
        why = unusable_reason(s)
        if why is not None:
            if not cfg.data.skip_bad_samples:
                hint = f" ({SKIP_HINT})" if len(samples) > 1 else ""
                raise InputError(f"sample {s.sample_id}: {why}{hint}", s.meta.get("st_file") or
                                 s.meta.get("counts_file") or s.meta.get("matrix_file") or cfg.data.path)
            kept.skipped[s.sample_id] = why
            warnings.warn(f"skipping sample {s.sample_id}: {why}", UserWarning, stacklevel=3)
            continue
        frac = zero_spot_fraction(s)
        if frac > 0.5:
            warnings.warn(f"sample {s.sample_id}: {frac:.0%} of its {s.n_spots} spots have zero counts", UserWarning,
                          stacklevel=3)
        kept.append(s)
    return kept


def resolve_manifest(cfg: RunConfig):
    from cmrcnet.data.manifest import find_manifest_for_path, load_manifest

    if cfg.data.dataset:
        return load_manifest(cfg.data.dataset)
    return find_manifest_for_path(cfg.data.path) if cfg.data.path else None


def resolve_markers(cfg: RunConfig) -> list[str]:
    if cfg.genes.markers:
        return list(cfg.genes.markers)
    manifest = resolve_manifest(cfg)
    return list(manifest.markers) if manifest is not None else []


def spot_positions(sample: Sample) -> np.ndarray:
    """Array (row, col) of each spot; from the spot grid when the format has none."""
    obs = sample.adata.obs
    if "array_row" in obs and "array_col" in obs:
        return np.stack([obs["array_row"].to_numpy(), obs["array_col"].to_numpy()], 1).astype(np.int64)
    pitch_px = (sample.pitch_um or 2 * sample.spot_diameter_um) / sample.um_per_px
    xy = sample.coords_px
    rc = np.round((xy[:, ::-1] - xy[:, ::-1].min(0)) / max(pitch_px, 1e-6))
    return rc.astype(np.int64)


def spot_table(sample: Sample, genes: list[str], cfg: RunConfig, with_expr: bool = True) -> SpotTable:
    """The sample's cached patches, expression of ``genes`` (zeros without counts) and positions."""
    from cmrcnet.data.genes import expression_matrix
    from cmrcnet.data.patches import get_patch_store

    store = get_patch_store(sample, cfg.patches.size_um, cfg.patches.size_px, cfg.data.cache_dir)
    n = sample.n_spots
    if with_expr:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            expr = expression_matrix(sample, genes, cfg.genes.target_sum)
        for w in caught:
            log.warning("%s: %s", sample.sample_id, w.message)
    else:
        expr = np.zeros((n, len(genes)), np.float32)
    t = SpotTable(
        imgs=store.imgs,
        expr=np.asarray(expr, np.float32),
        pos=spot_positions(sample),
        sample_ids=np.array([sample.sample_id] * n),
        barcodes=np.asarray(sample.adata.obs_names.astype(str)),
    )
    return concat_tables([t])


def prepare_fold(samples: list[Sample], train_ids: list[str], test_ids: list[str], cfg: RunConfig, run_dir: Path | None = None) -> FoldData:
    """Select genes on the training samples, cut patches, build the train/val/test tables."""
    from cmrcnet.data.genes import select_genes
    from cmrcnet.data.splits import validation_mask

    by_id = {s.sample_id: s for s in samples}
    missing = [i for i in train_ids + test_ids if i not in by_id]
    if missing:
        raise InputError(f"unknown sample id(s): {', '.join(missing)} (have: {', '.join(by_id)})", cfg.data.path)
    from cmrcnet.data.sample import unusable_reason

    for i in list(dict.fromkeys(train_ids + test_ids)):
        why = unusable_reason(by_id[i])
        if why is not None:
            raise InputError(f"sample {i}: {why}", cfg.data.path)
    markers = resolve_markers(cfg)
    genes = select_genes(samples, train_ids, cfg.genes, markers if cfg.genes.include_markers else None)
    check_gene_overlap([by_id[i] for i in dict.fromkeys(train_ids + test_ids)], genes)
    train_parts = [spot_table(by_id[i], genes, cfg) for i in train_ids]
    val_fraction = get_method(cfg.method).model_cls.validation_fraction(cfg.split.val_fraction)
    if val_fraction > 0:
        val_masks = validation_mask({i: by_id[i].n_spots for i in train_ids}, val_fraction, cfg.seed)
    else:
        val_masks = {i: np.zeros(by_id[i].n_spots, bool) for i in train_ids}
    parts = dict(zip(train_ids, train_parts))
    tr, va = split_tables(parts, val_masks)
    perm = None
    if cfg.train.shuffle_labels:
        perm = np.random.default_rng(cfg.seed).permutation(len(tr))
        tr.expr = tr.expr[perm]
    test = {i: spot_table(by_id[i], genes, cfg) for i in test_ids}
    if run_dir is not None:
        from cmrcnet.data.splits import Fold, save_split

        save_split(run_dir / "split.json", Fold(0, list(train_ids), list(test_ids), cfg.split.scheme, cfg.seed), val_masks)
    return FoldData(genes, tr, va, test, list(train_ids), list(test_ids), markers, parts, val_masks, perm)


def check_gene_overlap(samples: list[Sample], genes: list[str], warn_below: float = 0.5) -> None:
    """Warn loudly, with the numbers, about a sample that measures few of the run's genes (the
    others become zero columns): another species, panel or gene naming (Ensembl ids vs symbols)."""
    for s in samples:
        have = set(map(str, s.adata.var_names))
        n = sum(g in have for g in genes)
        if n < warn_below * len(genes):
            warnings.warn(
                f"sample {s.sample_id} measures only {n} of the {len(genes)} genes of this run ({n / len(genes):.0%}); "
                f"the other {len(genes) - n} are set to 0 there. Different species, gene panel or gene naming "
                "(Ensembl ids vs symbols)?", UserWarning, stacklevel=3)


# -- models ----------------------------------------------------------------------------------
def build_model(cfg: RunConfig, n_genes: int) -> ExpressionModel:
    spec = get_method(cfg.method)
    model_cfg = dict(cfg.model)
    if "img_size" in model_cfg and model_cfg["img_size"] is None:
        model_cfg["img_size"] = cfg.patches.size_px
    return spec.build(model_cfg, n_genes)


def quiet_lightning() -> None:
    """Lightning announces hardware and tips at INFO on every fit; keep the console for our progress."""
    if log.getEffectiveLevel() <= logging.INFO:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")  # a frozen encoder


def make_trainer(cfg: RunConfig, run_dir: Path, has_val: bool):
    """The Lightning trainer of every gradient-trained method, and its checkpoint callback."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cmrcnet.training.lit import LinkedLastCheckpoint

    quiet_lightning()

    monitor = "val/loss" if has_val else "train/loss"
    ckpt = LinkedLastCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode="min",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks = [ckpt]
    from cmrcnet.progress import stderr_is_terminal

    show_bar = stderr_is_terminal()
    if show_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=False))
    else:  # nohup / SLURM / a log file: one plain line per epoch with its rate and the ETA
        callbacks.append(epoch_log_callback(cfg.method))
    t = cfg.train
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=t.epochs,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
        logger=CSVLogger(str(run_dir), name="logs", version=""),
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        val_check_interval=t.val_check_interval,
        deterministic=False,
    ), ckpt


def epoch_log_callback(name: str):
    """The plain per-epoch progress line of a run off a terminal (:class:`cmrcnet.training.lit.EpochLog`)."""
    from cmrcnet.training.lit import EpochLog

    return EpochLog(name)


def fit_by_gradient(model: ExpressionModel, fold: FoldData, cfg: RunConfig, run_dir: Path, resume: bool) -> dict:
    """The shared trainer (AdamW + cosine, Lightning); the best validation checkpoint is kept."""
    from cmrcnet.training.lit import LitMethod

    t = cfg.train
    train_loader = model.loader(fold.train, batch_size=t.batch_size, train=True, augment=t.augment,
                                seed=cfg.seed, num_workers=t.num_workers)
    val_loader = model.loader(fold.val, batch_size=t.batch_size, seed=cfg.seed) if fold.val is not None else None
    model.on_train_start(torch.from_numpy(fold.train.expr))
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lit = LitMethod(model, t, steps_per_epoch=len(train_loader))
    if "spawn" in str(t.strategy):
        # spawned DDP workers receive the model through shared memory; the default
        # file-descriptor strategy fails on CPU ("unable to resize file")
        torch.multiprocessing.set_sharing_strategy("file_system")
    trainer, ckpt = make_trainer(cfg, run_dir, val_loader is not None)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    trainer.fit(lit, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    best = ckpt.best_model_path
    if best and Path(best).is_file():
        # mmap: the optimizer moments (2/3 of the file) are never read
        state = torch.load(best, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
        lit.load_state_dict(state)
    return {
        "best_checkpoint": str(best) if best else None,
        "best_score": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "global_step": int(trainer.global_step),
        "epochs_run": int(trainer.current_epoch),
    }


def config_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that differ from its method's preset (``--set``, ``--config``, a
    benchmark's ablation variant), as ``{dotted key: value}``; the data folder and seed excluded."""
    from cmrcnet.config import make_config

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and k in ("data", "patches", "genes", "split", "train", "retrieval", "model") and not prefix:
                out.update(flat(v, f"{key}."))
            else:
                out[key] = v
        return out

    try:
        base = flat(make_config(cfg.method, cfg.preset).to_dict())
    except Exception:  # noqa: BLE001 - an unknown preset of an old run: nothing to compare with
        return {}
    mine = flat(cfg.to_dict())
    skip = ("data.", "seed", "method", "preset")
    return {k: v for k, v in mine.items() if not k.startswith(skip) and base.get(k, object()) != v}


def gene_ids_of(samples: list[Sample], genes: list[str]) -> list[str] | None:
    """The Ensembl (or other) id of each gene from the samples' ``var["gene_ids"]``; None when no
    sample has ids. Genes without one get an empty string."""
    ids: dict[str, str] = {}
    for s in samples:
        var = s.adata.var
        if "gene_ids" in var.columns:
            for name, gid in zip(map(str, var.index), var["gene_ids"].astype(str)):
                ids.setdefault(name, gid)
    if not ids:
        return None
    return [ids.get(g, "") for g in genes]


def describe_run(cfg: RunConfig, fold: FoldData, extra: dict[str, Any] | None = None,
                 gene_ids: list[str] | None = None) -> dict[str, Any]:
    """What a run directory is, saved with it (``run.json``, ``model.pt``) and copied into every
    prediction's ``uns["cmrcnet"]``, so prediction and evaluation never consult the data folder.

    Includes the settings a report states: preset, epochs, the encoder (where the method has
    one), the model settings and every setting that differs from the preset (``overrides``)."""
    from cmrcnet.evaluation.gene_sets import DEFAULT_KS

    manifest = resolve_manifest(cfg)
    settings = {
        "epochs": int(cfg.train.epochs),
        "batch_size": int(cfg.train.batch_size),
        "lr": float(cfg.train.lr),
        "precision": resolve_precision(cfg.train.precision, cfg.train.accelerator),
        "encoder": str(cfg.model.get("encoder") or ""),
        "model_settings": {k: v for k, v in cfg.model.items() if v is not None},
        "overrides": config_overrides(cfg),
    }
    if gene_ids is not None:
        settings["gene_ids"] = list(gene_ids)
    return {
        "method": cfg.method,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "dataset": cfg.data.dataset or (manifest.name if manifest is not None else ""),
        "train_ids": list(fold.train_ids),
        "test_ids": list(fold.test_ids),
        "genes": list(fold.genes),
        "markers": list(fold.markers),
        "gene_selection": cfg.genes.selection,
        "gene_sets": {
            "top_k_expressed_and_variable": list(DEFAULT_KS),
            "chosen_on": "observed expression of the predicted sample",
            "markers": list(fold.markers),
        },
        "patch_size_um": float(cfg.patches.size_um),
        "patch_size_px": int(cfg.patches.size_px),
        "cmrcnet_version": cmrcnet.__version__,
        **settings,
        **(extra or {}),
    }


def save_model(path: Path, model: ExpressionModel, cfg: RunConfig, genes: list[str], run_info: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {"state_dict": model.state_dict(), "config": cfg.to_dict(), "genes": genes, "method": cfg.method, "run": run_info},
            tmp,
        )


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    test_ids: list[str],
    train_ids: list[str] | None = None,
    samples: list[Sample] | None = None,
    resume: bool = False,
    describe: dict[str, Any] | None = None,
) -> Path:
    """Train ``cfg.method`` with ``test_ids`` held out; returns the completed run directory.

    ``describe`` is recorded with the run (``run.json``) and in every prediction made from it,
    e.g. the benchmark's ablation variant and its overrides.
    """
    run_dir = Path(run_dir)
    if resume and (run_dir / "done.json").is_file():
        log.info("run %s already complete; skipping", run_dir)
        return run_dir
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    samples = samples if samples is not None else load_samples(cfg)
    ids = [s.sample_id for s in samples]
    skipped = dict(getattr(samples, "skipped", {}) or {})
    why = ("; skipped as unreadable: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())) if skipped else ""
    unknown = [i for i in test_ids if i not in ids]
    if unknown:
        raise InputError(f"held-out sample(s) not in the dataset: {', '.join(unknown)} (have: {', '.join(ids)}){why}", cfg.data.path)
    train_ids = train_ids if train_ids is not None else [i for i in ids if i not in test_ids]
    if not train_ids:
        raise InputError(f"no training sample left after holding out {', '.join(test_ids)}{why}", cfg.data.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    fold = prepare_fold(samples, train_ids, list(test_ids), cfg, run_dir)
    write_text_atomic(run_dir / "genes.txt", "\n".join(fold.genes) + "\n")
    by_id = {s.sample_id: s for s in samples}
    run_info = describe_run(cfg, fold, describe, gene_ids=gene_ids_of([by_id[i] for i in train_ids], fold.genes))
    write_json_atomic(run_dir / "run.json", run_info)
    t_data = time.perf_counter() - t0
    seed_everything(cfg.seed)
    model = build_model(cfg, len(fold.genes))
    t_feat = time.perf_counter()
    fold = model.encode_fold(fold, augment=cfg.train.augment, cache_dir=cfg.data.cache_dir, precision=cfg.train.precision)
    t_feat = time.perf_counter() - t_feat
    t1 = time.perf_counter()
    info = model.fit(fold, batch_size=cfg.train.batch_size, seed=cfg.seed,
                     by_gradient=lambda: fit_by_gradient(model, fold, cfg, run_dir, resume))
    t_train = time.perf_counter() - t1
    model.eval()
    save_model(run_dir / "model.pt", model, cfg, fold.genes, run_info)
    model.make_predictor(fold, cfg).save(run_dir)
    write_json_atomic(
        run_dir / "done.json",
        {
            "method": cfg.method,
            "train_ids": train_ids,
            "test_ids": list(test_ids),
            "n_genes": len(fold.genes),
            "n_train_spots": len(fold.train),
            "n_val_spots": 0 if fold.val is None else len(fold.val),
            "data_seconds": round(t_data, 2),
            "feature_seconds": round(t_feat, 2),
            "train_seconds": round(t_train, 2),
            "total_seconds": round(time.perf_counter() - t0, 2),
            **info,
        },
    )
    return run_dir
