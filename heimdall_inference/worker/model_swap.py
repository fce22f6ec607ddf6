"""Hot swap: a new version behind the served alias reaches every child, between batches, with no task lost.

* **Main process** (:class:`ModelWatcher`, a thread): every ``HEIMDALL_MODEL_POLL_S`` seconds, or at once
  when ``heimdall-inference model reload`` broadcasts ``heimdall_model_reload``, it resolves the alias
  again (:func:`~heimdall_inference.registry.resolve.resolve_model`: download once per host, sha256 and
  contract checked out of process). A new version is published to this worker's children by replacing a
  small state file (atomically); a child forked later reads that file before it loads its model, and
  under the solo pool the main process, which serves too, swaps like a child. A version that fails its checks is refused (logged, counted): the
  children keep serving the old one. A registry that does not answer changes nothing.
* **Each child** (:func:`swapped`, called where a pass begins: one ``os.stat`` of the state file): when
  the file changed, it loads and warms the new session beside the old one, builds a new service sharing
  the old one's database pool and cache client, and replaces its process context as a whole; the old
  session is dropped only then. A pass that began on the old model finishes on it. A new version that
  does not load in the child is logged and counted, and the old one keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import HeimdallError, RegistryUnavailable
from ..registry.resolve import ResolvedModel

__all__ = ["ModelWatcher", "write_state", "read_state", "swapped", "RELOAD_COMMAND"]

log = logging.getLogger(__name__)

RELOAD_COMMAND = "heimdall_model_reload"


def write_state(path: Path, model: ResolvedModel) -> None:
    """Publish ``model`` to the children (a new file replaces the old one: readers see one or the other)."""
    doc = {**asdict(model), "path": str(model.path) if model.path else None}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read_state(path: Path) -> ResolvedModel:
    doc = json.loads(path.read_text())
    return ResolvedModel(**{**doc, "path": Path(doc["path"]) if doc.get("path") else None})


def _same(a: ResolvedModel | None, b: ResolvedModel | None) -> bool:
    return a is not None and b is not None and (a.version, a.sha256, a.path) == (b.version, b.sha256, b.path)


class ModelWatcher:
    """The main process' watch on the served alias (a daemon thread; ``interval_s`` 0: only on reload)."""

    def __init__(self, current: ResolvedModel, state_path: Path, resolve: Callable[[], ResolvedModel], *,
                 interval_s: float, count: Callable[[str], None] = lambda result: None) -> None:
        self.current = current
        self.state_path = state_path
        self._resolve = resolve
        self.interval_s = float(interval_s)
        self._count = count
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        write_state(state_path, current)

    def start(self) -> "ModelWatcher":
        self._thread = threading.Thread(target=self._run, name="heimdall-model-watch", daemon=True)
        self._thread.start()
        return self

    def request_check(self) -> None:
        """Check now (the reload broadcast), without waiting for the interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        shutil.rmtree(self.state_path.parent, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s if self.interval_s > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception as exc:  # the watch must outlive any one check (a state file that cannot be written)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("model watch: the check failed; version %s keeps serving", self.current.version)
                self._result("error")

    def check(self) -> str:
        """Resolve the alias again; publish a new version. Returns what happened (also counted)."""
        with self._lock:
            try:
                new = self._resolve()
            except RegistryUnavailable as exc:
                self.last_error = str(exc)
                log.warning("model watch: the registry did not answer (%s); serving version %s", exc,
                            self.current.version)
                return self._result("unreachable")
            except HeimdallError as exc:  # a checksum, a contract, an alias gone: the old version keeps serving
                self.last_error = str(exc)
                log.error("model watch: %s is refused: %s; version %s keeps serving", self.current.uri, exc,
                          self.current.version)
                return self._result("refused")
            if new.source == "cache":  # the registry did not answer; what the alias last pointed at is served
                self.last_error = "the registry did not answer"
                return self._result("unreachable")
            self.last_error = None
            if _same(new, self.current):
                return "unchanged"
            old, self.current = self.current, new
            write_state(self.state_path, new)
            log.info("model watch: %s now points at version %s (was %s): the children swap between batches",
                     new.uri, new.version, old.version)
            return self._result("published")

    def _result(self, result: str) -> str:
        try:
            self._count(result)
        except Exception:  # a metric must never stop the watch
            log.debug("could not count a model watch result", exc_info=True)
        return result


def swapped(ctx: Any, build: Callable[[Any, ResolvedModel], Any], install: Callable[[Any], Any]) -> Any:
    """In a child, where a pass begins: the context to serve it with (a new one after a published swap).

    ``build(ctx, model)`` makes the new service (loading and warming the session); ``install(new)`` puts
    the new context in place (closing what of the old one it does not share)."""
    path = ctx.model_state
    try:
        st = os.stat(path)
    except OSError:
        return ctx
    seen = (st.st_ino, st.st_mtime_ns)
    if seen == ctx.model_seen:
        return ctx
    try:
        model = read_state(path)
    except (OSError, ValueError, TypeError, KeyError):
        log.exception("model swap: unreadable state file %s", path)
        return ctx
    if _same(model, ctx.model):
        new = ctx.with_(model_seen=seen)
        install(new)
        return new
    try:
        service = build(ctx, model)
    except getattr(ctx.service, "interrupts", ()):  # a soft time limit ends the pass; the swap is tried again
        raise
    except Exception as exc:
        log.error("model swap: version %s does not load here (%s); version %s keeps serving", model.version, exc,
                  getattr(ctx.model, "version", None))
        if ctx.metrics is not None:
            ctx.metrics.swap_done("failed")
        new = ctx.with_(model_seen=seen)
        install(new)
        return new
    new = ctx.with_(service=service, model=model, model_seen=seen)
    install(new)
    log.info("model swap: now serving %s version %s", model.name or model.uri, model.version)
    if ctx.metrics is not None:
        ctx.metrics.swap_done("swapped")
    return new
