"""Losses of the contrastive retrieval methods, and the cross-process gather they need.

``bleep_contrastive_loss`` reproduces BLEEP's loss (also used unchanged by the
CMRCNet authors); options expose where the CMRCNet paper's formula reads
differently. All losses are computed in float32 whatever the autocast dtype,
because the soft targets are a softmax of similarities and bf16 would blur them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cmrcnet.errors import ConfigError

__all__ = [
    "soft_cross_entropy",
    "bleep_contrastive_loss",
    "gather_embeddings",
    "reconstruction_loss",
    "TEMPERATURE_MODES",
]

TEMPERATURE_MODES = ("bleep", "multiply", "divide")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with soft targets: ``-(targets * log_softmax(logits)).sum(-1)``.

    Rows of ``targets`` are not renormalised (BLEEP passes ``targets.T``, whose rows need
    not sum to one), so this matches BLEEP's ``cross_entropy`` exactly.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def bleep_contrastive_loss(
    img_emb: torch.Tensor,
    gene_emb: torch.Tensor,
    tau: float = 1.0,
    temperature_mode: str = "bleep",
    reduction: str = "mean",
    batch_reduction: str = "mean",
) -> torch.Tensor:
    """BLEEP's contrastive loss with soft, similarity-derived targets.

    ``logits = gene @ img.T`` and ``targets = softmax((img @ img.T + gene @ gene.T) / 2)``,
    with the temperature applied per ``temperature_mode``:

    - ``bleep`` (BLEEP's and the CMRCNet authors' code): logits ``/ tau``, targets ``* tau``;
    - ``multiply``: both ``* tau`` (the paper's target formula, applied to the logits too);
    - ``divide``: both ``/ tau`` (CLIP-style temperature).

    All three agree at ``tau = 1`` (the default everywhere).

    Per sample ``i``: ``l_i = CE(logits_i, targets_i)`` combined with ``CE(logits.T_i, targets.T_i)``
    by ``reduction``: ``mean`` halves the sum (BLEEP and the authors' code), ``sum`` adds them
    (the paper's ``Loss_c`` as printed, i.e. twice BLEEP's value).
    ``batch_reduction``: ``mean`` over the batch, or ``none`` for the per-sample vector
    (the authors apply ``log(1 + .)`` per sample before averaging).
    """
    if temperature_mode not in TEMPERATURE_MODES:
        raise ConfigError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}")
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"contrastive reduction must be 'mean' or 'sum', got {reduction!r}")
    if batch_reduction not in ("mean", "none"):
        raise ConfigError(f"batch_reduction must be 'mean' or 'none', got {batch_reduction!r}")
    if img_emb.shape != gene_emb.shape or img_emb.ndim != 2:
        raise ValueError(f"embeddings must both be (B, D), got {tuple(img_emb.shape)} and {tuple(gene_emb.shape)}")
    with torch.autocast(img_emb.device.type, enabled=False):  # autocast would redo the matmuls in bf16
        img = img_emb.float()
        gene = gene_emb.float()
        sim = gene @ img.T
        target_sim = (img @ img.T + gene @ gene.T) / 2
        if temperature_mode == "bleep":
            logits, target_logits = sim / tau, target_sim * tau
        elif temperature_mode == "multiply":
            logits, target_logits = sim * tau, target_sim * tau
        else:
            logits, target_logits = sim / tau, target_sim / tau
        targets = F.softmax(target_logits, dim=-1)
        gene_loss = soft_cross_entropy(logits, targets)
        img_loss = soft_cross_entropy(logits.T, targets.T)
    per_sample = gene_loss + img_loss
    if reduction == "mean":
        per_sample = per_sample / 2
    return per_sample if batch_reduction == "none" else per_sample.mean()


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: mean squared error over all elements; ``cosine``: mean of ``1 - cos(pred, target)`` over rows."""
    if kind not in ("mse", "cosine"):
        raise ConfigError(f"recon_loss must be 'mse' or 'cosine', got {kind!r}")
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if kind == "mse":
            return F.mse_loss(pred, target)
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns this process's slice of the *summed* gradient.

    Every process computes the same loss over the gathered batch; summing their
    gradients for the local rows (an all-reduce, supported by every backend) and then
    letting DDP average parameter gradients yields exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.n
        return grad[start : start + ctx.n], None


def gather_embeddings(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` (B_local, D) from all processes along dim 0, keeping the gradient.

    Identity when ``torch.distributed`` is not initialised or has one process, so the
    same model code runs on one CPU and under DDP. Unequal local batch sizes (a last,
    smaller validation batch) are padded for the collective and trimmed afterwards.
    Under DDP with the gathered loss, the effective contrastive batch is the global one.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    if all(c == top for c in counts):
        return _GatherWithGrad.apply(x, group)
    padded = F.pad(x, (0, 0, 0, top - x.shape[0])) if x.ndim == 2 else torch.cat(
        [x, x.new_zeros((top - x.shape[0], *x.shape[1:]))], 0
    )
    full = _GatherWithGrad.apply(padded, group)
    return torch.cat([full[r * top : r * top + c] for r, c in enumerate(counts)], 0)
