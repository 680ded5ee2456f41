"""Tools: train a method, predict samples, slides and cohorts, score predictions (``cn.tl``).

The Python face of the command line, in scanpy's style: keyword-only options, AnnData out::

    import cmrcnet as cn
    run = cn.tl.train("data/her2st", method="cmrcnet", test=None, out="runs/final")
    adata = cn.tl.predict(run, image="slide.svs")          # pixel size read from the slide
    per_gene, summary = cn.tl.score(cn.tl.predict(run, sample=held_out))

Every CLI command (``cmrcnet train``, ``cmrcnet predict``) calls these functions.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from cmrcnet.errors import InputError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from cmrcnet.data.image import SlideImage
    from cmrcnet.data.sample import Sample
    from cmrcnet.training.predict import TrainedRun

PathLike = str | Path


def _test_ids(test: str | Sequence[str] | None) -> list[str]:
    """``None``, ``"none"`` or ``[]``: hold nothing out; ``"A,B"`` or ``["A", "B"]``: those samples."""
    if test is None:
        return []
    items = test.split(",") if isinstance(test, str) else list(test)
    ids = [str(t).strip() for t in items if str(t).strip()]
    return [] if [i.lower() for i in ids] == ["none"] else ids


def train(
    data: PathLike | Sequence["Sample"],
    *,
    out: PathLike,
    method: str = "cmrcnet",
    test: str | Sequence[str] | None = None,
    preset: str = "cpu",
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    config: PathLike | None = None,
    dataset: str | None = None,
    resume: bool = False,
    skip_bad_samples: bool = False,
) -> "TrainedRun":
    """Train ``method`` and write a run directory; return the loaded run.

    Parameters
    ----------
    data
        A dataset folder (her2st, legacy ST, Visium, HEST-1k) or samples already read
        (:func:`cmrcnet.read_dataset`).
    out
        The run directory to write (``config.yaml``, ``run.json``, ``split.json``, ``model.pt``, ...).
    method
        A registered method (``cmrcnet methods`` lists them): ``cmrcnet``, ``bleep``, ``stnet``, ...
    test
        Sample ids to hold out. ``None`` (or ``"none"``) trains a final model on every sample; validation
        spots are still taken from the training samples.
    preset
        ``cpu`` (a 2-core machine), ``paper``, ``tiny`` (tests), or a method's own preset.
    seed
        Random seed (recorded with the run); default: the preset's.
    overrides
        Config keys, e.g. ``{"train.epochs": 4, "model.encoder": "uni"}``; typed and range-checked.
    config
        A YAML config to start from.
    dataset
        Dataset manifest name (markers, gene sets) when the folder is not recognised; for samples
        read from one packaged dataset (``sample.dataset``, e.g. ``her2st``), that dataset's.
    resume
        Continue from the last checkpoint; return at once if the run is complete.
    skip_bad_samples
        Go on without samples that cannot be read (one warning each).
    """
    from cmrcnet.config import load_yaml, make_config
    from cmrcnet.training import load_run
    from cmrcnet.training import train as train_run
    from cmrcnet.utils import check_writable_dir

    ov = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in dict(overrides or {}).items()}
    samples = None
    if isinstance(data, (str, Path)):
        ov["data.path"] = str(data)
    else:
        samples = list(data)
        if not samples:
            raise InputError("train: no samples given")
    dataset = dataset or (_manifest_of(samples) if samples else None)
    if dataset:
        ov["data.dataset"] = dataset
    if seed is not None:
        ov["seed"] = str(int(seed))
    if skip_bad_samples:
        ov["data.skip_bad_samples"] = "true"
    cfg = make_config(method, preset, ov, base=load_yaml(Path(config)) if config else None)
    check_writable_dir(Path(out), "out")
    run_dir = train_run(cfg, Path(out), _test_ids(test), samples=samples, resume=resume)
    return load_run(run_dir)


def _manifest_of(samples: Sequence["Sample"]) -> str | None:
    """The packaged manifest (markers, gene sets) of samples read from one known dataset, if any."""
    from cmrcnet.data.manifest import list_manifests

    names = {s.dataset for s in samples if s.dataset}
    name = next(iter(names)) if len(names) == 1 else None
    return name if name in list_manifests() else None


def load(run: PathLike | "TrainedRun", *, overrides: Mapping[str, Any] | None = None) -> "TrainedRun":
    """A run directory, loaded (``overrides``: ``retrieval.*`` settings only)."""
    from cmrcnet.training import load_run
    from cmrcnet.training.predict import TrainedRun

    if isinstance(run, TrainedRun) and not overrides:
        return run
    return load_run(run.run_dir if isinstance(run, TrainedRun) else Path(run), overrides=dict(overrides or {}))


def predict(
    run: PathLike | "TrainedRun",
    *,
    sample: "Sample | PathLike | None" = None,
    sample_id: str | None = None,
    image: "PathLike | SlideImage | None" = None,
    um_per_px: float | None = None,
    pitch_um: float = 100.0,
    top_k: int | None = None,
    out: PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> "ad.AnnData":
    """Predict expression for every spot of a sample, or a tissue grid over a slide.

    Parameters
    ----------
    run
        A run directory (or :func:`train`'s result).
    sample
        A :class:`~cmrcnet.data.sample.Sample`, or a dataset folder (then ``sample_id`` picks the sample
        unless the folder holds one).
    image
        A slide (SVS, NDPI, MRXS, SCN, OME-TIFF, pyramidal TIFF, JPEG/PNG) without spots: a grid of
        pseudo-spots every ``pitch_um`` over the detected tissue. Patches are read from the pyramid
        level closest to the run's resolution.
    um_per_px
        The slide's pixel size; default: read from its metadata (an error if it has none).
    top_k
        Neighbours averaged by retrieval methods (default: the run's).
    out
        Also write the prediction: ``.h5ad`` (for a slide: streamed, memory independent of the number of
        spots; the result is then opened backed) or ``.zarr`` (a SpatialData store, :mod:`cmrcnet.export`).

    Returns
    -------
    AnnData with ``layers["predicted"]`` (= ``X``), ``layers["uncertainty"]``, ``obsm["spatial"]``
    (full-resolution pixels), ``uns["spatial"]`` (hires/lowres images) and ``uns["cmrcnet"]``
    describing the run and the slide; ``layers["observed"]`` when the sample has counts.
    """
    from cmrcnet.cohort import write_prediction
    from cmrcnet.progress import progress_reporter
    from cmrcnet.tiling import grid_sample
    from cmrcnet.training import predict_sample, predict_streaming, write_h5ad_atomic
    from cmrcnet.utils import check_writable_file

    if (sample is None) == (image is None):
        raise InputError("give exactly one of sample= (a sample or dataset folder) or image= (a slide)")
    fmt = "spatialdata" if out is not None and Path(out).suffix.lower() == ".zarr" else "h5ad"
    if out is not None and fmt == "h5ad":
        check_writable_file(Path(out), "out")
    trained = load(run, overrides=overrides)
    predictor = trained.predictor_for(top_k)
    if image is not None:
        smp = grid_sample(image, um_per_px, pitch_um=pitch_um, sample_id=sample_id)
        bar = progress_reporter("predicting", smp.n_spots, "spots") if progress else nullcontext()
        with bar as advance:
            if out is not None:
                return write_prediction(trained, smp, Path(out), fmt, predictor=predictor, progress=advance)
            return predict_streaming(trained, smp, predictor, progress=advance)
    smp = sample if not isinstance(sample, (str, Path)) else read_one_sample(Path(sample), sample_id)
    pred = predict_sample(trained, smp, predictor)
    if out is not None:
        if fmt == "spatialdata":
            from cmrcnet.export import write_spatialdata

            write_spatialdata(pred, Path(out), smp.image)
        else:
            write_h5ad_atomic(pred, Path(out))
    return pred


def read_one_sample(path: Path, sample_id: str | None) -> "Sample":
    """The sample ``sample_id`` of a dataset folder, or its only sample."""
    from cmrcnet.data.readers import read_dataset, read_sample

    if sample_id:
        return read_sample(path, sample_id)
    samples = read_dataset(path)
    if len(samples) != 1:
        ids = ", ".join(s.sample_id for s in samples)
        raise InputError(f"dataset holds {len(samples)} samples; choose one with --sample-id ({ids})", path)
    return samples[0]


def predict_cohort(
    run: PathLike | "TrainedRun",
    images: Iterable[PathLike],
    *,
    out: PathLike,
    format: str = "h5ad",  # noqa: A002 - the CLI's option name
    um_per_px: float | None = None,
    pitch_um: float = 100.0,
    top_k: int | None = None,
    resume: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> "pd.DataFrame":
    """Predict many slides into the folder ``out``, one ``<id>.h5ad`` (or ``.zarr``) each.

    ``images`` are slide files, folders of slides or CSV lists (column ``image``, optional
    ``sample_id``, ``um_per_px``). Every slide is checked before the first is predicted; outputs
    are atomic; with ``resume`` (default) slides whose output exists are skipped. Returns the
    summary (slide, µm/px and its source, spots, seconds, output), also written as ``cohort.csv``.
    """
    from cmrcnet.cohort import collect_slides
    from cmrcnet.cohort import predict_cohort as run_cohort

    jobs = collect_slides(images, um_per_px=um_per_px)
    return run_cohort(load(run, overrides=overrides), jobs, Path(out), fmt=format, pitch_um=pitch_um, top_k=top_k,
                      resume=resume)


def score(adata: "ad.AnnData", *, markers: Sequence[str] | None = None) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """PCC per gene and per gene set (HEG/HVG top 50, markers, ...) of a prediction with
    ``layers["observed"]``; ``markers`` default to the run's (``uns["cmrcnet"]["markers"]``).

    Returns ``(per_gene, summary)`` data frames.
    """
    from cmrcnet.evaluation import evaluate_prediction

    if "observed" not in adata.layers:
        raise InputError("score needs measured expression (layers['observed']); a slide grid has none")
    if markers is None:
        markers = list((adata.uns.get("cmrcnet") or {}).get("markers", []))
    return evaluate_prediction(adata, list(markers))
