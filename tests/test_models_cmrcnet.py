"""CMRCNet / BLEEP models and their layers: shapes, maths, switches, presets, speed."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from cmrcnet.config import make_config
from cmrcnet.errors import ConfigError
from cmrcnet.models import get_method
from cmrcnet.models.bleep import BLEEP, BLEEPConfig
from cmrcnet.models.cmrcnet import CMRCNet, CMRCNetConfig
from cmrcnet.models.layers import (
    SNN,
    CrossAttention,
    FusionBlock,
    ProjectionHead,
    ResidualCrossAttention,
    random_feature_mask,
)
from cmrcnet.models.losses import bleep_contrastive_loss, reconstruction_loss

G = 20  # genes
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny_cfg(**kw) -> CMRCNetConfig:
    base = dict(
        encoder="vit_tiny_patch16_224",
        encoder_kwargs=dict(TINY_VIT),
        img_size=32,
        embed_dim=32,
        gene_tokens=4,
        cross_heads=2,
        fusion_heads=2,
        mlp_ratio=2.0,
    )
    base.update(kw)
    return CMRCNetConfig(**base)


def batch(b: int = 6, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.randn(b, 3, size, size, generator=g),
        "expr": torch.rand(b, G, generator=g) * 3,
        "pos": torch.zeros(b, 2, dtype=torch.long),
        "index": torch.arange(b),
    }


def build(cfg: CMRCNetConfig, seed: int = 0, cls=CMRCNet) -> CMRCNet:
    torch.manual_seed(seed)
    return cls(cfg, G)


# -- layers ---------------------------------------------------------------------------------------
def test_projection_head_is_bleeps() -> None:
    head = ProjectionHead(7, 5, dropout=0.0).eval()
    x = torch.randn(3, 7)
    p = head.projection(x)
    ref = torch.nn.functional.layer_norm(head.fc(torch.nn.functional.gelu(p)) + p, (5,), head.norm.weight, head.norm.bias)
    torch.testing.assert_close(head(x), ref)


def test_snn_activation_and_dropout() -> None:
    assert isinstance(SNN(4, 8).act, torch.nn.SELU)
    assert isinstance(SNN(4, 8, "elu").act, torch.nn.ELU)
    assert isinstance(SNN(4, 8).dropout, torch.nn.AlphaDropout) and SNN(4, 8).dropout.p == 0.25
    with pytest.raises(ConfigError):
        SNN(4, 8, "relu")


def test_first_cross_attention_takes_query_shape() -> None:
    ca = CrossAttention(16, 4)
    out = ca(torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    assert out.shape == (2, 5, 16)


def _manual_residual_attention(m: ResidualCrossAttention, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    q, k = m.q(x), m.k(y)
    src_x, src_y = (x, y) if m.variant == "paper" else (q, k)
    v_img, v_gene = m.v_img(src_x), m.v_gene(src_y)
    h = m.num_heads
    b, n, d = q.shape
    dh = d // h
    outs = []
    for i in range(h):
        sl = slice(i * dh, (i + 1) * dh)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5, -1)
        outs.append(v_img[..., sl] + a @ v_gene[..., sl])
    return torch.cat(outs, -1)


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_residual_cross_attention_formula(variant: str) -> None:
    torch.manual_seed(0)
    m = ResidualCrossAttention(8, 2, variant).eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(m(x, y), _manual_residual_attention(m, x, y), rtol=1e-5, atol=1e-5)
    if variant == "authors":
        assert isinstance(m.q, torch.nn.Sequential) and isinstance(m.q[1], torch.nn.ReLU)


def test_fusion_block_residual_structure() -> None:
    torch.manual_seed(0)
    blk = FusionBlock(8, 2, proj_drop=0.0).eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    h = blk.block(x)
    torch.testing.assert_close(blk(x, y), h + blk.cross(h, y))


def test_mask_ratio_is_honoured() -> None:
    x = torch.ones(64, 50, 256)
    for ratio in (0.3, 0.5, 0.7):
        masked = random_feature_mask(x, ratio)
        frac = (masked == 0).float().mean().item()
        assert abs(frac - ratio) < 0.01
        assert set(masked.unique().tolist()) <= {0.0, 1.0}  # no rescaling
    assert random_feature_mask(x, 0.0) is x
    with pytest.raises(ConfigError):
        random_feature_mask(x, 1.0)
    xb = torch.ones(32, 50, 256, dtype=torch.bfloat16)
    assert abs((random_feature_mask(xb, 0.5) == 0).float().mean().item() - 0.5) < 0.01


# -- the model ------------------------------------------------------------------------------------
def test_registered_as_retrieval_methods() -> None:
    """Both supply a retrieval predictor that owns the bank of the fold's reference spots."""
    from cmrcnet.config import make_config
    from cmrcnet.data.batches import SpotTable
    from cmrcnet.models import RetrievalPredictor
    from cmrcnet.training import FoldData

    n, g = 6, 5
    table = SpotTable(np.zeros((n, 8, 8, 3), np.uint8), np.random.default_rng(0).random((n, g), dtype=np.float32),
                      np.zeros((n, 2), np.int64), np.array(["a"] * n), np.array([str(i) for i in range(n)]))
    fold = FoldData([f"g{i}" for i in range(g)], table.subset(np.arange(4)), table.subset(np.arange(4, 6)), {}, ["a"], [], [])
    for name, cls in (("cmrcnet", CMRCNet), ("bleep", BLEEP)):
        spec = get_method(name)
        assert spec.model_cls is cls
        cfg = make_config(name, "tiny")
        p = spec.build(cfg.model, g).make_predictor(fold, cfg)
        assert isinstance(p, RetrievalPredictor) and len(p.bank) == n  # validation spots included
        assert p.describe()["top_k"] == cfg.retrieval.top_k and p.with_top_k(3).describe()["top_k"] == 3
    assert issubclass(BLEEP, CMRCNet) and issubclass(BLEEPConfig, CMRCNetConfig)
    d = BLEEPConfig()
    assert d.encoder == "resnet50" and d.reconstruction is False


