"""The interface every method implements, and the method registry.

All methods consume the same batches (:mod:`cmrcnet.data.batches`) and are trained by
the same trainer (:mod:`cmrcnet.training`); they differ only in their model file. A batch
is a dict:

- ``img``: float32 ``(B, 3, H, W)``, normalised with ImageNet mean/std;
- ``expr``: float32 ``(B, G)``, log1p-normalised expression of the run's genes;
- ``pos``: int64 ``(B, 2)``, the spot's array (row, col) position (or a grid index);
- ``index``: int64 ``(B,)``, the spot's row in its sample.

A method changes behaviour by overriding a method here, never by a flag that code
downstream tests (Lightning's shape):

- how it is fitted: :meth:`ExpressionModel.fit` (default: the shared gradient trainer;
  ridge fits in closed form), on what (:meth:`~ExpressionModel.encode_fold`: a frozen
  encoder trains on cached features) and with which learning rates
  (:meth:`~ExpressionModel.param_groups`);
- how spots are batched: :meth:`~ExpressionModel.loader`,
  :meth:`~ExpressionModel.prediction_batches` and
  :meth:`~ExpressionModel.validation_fraction` (HisToGene sees whole slides);
- how it predicts: :meth:`~ExpressionModel.make_predictor` /
  :meth:`~ExpressionModel.load_predictor` return a
  :class:`~cmrcnet.models.predictors.Predictor` (regression by default; BLEEP and CMRCNet
  retrieve from a bank of training-spot gene embeddings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from cmrcnet.data.batches import SpotTable, spot_loader
from cmrcnet.errors import ConfigError
from cmrcnet.models.predictors import Predictor, RegressionPredictor

if TYPE_CHECKING:
    from cmrcnet.config import RunConfig
    from cmrcnet.training.fit import FoldData

Batch = dict[str, torch.Tensor]


class ExpressionModel(nn.Module):
    """Base class of all methods (see the module docstring for the batch contract)."""

    # -- the maths -------------------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Return a dict of scalar tensors; ``loss`` is optimised, the rest are logged."""
        raise NotImplementedError

    def predict_expression(self, batch: Batch) -> torch.Tensor:
        """Expression ``(B, G)`` of a batch (what :class:`RegressionPredictor` calls)."""
        raise NotImplementedError

    def on_train_start(self, train_expr: torch.Tensor) -> None:
        """Hook called once with the training expression matrix (e.g. STNet's bias init)."""

    # -- fitting ---------------------------------------------------------------------------------
    def encode_fold(self, fold: FoldData, *, augment: bool, cache_dir: str | Path | None, precision: str) -> FoldData:
        """The fold as this model trains on it; a frozen encoder replaces patches by cached features
        (:class:`~cmrcnet.models.features.EncoderMethod`). Default: unchanged."""
        return fold

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups (e.g. a lower encoder learning rate). Default: all trainable at ``lr``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def fit(self, fold: FoldData, *, batch_size: int, seed: int, by_gradient: Callable[[], dict]) -> dict:
        """Fit on ``fold``; returns facts for ``done.json``. Default: the shared gradient trainer."""
        return by_gradient()

    # -- grouping spots into batches --------------------------------------------------------------
    @classmethod
    def validation_fraction(cls, requested: float) -> float:
        """Fraction of training spots held out for validation (``split.val_fraction`` by default)."""
        return requested

    def loader(self, table: SpotTable, *, batch_size: int, train: bool = False, augment: bool = False,
               seed: int = 0, num_workers: int = 0) -> DataLoader:
        """Training (``train=True``: shuffled, last partial batch dropped) or validation batches."""
        drop_last = train and len(table) > batch_size
        return spot_loader(table, batch_size, shuffle=train, augment=augment, seed=seed,
                           drop_last=drop_last, num_workers=num_workers)

    def prediction_batches(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """Regroup spot batches of one sample (in row order) into the batches this model predicts."""
        return batches

    # -- prediction ------------------------------------------------------------------------------
    def make_predictor(self, fold: FoldData, cfg: RunConfig) -> Predictor:
        """The predictor of this freshly trained model (it saves its own artifacts)."""
        return RegressionPredictor(self)

    def load_predictor(self, run_dir: Path, cfg: RunConfig) -> Predictor:
        """The predictor of a trained run directory (artifacts written by :meth:`Predictor.save`)."""
        return RegressionPredictor(self)


@dataclass
class MethodSpec:
    name: str
    model_cls: type[ExpressionModel]
    Config: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""
    colour: str = ""
    """Plot colour of the method (figures and report); empty = one from a fallback palette."""

    def validate_model_config(self, model_cfg: dict[str, Any]) -> Any:
        valid = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(model_cfg) - valid)
        if unknown:
            raise ConfigError(
                f"unknown model option(s) for method {self.name!r}: {', '.join(unknown)} "
                f"(valid: {', '.join(sorted(valid))})"
            )
        required = [f.name for f in dataclasses.fields(self.Config)
                    if f.name in model_cfg and model_cfg[f.name] is None and "None" not in str(f.type)]
        if required:
            raise ConfigError(f"model option(s) {', '.join(required)} of method {self.name!r} cannot be null")
        return self.Config(**self.typed_model_config(model_cfg))

    def typed_model_config(self, model_cfg: dict[str, Any]) -> dict[str, Any]:
        """Each value converted to its field's type (``model.depth=abc`` is a ConfigError naming
        the key) and range-checked (:func:`model_field_check`); numbers must be finite."""
        from cmrcnet.config import check_value, typed_value

        out = {}
        by_name = {f.name: f for f in dataclasses.fields(self.Config)}
        for k, v in model_cfg.items():
            if v is None:
                out[k] = None
                continue
            out[k] = typed_value(self.Config, k, v, f"model.{k}")
            check_value(out[k], model_field_check(by_name[k]), f"model.{k}")
        return out

    def build(self, model_cfg: dict[str, Any], n_genes: int) -> ExpressionModel:
        return self.model_cls(self.validate_model_config(model_cfg), n_genes)


