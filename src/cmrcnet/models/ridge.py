"""Frozen-encoder ridge regression: HEST-Benchmark's protocol (Jaume et al., NeurIPS 2024).

Stands in for the paper's foundation-model comparison (cTransPath): embed every
training patch with a frozen image encoder, then StandardScaler -> PCA(256) -> ridge
regression onto log1p expression. Fitted in closed form, not by gradient descent.

The fitted scaler, PCA and ridge are kept as tensor buffers, so ``state_dict()``
round-trips through ``torch.save`` and prediction is plain torch. Deviations from HEST
are listed in ``docs/methods.md``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.models.base import Batch, ExpressionModel, register_method
from cmrcnet.models.encoders import HALF, IMAGENET, ImageEncoder, state_dict_upgrade_hook, weights_deferred
from cmrcnet.models.features import EncoderMethod, EncoderOptions

if TYPE_CHECKING:
    from cmrcnet.training.fit import FoldData

log = logging.getLogger(__name__)


@dataclass
class RidgeConfig(EncoderOptions):
    encoder: str = "resnet50"
    """Frozen encoder: a registered one (``cmrcnet encoders``) or a timm model (HEST's weakest
    baseline is an ImageNet ResNet-50). Without weights it is a random-weights control."""
    encoder_mode: str = "frozen"
    """Always ``frozen``: the probe is fitted on fixed features (cached, see EncoderOptions)."""
    encoder_norm: str = "auto"
    """Input normalisation the encoder was trained with: ``auto`` (a registered encoder's own, else
    ImageNet), ``imagenet`` (batches as given) or ``half`` (pixels in [-1, 1], as TF
    EfficientNet-Lite and Inception-style models)."""
    n_components: int = 256
    """PCA dimensions (HEST: 256), capped by the number of training spots and features."""
    alpha: float | None = None
    """Ridge penalty; None = HEST's 100 / (n_components * n_genes)."""
    fit_intercept: bool = True
    """HEST fits without intercept; with centred PCA inputs the coefficients are identical,
    and the intercept restores the mean level (PCC is unaffected, MSE is not)."""
    solver: str = "lsqr"
    """scikit-learn Ridge solver (HEST: lsqr)."""
    max_iter: int = 1000

    def __post_init__(self) -> None:
        _check(self)


def _check(config: RidgeConfig) -> None:
    config.validate_encoder_options()
    if config.encoder_mode != "frozen":
        raise ConfigError(f"ridge: the encoder is frozen by nature; model.encoder_mode must be frozen, got {config.encoder_mode!r}")
    if config.encoder_norm not in ("auto", "imagenet", "half"):
        raise ConfigError(f"ridge: encoder_norm must be 'auto', 'imagenet' or 'half', got {config.encoder_norm!r}")
    if config.n_components < 1:
        raise ConfigError("ridge: n_components must be positive")
    if config.alpha is not None and config.alpha < 0:
        raise ConfigError("ridge: alpha must be >= 0")


