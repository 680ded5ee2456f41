"""Score a retrieval method's configuration on the validation spots of the training sections.

For choosing a setting without looking at any held-out section: each variant is trained on one
fold (``--test`` held out, never scored), then its validation spots (``split.val_fraction`` of
each training section) are predicted by top-k retrieval from a bank of the *training* spots
only (the run's own bank also holds the validation spots, which would find themselves), and
scored like a held-out section: Pearson r per gene over the pooled validation spots, averaged
over the HEG-50 / HVG-50 genes of those spots. Also reported: the best validation loss and its
contrastive part (the reconstruction part differs between variants, so only the contrastive
part compares across them), and ``train_seconds`` (variants alternate within each seed, so they
share the machine's load).

    python benchmarks/validation_spots.py --variant base= --variant grid2=model.frozen_token_grid=2
    python benchmarks/validation_spots.py --seeds 0,1,2 --variant base= \\
        --variant grid2_1block=model.frozen_token_grid=2,model.fusion_blocks=1

A variant is ``NAME=KEY=VALUE,KEY=VALUE`` (``NAME=`` for the preset as is).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=K=V,K=V`` -> ``(NAME, {K: V})`` with YAML-typed values."""
    import yaml

    name, _, rest = text.partition("=")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def score_validation(run_dir: Path, samples, test_id: str) -> dict[str, float]:
    """HEG-50 / HVG-50 mean PCC of the run's validation spots, retrieved from a training-only bank."""
    import numpy as np
    import torch

    from cmrcnet.evaluation.gene_sets import evaluation_sets
    from cmrcnet.evaluation.metrics import per_gene_metrics
    from cmrcnet.models.predictors import RetrievalPredictor
    from cmrcnet.training import load_run
    from cmrcnet.training.fit import prepare_fold

    run = load_run(run_dir)
    cfg = run.cfg
    train_ids = [s.sample_id for s in samples if s.sample_id != test_id]
    fold = prepare_fold(samples, train_ids, [test_id], cfg)
    fold = run.model.encode_fold(fold, augment=cfg.train.augment, cache_dir=cfg.data.cache_dir,
                                 precision=cfg.train.precision)
    if fold.val is None or "feat" not in fold.val.features:
        raise SystemExit("validation_spots.py needs a frozen-encoder retrieval run with validation spots")
    predictor = RetrievalPredictor.build(run.model, fold.train.expr, fold.genes, fold.train.spot_ids, cfg.retrieval,
                                         cfg.train.precision)
    feat = torch.from_numpy(np.asarray(fold.val.features["feat"][:, 0], np.float32))  # the patch as cut
    with torch.no_grad(), predictor.embed_autocast():
        emb = run.model.image_projection(feat).float().numpy()
    pred, _ = predictor.search(emb)
    obs = fold.val.expr
    sets = evaluation_sets(obs, fold.genes, ks=(50,))
    per_gene = per_gene_metrics(pred, obs, fold.genes).set_index("gene")
    return {f"val_{name}": float(per_gene.loc[sets[name], "pcc"].mean()) for name in ("HEG50", "HVG50")}


def validation_losses(run_dir: Path) -> dict[str, float]:
    """The best epoch's validation loss and its contrastive part (logs/metrics.csv)."""
    import pandas as pd

    m = pd.read_csv(run_dir / "logs" / "metrics.csv")
    v = m.dropna(subset=["val/loss"])
    best = v.loc[v["val/loss"].idxmin()]
    return {"val_loss": float(best["val/loss"]), "val_loss_contrastive": float(best["val/loss_contrastive"]),
            "best_epoch": int(best["epoch"])}


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="her2st folder (default $CMRCNET_DATA_DIR/her2st)")
    p.add_argument("--method", default="cmrcnet")
    p.add_argument("--test", default="C3", help="held-out section: trained around, never scored")
    p.add_argument("--seeds", default="0")
    p.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE,... (repeatable)")
    args = p.parse_args(argv)
    C.apply_threads(args.threads)
    C.quiet_warnings()
    from cmrcnet.config import make_config
    from cmrcnet.training import load_samples, train

    if args.smoke:
        raise SystemExit("validation_spots.py: no --smoke mode (it trains real her2st folds)")
    her2st = C.her2st_dir(args.data)
    if her2st is None:
        raise SystemExit(C.data_missing(args.data))
    variants = [parse_variant(v) for v in (args.variant or ["base="])]
    rep = C.Report("validation_spots", args)
    rows = []
    samples = None
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, overrides in variants:
            cfg = make_config(args.method, "cpu", {"data.path": str(her2st), "seed": seed, **overrides})
            samples = samples if samples is not None else load_samples(cfg)
            out = Path(tempfile.mkdtemp(prefix="val-spots-"))
            t0 = time.perf_counter()
            train(cfg, out, [args.test], samples=samples)
            wall = time.perf_counter() - t0
            done = json.loads((out / "done.json").read_text())
            row = {"variant": name, "seed": seed, **validation_losses(out), **score_validation(out, samples, args.test),
                   "train_s": done["train_seconds"], "wall_s": wall, "load1": C.loadavg()[0],
                   "overrides": ",".join(f"{k}={v}" for k, v in overrides.items())}
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)  # checkpoints: 166 MB+ per run
            rows.append(row)
    rep.table("validation", f"Validation spots of the training sections ({args.test} held out, not scored)", rows)
    rep.write(C.resolve_out(args.out, "validation_spots", args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
