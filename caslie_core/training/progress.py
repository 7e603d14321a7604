"""The training run's step log on any storage the run uses (a local folder, `s3://`, any fsspec URL).

One file of step lines per worker-group start, `RUN_DIR/progress/steps-<ms>-from<step>.jsonl`, written by rank 0:
the audit trail of which optimizer steps ran in which attempt (a resumed run starts a new file). On a local disk
each step is appended as it ends; object storage has no append, so there the whole file is written again at
every report (a checkpoint or an evaluation, the points where Ray Train records the run's metrics as well) and
when training ends: a remote log is at most one report interval behind.
"""

from __future__ import annotations

import json
import os
import time


class ProgressLog:
    def __init__(self, folder: str, start_step: int, *, rank: int) -> None:
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(folder)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(root, exist_ok=True)
        self.path = f"{root.rstrip('/')}/steps-{int(time.time() * 1000)}-from{start_step}.jsonl"
        self.rank, self.lines = rank, []
        if self.local:  # which process is which rank (operators; the restart test kills one by its pid)
            with self.fs.open(f"{root.rstrip('/')}/worker-rank{rank}.pid", "w") as fh:
                fh.write(str(os.getpid()))

    def add(self, entry: dict) -> None:
        if self.rank != 0:
            return
        line = json.dumps(entry) + "\n"
        if self.local:
            with self.fs.open(self.path, "a") as fh:
                fh.write(line)
        else:
            self.lines.append(line)

    def flush(self) -> None:
        if self.rank == 0 and not self.local and self.lines:
            with self.fs.open(self.path, "w") as fh:
                fh.write("".join(self.lines))