@register_method(
    "ridge",
    config=RidgeConfig,
    presets={
        "paper": {"model.encoder": "resnet50", "patches.size_px": 224, "train.augment": False},
        # ImageNet EfficientNet-Lite0: its weights come with a dependency, so this is a real probe
        "cpu": {"model.encoder": "efficientnet-lite0", "train.augment": False},
        "tiny": {"model.encoder": "test_resnet", "model.n_components": 16, "train.augment": False},
    },
    description="HEST benchmark: frozen encoder -> StandardScaler -> PCA(256) -> ridge (closed form)",
    colour="#7f7f7f",
)
class RidgeProbe(EncoderMethod, ExpressionModel):
    """Frozen encoder + linear probe fitted in closed form."""

    def __init__(self, config: RidgeConfig, n_genes: int) -> None:
        super().__init__()
        _check(config)
        self.config = config
        self.n_genes = n_genes
        norm = {"imagenet": IMAGENET, "half": HALF}.get(config.encoder_norm)
        self.encoder = ImageEncoder(config.encoder, config.encoder_weights, fallback_pool="timm", norm_override=norm,
                                    **config.encoder_kwargs)
        self._register_load_state_dict_pre_hook(state_dict_upgrade_hook("encoder.", "encoder.model."))
        if not self.encoder.pretrained and not weights_deferred():
            msg = (
                f"ridge: encoder {config.encoder!r} has RANDOM weights; this is a control, not the "
                "foundation-model protocol. Set model.encoder_weights to a local weights file."
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        n_feat = self.encoder.out_dim
        k = min(config.n_components, n_feat)
        # Fixed-size buffers (zero-padded past the fitted rank) so that a fresh model
        # loads a fitted state_dict without knowing the training set.
        self.register_buffer("x_mean", torch.zeros(n_feat))
        self.register_buffer("x_scale", torch.ones(n_feat))
        self.register_buffer("pca_mean", torch.zeros(n_feat))
        self.register_buffer("components", torch.zeros(k, n_feat))
        self.register_buffer("coef", torch.zeros(n_genes, k))
        self.register_buffer("intercept", torch.zeros(n_genes))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def image_encoder(self) -> ImageEncoder:
        return self.encoder

    @torch.no_grad()
    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features (float32), in the normalisation the encoder expects."""
        dev = next(self.encoder.parameters()).device
        return self.encoder(img.to(dev, torch.float32))[1].float()

    @torch.no_grad()
    def features(self, batch: Batch) -> torch.Tensor:
        """The batch's cached features (``feat``) or, from images, the encoder's."""
        return batch["feat"].float() if "feat" in batch else self.embed(batch["img"])

    def fit(self, fold: FoldData, *, batch_size: int, seed: int, by_gradient: Callable[[], dict]) -> dict:
        """Closed form on every labelled training spot (validation spots too: nothing to early-stop)."""
        table = fold.reference
        self.fit_closed_form(self.loader(table, batch_size=max(batch_size, 64), seed=seed))
        return {"n_train": len(table)}

    def fit_closed_form(self, batches: Iterable[Batch]) -> None:
        """Embed all training spots, then fit scaler -> PCA -> ridge (HEST's probe)."""
        xs, ys = [], []
        for batch in batches:
            xs.append(self.features(batch).cpu().numpy())
            ys.append(batch["expr"].float().cpu().numpy())
        if not xs:
            raise ValueError("ridge: no training batches to fit on")
        self.fit_arrays(np.concatenate(xs), np.concatenate(ys))

    def fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        """Fit the probe on precomputed features ``x`` (N, F) and targets ``y`` (N, G)."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        if y.shape[1] != self.n_genes or x.shape[1] != self.x_mean.shape[0] or len(x) != len(y):
            raise ValueError(f"ridge: got features {x.shape} and targets {y.shape}")
        if len(x) < 2:
            raise ValueError("ridge: need at least 2 training spots")
        scaler = StandardScaler().fit(x)
        k = min(self.components.shape[0], len(x), x.shape[1])
        pca = PCA(n_components=k, random_state=0).fit(scaler.transform(x))
        z = pca.transform(scaler.transform(x))
        alpha = self.config.alpha if self.config.alpha is not None else 100.0 / (k * y.shape[1])
        reg = Ridge(
            alpha=alpha,
            fit_intercept=self.config.fit_intercept,
            solver=self.config.solver,
            max_iter=self.config.max_iter,
            random_state=0,
        ).fit(z, y)
        self._store(scaler, pca, reg)
        log.info("ridge: fitted on %d spots, %d PCA components, alpha=%.3g", len(x), k, alpha)

    def _store(self, scaler: object, pca: object, reg: object) -> None:
        """Copy the fitted sklearn parameters into the buffers (zero-padding unused components)."""

        def t(a: object) -> torch.Tensor:
            return torch.tensor(np.asarray(a, dtype=np.float32), device=self.x_mean.device)

        k = pca.components_.shape[0]
        with torch.no_grad():
            self.x_mean.copy_(t(scaler.mean_))
            self.x_scale.copy_(t(scaler.scale_))
            self.pca_mean.copy_(t(pca.mean_))
            self.components.zero_()
            self.components[:k].copy_(t(pca.components_))
            self.coef.zero_()
            self.coef[:, :k].copy_(t(np.atleast_2d(reg.coef_)))
            self.intercept.copy_(t(np.broadcast_to(reg.intercept_, (self.n_genes,))))
            self.fitted.fill_(True)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Scaler -> PCA -> ridge as torch ops, in float32 even under autocast."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            z = ((feats.float() - self.x_mean) / self.x_scale - self.pca_mean) @ self.components.T
            return z @ self.coef.T + self.intercept

    def predict_expression(self, batch: Batch) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("ridge: predict_expression called before fit_closed_form")
        return self.project(self.features(batch))

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError("ridge is fitted in closed form (RidgeProbe.fit)")
