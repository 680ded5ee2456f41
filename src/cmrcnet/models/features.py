"""Encoder modes shared by every image method: ``scratch``, ``finetune``, ``lora`` and ``frozen``.

- ``scratch``: every encoder weight is trained, from ``encoder_weights`` when given, else from
  random weights (the behaviour before modes existed).
- ``finetune``: the same from pretrained weights (required), the encoder's learning rate scaled
  by ``encoder_lr_scale``.
- ``lora``: the pretrained encoder stays fixed; low-rank adapters (``peft``) on its linear and
  convolution layers are trained, at ``encoder_lr_scale`` x the learning rate.
- ``frozen``: the pretrained encoder never changes, so it runs once per patch (and per dihedral
  view when augmenting): :func:`cached_features` stores its outputs on disk (float16, keyed by
  sample, patches, encoder, weights hash, views and token pooling; written atomically) and the
  training epochs read features only.

A method opts in by inheriting :class:`EncoderMethod` and holding its encoder as
``self.image_encoder`` (an :class:`~cmrcnet.models.encoders.ImageEncoder`); its config
inherits :class:`EncoderOptions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.data.batches import SpotTable, dihedral, spot_loader
from cmrcnet.errors import ConfigError, InputError
from cmrcnet.models.encoders import ImageEncoder, weights_deferred
from cmrcnet.utils import atomic_path

if TYPE_CHECKING:
    from cmrcnet.training.fit import FoldData

log = logging.getLogger(__name__)

ENCODER_MODES = ("scratch", "finetune", "lora", "frozen")
VIEW_CHOICES = ("auto", "dihedral", "none")
FEATURE_FORMAT_VERSION = 1


@dataclass
class EncoderOptions:
    """Encoder options of every image method (``--set model.KEY=VALUE``)."""

    encoder: str = "resnet18"
    """A registered encoder (``cmrcnet encoders``: UNI, Virchow2, ..., efficientnet-lite0) or any
    timm architecture name."""
    encoder_weights: str | None = None
    """Local weights file or Hugging Face style folder (never downloaded). None = random init,
    or the weights that come with the entry (efficientnet-lite0)."""
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (override a registered entry's)."""
    encoder_mode: str = "scratch"
    """``scratch``, ``finetune``, ``lora`` or ``frozen`` (see :mod:`cmrcnet.models.features`)."""
    encoder_lr_scale: float = 1.0
    """Learning-rate multiplier of the encoder's trainable weights (``finetune``, ``lora``)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    """Module names given LoRA adapters; empty = every Linear and ungrouped Conv2d of the encoder."""
    frozen_views: str = "auto"
    """``frozen``: cache the 8 dihedral views (``dihedral``), only the patch as cut (``none``), or
    ``auto``: the 8 views when ``train.augment`` is on."""
    frozen_token_grid: int = 4
    """``frozen``: image tokens kept for reconstruction, the patch grid average-pooled to this side
    (prefix tokens kept); 0 keeps every token (memory: spots x views x tokens x width x 2 bytes)."""
    frozen_precision: str = "auto"
    """``frozen``: encode in ``fp32``, ``bf16``, or ``auto`` (bf16 when the run trains in bf16 on
    hardware where bf16 matmuls are faster: :func:`cmrcnet.runtime.use_bf16`)."""

    def validate_encoder_options(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"model.{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")

        choice("encoder_mode", ENCODER_MODES)
        choice("frozen_views", VIEW_CHOICES)
        choice("frozen_precision", ("auto", "fp32", "bf16"))
        if not (float(self.encoder_lr_scale) > 0):
            raise ConfigError(f"model.encoder_lr_scale must be > 0, got {self.encoder_lr_scale}")
        if int(self.lora_rank) < 1 or float(self.lora_alpha) <= 0 or not 0 <= float(self.lora_dropout) < 1:
            raise ConfigError("model.lora_rank must be >= 1, model.lora_alpha > 0 and 0 <= model.lora_dropout < 1")
        if int(self.frozen_token_grid) < 0:
            raise ConfigError(f"model.frozen_token_grid must be >= 0, got {self.frozen_token_grid}")
        if not isinstance(self.encoder_kwargs, dict):
            raise ConfigError("model.encoder_kwargs must be a mapping")


class EncoderMethod:
    """Mixin for :class:`~cmrcnet.models.base.ExpressionModel` subclasses with an ``image_encoder``
    and an :class:`EncoderOptions` config: applies the encoder mode, and in ``frozen`` mode encodes
    a fold once (cached) so that batches carry ``feat`` / ``tokens`` instead of ``img``."""

    image_encoder: ImageEncoder
    config: EncoderOptions
    #: Whether :meth:`image_features` needs image tokens (reconstruction), cached in frozen mode.
    needs_tokens: bool = False

    def setup_encoder_mode(self) -> None:
        """Freeze or adapt the encoder as its mode says (call once, after building it)."""
        c, enc = self.config, self.image_encoder
        mode = c.encoder_mode
        if mode in ("finetune", "lora", "frozen") and not enc.pretrained and not weights_deferred():
            raise ConfigError(
                f"model.encoder_mode={mode} needs pretrained weights: set model.encoder_weights=PATH "
                f"(or use an encoder that ships them, e.g. efficientnet-lite0); encoder {c.encoder!r} has none"
            )
        if mode == "frozen":
            enc.requires_grad_(False)
            enc.eval()
        elif mode == "lora":
            inject_lora(enc, c)

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module.train, keeping a frozen encoder in eval
        super().train(mode)  # type: ignore[misc]
        if self.config.encoder_mode == "frozen":
            self.image_encoder.eval()
        return self

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Encoder weights at ``encoder_lr_scale`` x ``lr``, the rest at ``lr`` (frozen weights left out)."""
        enc_ids = {id(p) for p in self.image_encoder.parameters()}
        own = [p for p in self.parameters() if p.requires_grad and id(p) not in enc_ids]  # type: ignore[attr-defined]
        enc = [p for p in self.image_encoder.parameters() if p.requires_grad]
        groups = [{"params": own, "lr": lr}]
        if enc:
            groups.append({"params": enc, "lr": lr * float(self.config.encoder_lr_scale)})
        return [g for g in groups if g["params"]]

    def image_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(tokens, pooled)`` of a batch: cached (``feat``, ``tokens``) in frozen mode, else encoded."""
        if "feat" in batch:
            return batch.get("tokens"), batch["feat"]
        return self.image_encoder(batch["img"])

    def encode_fold(self, fold: FoldData, *, augment: bool, cache_dir: str | Path | None, precision: str) -> FoldData:
        """Frozen mode: the fold's training and validation spots as cached encoder features."""
        if self.config.encoder_mode != "frozen":
            return fold
        c = self.config
        views = 8 if c.frozen_views == "dihedral" or (c.frozen_views == "auto" and augment) else 1
        grid = int(c.frozen_token_grid) if self.needs_tokens else None
        bf16 = _use_bf16(c.frozen_precision, precision, self.image_encoder)

        def encode(sample_id: str, table: SpotTable) -> dict[str, np.ndarray]:
            return cached_features(self.image_encoder, table, sample_id=sample_id, views=views, token_grid=grid,
                                   cache_dir=cache_dir, bf16=bf16)

        return fold.with_features(encode)


