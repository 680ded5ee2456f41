"""CMRCNet: contrastive image/expression alignment plus cross-modal masked reconstruction.

Training (paper Fig. 1a)::

    img ─ encoder ─ F_img (B,N,De) ─ pool ─ ProjectionHead ─ F'_img (B,E) ─┐
    expr ─────────────────────────────────── ProjectionHead ─ F_gene (B,E) ─┴─ contrastive loss
    F_img ─ Linear(De->E) ─ mask ─┐                                    (gathered across processes)
    expr ─ SNN ─ (B,T,E) ─────────┴─ CrossAttention ─ FusionBlock x2 ─ mean ─ F_r ─ recon loss vs F'_img

Inference keeps only the encoder + both projection heads; prediction is top-k
retrieval from a bank of training-spot gene embeddings (:mod:`cmrcnet.retrieval`).
Every paper-vs-authors choice is an option of :class:`CMRCNetConfig`; see ``docs/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.base import Batch, ExpressionModel, register_method
from cmrcnet.models.encoders import POOLINGS, ImageEncoder
from cmrcnet.models.features import EncoderMethod, EncoderOptions
from cmrcnet.models.layers import (
    SNN,
    CrossAttention,
    FusionBlock,
    ProjectionHead,
    random_feature_mask,
    set_fused_attention,
)
from cmrcnet.models.predictors import RetrievalPredictor
from cmrcnet.models.losses import (
    TEMPERATURE_MODES,
    bleep_contrastive_loss,
    gather_embeddings,
    reconstruction_loss,
)

if TYPE_CHECKING:
    from cmrcnet.config import RunConfig
    from cmrcnet.training.fit import FoldData

LOSS_COMBINE = ("log1p", "log1p_per_sample", "sum")


@dataclass
class CMRCNetConfig(EncoderOptions):
    """Hyperparameters of CMRCNet (defaults: the paper; ``authors`` preset: the authors' code).

    The encoder options (``encoder``, ``encoder_weights``, ``encoder_kwargs``, ``encoder_mode``,
    LoRA and frozen-feature settings) are :class:`~cmrcnet.models.features.EncoderOptions`'.
    """

    # -- image encoder
    encoder: str = "vit_base_patch32_224"
    """A registered encoder (``cmrcnet encoders``) or any timm model name; ViT-B/32 as in the paper."""
    vit_depth: int | None = None
    """Transformer depth override (timm ``depth``); the authors use 8 instead of ViT-B's 12."""
    vit_heads: int | None = None
    """Attention heads override (timm ``num_heads``); the authors use 8 instead of 12."""
    img_size: int | None = None
    """Input side in px; None = filled by the trainer from ``patches.size_px``."""
    pool: str = "auto"
    """Image embedding pooling: ``auto`` (a registered encoder's own tile embedding, e.g. UNI's CLS;
    else ``mean``), ``mean`` (all tokens incl. CLS), ``mean_no_cls``, ``cls``, ``cls+mean``, ``timm``."""
    # -- contrastive part
    embed_dim: int = 256
    """Shared embedding size of both projection heads (and of the fusion tokens)."""
    proj_dropout: float = 0.1
    tau: float = 1.0
    temperature_mode: str = "bleep"
    """``bleep`` (logits/tau, targets*tau), ``multiply`` or ``divide``; identical at tau = 1."""
    contrastive_reduction: str = "mean"
    """``mean``: (CE_gene + CE_img)/2 (BLEEP, authors); ``sum``: CE_gene + CE_img (paper formula)."""
    gather_distributed: bool = True
    """All-gather embeddings across processes before the loss (more negatives under DDP)."""
    # -- cross-modal reconstruction
    reconstruction: bool = True
    """False = contrastive learning only (BLEEP); no reconstruction parameters are built."""
    mask_ratio: float = 0.5
    """Fraction of image token *elements* zeroed before reconstruction."""
    mask_at_eval: bool = False
    """Also mask in eval mode (authors: True; affects validation loss only)."""
    recon_loss: str = "mse"
    """``mse`` or ``cosine`` (1 - cos)."""
    recon_target: str = "image"
    """``image``: reconstruct F'_img (paper); ``expression``: regress the expression vector."""
    detach_target: bool = False
    """Stop the gradient through the reconstruction target (authors: not detached)."""
    snn_activation: str = "selu"
    """``selu`` (paper) or ``elu`` (authors)."""
    snn_dropout: float = 0.25
    gene_tokens: int = 8
    """Gene tokens made by the SNN (2048 = 8 x 256 in the paper)."""
    cross_heads: int = 4
    fusion_heads: int = 8
    fusion_blocks: int = 2
    fusion_shared_weights: bool = False
    """Apply one FusionBlock ``fusion_blocks`` times (authors' code) instead of distinct blocks."""
    residual_attention: str = "paper"
    """``paper`` (linear Q/K/V, V_img residual) or ``authors`` (Linear+ReLU+Dropout on Q and K)."""
    cross_dropout: float = 0.25
    """Dropout inside the authors' Q/K maps (``residual_attention = authors`` only)."""
    mlp_ratio: float = 4.0
    fusion_dropout: float = 0.1
    """Dropout after the fusion blocks' attention projection and MLP (authors: 0.1)."""
    attn_dropout: float = 0.0
    fused_attention: str = "auto"
    """``auto``: fused SDPA on accelerators, explicit matmuls on CPU (much faster there in bf16);
    ``always`` / ``never``. Same maths either way."""
    loss_combine: str = "log1p"
    """``log1p``: log(1+Lc)+log(1+Lr) (paper); ``log1p_per_sample``: mean_i log(1+Lc_i)+log(1+Lr)
    (authors); ``sum``: Lc + Lr (BLEEP's plain loss when reconstruction is off)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value, before any module is built."""

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"model.{name} must be one of {options}, got {getattr(self, name)!r}")

        self.validate_encoder_options()
        choice("pool", ("auto",) + POOLINGS)
        choice("temperature_mode", TEMPERATURE_MODES)
        choice("contrastive_reduction", ("mean", "sum"))
        choice("recon_loss", ("mse", "cosine"))
        choice("recon_target", ("image", "expression"))
        choice("snn_activation", ("selu", "elu"))
        choice("residual_attention", ("paper", "authors"))
        choice("loss_combine", LOSS_COMBINE)
        choice("fused_attention", ("auto", "always", "never"))
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.tau <= 0:
            raise ConfigError(f"model.tau must be > 0, got {self.tau}")
        for name in ("embed_dim", "gene_tokens", "cross_heads", "fusion_heads", "fusion_blocks"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name, heads in (("cross_heads", self.cross_heads), ("fusion_heads", self.fusion_heads)):
            if self.reconstruction and self.embed_dim % heads:
                raise ConfigError(f"model.embed_dim {self.embed_dim} is not divisible by model.{name} {heads}")
        if not isinstance(self.encoder_kwargs, dict):
            raise ConfigError("model.encoder_kwargs must be a mapping")

    def timm_kwargs(self) -> dict[str, Any]:
        kw = dict(self.encoder_kwargs)
        for key, value in (("depth", self.vit_depth), ("num_heads", self.vit_heads)):
            if value is None:
                continue
            if key in kw and kw[key] != value:
                raise ConfigError(f"encoder_kwargs[{key!r}]={kw[key]} conflicts with vit_{key.split('_')[-1]}={value}")
            kw[key] = value
        return kw


CMRCNET_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"model.encoder": "vit_base_patch32_224"},
    "authors": {
        # data/train settings of the paper preset (this preset has no global counterpart)
        "patches.size_px": 224,
        "train.epochs": 60,
        "train.batch_size": 64,
        "train.lr": 1e-4,
        "train.weight_decay": 1e-3,
        "train.min_lr": 1e-5,
        "train.precision": "auto",
        "model.encoder": "vit_base_patch32_224",
        "model.vit_depth": 8,
        "model.vit_heads": 8,
        "model.fusion_shared_weights": True,
        "model.mask_at_eval": True,
        "model.snn_activation": "elu",
        "model.residual_attention": "authors",
        "model.loss_combine": "log1p_per_sample",
    },
    "cpu": {
        # Frozen ImageNet EfficientNet-Lite0 (its weights ship with a dependency), features cached
        # once: HEG-50 0.186 vs 0.080 for the from-scratch ViT-Ti on her2st, 0.317 vs 0.268 on mob,
        # 0.054 vs 0.040 across patients (docs/RESULTS.md). 112 px gives a 4 x 4 token grid.
        "model.encoder": "efficientnet-lite0",
        "model.encoder_mode": "frozen",
    },
    # The previous cpu preset (ViT-Ti/16 at 112 px, 7 x 7 + 1 = 50 tokens like the paper's ViT-B/32
    # at 224 px, from scratch): --set model.encoder=vit_tiny_patch16_224 --set model.vit_depth=6
    # --set model.encoder_mode=scratch.
    "tiny": {
        "model.encoder": "vit_tiny_patch16_224",
        "model.encoder_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "model.embed_dim": 32,
        "model.gene_tokens": 4,
        "model.cross_heads": 2,
        "model.fusion_heads": 2,
        "model.mlp_ratio": 2.0,
    },
}


