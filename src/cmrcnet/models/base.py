"""The interface every method implements, and the method registry.

All methods consume the same batches and are trained by the same trainer
(:mod:`cmrcnet.training`); they differ only in their model file. A batch is a dict:

- ``img``: float32 ``(B, 3, H, W)``, normalised with ImageNet mean/std;
- ``expr``: float32 ``(B, G)``, log1p-normalised expression of the run's genes;
- ``pos``: int64 ``(B, 2)``, the spot's array (row, col) position (or a grid index);
- ``index``: int64 ``(B,)``, the spot's row in its sample.

With ``batching = "slide"`` (HisToGene) one batch holds all spots of one slide.

Kinds of method:

- ``retrieval``: implements :meth:`ExpressionModel.embed_images` and
  :meth:`ExpressionModel.embed_genes`; prediction is top-k retrieval from a bank
  of training-spot gene embeddings (:mod:`cmrcnet.retrieval`).
- ``regression``: implements :meth:`ExpressionModel.predict_expression`.

``trainable = False`` methods (ridge) are fitted in closed form by
:meth:`ExpressionModel.fit_closed_form` instead of by gradient descent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from cmrcnet.errors import ConfigError

Batch = dict[str, torch.Tensor]


class ExpressionModel(nn.Module):
    """Base class of all methods (see module docstring for the batch contract)."""

    kind: ClassVar[str] = "regression"
    batching: ClassVar[str] = "spot"
    trainable: ClassVar[bool] = True

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Return a dict of scalar tensors; ``loss`` is optimised, the rest are logged."""
        raise NotImplementedError

    def embed_images(self, img: torch.Tensor) -> torch.Tensor:  # retrieval methods
        raise NotImplementedError

    def embed_genes(self, expr: torch.Tensor) -> torch.Tensor:  # retrieval methods
        raise NotImplementedError

    def predict_expression(self, batch: Batch) -> torch.Tensor:  # regression methods
        raise NotImplementedError

    def fit_closed_form(self, batches: Iterable[Batch]) -> None:  # trainable = False
        raise NotImplementedError

    def on_train_start(self, train_expr: torch.Tensor) -> None:
        """Hook called once with the training expression matrix (e.g. STNet's bias init)."""


@dataclass
class MethodSpec:
    name: str
    model_cls: type[ExpressionModel]
    Config: type
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    description: str = ""

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
        return self.Config(**model_cfg)

    def build(self, model_cfg: dict[str, Any], n_genes: int) -> ExpressionModel:
        return self.model_cls(self.validate_model_config(model_cfg), n_genes)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config: type,
    presets: dict[str, dict[str, Any]] | None = None,
    description: str = "",
) -> Callable[[type[ExpressionModel]], type[ExpressionModel]]:
    """Class decorator: make a model available as ``--method name``.

    The model class is constructed as ``cls(config_instance, n_genes)``.
    ``presets`` maps a preset name (``cpu``, ``paper``, ``tiny``) to dotted overrides
    such as ``{"model.depth": 4, "train.epochs": 10}``.
    """

    def deco(cls: type[ExpressionModel]) -> type[ExpressionModel]:
        _REGISTRY[name] = MethodSpec(name, cls, config, dict(presets or {}), description)
        return cls

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
