"""`caslie store stats PATH` and `caslie store prune PATH --older-than AGE`: the result store of `store.path`
(`caslie_core.io.results`), looked at or trimmed without Ray."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="look at or prune the result store (captions and votes kept across enrichment runs)",
        description="stats: keys, rows, parts, bytes and keys per model of each kind; prune: remove results "
        "written more than AGE ago (e.g. 30d, 12h, 90m) and temporaries of killed writers.",
    )
    p.add_argument("action", choices=("stats", "prune"))
    p.add_argument("path", help="the store's folder (store.path: local or any fsspec URL)")
    p.add_argument("--older-than", default=None, metavar="AGE", help="prune: results older than this (30d, 12h)")


def command(args) -> int:
    from caslie_core.errors import UsageError
    from caslie_core.io.results import ResultStore, parse_age

    store = ResultStore(args.path)
    if args.action == "stats":
        out = store.stats()
        for kind in ("captions", "votes"):  # a model's identity is JSON: shown as an object, not a string
            out[kind]["by_model"] = [{"model": json.loads(m), "keys": n} for m, n in out[kind]["by_model"].items()]
    else:
        if args.older_than is None:
            raise UsageError("caslie store prune needs --older-than AGE (e.g. 30d): what to remove")
        out = store.prune(parse_age(args.older_than))
    print(json.dumps(out, indent=2))
    return 0
