"""The result store: captions and votes kept across runs, so tomorrow's catalog costs only what changed.

A caption is stored under the key of what determines it: the image's content (the digest of its bytes), the
caption request (the context-conditioned prompt text) and the captioner (`caption_model`: model id, revision,
engine and the server's model id, token cap, chat date, the size the image is decoded to). A vote under the key of
its question with the caption in it and the judge (`judge_model`: model id, revision, engine, mode, token cap,
reply rule, system message, chat date). A changed model revision, prompt or setting is another key: it misses by
construction. Only greedy results are stored (every captioner and judge of this project decodes greedily).

Layout (`store.path`, local or any fsspec URL): `STORE/captions/part-<run>-<uuid>.parquet` and
`STORE/votes/part-<run>-<uuid>.parquet`, each row {key, value, raw, model, run_id, created}. A writer writes a part
under a temporary dot-name and renames it: readers never see half a part, any number of writers never collide, and
a writer killed mid-write leaves only a dot-file that readers skip and `prune` sweeps. The same key written twice
(two runs racing) holds the same value; readers take either. A run's model actors write a part per batch; when the
run ends its parts are merged into one per kind (`merge_run`); a reader that listed a part merged away meanwhile
skips it (its results are in the merged part, which the next reader sees).

This module is the store itself (Ray-free): `ResultIndex` is what one lookup actor of the batch job holds.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from ..errors import UsageError

CAPTIONS, VOTES = "captions", "votes"
KINDS = (CAPTIONS, VOTES)
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0  # a temporary part this old belongs to a writer that was killed


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("value", pa.string()),  # the caption (None: the captioner made none) or the vote
            ("raw", pa.string()),  # a judge's raw answer
            ("model", pa.string()),  # the model's identity (canonical JSON): what `stats` groups by
            ("run_id", pa.string()),
            ("created", pa.float64()),  # unix seconds
        ]
    )


def _canonical(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _identity(section, **settings) -> str:
    """A model section's identity (model, revision, engine, the server's model id) and the settings its results
    depend on, as canonical JSON."""
    server = getattr(section, "openai", None)
    served = server.model if server else None
    engine = getattr(section, "engine", "hf")
    if server is not None:  # what the server is sent or asked for that changes its answer
        keep = ("max_tokens", "image_format", "logprobs", "structured_choice")
        settings = {**settings, "server": {k: getattr(server, k) for k in keep}}
    return _canonical(
        {
            "model": section.model,
            "revision": section.revision,
            "engine": engine,
            "served": served,
            "max_new_tokens": section.max_new_tokens,
            "chat_date": section.chat_date,
            **settings,
        }
    )


def caption_model(section, image_size: int) -> str:
    """The captioner's identity as far as its captions depend on it (a `CaptionerConfig` section)."""
    return _identity(section, image_size=image_size)


def judge_model(section) -> str:
    """A judge's identity as far as its votes depend on it (a `JudgeConfig` section)."""
    return _identity(section, mode=section.mode, reply=section.reply, system_message=section.system_message)


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """An age such as 30d, 12h, 90m, 45s or 2w (or plain seconds) as seconds."""
    t = text.strip().lower()
    try:
        return float(t[:-1]) * AGE_UNITS[t[-1]] if t and t[-1] in AGE_UNITS else float(t)
    except ValueError:
        raise UsageError(f"age {text!r}: give a number and a unit, e.g. 30d, 12h, 90m, 45s, 2w") from None


def _safe(run_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in run_id)[:40] or "run"


def shard_of(key: str, shards: int) -> int:
    """The lookup actor that holds `key` (keys are hex digests: evenly spread)."""
    return int(key[:6], 16) % shards


def result_key(model: str, *parts: str) -> str:
    """The store key of a result: the model's identity and what it was asked (image digest and request, or the
    question with the caption in it)."""
    h = hashlib.sha256(model.encode())
    for p in parts:
        h.update(b"\x00" + p.encode())
    return h.hexdigest()[:40]