def _use_bf16(setting: str, train_precision: str, encoder: nn.Module) -> bool:
    from cmrcnet.runtime import use_bf16

    return use_bf16(setting, train_precision, next(iter(encoder.parameters())).device.type)


# -- LoRA ---------------------------------------------------------------------------------------
def lora_target_names(module: nn.Module) -> list[str]:
    """Every Linear and ungrouped Conv2d below ``module`` (what LoRA adapts by default)."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            names.append(name)
    return names


def inject_lora(encoder: ImageEncoder, c: EncoderOptions) -> None:
    """Add LoRA adapters (``peft``) to the encoder's timm model in place; only they train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # pragma: no cover - peft is a dependency
        raise ConfigError("model.encoder_mode=lora needs the peft package (pip install peft)") from None
    targets = list(c.lora_targets) or lora_target_names(encoder.model)
    if not targets:
        raise ConfigError(f"encoder {c.encoder!r} has no Linear or Conv2d layer for LoRA")
    encoder.model.requires_grad_(False)
    cfg = LoraConfig(r=int(c.lora_rank), lora_alpha=float(c.lora_alpha), lora_dropout=float(c.lora_dropout),
                     target_modules=targets)
    try:
        inject_adapter_in_model(cfg, encoder.model)
    except ValueError as e:
        raise ConfigError(f"model.lora_targets: {e}") from None
    for name, p in encoder.model.named_parameters():
        p.requires_grad_("lora_" in name)


