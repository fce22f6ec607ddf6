"""``heimdall-inference model …``: the served model's card, and the MLflow registry an operator works.

    heimdall-inference model info [--model FILE]                 # a local ONNX file (default: the shipped one)
    heimdall-inference model info --uri models:/localization_model@production
    heimdall-inference model register FILE [--name N] [--alias production]
    heimdall-inference model promote VERSION --alias production  # also how to roll back: the previous version
    heimdall-inference model list
    heimdall-inference model bootstrap [FILE] --alias production  # register + promote, only if the alias is unset
                                                                 # (no FILE, no --name: every shipped model, 2 m
                                                                 # and 70 cm, each under its own name)
    heimdall-inference model reload                              # workers check their alias now (HEIMDALL_* broker)
    heimdall-inference model compare [--since-hours 24]          # A/B arms and shadow agreement, from the database

The registry is ``MLFLOW_TRACKING_URI``; artifacts go where its tracking server keeps them (S3/MinIO).
These commands use the MLflow client (``pip install 'heimdall-inference[registry]'``); workers read the
registry without it (:mod:`heimdall_inference.registry.rest`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("model", help="the model: info, and the MLflow registry (register, promote, list)")
    p.add_argument("action", choices=("info", "register", "promote", "list", "bootstrap", "reload", "compare"))
    p.add_argument("target", nargs="?", default=None,
                   help="register/bootstrap: the ONNX file (bootstrap: default the shipped model); promote: the version")
    p.add_argument("--model", type=Path, default=None, help="info: ONNX model file (default: the shipped model)")
    p.add_argument("--uri", default=None, help="info: a registered model, models:/<name>@<alias> or models:/<name>/<version>")
    p.add_argument("--name", default=None, help="registered model name (default: localization_model)")
    p.add_argument("--alias", default=None, help="promote (required) / register (optional): e.g. production, challenger")
    p.add_argument("--card", type=Path, default=None, help="register: the model card (default: MODEL_CARD.md beside the file)")
    p.add_argument("--since-hours", type=float, default=24.0,
                   help="compare: fixes captured in the last this many hours (0 = all)")


def _registry() -> Any:
    try:
        from ..registry.mlflow_registry import MlflowRegistry
    except ImportError as exc:  # pragma: no cover - the package is a declared extra
        raise ConfigError("the registry commands need the MLflow client: pip install 'heimdall-inference[registry]'") from exc
    try:
        return MlflowRegistry()
    except ImportError as exc:
        raise ConfigError("the registry commands need the MLflow client: pip install 'heimdall-inference[registry]'") from exc


def run(args: argparse.Namespace) -> int:
    from ..registry.uri import ALIAS_PATTERN, parse_model_uri
    from ..registry.version import DEFAULT_NAME

    import re

    name = args.name or DEFAULT_NAME
    if args.alias is not None and not re.fullmatch(ALIAS_PATTERN, args.alias):
        raise ConfigError(f"--alias {args.alias!r}: letters, digits, '_' and '-', starting with a letter")
    if args.action == "reload":
        return reload_workers()
    if args.action == "compare":
        return compare(args.since_hours)
    if args.action == "info" and args.uri is None:
        from ..core.session import ModelSession

        print(json.dumps(ModelSession(args.model).info(), indent=2))
        return 0
    reg = _registry()
    if args.action == "info":
        uri = parse_model_uri(args.uri)
        if uri.kind != "registry":
            raise ConfigError(f"--uri {args.uri!r}: models:/<name>@<alias> or models:/<name>/<version>")
        out: Any = reg.get(str(uri.name), alias=uri.alias, version=uri.version).to_dict()
    elif args.action == "register":
        if not args.target:
            raise ConfigError("model register FILE: the ONNX file to register")
        v = reg.register(Path(args.target), name=name, card=args.card)
        out = (reg.promote(v.version, args.alias, name=name) if args.alias else v).to_dict()
    elif args.action == "promote":
        if not args.target or not args.alias:
            raise ConfigError("model promote VERSION --alias ALIAS")
        out = reg.promote(args.target, args.alias, name=name).to_dict()
    elif args.action == "bootstrap":  # a deployment's first start: idempotent
        from ..core.session import ModelSession, shipped_models

        alias = args.alias or "production"
        if args.target or args.name:
            out = _bootstrap(reg, Path(args.target) if args.target else shipped_models()["2m"], name, alias, args.card)
        else:  # every shipped model (one per band), each under the name its metadata gives
            out = [_bootstrap(reg, path, ModelSession(path).spec.name, alias, None) for path in shipped_models().values()]
    else:
        out = [v.to_dict() for v in reg.versions(name)]
    print(json.dumps(out, indent=2))
    return 0


def _bootstrap(reg: Any, path: Path, name: str, alias: str, card: Path | None) -> dict[str, Any]:
    """Register ``path`` as ``name`` and point ``alias`` at it, unless the alias is set already."""
    from ..errors import RegistryError, RegistryUnavailable

    try:
        return {"registered": False, **reg.get(name, alias=alias).to_dict()}
    except RegistryUnavailable:
        raise
    except RegistryError:  # no such model or alias yet
        v = reg.register(path, name=name, card=card)
        return {"registered": True, **reg.promote(v.version, alias, name=name).to_dict()}


def compare(since_hours: float) -> int:
    """``model compare``: the A/B arms and the shadow model's agreement, from the database (HEIMDALL_DATABASE_URL)."""
    from ..ops.experiments import experiment_report
    from ..settings import process_settings
    from ..store import open_store

    if since_hours < 0:
        raise ConfigError("--since-hours must be >= 0 (0: all stored fixes)")
    settings = process_settings()
    store = open_store(settings.database_url, schema=settings.db_schema, pool_max=1)
    try:
        print(json.dumps(experiment_report(store, since_hours=since_hours or None), indent=2))
    finally:
        store.close()
    return 0


def reload_workers(timeout_s: float = 5.0) -> int:
    """``model reload``: every worker serving an alias checks it now; prints each worker's answer."""
    from ..settings import process_settings
    from ..worker.celery_app import configure_app
    from ..worker.model_swap import RELOAD_COMMAND

    app = configure_app(process_settings())
    replies = app.control.broadcast(RELOAD_COMMAND, reply=True, timeout=timeout_s)
    print(json.dumps({name: answer for r in replies for name, answer in r.items()}, indent=2))
    if not replies:
        from ..errors import TransientError

        raise TransientError(f"no worker answered within {timeout_s} s")
    return 0
