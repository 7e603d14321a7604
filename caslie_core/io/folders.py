"""Which files of a catalog are records, and how the enrichment job reads each: format detection, the folder
rule (`survey`: one format per folder, metadata files skipped), the reading plan (parallel readers or the driver).

One copy of the rule for every job and `caslie validate`. `io.store.classify_inputs` tells enrichment output
apart from raw records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import SourceError

Format = Literal["jsonl", "json", "parquet"]


def detect_format(path: str) -> Format:
    name = path.lower().split("?", 1)[0]
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise SourceError(
        f"{path}: unsupported file type; expected .jsonl/.ndjson, .json (a list or JSON lines) or .parquet"
        " (optionally compressed: .gz, .bz2, .xz, .zst for JSON)"
    )


def is_records_file(path: str) -> bool:
    """A file whose name says it holds records (JSONL, JSON, Parquet)."""
    try:
        detect_format(path)
        return True
    except SourceError:
        return False


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


# Written beside records by dataset tools (ours: `caslie synth`'s manifest, a job's summary; Hugging Face's
# dataset_info/state): in a folder they are never read as records.
NOT_RECORDS = frozenset(
    {"manifest.json", "summary.json", "dataset_info.json", "dataset_dict.json", "state.json", "metadata.json"}
)


class MixedFormatsError(SourceError):
    """A folder holding records in two formats (the folder rule refuses to guess which to read)."""


def _family(path: str) -> str:
    return "Parquet" if detect_format(path) == "parquet" else "JSON"


@dataclass
class Found:
    """What a records path holds: the files read as records, and the files beside them that are not."""

    files: list[str]
    ignored: list[str]

    def line(self, limit: int = 5) -> str:
        """One line for a job's log: the files it reads, and what it skips."""

        def names(paths: list[str]) -> str:
            shown = ", ".join(p.rsplit("/", 1)[-1] for p in paths[:limit])
            return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")

        head = f"{len(self.files)} file{'s' * (len(self.files) != 1)}: {names(self.files)}"
        return head + (f"; not records, ignored: {names(self.ignored)}" if self.ignored else "")


def survey(path: str, *, fmt: str = "auto", key: str = "input.path") -> Found:
    """The rule for a records folder (a file is itself): every `.jsonl`/`.ndjson`/`.json` or every `.parquet` file
    below it, never both (a folder with both is refused, naming them: `fmt` picks one side: `jsonl` or `json`
    reads the JSON files, `parquet` the Parquet ones); hidden and `_` files (`.tmp-*`, `_SUCCESS`), the metadata
    files of `NOT_RECORDS` and files of other types are skipped and listed in `ignored`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.isdir(root):
        return Found([path], [])

    def named(p: str) -> str:
        return fs.unstrip_protocol(p) if "://" in path else p

    files, ignored = [], []
    for p in sorted(fs.find(root)):
        name = p.rsplit("/", 1)[-1]
        skip = _hidden(p) or name.lower() in NOT_RECORDS or not is_records_file(p)
        (ignored if skip else files).append(named(p))
    families: dict[str, list[str]] = {}
    for f in files:
        families.setdefault(_family(f), []).append(f)
    if fmt != "auto":
        keep = "Parquet" if fmt == "parquet" else "JSON"
        ignored = sorted(ignored + [f for fam, fs_ in families.items() if fam != keep for f in fs_])
        files = families.get(keep, [])
    elif len(families) > 1:
        found = "; ".join(
            f"{len(v)} {fam} ({', '.join(x.rsplit('/', 1)[-1] for x in v[:3])}{', ...' * (len(v) > 3)})"
            for fam, v in sorted(families.items())
        )
        raise MixedFormatsError(
            f"{key}: {path}: the folder holds records in two formats: {found}. A folder is read as one format: "
            f"set input.format to parquet, or to jsonl (JSON files), to read only those, or point {key} at a file"
        )
    if not files:
        want = "no .parquet files" if fmt == "parquet" else "no .jsonl, .json or .parquet files"
        raise SourceError(
            f"{key}: {path}: folder has {want}" + (f" (ignored: {len(ignored)} files)" if ignored else "")
        )
    return Found(files, ignored)


def find_record_files(path: str, *, key: str = "input.path", fmt: str = "auto") -> list[str]:
    """The record files at `path`: the file itself, or a folder's records files by the rule of `survey`."""
    return survey(path, fmt=fmt, key=key).files


@dataclass
class Read:
    """How one input file is read: `text` (JSON lines) or `parquet` by parallel readers, else `driver`."""

    path: str
    format: Format
    reader: Literal["text", "parquet", "driver"]
    filesystem: Any = None  # a pyarrow filesystem for remote paths (parallel readers only)
    rows: int | None = None  # about how many records (JSON lines: size / the first MiB's bytes per line)


def estimate_lines(fs, path: str, sample: int = 1 << 20) -> int | None:
    """About how many lines a text file holds: its size over the bytes per line of its first `sample` bytes."""
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as fh:
            head = fh.read(sample)
    except Exception:  # noqa: BLE001 - an estimate only: the reader reports a file it cannot open
        return None
    lines = head.count(b"\n") + (0 if head.endswith(b"\n") else 1)
    return max(1, round(size * lines / len(head))) if head else 0


PARALLEL_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs")


class Plan(list):
    """The `Read`s of a job's input, with `found`: what each path held (the files read, those skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = Found([], [])

    @property
    def mixed(self) -> bool:
        """Both JSON and Parquet files (listed one by one in `input.path`): rows of two shapes to bring together."""
        return len({r.format == "parquet" for r in self}) > 1


def reading_plan(paths: str | list[str], fmt: str = "auto", *, count_lines: bool = False) -> Plan:
    """Every records file under `paths` (a folder by the rule of `survey`) with the way to read it: uncompressed
    JSONL and Parquet on local or object storage go to parallel readers; JSON lists, compressed files and
    http(s)/hf URLs through one process. `count_lines`: estimate each JSON-lines file's records (`Read.rows`; one
    small read per file, on the driver)."""
    import fsspec

    plan = Plan()
    for root in [paths] if isinstance(paths, str) else list(paths):
        listed = survey(root, fmt=fmt)
        plan.found.files.extend(listed.files)
        plan.found.ignored.extend(listed.ignored)
        for path in listed.files:
            f = detect_format(path) if fmt == "auto" or listed.files != [root] else fmt
            scheme = path.split("://", 1)[0] if "://" in path else "file"
            if scheme not in PARALLEL_SCHEMES or f not in ("jsonl", "parquet") or path.endswith(".gz"):
                plan.append(Read(path, f, "driver"))
                continue
            fs, stripped = fsspec.core.url_to_fs(path)
            if not fs.exists(stripped):
                raise SourceError(f"input.path {path}: no such file")
            rows = estimate_lines(fs, stripped) if count_lines and f == "jsonl" else None
            filesystem = None
            if scheme != "file":
                from pyarrow.fs import FSSpecHandler, PyFileSystem

                filesystem, path = PyFileSystem(FSSpecHandler(fs)), stripped
            plan.append(Read(path, f, "text" if f == "jsonl" else "parquet", filesystem, rows))
    return plan


ORDER = "__input_order"  # the raw rows' column (and `Item.order`): where each record came in the input
ROW_BITS = 40  # rows per file before the next file's numbers (a trillion)


def input_order(file_index: int, row: int) -> int:
    """A record's place in the input: its file's place in the reading plan, then its row in that file."""
    return (file_index << ROW_BITS) + row