def model_field_check(f: dataclasses.Field) -> dict[str, Any]:
    """The range check of a method's config field: its ``metadata={"check": {...}}`` if it declares
    one (keys as :func:`cmrcnet.config.check_value`), else two generic rules: a count (an integer
    field defaulting to >= 1 or None: depth, heads, dims, components) must be >= 1, and a
    fraction (a float ``*dropout*`` / ``*ratio*`` field defaulting to [0, 1)) must lie in [0, 1)."""
    declared = f.metadata.get("check") if f.metadata else None
    if declared:
        return dict(declared)
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = str(f.type)
    if kind.startswith("int") and (default is None or (isinstance(default, int) and default >= 1)):
        return {"min": 1}
    if (kind.startswith("float") and ("dropout" in f.name or "ratio" in f.name)
            and isinstance(default, float) and 0.0 <= default < 1.0):
        return {"min": 0.0, "lt": 1.0}
    return {}


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config: type,
    presets: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    colour: str = "",
) -> Callable[[type[ExpressionModel]], type[ExpressionModel]]:
    """Class decorator: make a model available as ``--method name``.

    The model class is constructed as ``cls(config_instance, n_genes)``.
    ``presets`` maps a preset name (``cpu``, ``paper``, ``tiny``) to dotted overrides
    such as ``{"model.depth": 4, "train.epochs": 10}``. ``colour`` is the method's colour
    in figures; the CLI's method lists, the plots and the report all read this registry.
    """

    def deco(cls: type[ExpressionModel]) -> type[ExpressionModel]:
        _REGISTRY[name] = MethodSpec(name, cls, config, dict(presets or {}), description, colour)
        return cls

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_colours() -> dict[str, str]:
    """``{method: colour}`` of the registered methods that name a colour."""
    return {name: spec.colour for name, spec in sorted(_REGISTRY.items()) if spec.colour}
