"""Dataset manifests: which samples, patients and marker genes make up a named dataset.

A manifest is a small YAML file. The packaged ones (``cmrcnet datasets``) describe
the six HEST-1k datasets of the CMRCNet paper (IDC-LymphNode, SKCM, READ, COAD,
IDC, PSC) and the two datasets shared with this project (her2st, mob). Users can
write their own and pass the file's path wherever a dataset name is accepted.

Schema (keys marked * are required)::

    name*: coad                     # lower-case identifier
    title*: Colon adenocarcinoma (Xenium)
    platform*: xenium               # visium | xenium | legacy-st
    format*: hest                   # hest | her2st | legacy-st (on-disk layout)
    species*: Homo sapiens
    samples*:                       # non-empty; ids unique
      - {id: TENX111, patient: TENX111}
    markers: [CLCA1, CD8A]          # marker genes for evaluation
    gene_selection:                 # defaults shown
      n_hvg: 1000
      combine: union                # union | intersection
      drop_probes_regex: null       # regex of control probes to drop (Xenium)
    paper_results: {}               # published numbers (free-form; tables validated)
    notes: ""
    aliases: []                     # other accepted names
    reference: ""                   # citation / source URL

Validation errors raise :class:`~cmrcnet.errors.ConfigError` (schema) or
:class:`~cmrcnet.errors.InputError` (unreadable file), both naming the file.
"""

from __future__ import annotations

import copy
import functools

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cmrcnet.errors import ConfigError, InputError

PLATFORMS = ("visium", "xenium", "legacy-st")
FORMATS = ("hest", "her2st", "legacy-st")
COMBINE = ("union", "intersection")

#: Xenium control / unassigned probes (HEST keeps them in ``st/{id}.h5ad``).
XENIUM_CONTROL_REGEX = "^(BLANK|NegControl|NegPrb|antisense|Unassigned|DeprecatedCodeword|intergenic)"

HEST_REPO_ID = "MahmoodLab/hest"

_REQUIRED = ("name", "title", "platform", "format", "species", "samples")
_OPTIONAL = ("markers", "gene_selection", "paper_results", "notes", "aliases", "reference")
_GENE_SELECTION_KEYS = ("n_hvg", "combine", "drop_probes_regex")


@dataclass
class ManifestSample:
    id: str
    patient: str


@dataclass
class Manifest:
    name: str
    title: str
    platform: str
    format: str
    species: str
    samples: list[ManifestSample]
    markers: list[str] = field(default_factory=list)
    n_hvg: int = 1000
    combine: str = "union"
    drop_probes_regex: str | None = None
    paper_results: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    aliases: list[str] = field(default_factory=list)
    reference: str = ""
    path: Path | None = None
    """File the manifest was read from."""

    def patients(self) -> dict[str, str]:
        """``{sample id: patient id}``, in manifest order."""
        return {s.id: s.patient for s in self.samples}

    def sample_ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def is_control_probe(self, gene: str) -> bool:
        """True if ``gene`` matches :attr:`drop_probes_regex` (always False without one)."""
        return self.drop_probes_regex is not None and re.search(self.drop_probes_regex, gene) is not None

    def fetch_snippet(self, local_dir: str = "HEST_DIR") -> str:
        """Python text that downloads this dataset's samples with HEST's own instructions."""
        return hest_fetch_snippet(self.sample_ids(), local_dir)


# ----------------------------------------------------------------------------- loading


def _packaged_dir() -> Path:
    return Path(str(resources.files("cmrcnet.data.manifests")))


def _packaged_files() -> dict[str, Path]:
    return {p.stem.lower(): p for p in sorted(_packaged_dir().glob("*.yaml"))}