def test_output_shapes_default_embed_dim() -> None:
    cfg = tiny_cfg(embed_dim=256, gene_tokens=8, cross_heads=4, fusion_heads=8)
    model = build(cfg)
    b = batch()
    assert model.embed_images(b["img"]).shape == (6, 256)
    assert model.embed_genes(b["expr"]).shape == (6, 256)
    out = model.training_loss(b)
    assert set(out) == {"loss", "loss_contrastive", "loss_recon", "n_negatives"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())


def test_total_loss_is_log1p_sum_of_parts() -> None:
    model = build(tiny_cfg()).eval()  # eval: no dropout, no mask (mask_at_eval False)
    b = batch()
    out = model.training_loss(b)
    with torch.no_grad():
        tokens, img = model.encode_images(b["img"])
        gene = model.embed_genes(b["expr"])
        lc = bleep_contrastive_loss(img, gene)
        lr = reconstruction_loss(model.reconstruct(tokens, b["expr"]), img, "mse")
    torch.testing.assert_close(out["loss_contrastive"], lc)
    torch.testing.assert_close(out["loss_recon"], lr)
    torch.testing.assert_close(out["loss"], torch.log1p(lc) + torch.log1p(lr))


def test_loss_combine_variants() -> None:
    b = batch()
    per = None
    for combine in ("log1p_per_sample", "sum"):
        model = build(tiny_cfg(loss_combine=combine)).eval()
        out = model.training_loss(b)
        if combine == "sum":
            torch.testing.assert_close(out["loss"], out["loss_contrastive"] + out["loss_recon"])
        else:
            with torch.no_grad():
                _, img = model.encode_images(b["img"])
                per = bleep_contrastive_loss(img, model.embed_genes(b["expr"]), batch_reduction="none")
            torch.testing.assert_close(out["loss"], torch.log1p(per).mean() + torch.log1p(out["loss_recon"]))