# -- the feature cache ------------------------------------------------------------------------------
def _patches_digest(imgs: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(str(imgs.shape).encode())
    h.update(np.ascontiguousarray(imgs).data)
    return h.hexdigest()[:16]


def feature_cache_key(encoder: ImageEncoder, table: SpotTable, sample_id: str, views: int,
                      token_grid: int | None, bf16: bool) -> str:
    """Content key of a sample's cached features: any change of patches, encoder, weights, views,
    token pooling or precision gives another key (another file), never a stale hit."""
    d = encoder.describe()
    parts = [str(FEATURE_FORMAT_VERSION), sample_id, _patches_digest(table.imgs), repr(sorted(d.items())),
             str(views), str(token_grid), "bf16" if bf16 else "fp32"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def cached_features(
    encoder: ImageEncoder,
    table: SpotTable,
    *,
    sample_id: str,
    views: int = 1,
    token_grid: int | None = None,
    cache_dir: str | Path | None = None,
    bf16: bool = False,
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """``{"feat": (N, V, E)[, "tokens": (N, V, T, D)]}`` float16 of one sample's patches, read from the
    cache or computed once and cached. ``token_grid`` None: no tokens; 0: every token; n: the patch
    grid average-pooled to n x n (prefix tokens kept)."""
    from cmrcnet.data.patches import default_cache_dir

    if table.imgs is None:
        raise ValueError("cached_features needs a table with images")
    if views not in (1, 8):
        raise ValueError("views must be 1 or 8")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = feature_cache_key(encoder, table, sample_id, views, token_grid, bf16)
    path = root / "features" / f"{_safe(sample_id)}-{key}.npz"
    want = {"feat"} | ({"tokens"} if token_grid is not None else set())
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in want}
                barcodes = z["barcodes"]
            if barcodes.tolist() == table.barcodes.astype(str).tolist() and all(v.shape[:2] == (len(table), views) for v in out.values()):
                return out
            warnings.warn(f"feature cache {path} does not match sample {sample_id}; recomputing", stacklevel=2)
        except (OSError, KeyError, ValueError) as e:
            warnings.warn(f"feature cache {path} unreadable ({e}); recomputing", stacklevel=2)
    from cmrcnet.progress import progress_reporter

    t0 = time.perf_counter()
    with progress_reporter(f"caching features of {sample_id}", len(table) * views, "patches") as advance:
        out = encode_views(encoder, table, views=views, token_grid=token_grid, bf16=bf16, batch_size=batch_size,
                           progress=advance)
    dt = time.perf_counter() - t0
    log.info("%s: encoded %d patches x %d views in %.1f s (%.0f patches/s)", sample_id, len(table), views, dt,
             len(table) * views / max(dt, 1e-9))
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, barcodes=table.barcodes.astype(str), **out)
    except OSError as e:
        raise InputError(f"cannot write the feature cache: {e}", path) from None
    return out


def pool_token_grid(tokens: torch.Tensor, prefix: int, side: int) -> torch.Tensor:
    """Keep ``prefix`` tokens and average-pool the square patch grid after them to ``side`` x ``side``."""
    if side <= 0:
        return tokens
    grid = tokens[:, prefix:]
    n = grid.shape[1]
    g = int(round(n**0.5))
    if g * g != n or g <= side:
        return tokens
    b, _, d = grid.shape
    pooled = F.adaptive_avg_pool2d(grid.transpose(1, 2).reshape(b, d, g, g), side).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :prefix], pooled], dim=1)


@torch.no_grad()
def encode_views(encoder: ImageEncoder, table: SpotTable, *, views: int, token_grid: int | None, bf16: bool,
                 batch_size: int = 128, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Run the encoder over every patch (and dihedral view) of ``table``; ``progress(n)`` per batch."""
    was_training = encoder.training
    encoder.eval()
    device = next(iter(encoder.parameters())).device
    ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    feats: list[np.ndarray] = []
    toks: list[np.ndarray] = []
    try:
        with ctx:
            for b in spot_loader(table, batch_size):
                img = b["img"].to(device)
                fv, tv = [], []
                for k in range(views):
                    tokens, pooled = encoder(dihedral(img, k) if k else img)
                    fv.append(pooled.float().cpu())
                    if progress is not None:
                        progress(len(img))
                    if token_grid is not None:
                        tv.append(pool_token_grid(tokens.float(), encoder.num_prefix_tokens, token_grid).cpu())
                feats.append(torch.stack(fv, 1).numpy().astype(np.float16))
                if token_grid is not None:
                    toks.append(torch.stack(tv, 1).numpy().astype(np.float16))
    finally:
        encoder.train(was_training)
    out = {"feat": np.concatenate(feats)}
    if token_grid is not None:
        out["tokens"] = np.concatenate(toks)
    return out
