"""One run at a time per output folder: a lock file naming its owner, refreshed while the run lives.

Two runs of one command into one output would each do the whole catalog, and a second run's start (sweeping
temporary parts, moving damaged ones aside) would pull files from under the first. The lock,
`OUTPUT/.caslie-run.lock`, is JSON: {run_id, user, host, pid, started, seen}. A run refreshes `seen` every
`stale_s / 4` seconds; another run refuses to start while the lock is fresh, and takes over a stale one (not
refreshed for `stale_s`, or held by a process of this host that no longer exists), saying so.

On local disks the lock is created exclusively (`O_EXCL`); on object stores, which have no exclusive create
through fsspec, it is written then read back, which leaves a window of a second for two runs started together.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
from collections.abc import Callable

from ..errors import CaslieError

NAME = ".caslie-run.lock"


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        return f"uid {os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputLock:
    """`acquire()` before a run touches its output, `release()` after (a context manager does both)."""

    def __init__(self, output: str, run_id: str, *, stale_s: float = 120.0, say: Callable[[str], None] = print):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(output)
        self.path, self.output, self.say, self.stale_s = f"{root.rstrip('/')}/{NAME}", output, say, stale_s
        self.me = {"run_id": run_id, "user": _user(), "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as fh:
                return json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written or unreadable: treat as stale
            return {}

    def _record(self, started: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({**self.me, "started": started or now, "seen": now}).encode()

    def _create(self, data: bytes) -> bool:
        """Write the lock if there is none; False when another run made one first."""
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "file" in protocols:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        if self.fs.exists(self.path):
            return False
        with self.fs.open(self.path, "wb") as fh:
            fh.write(data)
        time.sleep(1.0)  # another writer in the same second: the last one wins, the other sees it below
        held = self._read() or {}
        return held.get("run_id") == self.me["run_id"]

    def _stale(self, held: dict) -> str | None:
        """Why a held lock may be taken over, or None while its run looks alive."""
        if not held:
            return "it is unreadable"
        seen = float(held.get("seen") or 0)
        if held.get("host") == self.me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return f"its process ({held['pid']} on this host) is gone"
        if time.time() - seen > self.stale_s:
            return f"it was last refreshed {_age(time.time() - seen)} ago"
        return None

    def acquire(self) -> OutputLock:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        for _ in range(3):
            if self._create(self._record()):
                break
            held = self._read()
            if held is None:  # released meanwhile
                continue
            why = self._stale(held)
            if why is None:
                raise CaslieError(
                    f"output.path {self.output} is in use by another run: run {held.get('run_id')} of "
                    f"{held.get('user')}@{held.get('host')} (pid {held.get('pid')}), started "
                    f"{_age(time.time() - float(held.get('started') or 0))} ago, alive {_age(time.time() - float(held.get('seen') or 0))} ago."
                    f" Wait for it to finish or stop it, or write to another output.path (a lock not refreshed for"
                    f" {_age(self.stale_s)} is taken over)"
                )
            self.say(
                f"[enrich] taking over the lock of run {held.get('run_id')} ({held.get('user')}@{held.get('host')}, "
                f"pid {held.get('pid')}) on {self.output}: {why}"
            )
            self.fs.rm(self.path)
        else:
            raise CaslieError(f"output.path {self.output}: could not take its lock {self.path}; try again")
        self._thread = threading.Thread(target=self._refresh, name="caslie-output-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        started = time.time()
        while not self._stop.wait(self.stale_s / 4):
            try:
                held = self._read() or {}
                if held.get("run_id") != self.me["run_id"]:
                    self.say(f"[enrich] the lock on {self.output} was taken by run {held.get('run_id')}")
                    return
                with self.fs.open(self.path, "wb") as fh:
                    fh.write(self._record(started))
            except Exception:  # noqa: BLE001, S110 - a missed refresh only makes the lock look older
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            if (self._read() or {}).get("run_id") == self.me["run_id"]:
                self.fs.rm(self.path)
        except Exception:  # noqa: BLE001, S110 - a lock left behind is taken over as stale
            pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
