"""The contrastive / reconstruction losses against hand computation, and the DDP gather."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.models.losses import (
    bleep_contrastive_loss,
    gather_embeddings,
    reconstruction_loss,
    soft_cross_entropy,
)


def _np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _np_bleep(img: np.ndarray, gene: np.ndarray, logit_scale: float, target_scale: float) -> np.ndarray:
    """BLEEP's loss written out in numpy, per sample (before the batch mean)."""
    logits = gene @ img.T * logit_scale
    targets = _np_softmax((img @ img.T + gene @ gene.T) / 2 * target_scale)
    gene_loss = -(targets * _np_log_softmax(logits)).sum(1)
    img_loss = -(targets.T * _np_log_softmax(logits.T)).sum(1)
    return (gene_loss + img_loss) / 2


@pytest.fixture()
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 3)).astype(np.float64), rng.normal(size=(4, 3)).astype(np.float64)


def test_contrastive_loss_equals_hand_computation_on_a_tiny_batch() -> None:
    # 2 x 2 batch small enough to check fully by hand.
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    gene = np.array([[1.0, 0.0], [1.0, 1.0]])
    # logits = gene @ img.T = [[1, 0], [1, 1]]; img@img.T = I; gene@gene.T = [[1, 1], [1, 2]]
    # (I + GG^T)/2 = [[1, .5], [.5, 1.5]] -> row softmax
    t0 = np.exp([1.0, 0.5]) / np.exp([1.0, 0.5]).sum()
    t1 = np.exp([0.5, 1.5]) / np.exp([0.5, 1.5]).sum()
    targets = np.array([t0, t1])
    ls_rows = np.array([[1 - np.log(np.e + 1), 0 - np.log(np.e + 1)], [1 - np.log(2 * np.e), 1 - np.log(2 * np.e)]])
    gene_loss = -(targets * ls_rows).sum(1)
    # logits.T = [[1, 1], [0, 1]]
    ls_cols = np.array([[1 - np.log(2 * np.e), 1 - np.log(2 * np.e)], [0 - np.log(1 + np.e), 1 - np.log(1 + np.e)]])
    img_loss = -(targets.T * ls_cols).sum(1)
    expected = ((gene_loss + img_loss) / 2).mean()
    got = bleep_contrastive_loss(torch.tensor(img), torch.tensor(gene))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(_np_bleep(img, gene, 1.0, 1.0).mean(), rel=1e-6)


@pytest.mark.parametrize(
    "mode, logit_scale, target_scale",
    [("bleep", 1 / 0.5, 0.5), ("multiply", 0.5, 0.5), ("divide", 1 / 0.5, 1 / 0.5)],
)
def test_temperature_modes(pair, mode: str, logit_scale: float, target_scale: float) -> None:
    img, gene = pair
    got = bleep_contrastive_loss(torch.tensor(img), torch.tensor(gene), tau=0.5, temperature_mode=mode)
    assert got.item() == pytest.approx(_np_bleep(img, gene, logit_scale, target_scale).mean(), rel=1e-5)


def test_modes_agree_at_tau_one_and_reductions(pair) -> None:
    img, gene = (torch.tensor(a) for a in pair)
    vals = [bleep_contrastive_loss(img, gene, 1.0, m).item() for m in ("bleep", "multiply", "divide")]
    assert max(vals) - min(vals) < 1e-6
    per = bleep_contrastive_loss(img, gene, batch_reduction="none")
    assert per.shape == (4,)
    np.testing.assert_allclose(per.numpy(), _np_bleep(*pair, 1.0, 1.0), rtol=1e-5)
    summed = bleep_contrastive_loss(img, gene, reduction="sum")
    assert summed.item() == pytest.approx(2 * per.mean().item(), rel=1e-6)


def test_loss_is_float32_under_bf16_inputs_and_autocast(pair) -> None:
    img, gene = (torch.tensor(a, dtype=torch.float32) for a in pair)
    ref = bleep_contrastive_loss(img, gene)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bleep_contrastive_loss(img, gene)  # autocast must not redo the similarity in bf16
        rec = reconstruction_loss(img, gene)
    assert got.dtype == rec.dtype == torch.float32
    assert got.item() == ref.item()
    assert rec.item() == reconstruction_loss(img, gene).item()
    assert bleep_contrastive_loss(img.bfloat16(), gene.bfloat16()).dtype == torch.float32


def test_bad_options_raise(pair) -> None:
    img, gene = (torch.tensor(a) for a in pair)
    with pytest.raises(ConfigError):
        bleep_contrastive_loss(img, gene, temperature_mode="x")
    with pytest.raises(ConfigError):
        bleep_contrastive_loss(img, gene, reduction="x")
    with pytest.raises(ValueError):
        bleep_contrastive_loss(img, gene[:2])
    with pytest.raises(ConfigError):
        reconstruction_loss(img, gene, "l1")


def test_soft_cross_entropy_with_one_hot_targets_is_ordinary_ce() -> None:
    logits = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    onehot = torch.nn.functional.one_hot(y, 7).float()
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), ce)


def test_reconstruction_losses(pair) -> None:
    a, b = pair
    mse = reconstruction_loss(torch.tensor(a), torch.tensor(b), "mse").item()
    assert mse == pytest.approx(((a - b) ** 2).mean(), rel=1e-6)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    got = reconstruction_loss(torch.tensor(a), torch.tensor(b), "cosine").item()
    assert got == pytest.approx((1 - cos).mean(), rel=1e-6)


def test_gather_is_identity_without_distributed() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_embeddings(x)
    assert y is x


# -- two processes (gloo, CPU) ------------------------------------------------------------------
_SIZES = (3, 2)  # unequal on purpose: exercises the pad-and-trim path too
_DIM = 4


def _rank_data(rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(size, _DIM, generator=g, dtype=torch.float64), torch.randn(size, _DIM, generator=g, dtype=torch.float64)


def _gather_worker(rank: int, world: int, init_file: str, sizes: tuple[int, ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, gene = (t.requires_grad_() for t in _rank_data(rank, sizes[rank]))
        all_img, all_gene = gather_embeddings(img), gather_embeddings(gene)
        assert all_img.shape == (sum(sizes), _DIM), all_img.shape
        loss = bleep_contrastive_loss(all_img, all_gene)
        loss.backward()
        # Reference: the whole global batch in one process.
        ref = [_rank_data(r, sizes[r]) for r in range(world)]
        ref_img = torch.cat([r[0] for r in ref]).requires_grad_()
        ref_gene = torch.cat([r[1] for r in ref]).requires_grad_()
        ref_loss = bleep_contrastive_loss(ref_img, ref_gene)
        ref_loss.backward()
        assert torch.allclose(loss, ref_loss)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        assert img.grad is not None and gene.grad is not None
        # Summed over the world (DDP then averages parameter gradients): world * d(loss)/d(local rows).
        assert torch.allclose(img.grad, world * ref_img.grad[sl]), (img.grad, ref_img.grad[sl])
        assert torch.allclose(gene.grad, world * ref_gene.grad[sl])
        assert torch.allclose(all_img[sl].detach(), img.detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [pytest.param((3, 3), marks=pytest.mark.slow), _SIZES])
def test_gather_embeddings_two_processes(sizes: tuple[int, int]) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_gather_worker, args=(2, init_file, sizes), nprocs=2, join=True)
