"""`caslie submit JOB CONFIG`: send a job to a Ray cluster through the Ray Jobs API.

The config is validated here first (a typo fails in a second, not after the upload); the entrypoint is the
same `python -m ray_jobs.<job> --config CONFIG [--set ...]` a cluster user runs by hand; the runtime env is
`cluster/runtime_env.yaml` with this repository as the working directory. With token authentication on (the
default of current Ray), Ray's client sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token; it is never printed.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from .common import JOBS, ROOT, load_job_config

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(job: str, config: str, overrides: list[str]) -> str:
    cfg_path = (
        os.path.relpath(os.path.abspath(config), ROOT) if os.path.abspath(config).startswith(str(ROOT)) else config
    )
    parts = ["python", "-m", f"ray_jobs.{job}", "--config", cfg_path]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def runtime_env(path: str | None, *, upload: bool) -> dict:
    import yaml

    env = yaml.safe_load(open(path or ROOT / "cluster" / "runtime_env.yaml")) or {}
    if upload:
        env["working_dir"] = str(ROOT) if env.get("working_dir") in (None, ".") else env["working_dir"]
    else:
        env.pop("working_dir", None)
        env.pop("excludes", None)
    return env


def submit(
    job: str,
    config: str,
    overrides: list[str],
    *,
    address: str | None = None,
    wait: bool = False,
    runtime_env_path: str | None = None,
    upload: bool = True,
    timeout_s: float = 24 * 3600,
    out=sys.stdout,
) -> dict:
    """Validate, submit, optionally wait. Returns {submission_id, status, address}."""
    from ray.job_submission import JobSubmissionClient

    from caslie_core.errors import CaslieError

    if job not in JOBS or job == "serve":
        raise CaslieError(
            f"unknown job {job!r}; jobs: {', '.join(j for j in JOBS if j != 'serve')} "
            "(serve with `serve deploy` or a RayService)"
        )
    load_job_config(job, config, overrides)  # fail fast, before any upload
    address = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    )
    try:
        client = JobSubmissionClient(address)
        sid = _submit_when_an_agent_is_up(
            client,
            out,
            entrypoint=entrypoint(job, config, overrides),
            runtime_env=runtime_env(runtime_env_path, upload=upload),
            metadata={"caslie_job": job, "config": os.path.basename(config)},
        )
    except Exception as e:
        text = str(e)
        if type(e).__name__ == "AuthenticationError" or any(
            k in text for k in ("401", "403", "nauthenticated", "uthoriz")
        ):
            raise CaslieError(
                f"the cluster at {address} refused the submission: authentication failed; set "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
                "token"
            ) from None
        if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection" in text:
            raise CaslieError(f"cannot reach the Ray Jobs API at {address}: {text.splitlines()[0]}") from None
        raise
    print(f"submitted {job} as {sid} to {address}", file=out)
    status = str(client.get_job_status(sid).value)
    if wait:
        deadline = time.time() + timeout_s
        streamed = stream_logs(client, sid, timeout_s, out)  # the job's own lines, as they are written
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(2)
            status = str(client.get_job_status(sid).value)
        print(f"{sid}: {status}", file=out)
        if status != "SUCCEEDED" and not streamed:
            tail = client.get_job_logs(sid).splitlines()[-20:]
            print("last log lines:\n  " + "\n  ".join(tail), file=out)
    return {"submission_id": sid, "status": status, "address": address}


AGENT_WAIT_S = 60.0  # a cluster just started answers "No available agent" until its job agents are up


def _submit_when_an_agent_is_up(client, out, **job) -> str:
    """`submit_job`, retried while the Jobs API says no job agent is up yet (a cluster just started; Ray's
    own words: "please try again later"), for up to `AGENT_WAIT_S`."""
    deadline, wait, said = time.monotonic() + AGENT_WAIT_S, 1.0, False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() + wait > deadline:
                raise
            if not said:
                print("the cluster's job agents are not up yet; retrying the submission", file=out)
                said = True
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


def stream_logs(client, sid: str, timeout_s: float, out) -> bool:
    """Print the job's log lines as they come (`tail_job_logs`, a websocket) until the job ends or `timeout_s`;
    False when the stream could not be opened or broke (the caller then polls and prints the last lines)."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
        return True
    except asyncio.TimeoutError:
        return True
    except Exception as e:  # noqa: BLE001 - a lost stream must not lose the job's status
        print(f"(log stream unavailable: {type(e).__name__}: {e}; polling the status)", file=out)
        return False
