"""BLEEP (Xie et al., NeurIPS 2023): CMRCNet with the reconstruction branch off and a ResNet-50.

BLEEP is literally :class:`~cmrcnet.models.cmrcnet.CMRCNet` with other defaults, so
both methods share one code path for encoders, projection heads, the contrastive
loss, the distributed gather and retrieval; a comparison of the two isolates the
reconstruction branch and the encoder.

Defaults follow BLEEP's code: ResNet-50 with global average pooling, projection
heads to 256, ``loss = Lc`` (``loss_combine = "sum"``, no log), top-50 mean retrieval.
BLEEP starts from ImageNet weights; this package never downloads, so give a local
file with ``model.encoder_weights=PATH`` to match it (random init otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmrcnet.models.base import register_method
from cmrcnet.models.cmrcnet import CMRCNet, CMRCNetConfig


@dataclass
class BLEEPConfig(CMRCNetConfig):
    """CMRCNet options with BLEEP's defaults (every CMRCNet option stays available)."""

    encoder: str = "resnet50"
    reconstruction: bool = False
    loss_combine: str = "sum"


BLEEP_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"model.encoder": "resnet50", "model.reconstruction": False},
    # Frozen ImageNet EfficientNet-Lite0, as CMRCNet's cpu preset (docs/RESULTS.md).
    "cpu": {"model.encoder": "efficientnet-lite0", "model.encoder_mode": "frozen", "model.reconstruction": False},
    # The previous cpu preset, ResNet-18 at 112 px from scratch: --set model.encoder=resnet18
    # --set model.encoder_mode=scratch.
    # resnet10t at 32 px: a 1 x 1 final map, a few ms per batch; for tests only.
    "tiny": {"model.encoder": "resnet10t", "model.reconstruction": False, "model.embed_dim": 32},
}


@register_method(
    "bleep",
    config=BLEEPConfig,
    presets=BLEEP_PRESETS,
    description="BLEEP: bi-modal contrastive learning (ResNet-50), top-k retrieval",
    colour="#ff7f0e",  # the paper's Fig. 2
)
class BLEEP(CMRCNet):
    """CMRCNet restricted to contrastive learning; see the module docstring."""
