"""Image encoders from timm, with optional local weights (never a hub download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrcnet.errors import ConfigError, InputError


def create_encoder(
    name: str,
    weights: str | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model without classifier head (``num_classes=0``).

    ``weights`` is a local file (``.pth``/``.pt``/``.bin``/``.safetensors``) loaded with
    ``weights_only=True``; keys of a classifier head are ignored. ``img_size`` is passed to
    models that take it (ViTs).
    """
    import timm

    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}")
    if img_size is not None and ("vit" in name or "deit" in name or "swin" in name):
        kwargs.setdefault("img_size", img_size)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights:
        load_local_weights(model, weights)
    return model


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise InputError("encoder weights file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad file for the user
        raise InputError(f"cannot read encoder weights: {e}", path) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise InputError("encoder weights file does not hold a state dict", path)
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    own = model.state_dict()
    filtered = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not filtered:
        filtered = _match_by_position(state, own)
    if not filtered:
        raise InputError("no tensor in the weights file matches the encoder's parameters", path)
    missing = [k for k in own if k not in filtered]
    model.load_state_dict(filtered, strict=False)
    if len(missing) > 0.5 * len(own):
        raise InputError(
            f"weights file matches only {len(filtered)} of {len(own)} encoder tensors", path
        )


def _match_by_position(state: dict, own: dict) -> dict:
    """Pair tensors by order when no name matches but every shape lines up.

    Why: weights saved under another implementation's names (e.g. EfficientNet-PyTorch's
    ``_blocks.0._bn1`` for timm's ``blocks.0.0.bn1``) hold the same tensors in the same
    order. At most two trailing extra tensors (a classifier head) are ignored.
    """
    src = list(state.values())
    dst = list(own.items())
    if not len(dst) <= len(src) <= len(dst) + 2:
        return {}
    for v, (_, o) in zip(src, dst):
        if not isinstance(v, torch.Tensor) or v.shape != o.shape:
            return {}
    return {k: v for (k, _), v in zip(dst, src)}


def encoder_out_dim(model: nn.Module) -> int:
    """Width of a ``num_classes=0`` timm model's pooled output (``forward`` / ``forward_head``).

    ``head_hidden_size`` differs from ``num_features`` (the width of ``forward_features``)
    for models with a conv head (MobileNetV3/V4, MambaOut), whose pooled output is the head's.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
