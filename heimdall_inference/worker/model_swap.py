"""Hot swap: a new version behind a served alias reaches every child, between batches, with no task lost.

* **Main process** (:class:`ModelWatcher`, a thread): every ``HEIMDALL_MODEL_POLL_S`` seconds, or at once
  when ``heimdall-inference model reload`` broadcasts ``heimdall_model_reload``, it resolves each model the
  worker serves again (its own ``HEIMDALL_MODEL_URI``, and the refs its A/B split, shadow and allow-list
  name: :func:`~heimdall_inference.registry.resolve.resolve_model`: download once per host, sha256 and
  contract checked out of process). A change is published to this worker's children by replacing a small
  state file holding the whole :class:`~heimdall_inference.registry.resolve.ModelSet` (atomically); a
  child forked later reads that file before it loads its models, and under the solo pool the main
  process, which serves too, swaps like a child. A version that fails its checks is refused (logged,
  counted): the children keep serving the old one. A registry that does not answer changes nothing. A
  ref other than the worker's own that does not resolve (its alias not set yet) is left out: its share
  of the traffic goes to the worker's own model until it appears.
* **Each child** (:func:`swapped`, called where a pass begins: one ``os.stat`` of the state file): when
  the file changed, it loads and warms each new version beside the old ones, builds a new service sharing
  the old one's database pool and cache client (and the sessions of the versions that did not change),
  and replaces its process context as a whole; the old sessions are dropped only then. A pass that began
  on the old models finishes on them. A new version that does not load in the child is logged and
  counted, and the old ones keep serving.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import HeimdallError, RegistryNotFound, RegistryUnavailable
from ..registry.resolve import ModelSet, ResolvedModel

__all__ = ["ModelWatcher", "write_state", "read_state", "swapped", "same_models", "RELOAD_COMMAND"]

log = logging.getLogger(__name__)

RELOAD_COMMAND = "heimdall_model_reload"


def write_state(path: Path, models: ModelSet) -> None:
    """Publish ``models`` to the children (a new file replaces the old one: readers see one or the other)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(models.to_dict()))
    os.replace(tmp, path)


def read_state(path: Path) -> ModelSet:
    return ModelSet.from_dict(json.loads(path.read_text()))


def _same(a: ResolvedModel | None, b: ResolvedModel | None) -> bool:
    return a is not None and b is not None and (a.version, a.sha256, a.path) == (b.version, b.sha256, b.path)


def same_models(a: ModelSet | None, b: ModelSet | None) -> bool:
    """The same files behind the same refs (where they came from, registry or cache, does not count)."""
    if a is None or b is None or not _same(a.primary, b.primary):
        return False
    return [r for r, _ in a.others] == [r for r, _ in b.others] and all(
        _same(m, b.other(r)) for r, m in a.others) and [u for u, _ in a.bands] == [u for u, _ in b.bands] and all(
        _same(m, b.band(u)) for u, m in a.bands)


