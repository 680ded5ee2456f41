"""``cmrcnet encoders [NAME]``: the encoder registry (pathology foundation models, ImageNet backbones)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cmrcnet.errors import ConfigError
from cmrcnet.models.encoders import EncoderEntry, encoder_entries, get_encoder_entry


def _console() -> Console:
    # piped output (cmrcnet encoders > file) keeps every column whole
    return Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def _norm(e: EncoderEntry) -> str:
    from cmrcnet.models import encoders as E

    names = {E.IMAGENET: "ImageNet", E.CLIP: "CLIP", E.HOPTIMUS: "H-optimus", E.HALF: "[-1, 1]"}
    return names.get(e.norm, f"mean {e.norm[0]} std {e.norm[1]}")


def encoders_cmd(name: Optional[str] = typer.Argument(None, help="Show one entry in detail.")) -> None:
    """List the named encoders: architecture, tile embedding, input, normalisation, weight layouts."""
    console = _console()
    if name:
        e = get_encoder_entry(name)
        if e is None:
            raise ConfigError(f"no encoder {name!r} in the registry (cmrcnet encoders lists them); any timm name also works")
        rows = [("name", e.name), ("timm architecture", e.arch), ("timm kwargs", str(dict(e.kwargs)).replace("'__swiglu__': True", "mlp_layer=SwiGLUPacked, act_layer=SiLU")),
                ("tile embedding", f"{e.pooling}, {e.embed_dim}"), ("tokens", e.tokens), ("input", f"{e.input_px} px"),
                ("µm/px", "-" if e.um_per_px is None else f"{e.um_per_px:g} (patch {e.patch_um:g} µm)"),
                ("normalisation", _norm(e)), ("weight layouts", ", ".join(e.layouts)), ("pretraining", e.pretraining),
                ("licence", e.licence), ("buildable", "yes" if e.supported else "no"), ("note", e.note or "-")]
        t = Table(show_header=False)
        t.add_column("key", style="bold")
        t.add_column("value")
        for k, v in rows:
            t.add_row(k, v)
        console.print(t)
        return
    t = Table(title="Encoders (--set model.encoder=NAME --set model.encoder_weights=PATH; any timm name also works)")
    for col in ("name", "architecture", "embedding", "input", "µm/px", "normalisation", "layouts", "pretraining", "licence"):
        t.add_column(col, no_wrap=col in ("name", "architecture"))
    for e in encoder_entries():
        t.add_row(e.name + ("" if e.supported else " (listed only)"), e.arch, f"{e.pooling} {e.embed_dim}",
                  f"{e.input_px} px", "-" if e.um_per_px is None else f"{e.um_per_px:g}", _norm(e),
                  ", ".join(e.layouts), e.pretraining, e.licence)
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("encoders")(encoders_cmd)
