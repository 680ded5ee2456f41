"""HisToGene (Pang et al., bioRxiv 2021): a Transformer over all spots of a slide.

As published (maxpmx/HisToGene): each spot's flattened patch goes through one linear
layer, plus learned embeddings of the spot's array x and y; a Transformer over the
whole slide's sequence of spots; LayerNorm + linear gene head; MSE. One optimiser step
per slide. Deviations are listed in ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cmrcnet.data.batches import SpotTable, concat_batches, slide_loader
from cmrcnet.errors import ConfigError
from cmrcnet.models.base import Batch, ExpressionModel, register_method


@dataclass
class HisToGeneConfig:
    patch_px: int = 112
    """Side the patch is resized to before flattening (HisToGene: 112 px)."""
    dim: int = 1024
    depth: int = 8
    heads: int = 16
    mlp_dim: int = 2048
    dropout: float = 0.1
    """Dropout on embeddings, attention output and MLP."""
    attn_dropout: float = 0.1
    """Dropout on attention probabilities. Any value > 0 makes PyTorch materialise the
    N x N attention matrix on CPU (8x slower and 8x memory at 4,000 spots): 0 in the cpu preset."""
    n_pos: int = 128
    """Buckets of each position embedding (array row, array column)."""
    pos_overflow: str = "scale"
    """Positions spanning more than ``n_pos`` after subtracting the slide minimum:
    ``scale`` divides them by the smallest integer that fits them, ``clamp`` clips at n_pos-1."""


def position_buckets(pos: torch.Tensor, n_pos: int, overflow: str = "scale") -> torch.Tensor:
    """Map arbitrary integer (row, col) positions of one slide to indices in ``[0, n_pos)``.

    Why: array coordinates start at 0 on Visium/ST but other readers may give offsets or
    a coarser grid; subtracting the slide minimum keeps the embedding table small.
    """
    p = pos.long() - pos.long().min(dim=0, keepdim=True).values
    if overflow == "scale":
        span = p.max(dim=0, keepdim=True).values + 1
        factor = torch.div(span + n_pos - 1, n_pos, rounding_mode="floor").clamp(min=1)
        p = torch.div(p, factor, rounding_mode="floor")
    elif overflow != "clamp":
        raise ConfigError(f"histogene: pos_overflow must be 'scale' or 'clamp', got {overflow!r}")
    return p.clamp(0, n_pos - 1)


def _check(config: HisToGeneConfig) -> None:
    if config.dim % config.heads:
        raise ConfigError(f"histogene: dim ({config.dim}) must be divisible by heads ({config.heads})")
    if config.patch_px < 1 or config.n_pos < 1 or config.depth < 1:
        raise ConfigError("histogene: patch_px, n_pos and depth must be positive")
    if not (0.0 <= config.dropout < 1.0 and 0.0 <= config.attn_dropout < 1.0):
        raise ConfigError("histogene: dropout and attn_dropout must be in [0, 1)")
    if config.pos_overflow not in ("scale", "clamp"):
        raise ConfigError(f"histogene: pos_overflow must be 'scale' or 'clamp', got {config.pos_overflow!r}")


class Block(nn.Module):
    """Pre-norm Transformer block (as HisToGene's ViT): x + Attn(LN(x)), then x + MLP(LN(x)).

    Attention goes through ``scaled_dot_product_attention`` so that memory-efficient kernels
    avoid the N x N matrix for slides of thousands of spots.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.mlp(self.norm2(x))


@register_method(
    "histogene",
    config=HisToGeneConfig,
    presets={
        # HisToGene's published run: 8 layers, dim 1024, 16 heads, 112 px, Adam lr 1e-5
        # constant for 100 epochs (min_lr = lr makes the shared cosine schedule constant).
        "paper": {
            "patches.size_px": 112,
            "model.patch_px": 112,
            "train.epochs": 100,
            "train.lr": 1e-5,
            "train.min_lr": 1e-5,
            "train.weight_decay": 0.0,
        },
        # One step per slide: many cheap epochs instead of 8. No attention dropout: on CPU
        # it forces the materialised N x N attention (see HisToGeneConfig.attn_dropout).
        "cpu": {
            "model.patch_px": 112,
            "model.dim": 256,
            "model.depth": 4,
            "model.heads": 8,
            "model.mlp_dim": 512,
            "model.attn_dropout": 0.0,
            "train.epochs": 100,
            "train.lr": 1e-4,
            "train.min_lr": 1e-5,
            "train.weight_decay": 0.0,
        },
        "tiny": {
            "model.patch_px": 32,
            "model.dim": 32,
            "model.depth": 1,
            "model.heads": 2,
            "model.mlp_dim": 64,
            "model.n_pos": 64,
        },
    },
    description="HisToGene: Transformer over all spots of a slide (flattened patches + position embeddings)",
    colour="#1f77b4",  # the paper's Fig. 2
)
class HisToGene(ExpressionModel):
    """Sequence model: the batch dimension (all spots of one slide) is the sequence."""

    def __init__(self, config: HisToGeneConfig, n_genes: int) -> None:
        super().__init__()
        _check(config)
        self.config = config
        self.n_genes = n_genes
        self.patch_embed = nn.Linear(3 * config.patch_px * config.patch_px, config.dim)
        self.row_embed = nn.Embedding(config.n_pos, config.dim)
        self.col_embed = nn.Embedding(config.n_pos, config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(
            *[
                Block(config.dim, config.heads, config.mlp_dim, config.dropout, config.attn_dropout)
                for _ in range(config.depth)
            ]
        )
        self.gene_head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, n_genes))

    def _patches(self, img: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3*p*p), resizing to ``patch_px`` when the input differs."""
        p = self.config.patch_px
        if img.shape[-2:] != (p, p):
            img = F.interpolate(img, size=(p, p), mode="bilinear", align_corners=False, antialias=True)
        return img.flatten(1)

    def forward(self, img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        idx = position_buckets(pos, self.config.n_pos, self.config.pos_overflow)
        x = self.patch_embed(self._patches(img))
        x = x + self.row_embed(idx[:, 0]) + self.col_embed(idx[:, 1])
        x = self.blocks(self.emb_dropout(x).unsqueeze(0)).squeeze(0)
        return self.gene_head(x)

    # -- whole slides as batches ---------------------------------------------------------------
    @classmethod
    def validation_fraction(cls, requested: float) -> float:
        """None: a slide is one sequence, and validation spots would cut holes into it."""
        return 0.0

    def loader(self, table: SpotTable, *, batch_size: int, train: bool = False, augment: bool = False,
               seed: int = 0, num_workers: int = 0) -> DataLoader:
        """One batch per slide (the batch dimension is the sequence); ``batch_size`` is unused."""
        return slide_loader(table, shuffle=train, augment=augment, seed=seed, num_workers=num_workers)

    def prediction_batches(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """All spots of the sample in one batch."""
        whole = concat_batches(batches)
        return [whole] if whole else []

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        pred = self(batch["img"], batch["pos"]).float()
        return {"loss": F.mse_loss(pred, batch["expr"].float())}

    def predict_expression(self, batch: Batch) -> torch.Tensor:
        return self(batch["img"], batch["pos"]).float()