def list_manifests() -> list[str]:
    """Names of the packaged manifests, sorted."""
    return sorted(_packaged_files())


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def load_manifest(name: str) -> Manifest:
    """Load a packaged manifest by (case-insensitive) name or alias, or a YAML file by path."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    if name.lower().endswith((".yaml", ".yml")) or "/" in name or "\\" in name:
        return load_manifest_file(Path(name))
    files = _packaged_files()
    key = _normalise(name)
    if key in files:
        return load_manifest_file(files[key])
    for path in files.values():  # aliases
        m = load_manifest_file(path)
        if key in {_normalise(a) for a in m.aliases}:
            return m
    raise ConfigError(
        f"unknown dataset {name!r}; available: {', '.join(sorted(files))} "
        "(or the path of a manifest YAML file)"
    )


def load_manifest_file(path: str | Path) -> Manifest:
    """Read and validate one manifest YAML file (packaged or user-written).

    Parsed once per file version: every prediction looks its markers up through the
    manifests, and re-reading all of them took 8 % of predicting a section."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError("manifest file not found", path)
    st = path.stat()
    return copy.deepcopy(_load_manifest_cached(path.resolve(), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=64)
def _load_manifest_cached(path: Path, mtime_ns: int, size: int) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read manifest: {e}", path) from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"manifest is not valid YAML: {e}", path) from None
    return manifest_from_dict(d, path)


def _err(msg: str, path: Path | None) -> ConfigError:
    return ConfigError(f"invalid manifest: {msg}", path)


def _as_str(v: Any, what: str, path: Path | None, allow_empty: bool = False) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, (list, dict)):
        raise _err(f"{what} must be a string, got {v!r}", path)
    s = str(v).strip()
    if not s and not allow_empty:
        raise _err(f"{what} must not be empty", path)
    return s


def _str_list(v: Any, what: str, path: Path | None) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _err(f"{what} must be a list of strings", path)
    out = [_as_str(x, f"{what} entry", path) for x in v]
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise _err(f"{what} has duplicates: {', '.join(dup)}", path)
    return out


def _check_tables(results: dict[str, Any], path: Path | None) -> None:
    """Keys starting with ``table`` must be ``{method: {metric: number}}``."""
    for key, table in results.items():
        if not str(key).startswith("table"):
            continue
        if not isinstance(table, dict) or not table:
            raise _err(f"paper_results.{key} must be a mapping of method -> metrics", path)
        for method, metrics in table.items():
            if not isinstance(metrics, dict) or not metrics:
                raise _err(f"paper_results.{key}.{method} must be a mapping of metric -> number", path)
            for metric, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise _err(f"paper_results.{key}.{method}.{metric} must be a number, got {value!r}", path)