class ModelWatcher:
    """The main process' watch on the models a worker serves (a daemon thread; ``interval_s`` 0: only on reload).

    ``resolve(ref)`` resolves the worker's own model (``ref`` None) or one of ``refs``, the other models its
    routes name; ``resolve_band(uri)`` one of ``bands``, the band models behind an alias (HEIMDALL_BAND_MODELS:
    like the worker's own model, one that does not resolve keeps its version serving)."""

    def __init__(self, current: ModelSet, state_path: Path, resolve: Callable[[str | None], ResolvedModel], *,
                 interval_s: float, refs: tuple[str, ...] = (),
                 count: Callable[[str], None] = lambda result: None, bands: tuple[str, ...] = (),
                 resolve_band: Callable[[str], ResolvedModel] | None = None) -> None:
        self.current = current
        self.state_path = state_path
        self._resolve = resolve
        self._resolve_band = resolve_band
        self.refs = refs
        self.bands = bands
        self.interval_s = float(interval_s)
        self._count = count
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self._said: dict[str | None, str] = {}  #: the last result logged per ref (a missing alias is said once)
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
                log.exception("model watch: the check failed; version %s keeps serving", self.current.primary.version)
                self._result("error")

    def check(self) -> str:
        """Resolve every served model again; publish what changed. Returns what happened (also counted, per
        model): published, refused, unreachable, absent (a ref not in the registry now) or unchanged."""
        with self._lock:
            primary, results = self._check_one(None, self.current.primary)
            others: dict[str, ResolvedModel] = {}
            for ref in self.refs:
                model, result = self._check_one(ref, self.current.other(ref))
                results += result
                if model is not None:
                    others[ref] = model
            bands: dict[str, ResolvedModel] = {}
            for uri, cur in self.current.bands:
                model = cur
                if uri in self.bands and self._resolve_band is not None:
                    model, result = self._check_one(uri, cur, resolve=self._resolve_band, band=True)
                    results += result
                bands[uri] = model  # type: ignore[assignment]
            new = ModelSet.of(primary, others, bands)  # type: ignore[arg-type]
            errors = [r for r in results if r != "unchanged"]
            self.last_error = None if not errors else self.last_error
            if same_models(new, self.current):
                return next((r for r in ("refused", "unreachable", "absent") if r in errors), "unchanged")
            old, self.current = self.current, new
            write_state(self.state_path, new)
            log.info("model watch: %s now points at version %s (was %s)%s: the children swap between batches",
                     new.primary.uri, new.primary.version, old.primary.version,
                     "".join(f"; {ref} at {m.version}" for ref, m in (*new.others, *new.bands)))
            return self._result("published")

    def _check_one(self, ref: str | None, cur: ResolvedModel | None, *, resolve: Callable[[Any], ResolvedModel] | None = None,
                   band: bool = False) -> tuple[ResolvedModel | None, list[str]]:
        """(the model to serve for ``ref`` now, [what happened]); counts and logs all but "unchanged". ``band``: ``ref``
        is a band model's URI, which keeps its version when it does not resolve (like the worker's own model)."""
        what = ref or (cur.uri if cur else "the served model")
        try:
            new = (resolve or self._resolve)(ref)
        except RegistryUnavailable as exc:
            self.last_error = str(exc)
            self._say(ref, "unreachable", logging.WARNING, "model watch: the registry did not answer (%s); %s keeps "
                      "serving version %s", exc, what, cur.version if cur else None)
            return cur, [self._result("unreachable")]
        except HeimdallError as exc:  # a checksum, a contract, an alias gone: the old version keeps serving
            self.last_error = str(exc)
            if ref is not None and not band and (cur is None or isinstance(exc, RegistryNotFound)):
                # an experiment arm not in the registry (not yet, or its alias removed: the experiment is over)
                self._say(ref, f"absent: {exc}", logging.WARNING, "model watch: %s is not served here (%s); its "
                          "requests go to the worker's own model", ref, exc)
                return None, [self._result("absent")]
            log.error("model watch: %s is refused: %s; version %s keeps serving", cur.uri if cur else ref, exc,
                      cur.version if cur else None)
            return cur, [self._result("refused")]
        if new.source == "cache":  # the registry did not answer; what the alias last pointed at is served
            self.last_error = "the registry did not answer"
            return (cur or new), [self._result("unreachable")]
        self._said.pop(ref, None)
        return new, ["unchanged"]

    def _say(self, ref: str | None, key: str, level: int, msg: str, *args: Any) -> None:
        """Log once per change of what happens to ``ref`` (a missing alias is not an error every poll)."""
        if self._said.get(ref) != key:
            self._said[ref] = key
            log.log(level, msg, *args)

    def _result(self, result: str) -> str:
        try:
            self._count(result)
        except Exception:  # a metric must never stop the watch
            log.debug("could not count a model watch result", exc_info=True)
        return result


def swapped(ctx: Any, build: Callable[[Any, ModelSet], Any], install: Callable[[Any], Any]) -> Any:
    """In a child, where a pass begins: the context to serve it with (a new one after a published swap).

    ``build(ctx, models)`` makes the new service (loading and warming the sessions of new versions);
    ``install(new)`` puts the new context in place (closing what of the old one it does not share)."""
    path = ctx.model_state
    try:
        st = os.stat(path)
    except OSError:
        return ctx
    seen = (st.st_ino, st.st_mtime_ns)
    if seen == ctx.model_seen:
        return ctx
    try:
        models = read_state(path)
    except (OSError, ValueError, TypeError, KeyError):
        log.exception("model swap: unreadable state file %s", path)
        return ctx
    if same_models(models, ctx.models):
        new = ctx.with_(model_seen=seen)
        install(new)
        return new
    was = getattr(getattr(ctx.models, "primary", None), "version", None)
    try:
        service = build(ctx, models)
    except getattr(ctx.service, "interrupts", ()):  # a soft time limit ends the pass; the swap is tried again
        raise
    except Exception as exc:
        log.error("model swap: version %s does not load here (%s); version %s keeps serving",
                  models.primary.version, exc, was)
        if ctx.metrics is not None:
            ctx.metrics.swap_done("failed")
        new = ctx.with_(model_seen=seen)
        install(new)
        return new
    new = ctx.with_(service=service, models=models, model_seen=seen)
    install(new)
    if getattr(ctx, "run_dir", None) is not None:
        from ..ops.health import mark_child_ready
        from .context import served_models

        mark_child_ready(ctx.run_dir, served_models(service))
    log.info("model swap: now serving %s version %s%s", models.primary.name or models.primary.uri,
             models.primary.version, "".join(f"; {ref} at {m.version}" for ref, m in (*models.others, *models.bands)))
    if ctx.metrics is not None:
        ctx.metrics.swap_done("swapped")
    return new