def test_backward_reaches_every_parameter() -> None:
    model = build(tiny_cfg(snn_dropout=0.0))
    model.training_loss(batch())["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_masking_only_in_training_unless_mask_at_eval(monkeypatch) -> None:
    import cmrcnet.models.cmrcnet as mod

    calls: list[float] = []
    real = mod.random_feature_mask

    def spy(x, ratio):
        calls.append(ratio)
        return real(x, ratio)

    monkeypatch.setattr(mod, "random_feature_mask", spy)
    b = batch()
    model = build(tiny_cfg(mask_ratio=0.3))
    model.training_loss(b)
    assert calls == [0.3]
    model.eval()
    model.training_loss(b)
    assert calls == [0.3]
    model_e = build(tiny_cfg(mask_at_eval=True)).eval()
    model_e.training_loss(b)
    assert calls == [0.3, 0.5]
    # eval without masking is deterministic; with masking it is not
    torch.testing.assert_close(model.training_loss(b)["loss"], model.training_loss(b)["loss"])
    assert model_e.training_loss(b)["loss_recon"] != model_e.training_loss(b)["loss_recon"]


def test_reconstruction_off_builds_no_branch_and_loss_is_log1p_contrastive() -> None:
    model = build(tiny_cfg(reconstruction=False)).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("token_projection", "gene_tokenizer", "first_cross", "fusion", "recon_head")) for n in names)
    out = model.training_loss(batch())
    assert set(out) == {"loss", "loss_contrastive", "n_negatives"}
    torch.testing.assert_close(out["loss"], torch.log1p(out["loss_contrastive"]))


def test_bleep_is_cmrcnet_without_reconstruction() -> None:
    """Same weights, same batch, same options -> identical loss (and BLEEP's plain-sum default)."""
    shared = dict(encoder="resnet10t", img_size=32, embed_dim=32)
    bleep = build(BLEEPConfig(**shared), cls=BLEEP)
    assert bleep.config.loss_combine == "sum" and not bleep.config.reconstruction
    cm = build(CMRCNetConfig(**shared, reconstruction=False, loss_combine="sum"), seed=1)
    cm.load_state_dict(bleep.state_dict())  # strict: the parameter sets are identical
    b = batch()
    for train in (False, True):
        bleep.train(train)
        cm.train(train)
        torch.manual_seed(3)
        lb = bleep.training_loss(b)
        torch.manual_seed(3)
        lm = cm.training_loss(b)
        assert lb.keys() == lm.keys() == {"loss", "loss_contrastive", "n_negatives"}
        torch.testing.assert_close(lb["loss"], lm["loss"], rtol=0, atol=0)
    # BLEEP's loss is its contrastive loss, without the log
    torch.testing.assert_close(lb["loss"], lb["loss_contrastive"])


def test_cnn_encoder_with_reconstruction_uses_feature_map_tokens() -> None:
    cfg = CMRCNetConfig(encoder="resnet10t", img_size=64, embed_dim=32, gene_tokens=4, cross_heads=2, fusion_heads=2)
    model = build(cfg)
    b = batch(size=64)
    tokens, emb = model.encode_images(b["img"])
    assert tokens.shape == (6, 4, model.image_encoder.out_dim)  # 64 px / 32 = 2 x 2 map
    assert emb.shape == (6, 32)
    out = model.training_loss(b)
    assert "loss_recon" in out and torch.isfinite(out["loss"])


@pytest.mark.parametrize("pool", ["mean", "mean_no_cls", "cls", "timm"])
def test_pool_options(pool: str) -> None:
    model = build(tiny_cfg(pool=pool)).eval()
    b = batch()
    tokens, pooled = model.image_encoder(b["img"])
    assert tokens.shape == (6, 17, 32)  # (32 / 8)^2 + CLS
    ref = {"mean": tokens.mean(1), "mean_no_cls": tokens[:, 1:].mean(1), "cls": tokens[:, 0], "timm": tokens[:, 0]}[pool]
    torch.testing.assert_close(pooled, ref)


