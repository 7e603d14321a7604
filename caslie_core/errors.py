"""Error types. Each names where the problem is and what was expected, so a user can fix it."""

from __future__ import annotations


class CaslieError(Exception):
    """Base class for every error this project raises on purpose."""


class RecordError(CaslieError, ValueError):
    """A record that does not follow the MMECInstruct schema.

    Carries the source file, the line or row number, the record id (when known) and the field,
    so that a rejected record can be found in its file.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.source = source
        self.row = row
        self.record_id = record_id
        self.field = field
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.source:
            where.append(str(self.source))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.record_id:
            where.append(f"id {self.record_id}")
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "row": self.row,
            "id": self.record_id,
            "field": self.field,
            "reason": self.reason,
        }


class UsageError(CaslieError, ValueError):
    """A request the user can fix: an unknown name or mode, a file that does not fit its purpose. The commands
    print it as one line (exit 2); a ValueError that is not one of these is a bug, and shows its traceback."""


class SourceError(CaslieError, OSError):
    """A data file that cannot be read at all: missing, empty, truncated or of an unknown type."""


class ConfigError(CaslieError, ValueError):
    """A configuration that does not validate. Lists every problem at once."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head} ({len(self.problems)} problem(s)):\n{body}")


class ImageError(CaslieError):
    """An image that could not be fetched or decoded. `stage` says which step failed."""

    def __init__(self, stage: str, message: str, *, transient: bool = False) -> None:
        self.stage = stage
        self.reason = message
        self.transient = transient
        super().__init__(f"{stage}: {message}")


class EngineError(CaslieError):
    """A model failed every item of several batches in a row: the model or its device is broken, not the data."""


def find_error(error: BaseException, cls: type[BaseException]) -> BaseException | None:
    """The first `cls` in `error`'s chain of causes (`__cause__`, `__context__`, and the `cause` Ray's task
    errors carry), else one rebuilt from the error's text: what a remote stage raised, inside what the
    engine raised for it."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):  # Ray's RayTaskError(cls) is one too: its `cause` is the error itself
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, cls) else e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    # Ray ships a remote error's chain as text (a pickled exception loses its __cause__): rebuild it from there.
    import re

    found = re.findall(rf"{re.escape(cls.__module__)}\.{cls.__name__}: (.+)", str(error))
    return cls(found[-1].strip()) if found else None


class OutputError(CaslieError):
    """The output cannot be written (disk full, permission denied, a path that is not a folder): stops the job,
    which says how many records are safely written."""
