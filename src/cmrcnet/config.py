"""Run configuration: plain dataclasses, YAML round trip, presets and ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`. Method-specific hyperparameters
live in ``RunConfig.model`` (a dict validated against the method's own dataclass,
see :mod:`cmrcnet.models`). Presets are layered: global preset defaults
(:data:`GLOBAL_PRESETS`), then the method's preset overrides, then the user's
``--set`` overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cmrcnet.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""
    """Dataset folder (any supported format)."""
    dataset: str | None = None
    """Name of a dataset manifest (``cmrcnet datasets``) selecting samples and markers."""
    cache_dir: str | None = None
    """Patch cache folder; default ``$CMRCNET_CACHE`` or ``~/.cache/cmrcnet``."""


@dataclass
class PatchConfig:
    size_um: float = 112.0
    """Physical side of the square patch around each spot (HEST: 224 px at 0.5 um/px)."""
    size_px: int = 224
    """Side in pixels of the model input the patch is resampled to."""


@dataclass
class GeneConfig:
    n_hvg: int = 1000
    """Top-N highly variable genes per sample."""
    selection: str = "train"
    """``train``: HVGs of training samples only (no leakage); ``all``: the paper's union over all samples."""
    combine: str = "union"
    """How per-sample HVG lists are combined: ``union`` or ``intersection``."""
    target_sum: float | None = 1e4
    """normalize_total target; None = median of total counts (scanpy default)."""
    include_markers: bool = True
    """Add the dataset's marker genes to the predicted gene set when present."""
    markers: list[str] = field(default_factory=list)
    """Marker genes for evaluation; empty = the dataset manifest's list."""


@dataclass
class SplitConfig:
    scheme: str = "loo-sample"
    """``loo-sample`` or ``loo-patient``."""
    val_fraction: float = 0.1
    """Fraction of training spots held out for validation (best checkpoint)."""


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-3
    min_lr: float = 1e-5
    """Cosine schedule floor."""
    precision: str = "32-true"
    """Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed``."""
    accumulate_grad_batches: int = 1
    augment: bool = True
    """Random flips and 90-degree rotations."""
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: no limit), for smoke tests."""
    val_check_interval: float = 1.0
    channels_last: bool = False
    shuffle_labels: bool = False
    """Negative control: permute expression across training spots (breaks image-expression pairing)."""


@dataclass
class RetrievalConfig:
    top_k: int = 50
    weighting: str = "mean"
    """``mean`` (paper) or ``similarity`` (softmax-free cosine-weighted mean)."""
    backend: str = "auto"
    """``auto``, ``torch`` (exact), ``faiss-flat`` (exact), ``faiss-ivf``, ``faiss-ivfpq``, ``faiss-hnsw``."""
    auto_exact_max: int = 2_000_000
    """``auto`` uses exact search up to this bank size (torch to 50k rows, FAISS flat above), an
    approximate index (IVF-PQ) beyond."""
    exact_precision: str = "auto"
    """Exact (torch) search scoring: ``fp32`` (= ``auto``) or ``bf16`` (bf16 candidates re-ranked
    in fp32, uncertain rows redone in fp32: still exact; faster only on well-spread banks)."""
    index: dict[str, Any] = field(default_factory=dict)
    """Approximate-index settings (``nlist``, ``nprobe``, ``pq_m``, ``k_factor``, ``M``, ``ef_search``)."""
    embed_precision: str = "auto"
    """Image embedding at prediction: ``fp32``, ``bf16`` or ``auto`` (bf16 when the run trained in
    bf16 and the device has native bf16 matmuls: 1.6x faster, 99.6 % identical neighbours)."""


@dataclass
class RunConfig:
    method: str = "cmrcnet"
    preset: str = "cpu"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    genes: GeneConfig = field(default_factory=GeneConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    model: dict[str, Any] = field(default_factory=dict)
    """Method hyperparameters, validated against the method's Config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: Preset defaults shared by all methods; a method's own PRESETS are applied on top.
GLOBAL_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "patches.size_px": 112,
        "train.epochs": 8,
        "train.batch_size": 64,
        "train.lr": 3e-4,
        "train.precision": "bf16-mixed",
        "genes.n_hvg": 1000,
    },
    "paper": {
        "patches.size_px": 224,
        "train.epochs": 60,
        "train.batch_size": 64,
        "train.lr": 1e-4,
        "train.precision": "bf16-mixed",
        "genes.n_hvg": 1000,
    },
    "tiny": {
        "patches.size_px": 32,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.lr": 1e-3,
        "train.precision": "32-true",
        "genes.n_hvg": 50,
        "split.val_fraction": 0.2,
    },
}