class ResultStore:
    def __init__(self, path: str) -> None:
        import fsspec

        self.path = path
        self.fs, self.root = fsspec.core.url_to_fs(path)
        self.root = self.root.rstrip("/")

    def _folder(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown result kind {kind!r}; valid: {KINDS}")
        return f"{self.root}/{kind}"

    def write(self, kind: str, rows: list[dict], run_id: str) -> str | None:
        """Rows {key, value, raw?, model} as one new part (atomic); its path, or None when there is nothing."""
        import pyarrow as pa

        if not rows:
            return None
        now = time.time()
        table = pa.Table.from_pylist(
            [{"raw": None, **r, "run_id": run_id, "created": now} for r in rows], schema=_schema()
        )
        return self._put(kind, table, f"part-{_safe(run_id)}-{uuid.uuid4().hex[:12]}.parquet")

    def _put(self, kind: str, table, name: str) -> str:
        import pyarrow.parquet as pq

        folder = self._folder(kind)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        with self.fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh, write_page_checksum=True)
        self.fs.mv(tmp, f"{folder}/{name}")
        return f"{folder}/{name}"

    def merge_run(self, run_id: str, most_rows: int = 1_000_000) -> dict[str, int]:
        """Merge the parts `run_id` wrote into as few as possible (at most `most_rows` rows each): a run's model
        actors write a part per batch. {kind: parts merged}. The merged part is in place before the small ones
        go: a reader sees every result at least once."""
        import pyarrow as pa

        merged: dict[str, int] = {}
        prefix = f"part-{_safe(run_id)}-"
        for kind in KINDS:
            small = [p for p in self.parts(kind) if p.rsplit("/", 1)[-1].startswith(prefix)]
            if len(small) < 2:
                continue
            tables: list = []
            for p in small:  # streamed: at most about `most_rows` rows in memory
                t = self._read_or_none(p)
                tables += [t] if t is not None else []
                if tables and (p == small[-1] or sum(t.num_rows for t in tables) >= most_rows):
                    self._put(kind, pa.concat_tables(tables), f"{prefix}{uuid.uuid4().hex[:12]}.parquet")
                    tables = []
            for p in small:
                self.fs.rm(p)
            merged[kind] = len(small)
        return merged

    def parts(self, kind: str) -> list[str]:
        folder = self._folder(kind)
        if not self.fs.exists(folder):
            return []
        names = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".parquet")]
        return sorted(p for p in names if not p.rsplit("/", 1)[-1].startswith("."))

    def _read(self, part: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        with self.fs.open(part, "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def _read_or_none(self, part: str, columns: list[str] | None = None):
        """A part, or None when it went since it was listed (merged or pruned by another run)."""
        try:
            return self._read(part, columns)
        except FileNotFoundError:
            return None

    def lookup(self, kind: str, keys, model: str | None = None) -> dict[str, dict]:
        """The stored results of `keys`: {key: {value, raw, model, run_id, created}} (a scan of every part; the
        job's lookup at catalog scale keeps the store in its helper actor instead). `model`: only that model's."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(set(keys)), pa.string())
        found: dict[str, dict] = {}
        if not len(wanted):
            return found
        for part in self.parts(kind):
            t = self._read_or_none(part)
            if t is None:
                continue
            mask = pc.is_in(t.column("key"), value_set=wanted)
            if model is not None:
                mask = pc.and_(mask, pc.equal(t.column("model"), model))
            for row in t.filter(mask).to_pylist():
                found.setdefault(row.pop("key"), row)
        return found

    def scan(self, kind: str, models: set[str] | None = None):
        """(key, value, raw, run_id, model) of every stored result (of `models`, when given), part by part."""
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = ["key", "value", "raw", "run_id", "model"]
        for part in self.parts(kind):
            t = self._read_or_none(part, columns)
            if t is None:
                continue
            if models is not None:
                t = t.filter(pc.is_in(t.column("model"), value_set=pa.array(sorted(models), pa.string())))
            yield from zip(*(t.column(c).to_pylist() for c in columns))

    def stats(self) -> dict[str, Any]:
        """Per kind: keys (distinct), rows, parts, bytes, and keys by model."""
        out: dict[str, Any] = {"path": self.path}
        for kind in KINDS:
            keys, rows, size, by_model = set(), 0, 0, {}
            parts = self.parts(kind)
            for part in parts:
                t = self._read_or_none(part, ["key", "model"])
                if t is None:
                    continue
                size += self.fs.size(part)
                rows += t.num_rows
                for k, m in zip(t.column("key").to_pylist(), t.column("model").to_pylist()):
                    if k not in keys:
                        keys.add(k)
                        by_model[m] = by_model.get(m, 0) + 1
            out[kind] = {"keys": len(keys), "rows": rows, "parts": len(parts), "bytes": size, "by_model": by_model}
        return out

    def prune(self, older_than_s: float, *, now: float | None = None) -> dict[str, int]:
        """Remove results written more than `older_than_s` ago (each part rewritten without them, atomically, or
        removed when nothing is left), and temporary parts of writers killed long ago."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        now = time.time() if now is None else now
        removed = rewritten = swept = 0
        for kind in KINDS:
            folder = self._folder(kind)
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                name = path.rsplit("/", 1)[-1]
                if name.startswith(TMP_PREFIX):
                    modified = self.fs.modified(path).timestamp()
                    if now - modified > STALE_TMP_S:
                        self.fs.rm(path)
                        swept += 1
            for part in self.parts(kind):
                t = self._read_or_none(part)
                if t is None:
                    continue
                keep = t.filter(pc.greater_equal(t.column("created"), now - older_than_s))
                if keep.num_rows == t.num_rows:
                    continue
                removed += t.num_rows - keep.num_rows
                if keep.num_rows:
                    tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}-{part.rsplit('/', 1)[-1]}"
                    with self.fs.open(tmp, "wb") as fh:
                        pq.write_table(keep, fh, write_page_checksum=True)
                    self.fs.mv(tmp, part)
                    rewritten += 1
                else:
                    self.fs.rm(part)
        return {"removed": removed, "parts_rewritten": rewritten, "temporaries_swept": swept}


class ResultIndex:
    """The stored results of some models, in memory, for lookups: what one lookup actor of the batch job holds
    (its `shard` of `shards`; the keys spread by `shard_of`). {kind: set of model identities} says what to load."""

    def __init__(self, path: str, models: dict[str, set[str]], shard: int = 0, shards: int = 1) -> None:
        t = time.monotonic()
        self.found: dict[str, dict[str, tuple]] = {kind: {} for kind in KINDS}
        store = ResultStore(path)
        for kind, wanted in models.items():
            table = self.found[kind]
            for key, value, raw, run_id, _ in store.scan(kind, set(wanted)) if wanted else ():
                if shards == 1 or shard_of(key, shards) == shard:
                    table.setdefault(key, (value, raw, run_id))
        self.load_s = time.monotonic() - t
        self.asked = self.hits = 0

    def get(self, kind: str, keys: list[str]) -> dict[str, tuple]:
        """{key: (value, raw, run_id)} of the keys stored."""
        table = self.found[kind]
        out = {k: table[k] for k in keys if k in table}
        self.asked, self.hits = self.asked + len(keys), self.hits + len(out)
        return out

    def stats(self) -> dict:
        return {
            "keys": {kind: len(v) for kind, v in self.found.items()},
            "load_s": round(self.load_s, 3),
            "asked": self.asked,
            "hits": self.hits,
        }
