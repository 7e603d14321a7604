"""A Ray Serve config file read the way Serve reads it, for `caslie serve`.

Serve applies three of the file's sections itself (`serve deploy`, `serve run`, a RayService): `http_options`
(where the proxy binds), the application's `deployments:` (each deployment's own options, applied over what
the code sets) and the application's `logging_config`. `caslie serve` starts Serve from our application's
`args`, so it folds those sections into the args with Serve's rules before validating them: one file behaves
the same under both. Tuning lives in `deployments:` rather than `args` because Serve hashes `args` into the
application's code version: a changed `args` restarts every replica, a changed `deployments:` entry is a light
update (replica counts, autoscaling, queue limits; `user_config` reaches running replicas through
`reconfigure()`).
"""

from __future__ import annotations

import copy

from ..errors import ConfigError

# Serve's per-deployment option -> our DeploymentSettings field. An option given replaces the whole field (Serve
# replaces `autoscaling_config`, `ray_actor_options` and `user_config` as a whole too, defaults for the rest).
_FIELDS = {
    "max_ongoing_requests": "max_ongoing_requests",
    "max_queued_requests": "max_queued_requests",
    "health_check_period_s": "health_check_period_s",
    "health_check_timeout_s": "health_check_timeout_s",
    "autoscaling_config": "autoscaling",
}
_ACTOR_OPTIONS = {"num_cpus", "num_gpus"}


def deployment_slots(args: dict) -> dict[str, tuple]:
    """Deployment name -> the path of its settings in the args, for the args' `layout` (judges by name)."""
    layout = args.get("layout", "split")
    slots: dict[str, tuple] = {"Ingress": ("http", "ingress")}
    if layout == "colocated":  # one Models replica, sized by the predictor's settings
        return {**slots, "Models": ("model", "deployment")}
    if layout == "single":  # the models in the ingress's replica: the predictor's settings size it
        return {"Ingress": ("model", "deployment")}
    slots.update(Captioner=("captioner", "deployment"), Predictor=("model", "deployment"))
    if layout == "panel":
        return {**slots, "Panel": ("panel",)}
    for i, judge in enumerate(args.get("judges") or []):
        if isinstance(judge, dict) and isinstance(judge.get("name"), str):
            slots[f"Judge_{judge['name']}"] = ("judges", i, "deployment")
    return slots


def _settings(args: dict, path: tuple) -> dict:
    node = args
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    if not isinstance(node.get(path[-1]), dict):
        node[path[-1]] = {}
    return node[path[-1]]


def _entry_settings(entry: dict, where: str) -> dict:
    """One `deployments:` entry as our DeploymentSettings keys (only the options `caslie serve` applies)."""
    out: dict = {}
    for key, value in entry.items():
        if key == "name":
            continue
        if key in _FIELDS:
            out[_FIELDS[key]] = value
        elif key == "ray_actor_options":
            if not isinstance(value, dict) or set(value) - _ACTOR_OPTIONS:
                extra = sorted(set(value) - _ACTOR_OPTIONS) if isinstance(value, dict) else value
                raise ConfigError(
                    [
                        f"{where}.ray_actor_options: caslie serve applies num_cpus and num_gpus only (got {extra}); "
                        "set other actor options with `serve deploy`"
                    ]
                )
            out["num_cpus"] = value.get("num_cpus", 1.0)
            out["num_gpus"] = value.get("num_gpus", 0.0)
        elif key == "user_config":
            if not isinstance(value, dict) or set(value) - {"batching"}:
                raise ConfigError(
                    [
                        f"{where}.user_config={value!r}: our deployments take {{batching: {{...}}}} only "
                        "(enabled, max_batch_size, wait_timeout_s)"
                    ]
                )
            out["batching"] = value.get("batching") or {}
        else:
            raise ConfigError(
                [
                    f"{where}.{key}: caslie serve does not apply this Serve option; set it through `serve deploy` "
                    f"(or leave it out). It applies: name, ray_actor_options, user_config, {', '.join(_FIELDS)}"
                ]
            )
    return out


def fold_serve_file(data: dict, app: dict, *, source: str | None = None) -> dict:
    """Our application's `args` with the file's `http_options` host/port, its `deployments:` entries and its
    `logging_config` encoding folded in (Serve's precedence: a `deployments:` option wins over `args`)."""
    args = copy.deepcopy(app.get("args") or {})
    if not isinstance(args, dict):
        raise ConfigError(["the application's args must be a mapping"], source=source)
    http_options = data.get("http_options") or {}
    http = args.setdefault("http", {})
    for key in ("host", "port"):
        if key in http_options:
            if key in http and http[key] != http_options[key]:
                raise ConfigError(
                    [
                        f"args.http.{key}={http[key]!r} disagrees with http_options.{key}={http_options[key]!r}: "
                        f"Serve binds to http_options; drop args.http.{key}"
                    ],
                    source=source,
                )
            http[key] = http_options[key]
    slots = deployment_slots(args)
    for i, entry in enumerate(app.get("deployments") or []):
        where = f"deployments[{i}]"
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in slots:
            raise ConfigError(
                [f"{where}.name={name!r} is not a deployment of this application: {', '.join(slots)}"], source=source
            )
        _settings(args, slots[name]).update(_entry_settings(entry, f"{where} ({name})"))
    encoding = (app.get("logging_config") or {}).get("encoding")
    if encoding is not None:
        args.setdefault("ray", {}).setdefault("log_format", str(encoding).lower())
    return args
