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
import os
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
    skip_bad_samples: bool = False
    """Go on without a sample that cannot be read (one warning per skipped sample); by default
    an unreadable sample is an error naming it and the missing or broken file."""


def _f(default: Any, **check: Any) -> Any:
    """A field with a range check: ``min``/``max`` (inclusive), ``gt``/``lt`` (exclusive), ``choices``,
    ``or_values`` (extra allowed values such as ``-1`` for "no limit"); see :func:`check_value`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"check": check})
    return field(default=default, metadata={"check": check})


@dataclass
class PatchConfig:
    size_um: float = _f(112.0, gt=0)
    """Physical side of the square patch around each spot (HEST: 224 px at 0.5 um/px)."""
    size_px: int = _f(224, min=8, max=4096)
    """Side in pixels of the model input the patch is resampled to."""


@dataclass
class GeneConfig:
    n_hvg: int = _f(1000, min=1)
    """Top-N highly variable genes per sample."""
    selection: str = _f("train", choices=("train", "all"))
    """``train``: HVGs of training samples only (no leakage); ``all``: the paper's union over all samples."""
    combine: str = _f("union", choices=("union", "intersection"))
    """How per-sample HVG lists are combined: ``union`` or ``intersection``."""
    target_sum: float | None = _f(1e4, gt=0)
    """normalize_total target; None = median of total counts (scanpy default)."""
    include_markers: bool = True
    """Add the dataset's marker genes to the predicted gene set when present."""
    markers: list[str] = field(default_factory=list)
    """Marker genes for evaluation; empty = the dataset manifest's list."""


@dataclass
class SplitConfig:
    scheme: str = _f("loo-sample", choices=("loo-sample", "loo-patient"))
    """``loo-sample`` or ``loo-patient``."""
    val_fraction: float = _f(0.1, min=0.0, max=0.9)
    """Fraction of training spots held out for validation (best checkpoint)."""


