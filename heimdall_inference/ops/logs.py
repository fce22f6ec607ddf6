"""The worker's log lines: a short summary of each fix instead of the whole document, and JSON on request.

* Celery logs every task's return value at INFO ("Task heimdall.predict[id] succeeded in 0.01s: {...}");
  for a fix that is ~2 KB of covariance, ellipses and GeoJSON per line. :class:`FixSummary` replaces it
  with one line an operator can read (request id, position, 95 % semi-major axis, model version) and
  puts the request id and model version on the record.
* ``HEIMDALL_LOG_FORMAT=json``: :class:`JsonFormatter` writes one JSON object per line with the time,
  level, logger, process, message, and, where known, the task id and name, the request id and the
  model version, for a log pipeline to index.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

__all__ = ["FixSummary", "JsonFormatter", "configure_logging", "remember_fix"]

_TRACE_LOGGER = "celery.app.trace"


def _summary(fix: dict[str, Any]) -> str:
    pos = fix.get("position") or {}
    e95 = next((e for e in (fix.get("uncertainty") or {}).get("ellipses", []) if e.get("confidence") == 0.95), {})
    model = fix.get("model") or {}
    return (f"fix request_id={fix.get('request_id')} lat={pos.get('lat')} lon={pos.get('lon')} "
            f"semi_major_95_km={round(float(e95.get('semi_major_m', 0.0)) / 1e3, 1)} "
            f"model={model.get('name')}/{model.get('version')}{'@' + model['alias'] if model.get('alias') else ''}"
            f"{' cached' if fix.get('cached') else ''}")


_recent: OrderedDict[str, tuple[str, Any, Any]] = OrderedDict()  #: task id -> (summary, request id, model version)
_RECENT_MAX = 1024  #: bounded: with INFO off nothing pops them


def remember_fix(task_id: str | None, fix: dict[str, Any]) -> None:
    """A task's fix, for the success line Celery logs right after the task returns (same process and thread:
    Celery hands the log only a truncated repr of the return value)."""
    if task_id is None:
        return
    _recent[task_id] = (_summary(fix), fix.get("request_id"), (fix.get("model") or {}).get("version"))
    while len(_recent) > _RECENT_MAX:
        _recent.popitem(last=False)


class FixSummary(logging.Filter):
    """On Celery's task-success records of a fix: the return value becomes one short summary, and the record
    gets the fix's ``request_id`` and ``model_version``; any other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and "return_value" in args:
            found = _recent.pop(str(args.get("id")), None)
            if found is not None:
                record.args = {**args, "return_value": found[0]}
                record.request_id, record.model_version = found[1], found[2]
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, message, task_id, task_name, request_id,
    model_version (those known), exc (a traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                               "level": record.levelname, "logger": record.name, "process": record.processName,
                               "message": record.getMessage()}
        task = _current_task()
        if task is not None:
            doc["task_id"], doc["task_name"] = task
        args = record.args if isinstance(record.args, dict) else {}
        if "id" in args and "name" in args and "task_id" not in doc:  # Celery's own task records
            doc["task_id"], doc["task_name"] = args["id"], args["name"]
        for key in ("request_id", "model_version"):
            if getattr(record, key, None) is not None:
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _current_task() -> tuple[str, str] | None:
    from celery import current_task

    task = current_task
    if task is None or not getattr(task, "request", None) or task.request.id is None:
        return None
    return str(task.request.id), str(task.name)


def configure_logging(logger: logging.Logger, fmt: str) -> None:
    """Summaries on Celery's success lines always; ``fmt`` "json": every handler of ``logger`` writes JSON."""
    trace = logging.getLogger(_TRACE_LOGGER)
    if not any(isinstance(f, FixSummary) for f in trace.filters):
        trace.addFilter(FixSummary())
    if fmt == "json":
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())