def manifest_from_dict(d: Any, path: str | Path | None = None) -> Manifest:
    """Validate a parsed manifest mapping; ``path`` is only used in error messages."""
    path = None if path is None else Path(path)
    if not isinstance(d, dict):
        raise _err("top level must be a mapping", path)
    unknown = sorted(set(map(str, d)) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _err(
            f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(_REQUIRED + _OPTIONAL)})", path
        )
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise _err(f"missing required key(s): {', '.join(missing)}", path)

    name = _as_str(d["name"], "name", path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _err(f"name {name!r} may only contain letters, digits, '_', '-', '.'", path)
    platform = _as_str(d["platform"], "platform", path).lower()
    if platform not in PLATFORMS:
        raise _err(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}", path)
    fmt = _as_str(d["format"], "format", path).lower()
    if fmt not in FORMATS:
        raise _err(f"format {fmt!r} is not one of {', '.join(FORMATS)}", path)

    raw_samples = d["samples"]
    if not isinstance(raw_samples, list) or not raw_samples:
        raise _err("samples must be a non-empty list of {id, patient}", path)
    samples: list[ManifestSample] = []
    for i, s in enumerate(raw_samples):
        if not isinstance(s, dict) or "id" not in s:
            raise _err(f"samples[{i}] must be a mapping with keys id and patient", path)
        extra = sorted(set(map(str, s)) - {"id", "patient"})
        if extra:
            raise _err(f"samples[{i}] has unknown key(s) {', '.join(extra)} (valid: id, patient)", path)
        sid = _as_str(s["id"], f"samples[{i}].id", path)
        if "patient" not in s or s["patient"] is None:
            raise _err(f"samples[{i}] ({sid}) has no patient (use the sample id if unknown)", path)
        samples.append(ManifestSample(sid, _as_str(s["patient"], f"samples[{i}].patient", path)))
    ids = [s.id for s in samples]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise _err(f"duplicate sample id(s): {', '.join(dup)}", path)

    gs = d.get("gene_selection") or {}
    if not isinstance(gs, dict):
        raise _err("gene_selection must be a mapping", path)
    bad = sorted(set(map(str, gs)) - set(_GENE_SELECTION_KEYS))
    if bad:
        raise _err(
            f"gene_selection has unknown key(s) {', '.join(bad)} (valid: {', '.join(_GENE_SELECTION_KEYS)})",
            path,
        )
    n_hvg = gs.get("n_hvg", 1000)
    if isinstance(n_hvg, bool) or not isinstance(n_hvg, int) or n_hvg <= 0:
        raise _err(f"gene_selection.n_hvg must be a positive integer, got {n_hvg!r}", path)
    combine = str(gs.get("combine", "union")).lower()
    if combine not in COMBINE:
        raise _err(f"gene_selection.combine {combine!r} is not one of {', '.join(COMBINE)}", path)
    regex = gs.get("drop_probes_regex")
    if regex is not None:
        regex = _as_str(regex, "gene_selection.drop_probes_regex", path)
        try:
            re.compile(regex)
        except re.error as e:
            raise _err(f"gene_selection.drop_probes_regex is not a valid regex: {e}", path) from None

    results = d.get("paper_results") or {}
    if not isinstance(results, dict):
        raise _err("paper_results must be a mapping", path)
    _check_tables(results, path)

    notes = d.get("notes") or ""
    if not isinstance(notes, str):
        raise _err("notes must be a string", path)
    reference = d.get("reference") or ""
    if not isinstance(reference, str):
        raise _err("reference must be a string", path)

    return Manifest(
        name=name,
        title=_as_str(d["title"], "title", path),
        platform=platform,
        format=fmt,
        species=_as_str(d["species"], "species", path),
        samples=samples,
        markers=_str_list(d.get("markers"), "markers", path),
        n_hvg=n_hvg,
        combine=combine,
        drop_probes_regex=regex,
        paper_results=results,
        notes=notes.strip(),
        aliases=_str_list(d.get("aliases"), "aliases", path),
        reference=reference.strip(),
        path=path,
    )


# ----------------------------------------------------------------------------- matching folders


def _strip_ext(name: str) -> str:
    for ext in (".tsv.gz", ".tsv", ".h5ad", ".csv.gz", ".csv"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _ids_in_folder(path: Path, fmt: str) -> set[str]:
    """Sample ids present in ``path`` in the layout of ``fmt``, as that format's reader lists them
    (file names only; a reader registered with :func:`cmrcnet.data.readers.register_reader` counts)."""
    from cmrcnet.data.readers import READERS

    spec = READERS.get(fmt)
    if spec is None:
        return set()
    try:  # no detect(): a partial download (e.g. HEST's st/ without wsis/) still names its samples
        return set(spec.list_ids(path))
    except InputError:
        return set()


def find_manifest_for_path(path: str | Path) -> Manifest | None:
    """The packaged manifest whose samples a data folder holds, or None.

    Per manifest, the sample ids present are listed by the reader of that manifest's
    format (HEST ``st/{id}.h5ad``; her2st ``ST-cnts/{id}.tsv.gz``; legacy ST
    ``{id}.tsv`` at top level). A manifest matches when the ids present are a
    non-empty subset of its ids (a partial copy); failing that, when all of its
    ids are present (a larger collection, e.g. all of her2st). Only a single,
    unambiguous match is returned: a HEST folder holding several datasets gives None.
    A file path (e.g. ``st/TENX111.h5ad``) is matched by its stem.
    """
    path = Path(path).expanduser()
    manifests = [load_manifest_file(p) for p in _packaged_files().values()]
    if path.is_file():
        stem = _strip_ext(path.name)
        hits = [m for m in manifests if stem in m.sample_ids()]
        return hits[0] if len(hits) == 1 else None
    if not path.is_dir():
        return None
    subset, superset = [], []
    for m in manifests:
        present = _ids_in_folder(path, m.format)
        if not present:
            continue
        ids = set(m.sample_ids())
        if present <= ids:
            subset.append(m)
        elif ids <= present:
            superset.append(m)
    if len(subset) == 1:
        return subset[0]
    if not subset and len(superset) == 1:
        return superset[0]
    return None


# ----------------------------------------------------------------------------- HEST


def hest_fetch_snippet(ids: Iterable[str], local_dir: str = "HEST_DIR") -> str:
    """HEST's documented per-sample download (tutorial 1-Downloading-HEST-1k), as text.

    cmrcnet never runs it: HEST-1k needs a Hugging Face account that accepted the
    dataset's terms, and a token.
    """
    ids = list(ids)
    id_list = ", ".join(repr(i) for i in ids)
    return (
        "# 1. accept the terms of https://huggingface.co/datasets/MahmoodLab/hest (Request access)\n"
        "# 2. pip install huggingface_hub   and create a token at https://huggingface.co/settings/tokens\n"
        "from huggingface_hub import login, snapshot_download\n"
        "\n"
        'login(token="YOUR HUGGING FACE TOKEN")\n'
        "\n"
        f"ids_to_query = [{id_list}]\n"
        'list_patterns = [f"*{id}[_.]**" for id in ids_to_query]\n'
        "snapshot_download(\n"
        f'    repo_id="{HEST_REPO_ID}",\n'
        '    repo_type="dataset",\n'
        "    allow_patterns=list_patterns,\n"
        f'    local_dir="{local_dir}",\n'
        ")\n"
    )


def check_hest_folder(hest_dir: str | Path, manifest: Manifest) -> list[str]:
    """Check that ``hest_dir/st/{id}.h5ad`` exists for every sample of ``manifest``.

    Returns the sample ids present (all of them, in manifest order). Raises
    :class:`InputError` listing the missing ids and the snippet that fetches them.
    """
    if manifest.format != "hest":
        raise ConfigError(
            f"dataset {manifest.name!r} is in the {manifest.format!r} layout, not HEST", manifest.path
        )
    hest_dir = Path(hest_dir).expanduser()
    if not hest_dir.is_dir():
        raise InputError(
            f"HEST folder not found; download the {manifest.name} samples with:\n\n"
            + hest_fetch_snippet(manifest.sample_ids(), str(hest_dir)),
            hest_dir,
        )
    ids = manifest.sample_ids()
    present = [i for i in ids if (hest_dir / "st" / f"{i}.h5ad").is_file()]
    missing = [i for i in ids if i not in present]
    if missing:
        raise InputError(
            f"dataset {manifest.name}: {len(missing)} of {len(ids)} samples missing "
            f"(no st/{{id}}.h5ad): {', '.join(missing)}. Fetch them with HEST's own instructions "
            "(https://huggingface.co/datasets/MahmoodLab/hest):\n\n"
            + hest_fetch_snippet(missing, str(hest_dir)),
            hest_dir,
        )
    return present


# ----------------------------------------------------------------------------- markers


def check_markers_against(manifest: Manifest, available_genes: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the manifest's markers into (present, unknown) for a data set's gene symbols.

    Exact matches first; a marker matching only case-insensitively is returned in the
    data's spelling. Unknown markers are reported with :func:`warnings.warn`, never
    dropped silently.
    """
    genes = [str(g) for g in available_genes]
    exact = set(genes)
    folded: dict[str, str] = {}
    for g in genes:
        folded.setdefault(g.lower(), g)
    present: list[str] = []
    unknown: list[str] = []
    for mk in manifest.markers:
        if mk in exact:
            present.append(mk)
        elif mk.lower() in folded:
            present.append(folded[mk.lower()])
        else:
            unknown.append(mk)
    if unknown:
        warnings.warn(
            f"dataset {manifest.name}: marker gene(s) not found in the data: {', '.join(unknown)} "
            f"({len(present)} of {len(manifest.markers)} present)",
            UserWarning,
            stacklevel=2,
        )
    return present, unknown


__all__ = [
    "FORMATS",
    "PLATFORMS",
    "XENIUM_CONTROL_REGEX",
    "Manifest",
    "ManifestSample",
    "check_hest_folder",
    "check_markers_against",
    "find_manifest_for_path",
    "hest_fetch_snippet",
    "list_manifests",
    "load_manifest",
    "load_manifest_file",
    "manifest_from_dict",
]