def test_cls_pool_on_cnn_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        build(CMRCNetConfig(encoder="resnet10t", pool="cls", reconstruction=False))


def test_recon_target_expression_and_cosine_loss() -> None:
    model = build(tiny_cfg(recon_target="expression", recon_loss="cosine"))
    assert model.recon_head is not None and model.recon_head.out_features == G
    out = model.training_loss(batch())
    assert 0.0 <= out["loss_recon"].item() <= 2.0


def test_shared_fusion_weights_and_authors_options() -> None:
    shared = build(tiny_cfg(fusion_shared_weights=True, residual_attention="authors", snn_activation="elu"))
    distinct = build(tiny_cfg())
    assert len(shared.fusion) == 1 and len(shared.fusion_layers()) == 2
    assert len(distinct.fusion) == 2
    assert isinstance(shared.gene_tokenizer.act, torch.nn.ELU)
    assert torch.isfinite(shared.training_loss(batch())["loss"])


def test_detach_target_stops_gradient_into_image_projection() -> None:
    b = batch()
    for detach in (False, True):
        model = build(tiny_cfg(detach_target=detach)).eval()
        out = model.training_loss(b)
        model.zero_grad()
        out["loss_recon"].backward()
        g = model.image_projection.fc.weight.grad
        assert (g is None or g.abs().sum() == 0) == detach


def test_vit_depth_and_heads_reach_timm() -> None:
    model = build(tiny_cfg(encoder_kwargs={"patch_size": 8, "embed_dim": 32}, vit_depth=2, vit_heads=4))
    vit = model.image_encoder.model
    assert len(vit.blocks) == 2 and vit.blocks[0].attn.num_heads == 4
    with pytest.raises(ConfigError):
        tiny_cfg(vit_depth=3).timm_kwargs()  # conflicts with encoder_kwargs depth=1


def test_invalid_options_are_config_errors() -> None:
    for bad in (
        {"pool": "max"},
        {"recon_loss": "l1"},
        {"loss_combine": "prod"},
        {"residual_attention": "x"},
        {"mask_ratio": 1.0},
        {"embed_dim": 30, "fusion_heads": 4},
        {"tau": 0.0},
    ):
        with pytest.raises(ConfigError):
            tiny_cfg(**bad)
    with pytest.raises(ConfigError):
        build(tiny_cfg(encoder="resnet10t", encoder_kwargs={}, vit_depth=2, reconstruction=False))


@pytest.mark.parametrize("method", ["cmrcnet", "bleep"])
@pytest.mark.parametrize("preset", ["paper", "cpu", "tiny"])
def test_presets_resolve_and_validate(method: str, preset: str) -> None:
    cfg = make_config(method, preset)
    spec = get_method(method)
    mc = spec.validate_model_config(cfg.model)
    if method == "bleep":
        assert mc.reconstruction is False
    if preset == "paper":
        assert mc.encoder == ("vit_base_patch32_224" if method == "cmrcnet" else "resnet50")


def test_cpu_preset_with_a_cnn_encoder_via_null_override() -> None:
    """Swapping the cpu preset's ViT for a ResNet needs ``vit_depth=null``; required keys stay non-null."""
    cfg = make_config("cmrcnet", "cpu", {"model.encoder": "resnet10t", "model.vit_depth": "null"})
    mc = get_method("cmrcnet").validate_model_config(cfg.model)
    assert mc.encoder == "resnet10t" and mc.vit_depth is None and mc.reconstruction
    with pytest.raises(ConfigError, match="embed_dim .*cannot be null"):
        get_method("cmrcnet").validate_model_config(make_config("cmrcnet", "cpu", {"model.embed_dim": "null"}).model)
    with pytest.raises(ConfigError, match="expected an integer"):
        make_config("cmrcnet", "cpu", {"train.epochs": "null"})


