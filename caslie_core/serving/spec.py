"""What the service's deployments need, resolved once where the app is built: the model sources, the names
clients use for them, the prompt template and the API key's digest (never the key)."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ServeConfig
from ..errors import ConfigError
from ..models.predictor import resolve_model_source
from .api import BASE_MODEL_NAME, key_digest


def _abs(path: str | None, root: Path) -> str | None:
    """Relative local paths resolve against the working directory, else the repo root."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path) if os.path.exists(path) or root is None else str(root / path)


def app_spec(cfg: ServeConfig, *, root: Path | None = None) -> dict:
    """What the deployments need, resolved once where the app is built (model sources, names, key digest)."""
    m = cfg.model.model_copy(update={"path": _abs(cfg.model.path, root)})
    source = resolve_model_source(m)
    adapters = {cfg.model.name: source.adapter} if source.adapter else {}
    adapters.update({n: _abs(p, root) for n, p in cfg.model.adapters.items()})
    missing = [
        f"model.adapters.{n}: {p} has no adapter_config.json"
        for n, p in adapters.items()
        if "://" not in p and not (Path(p) / "adapter_config.json").exists()
    ]
    if missing:
        raise ConfigError(missing)
    base_id = cfg.model.base_id or _base_id(source.base)
    ids = {f"{base_id}:{n}": n for n in adapters}  # Ray Serve LLM's ids: BASE:ADAPTER
    aliases = {n: f"{base_id}:{n}" for n in adapters}
    if cfg.model.serve_base or not ids:
        ids[base_id] = BASE_MODEL_NAME
        aliases[BASE_MODEL_NAME if adapters else cfg.model.name] = base_id
    store = _abs(cfg.model.adapter_store, root)
    digest = None
    if cfg.http.api_key_env:
        key = os.environ.get(cfg.http.api_key_env)
        if not key:
            raise ConfigError([f"http.api_key_env: environment variable {cfg.http.api_key_env} is not set"])
        digest = key_digest(key)
    predictor = {
        "base": source.base,
        "revision": source.revision,
        "dtype": cfg.model.dtype,
        "max_new_tokens": cfg.model.max_new_tokens,
        "max_prompt_tokens": cfg.model.max_prompt_tokens,
        "trust_remote_code": cfg.model.trust_remote_code,
        "adapters": adapters,
        "store": store,
        "style": source.style,
        "prefix_cache": cfg.model.prefix_cache,
    }
    models = {"base_id": base_id, "ids": ids, "aliases": aliases, "store": store}
    if any(s.engine == "openai" for s in [cfg.captioner, *cfg.judges]):  # servers answer, with what is needed
        import logging

        from ..models.remote import check_engines

        check_engines(cfg.captioner, cfg.judges, logging.getLogger("caslie").warning)
    return {"predictor": predictor, "models": models, "style": source.style, "key_digest": digest}


def _base_id(base: str) -> str:
    """A hub id as it is; a local folder by its name (its path says nothing to a client)."""
    return Path(base).name if os.path.isabs(base) or os.path.isdir(base) else base