def _section_types() -> dict[str, type]:
    return {f.name: f.type for f in fields(RunConfig)}


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert a string override to the type of the current value."""
    if not isinstance(value, str):
        return value
    parsed = yaml.safe_load(value) if value != "" else ""
    if current is None or isinstance(current, (list, dict)):
        return parsed
    if isinstance(current, bool):
        if isinstance(parsed, bool):
            return parsed
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(parsed, int):
            return parsed
        if isinstance(parsed, str):  # e.g. devices=auto
            return parsed
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return float(parsed)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(current, str):
        return value
    return parsed


def set_key(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` (or ``model.key``, or a top-level key) on ``cfg``, checking the key exists."""
    parts = dotted.split(".")
    if len(parts) == 1:
        name = parts[0]
        if name not in {f.name for f in fields(RunConfig)} or name in _SECTIONS:
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(cfg, name, _coerce(value, getattr(cfg, name), dotted))
        return
    section, key = parts[0], ".".join(parts[1:])
    if section == "model":
        cur = cfg.model.get(key)
        if _is_null(value):  # e.g. vit_depth=null when a preset's ViT is swapped for a CNN
            cfg.model[key] = None
            return
        cfg.model[key] = _coerce(value, cur, dotted) if cur is not None else (
            yaml.safe_load(value) if isinstance(value, str) else value
        )
        return
    if section not in _SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}")
    obj = getattr(cfg, section)
    types = {f.name: str(f.type) for f in fields(obj)}
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r} (valid {section}.* keys: {', '.join(types)})")
    if _is_null(value) and "None" in types[key]:
        setattr(obj, key, None)
        return
    setattr(obj, key, _coerce(value, getattr(obj, key), dotted))


def _is_null(value: Any) -> bool:
    """``null``/``none``/``~`` given on the command line: reset an optional key."""
    return value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~"))


_SECTIONS = ("data", "patches", "genes", "split", "train", "retrieval")


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """Parse ``["a.b=1", ...]`` into a dict, rejecting items without ``=``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    for k, v in overrides.items():
        set_key(cfg, k, v)
    return cfg


REMOVED_KEYS = {"train.compile": "never read; torch.compile gave no speed-up (docs/PERFORMANCE.md)"}
"""Keys older versions wrote: skipped with a warning, so their saved runs still load."""


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (possibly partial) nested dict, rejecting unknown keys."""
    cfg = RunConfig()
    for k, v in d.items():
        if k in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"config section {k!r} must be a mapping")
            for kk, vv in v.items():
                if f"{k}.{kk}" in REMOVED_KEYS:
                    warnings.warn(f"config key {k}.{kk} was removed ({REMOVED_KEYS[f'{k}.{kk}']}); ignored", stacklevel=2)
                    continue
                set_key(cfg, f"{k}.{kk}", vv)
        elif k == "model":
            cfg.model = dict(v or {})
        else:
            set_key(cfg, k, v)
    return cfg


def load_yaml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path) from None
    if not isinstance(d, dict):
        raise ConfigError("config must be a YAML mapping", path)
    return from_dict(d)


def make_config(
    method: str = "cmrcnet",
    preset: str = "cpu",
    overrides: dict[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Resolve a full config: defaults -> global preset -> method preset -> overrides."""
    from cmrcnet.models import get_method

    spec = get_method(method)
    if preset not in GLOBAL_PRESETS and preset not in spec.presets:  # method-only presets (cmrcnet "authors")
        choices = list(GLOBAL_PRESETS) + [p for p in spec.presets if p not in GLOBAL_PRESETS]
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(choices)})")
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    cfg.method = method
    cfg.preset = preset
    cfg.model = {**dataclasses.asdict(spec.Config()), **cfg.model}
    apply_overrides(cfg, GLOBAL_PRESETS.get(preset, {}))
    apply_overrides(cfg, spec.presets.get(preset, {}))
    _preset_architecture_follows_encoder(cfg, spec.Config(), overrides or {})
    apply_overrides(cfg, overrides or {})
    _patch_geometry_from_encoder(cfg, overrides or {}, base)
    spec.validate_model_config(cfg.model)
    return cfg


#: Model options that shape a preset's own encoder (e.g. the cpu preset's 6-layer ViT-Ti).
ENCODER_ARCH_KEYS = ("encoder_kwargs", "vit_depth", "vit_heads", "encoder_weights")


def _preset_architecture_follows_encoder(cfg: RunConfig, defaults: Any, overrides: dict[str, Any]) -> None:
    """When the user picks another encoder, the preset's options for its own encoder are dropped
    (``--set model.encoder=uni`` gets UNI's architecture, not ViT-Ti's depth), unless also given."""
    if "model.encoder" not in overrides:
        return
    for key in ENCODER_ARCH_KEYS:
        if key in cfg.model and f"model.{key}" not in overrides and hasattr(defaults, key):
            cfg.model[key] = copy.deepcopy(getattr(defaults, key))


def _patch_geometry_from_encoder(cfg: RunConfig, overrides: dict[str, Any], base: RunConfig | None) -> None:
    """A registered encoder with a native pixel size (UNI: 224 px at 0.5 µm/px) sets the patch to its
    native field of view and input size, unless the user set the patch geometry themselves."""
    from cmrcnet.models.encoders import get_encoder_entry

    entry = get_encoder_entry(str(cfg.model.get("encoder") or ""))
    if entry is None or entry.patch_um is None:
        return
    user_set = set(overrides)
    if base is not None and base.patches != PatchConfig():
        user_set |= {"patches.size_um", "patches.size_px"}
    if "patches.size_um" not in user_set:
        cfg.patches.size_um = float(entry.patch_um)
    if "patches.size_px" not in user_set:
        cfg.patches.size_px = int(entry.input_px)