def test_authors_preset() -> None:
    cfg = make_config("cmrcnet", "authors")
    mc = get_method("cmrcnet").validate_model_config(cfg.model)
    assert (mc.vit_depth, mc.vit_heads) == (8, 8)
    assert mc.fusion_shared_weights and mc.mask_at_eval and mc.snn_activation == "elu"
    assert mc.residual_attention == "authors" and mc.loss_combine == "log1p_per_sample"
    assert cfg.patches.size_px == 224


def test_cpu_preset_is_frozen_imagenet_efficientnet_and_the_old_vit_stays_one_override_away() -> None:
    cfg = make_config("cmrcnet", "cpu")
    mc = dataclasses.replace(get_method("cmrcnet").validate_model_config(cfg.model), img_size=cfg.patches.size_px)
    model = CMRCNet(mc, G).eval()
    assert model.image_encoder.pretrained and not any(p.requires_grad for p in model.image_encoder.parameters())
    with torch.no_grad():
        tokens, emb = model.encode_images(torch.randn(2, 3, cfg.patches.size_px, cfg.patches.size_px))
    assert tokens.shape[1] == 16 and emb.shape == (2, 256)  # 4 x 4 feature map at 112 px
    old = make_config("cmrcnet", "cpu", {"model.encoder": "vit_tiny_patch16_224", "model.vit_depth": 6})
    mc = dataclasses.replace(get_method("cmrcnet").validate_model_config(old.model), img_size=old.patches.size_px)
    assert mc.encoder_mode == "scratch"  # the preset's frozen mode belongs to its own encoder
    with torch.no_grad():
        tokens, _ = CMRCNet(mc, G).eval().encode_images(torch.randn(2, 3, 112, 112))
    assert tokens.shape[1] == 50


def test_tiny_preset_forward_backward_is_fast() -> None:
    cfg = make_config("cmrcnet", "tiny")
    mc = dataclasses.replace(get_method("cmrcnet").validate_model_config(cfg.model), img_size=cfg.patches.size_px)
    model = CMRCNet(mc, 50)
    b = {"img": torch.randn(32, 3, 32, 32), "expr": torch.rand(32, 50)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box's cores are shared; 2 OpenMP threads stall under contention
    try:
        model.training_loss(b)["loss"].backward()  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model.training_loss(b)["loss"].backward()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert min(times) < 0.5, times


def test_fused_and_explicit_attention_agree() -> None:
    b = batch()
    losses = []
    for mode in ("always", "never", "auto"):
        model = build(tiny_cfg(fused_attention=mode)).eval()
        losses.append(model.training_loss(b)["loss"])
        attn_flags = {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
        assert attn_flags == {mode == "always"}  # auto on CPU = explicit maths
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[1], losses[2])


def test_pooled_width_differs_from_token_width() -> None:
    """MobileNetV3's conv head pools to 1024 while its tokens are 576 wide: with ``pool="timm"`` the
    projection head is built at the pooled width and the token projection at the token width."""
    from cmrcnet.models.encoders import encoder_out_dim

    cfg = dataclasses.replace(CMRCNetConfig(), encoder="mobilenetv3_small_100", pool="timm", embed_dim=32,
                              gene_tokens=2, cross_heads=2, fusion_heads=2, vit_depth=None)
    model = CMRCNet(cfg, G)
    enc = model.image_encoder
    assert (enc.token_dim, enc.out_dim) == (576, 1024) and encoder_out_dim(enc.model) == 1024
    out = model.training_loss(batch(b=4, size=64))
    assert torch.isfinite(out["loss"]) and "loss_recon" in out
    stnet = get_method("stnet").build({"encoder": "mobilenetv3_small_100"}, G)
    assert stnet.head.in_features == 1024