@register_method(
    "cmrcnet",
    config=CMRCNetConfig,
    presets=CMRCNET_PRESETS,
    description="CMRCNet: contrastive learning + cross-modal masked reconstruction, top-k retrieval",
    colour="#2ca02c",  # the paper's Fig. 2
)
class CMRCNet(EncoderMethod, ExpressionModel):
    """Contrastive image/gene encoders; the reconstruction branch only shapes training."""

    def __init__(self, config: CMRCNetConfig, n_genes: int) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.n_genes = int(n_genes)
        self._fused: bool | None = None
        c = config
        self.image_encoder = ImageEncoder(c.encoder, c.encoder_weights, c.img_size, c.pool, fallback_pool="mean",
                                          **c.timm_kwargs())
        self.needs_tokens = bool(c.reconstruction)
        self.setup_encoder_mode()
        enc_dim = self.image_encoder.out_dim
        self.image_projection = ProjectionHead(enc_dim, c.embed_dim, c.proj_dropout)
        self.gene_projection = ProjectionHead(self.n_genes, c.embed_dim, c.proj_dropout)
        if c.reconstruction:
            self.token_projection = nn.Linear(self.image_encoder.token_dim, c.embed_dim)
            self.gene_tokenizer = SNN(self.n_genes, c.gene_tokens * c.embed_dim, c.snn_activation, c.snn_dropout)
            self.first_cross = CrossAttention(c.embed_dim, c.cross_heads, c.attn_dropout)

            def block() -> FusionBlock:
                return FusionBlock(
                    c.embed_dim,
                    c.fusion_heads,
                    c.mlp_ratio,
                    c.fusion_dropout,
                    c.attn_dropout,
                    c.residual_attention,
                    c.cross_dropout,
                )

            if c.fusion_shared_weights:
                self.fusion = nn.ModuleList([block()])
            else:
                self.fusion = nn.ModuleList([block() for _ in range(c.fusion_blocks)])
            self.recon_head = nn.Linear(c.embed_dim, self.n_genes) if c.recon_target == "expression" else None

    # -- encoders (used by retrieval) --------------------------------------------------------
    def _select_attention(self, device: torch.device) -> None:
        """Pick the attention kernel for the device the model now runs on (cheap when unchanged)."""
        mode = self.config.fused_attention
        fused = mode == "always" or (mode == "auto" and device.type != "cpu")
        if fused != self._fused:
            set_fused_attention(self, fused)
            self._fused = fused

    def encode_images(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(tokens (B,N,De), embedding (B,E))`` from one encoder pass."""
        self._select_attention(img.device)
        tokens, pooled = self.image_encoder(img)
        return tokens, self.image_projection(pooled)

    def embed_images(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode_images(img)[1]

    def embed_genes(self, expr: torch.Tensor) -> torch.Tensor:
        return self.gene_projection(expr)

    # -- prediction: top-k retrieval from a bank of training-spot gene embeddings ----------------
    def make_predictor(self, fold: FoldData, cfg: RunConfig) -> RetrievalPredictor:
        ref = fold.reference
        return RetrievalPredictor.build(self, ref.expr, fold.genes, ref.spot_ids, cfg.retrieval, cfg.train.precision)

    def load_predictor(self, run_dir: Path, cfg: RunConfig) -> RetrievalPredictor:
        return RetrievalPredictor.load(self, run_dir, cfg.retrieval, cfg.train.precision)

    # -- reconstruction ----------------------------------------------------------------------
    def fusion_layers(self) -> list[FusionBlock]:
        if self.config.fusion_shared_weights:
            return [self.fusion[0]] * self.config.fusion_blocks
        return list(self.fusion)

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """Rebuild the image embedding from masked image tokens guided by gene tokens: ``F_r (B,E)``."""
        c = self.config
        self._select_attention(tokens.device)
        x = self.token_projection(tokens)
        if self.training or c.mask_at_eval:
            x = random_feature_mask(x, c.mask_ratio)
        genes = self.gene_tokenizer(expr).view(expr.shape[0], c.gene_tokens, c.embed_dim)
        x = self.first_cross(x, genes)
        for blk in self.fusion_layers():
            x = blk(x, genes)
        return x.mean(1)

    # -- training ----------------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        expr = batch["expr"]
        tokens, pooled = self.image_features(batch)
        self._select_attention(pooled.device)
        img_emb = self.image_projection(pooled)
        gene_emb = self.embed_genes(expr)
        img_all, gene_all = img_emb, gene_emb
        if c.gather_distributed:
            img_all, gene_all = gather_embeddings(img_emb), gather_embeddings(gene_emb)
        per_sample = bleep_contrastive_loss(
            img_all,
            gene_all,
            tau=c.tau,
            temperature_mode=c.temperature_mode,
            reduction=c.contrastive_reduction,
            batch_reduction="none",
        )
        lc = per_sample.mean()
        # logged so a DDP run shows its effective negatives (local batch x world size)
        n_neg = torch.tensor(float(img_all.shape[0]), device=lc.device)
        out: dict[str, torch.Tensor] = {"loss_contrastive": lc, "n_negatives": n_neg}
        if c.loss_combine == "log1p":
            loss = torch.log1p(lc)
        elif c.loss_combine == "log1p_per_sample":
            loss = torch.log1p(per_sample).mean()
        else:
            loss = lc
        if c.reconstruction:
            f_r = self.reconstruct(tokens, expr)
            if c.recon_target == "image":
                pred, target = f_r, img_emb
            else:
                assert self.recon_head is not None
                pred, target = self.recon_head(f_r), expr
            if c.detach_target:
                target = target.detach()
            lr = reconstruction_loss(pred, target, c.recon_loss)
            out["loss_recon"] = lr
            loss = loss + (lr if c.loss_combine == "sum" else torch.log1p(lr))
        out["loss"] = loss
        return out