@dataclass
class TrainConfig:
    epochs: int = _f(60, min=1)
    batch_size: int = _f(64, min=1)
    lr: float = _f(1e-4, gt=0)
    weight_decay: float = _f(1e-3, min=0.0)
    min_lr: float = _f(1e-5, min=0.0)
    """Cosine schedule floor."""
    precision: str = _f("32-true", choices=("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                                            "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64"))
    """Lightning precision: ``32-true``, ``bf16-mixed``, ``16-mixed``, or ``auto`` (the presets'
    default): ``bf16-mixed`` where a quick matmul probe finds bf16 faster than fp32 on the training
    device (AMX CPUs, GPUs), else ``32-true`` (:func:`cmrcnet.runtime.resolve_precision`; the
    choice is recorded in run.json as ``precision``)."""
    accumulate_grad_batches: int = _f(1, min=1)
    augment: bool = True
    """Random flips and 90-degree rotations."""
    num_workers: int = _f(0, min=0)
    accelerator: str = "auto"
    devices: int | str = _f(1, min=1, or_values=(-1,))
    """Number of devices (-1: all), or a Lightning string such as ``auto`` or ``0,1``."""
    num_nodes: int = _f(1, min=1)
    strategy: str = "auto"
    max_steps: int = _f(-1, min=1, or_values=(-1,))
    """Stop after this many optimiser steps (-1: no limit), for smoke tests."""
    val_check_interval: float = _f(1.0, gt=0)
    channels_last: bool = False
    shuffle_labels: bool = False
    """Negative control: permute expression across training spots (breaks image-expression pairing)."""


@dataclass
class RetrievalConfig:
    top_k: int = _f(50, min=1)
    weighting: str = _f("mean", choices=("mean", "similarity", "softmax"))
    """``mean`` (paper) or ``similarity`` (softmax-free cosine-weighted mean)."""
    backend: str = _f("auto", choices=("auto", "torch", "faiss-flat", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw"))
    """``auto``, ``torch`` (exact), ``faiss-flat`` (exact), ``faiss-ivf``, ``faiss-ivfpq``, ``faiss-hnsw``."""
    auto_exact_max: int = _f(2_000_000, min=1)
    """``auto`` uses exact search up to this bank size (torch fp32 to 50k rows, then FAISS flat,
    from 100k rows torch's bf16 threshold search where bf16 is faster and can prune the bank), an
    approximate index (IVF-PQ) beyond."""
    exact_precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    """Exact (torch) search scoring: ``fp32``, ``bf16`` (bf16 scores with a running per-query
    threshold and a certified error bound, candidates re-ranked in fp32: the same result as fp32)
    or ``auto`` (``bf16`` for banks from 100k rows where the matmul probe finds bf16 faster:
    :func:`cmrcnet.retrieval.exact_precision`). A bank whose neighbours lie within bf16's error of
    each other (a narrow cone) is searched in fp32 whatever this says (:func:`cmrcnet.retrieval.bf16_prunes`)."""
    index: dict[str, Any] = field(default_factory=dict)
    """Approximate-index settings (``nlist``, ``nprobe``, ``pq_m``, ``k_factor``, ``M``, ``ef_search``)."""
    embed_precision: str = _f("auto", choices=("auto", "fp32", "bf16"))
    """Image embedding at prediction: ``fp32``, ``bf16`` or ``auto`` (bf16 when the run trained in
    bf16 and the device has native bf16 matmuls: 1.6x faster, 99.6 % identical neighbours)."""


@dataclass
class RunConfig:
    method: str = "cmrcnet"
    preset: str = "cpu"
    seed: int = _f(0, min=0, max=2**32 - 1)
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
        "train.precision": "auto",
        "genes.n_hvg": 1000,
    },
    "paper": {
        "patches.size_px": 224,
        "train.epochs": 60,
        "train.batch_size": 64,
        "train.lr": 1e-4,
        "train.precision": "auto",
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


# -- typed values -------------------------------------------------------------------------------
def field_types(cls: type) -> dict[str, Any]:
    """``{field: resolved type}`` of a dataclass (annotations are strings under ``from __future__``)."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no type check for that class
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in fields(cls)}


def _type_name(tp: Any) -> str:
    import types
    import typing

    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", bool: "true/false", str: "text", type(None): "null",
             list: "a list", dict: "a mapping"}
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` (a ``--set`` string, or a YAML / Python value) converted to type ``tp``; ConfigError
    naming ``key`` when it is not of that type (``train.epochs=abc``, ``train.lr=fast``, ...)."""
    import types
    import typing

    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, str) and value != "" else value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if _is_null(value) and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        # try the strictest type first: an integer before a string (``devices=2`` vs ``auto``)
        order = sorted(concrete, key=lambda a: {bool: 0, int: 1, float: 2}.get(a, 3))
        errors = []
        for a in order:
            try:
                return coerce_value(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # ``float | None``: the float's own message (e.g. "finite")
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    parsed = yaml.safe_load(value) if isinstance(value, str) and value.strip() != "" else value
    if tp is bool:
        if isinstance(parsed, bool):
            return parsed
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(parsed, float):
            if not (parsed == parsed and abs(parsed) != float("inf") and parsed.is_integer()):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            parsed = int(parsed)
        return parsed
    if tp is float:
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) and nan as text
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if parsed != parsed or parsed in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(parsed)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    if origin is list or tp is list:
        if isinstance(parsed, str):  # genes.markers=ERBB2,GATA3
            parsed = [p.strip() for p in parsed.split(",") if p.strip()]
        if not isinstance(parsed, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce_value(v, item, key) for v in parsed]
    if origin is dict or tp is dict:
        if parsed in ("", None):
            return {}
        if not isinstance(parsed, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{nprobe: 16}}, got {value!r}")
        return dict(parsed)
    return parsed


def check_value(value: Any, check: dict[str, Any], key: str) -> None:
    """Range / choice check of one value (see :func:`_f`); None (an unset optional) passes."""
    if value is None or not check:
        return
    if "choices" in check and isinstance(value, str) and value not in check["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, check['choices']))}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value in check.get("or_values", ()):
        return
    extra = "".join(f" or {v}" for v in check.get("or_values", ()))
    if "gt" in check and not value > check["gt"]:
        raise ConfigError(f"{key}: must be > {check['gt']:g}{extra}, got {value!r}")
    if "min" in check and value < check["min"]:
        raise ConfigError(f"{key}: must be >= {check['min']:g}{extra}, got {value!r}")
    if "max" in check and value > check["max"]:
        raise ConfigError(f"{key}: must be <= {check['max']:g}{extra}, got {value!r}")
    if "lt" in check and not value < check["lt"]:
        raise ConfigError(f"{key}: must be < {check['lt']:g}{extra}, got {value!r}")


def field_checks(cls: type) -> dict[str, dict[str, Any]]:
    """``{field: range check}`` declared in the dataclass fields' ``metadata["check"]``."""
    return {f.name: dict(f.metadata.get("check", {})) for f in fields(cls)}


def typed_value(cls: type, name: str, value: Any, key: str) -> Any:
    """``value`` for field ``name`` of dataclass ``cls``: coerced to its type, range-checked."""
    tp = field_types(cls).get(name, Any)
    out = coerce_value(value, tp, key)
    check_value(out, field_checks(cls).get(name, {}), key)
    return out


def set_key(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set ``section.key`` (or ``model.key``, or a top-level key) on ``cfg``: the key must exist,
    the value is converted to the field's type and range-checked (ConfigError otherwise)."""
    parts = dotted.split(".")
    if len(parts) == 1:
        name = parts[0]
        if name not in {f.name for f in fields(RunConfig)} or name in _SECTIONS or name == "model":
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(cfg, name, typed_value(RunConfig, name, value, dotted))
        return
    section, key = parts[0], ".".join(parts[1:])
    if section == "model":
        cfg.model[key] = _model_value(cfg.method, key, value, dotted)
        return
    if section not in _SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r}")
    obj = getattr(cfg, section)
    names = [f.name for f in fields(obj)]
    if key not in names:
        raise ConfigError(f"unknown config key {dotted!r} (valid {section}.* keys: {', '.join(names)})")
    setattr(obj, key, typed_value(type(obj), key, value, dotted))


def _model_value(method: str, key: str, value: Any, dotted: str) -> Any:
    """A ``model.*`` value typed from the method's config dataclass (unknown keys are left to
    :meth:`~cmrcnet.models.base.MethodSpec.validate_model_config`, which lists the valid ones)."""
    try:
        from cmrcnet.models import get_method

        spec_cls = get_method(method).Config
    except ConfigError:
        spec_cls = None
    known = spec_cls is not None and key in {f.name for f in fields(spec_cls)}
    if _is_null(value) and not (known and _is_choice_word(spec_cls, key, value)):
        return None  # e.g. vit_depth=null when a preset's ViT is swapped for a CNN
    if known:
        return typed_value(spec_cls, key, value, dotted)
    return yaml.safe_load(value) if isinstance(value, str) and value != "" else value


def _is_choice_word(cls: type, name: str, value: Any) -> bool:
    """A non-optional text field given ``none`` keeps the word (``frozen_views=none`` is a choice,
    checked by the method's own validation), where an optional field would be reset."""
    tp = str(field_types(cls).get(name, ""))
    return isinstance(value, str) and "None" not in tp and "str" in tp


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
ENCODER_ARCH_KEYS = ("encoder_kwargs", "vit_depth", "vit_heads", "encoder_weights", "encoder_mode")


def _preset_architecture_follows_encoder(cfg: RunConfig, defaults: Any, overrides: dict[str, Any]) -> None:
    """When the user picks another encoder, the preset's options for its own encoder (architecture,
    weights, mode) are dropped (``--set model.encoder=uni`` gets UNI's architecture, not ViT-Ti's
    depth, and the default ``scratch`` mode, not the preset's frozen EfficientNet), unless also given."""
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
