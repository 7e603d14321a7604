"""Connecting a job's driver to Ray: join a running cluster or start a local one, with token auth."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("caslie")  # the jobs' logger (ray_jobs.common configures it)


def verbose_mode() -> bool:
    """Ray's own logs on the terminal: on unless `quiet()` was asked for (the `caslie` commands without
    --verbose). A job submitted to a cluster (`python -m ray_jobs.<job>`) keeps them all, for `ray job logs`."""
    return os.environ.get("CASLIE_VERBOSE", "1") != "0"


def _answers(address: str, timeout: float = 1.0) -> bool:
    """Does a GCS listen at host:port? (Ray's address file outlives a cluster that died without `ray stop`.)"""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def running_local_cluster() -> str | None:
    """The address of the local cluster Ray's address file names (a `ray start` cluster), if it answers."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
    except Exception:  # noqa: BLE001 - a private helper; without it we simply start our own cluster
        return None
    return address if address and _answers(address) else None


def init_ray(ray_cfg, *, verbose: bool | None = None) -> bool:
    """Connect to Ray; returns True when this call started the cluster (then the job shuts it down).

    `ray.address` (else RAY_ADDRESS): `local` starts a cluster of our own with `ray.num_cpus` and
    `ray.object_store_memory`; `auto` or host:port joins that cluster. Unset: join a running local
    cluster when one answers (its resources are its own, so ours are not passed), else start one.
    Workers must import our packages: the repo goes on PYTHONPATH (inherited by local workers).
    """
    token_client_mode(ray_cfg.address)
    import ray

    if ray.is_initialized():
        return False
    verbose = verbose_mode() if verbose is None else verbose
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    kwargs = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if getattr(ray_cfg, "log_format", "text") == "json":
        json_logs()
        # Ray's workers and actors log JSON lines (their own files, `ray job logs`, a log collector)
        kwargs["logging_config"] = ray.LoggingConfig(encoding="JSON", log_level="INFO")
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address is None and (found := running_local_cluster()):
        address = found
        log.info(f"[ray] joined the running local Ray cluster at {found} (set ray.address=local to start our own)")
    elif address and address != "local":
        log.info(f"[ray] joining the Ray cluster at {address}")
    if address == "auto":
        address = running_local_cluster() or address
    if address and address != "local":
        match_local_auth(address)
        try:
            ray.init(address=address, **kwargs)
            interrupt_on_sigterm()
        except ConnectionError as e:
            if os.environ.get("RAY_AUTH_MODE") == "token":
                raise
            from caslie_core.errors import CaslieError

            raise CaslieError(
                f"cannot connect to the Ray cluster at {address} ({str(e).strip().splitlines()[0][:160]}). If it "
                "uses token authentication (Ray's default for clusters it starts, KubeRay's authOptions), set "
                "RAY_AUTH_MODE=token in this process's environment and the cluster's token in RAY_AUTH_TOKEN (or "
                "a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
            ) from None
        return False
    ray.init(
        address="local",
        num_cpus=ray_cfg.num_cpus,
        object_store_memory=ray_cfg.object_store_memory,
        include_dashboard=False,
        **kwargs,
    )
    if not verbose:
        log.info(f"[ray] started a local Ray cluster; Ray's own logs: {_session_logs()}")
    interrupt_on_sigterm()
    return True


class Interrupted(KeyboardInterrupt):
    """SIGTERM to a job's driver (Kubernetes, `kill`, `ray job stop` on a local run), raised where the driver is,
    as Ctrl-C raises KeyboardInterrupt: the job ends as it does on Ctrl-C, with one line, not Ray's native dump."""


def interrupt_on_sigterm() -> None:
    """From now on, SIGTERM raises `Interrupted` in the main thread (after `ray.init`, which installs its own)."""
    import signal
    import threading

    def interrupted(signum, frame):
        raise Interrupted("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupted)


def shutdown(started: bool) -> None:
    """`ray.shutdown()`; for a cluster this job started, then wait a few seconds for its worker processes, and kill
    those still there (after Ctrl-C some lived 10-30 s more): no process of the job is left once it returns."""
    import ray

    session = _session_name() if started else None
    ray.shutdown()
    if session:
        _reap(session)


def _session_name() -> str | None:
    try:
        import ray

        return Path(ray._private.worker.global_worker.node.get_session_dir_path()).name
    except Exception:  # noqa: BLE001 - nothing to reap without it
        return None


def _reap(session: str, wait_s: float = 5.0) -> int:
    """Kill what is left of a local session's processes (their command lines name the session); how many."""
    import time

    import psutil

    def left() -> list:
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and any(session in a for a in p.info["cmdline"] or ()):
                    mine.append(p)
            except psutil.Error:
                continue
        return mine

    end = time.monotonic() + wait_s
    while (procs := left()) and time.monotonic() < end:
        time.sleep(0.2)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def json_logs() -> None:
    """The jobs' own log lines (logger `caslie`) as JSON objects, one per line, in Ray's JSON shape."""
    from ray._common.formatters import JSONFormatter

    for handler in log.handlers:
        handler.setFormatter(JSONFormatter())


def token_client_mode(address: str | None) -> None:
    """A driver joining a cluster with a token given to it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) but no
    RAY_AUTH_MODE is joining a token-auth cluster: set the mode. Ray reads it when first imported, so this runs
    where a job's config is loaded, before the job imports Ray (and again in init_ray for embedders)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address in (None, "local") or os.environ.get("RAY_AUTH_MODE") is not None:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("[ray] a Ray auth token is set: connecting with RAY_AUTH_MODE=token")


def local_auth_mode(address: str) -> str | None:
    """The auth mode of a cluster whose GCS or raylet runs on this machine ("token" or "disabled"), read from the
    environment `ray start` gave its processes (it turns token auth on when a token exists, RAY_AUTH_MODE=token);
    None when no process of it can be read here (a remote cluster, another user's)."""
    host, _, port = address.rpartition(":")
    marks = (f"--gcs-address={address}", f"--gcs_server_port={port}")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().decode(errors="replace").split("\0")
            if not any(a in marks for a in args) or not any(a.endswith(("raylet", "gcs_server")) for a in args[:1]):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = dict(v.split("=", 1) for v in fh.read().decode(errors="replace").split("\0") if "=" in v)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        return "token" if env.get("RAY_AUTH_MODE", "").lower() == "token" else "disabled"
    return None


def match_local_auth(address: str) -> None:
    """Joining a cluster of this machine with RAY_AUTH_MODE unset: use the mode it runs with. A `ray start`
    cluster has token auth on whenever a token existed (any earlier `ray.init()` writes ~/.ray/auth_token); its
    token is Ray's usual one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). No token here: fail at once
    with the fix, rather than after Ray's ~20 s of retries."""
    if os.environ.get("RAY_AUTH_MODE") is not None or local_auth_mode(address) != "token":
        return
    from caslie_core.errors import CaslieError

    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.path.isfile(path):
        raise CaslieError(
            f"the Ray cluster at {address} uses token authentication (its processes run with RAY_AUTH_MODE=token), "
            f"and this process has no token: {path} does not exist. Run the job as the user who ran `ray start` "
            "(the token is in their ~/.ray/auth_token), or set RAY_AUTH_TOKEN to the token (`ray get-auth-token` "
            "prints it) or RAY_AUTH_TOKEN_PATH to its file, and the job connects"
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray is imported already (its address file was read): make it read the mode again
        from ray._raylet import Config

        Config.initialize("")
    except Exception as e:  # noqa: BLE001 - an older or newer Ray: the environment variable is still set
        log.debug(f"[ray] could not refresh Ray's config: {e}")
    where = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else path
    log.info(f"[ray] the cluster at {address} uses token authentication: connecting with the token from {where}")


def _session_logs() -> str:
    try:
        import ray

        return str(Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs")
    except Exception:  # noqa: BLE001 - only for the message
        return "/tmp/ray/session_latest/logs"
