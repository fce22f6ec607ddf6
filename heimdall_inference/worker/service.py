"""What a worker process does with a payload, without Celery: decode, cache, locate, store.

Tasks are thin wrappers over :class:`Service`. Invalid input raises :class:`PayloadError` after
being recorded in the ``rejections`` table (once per request, even when redelivered); a request id
already stored with other IQ for the same capture time is a :class:`PayloadError` ``conflict``; an
unreachable database is a :class:`TransientError` (retry with backoff), also while recording a
rejection; a row the database refuses is a :class:`StorageError` for that request alone, and a
non-finite model output an :class:`InferenceError` for that request alone (never cached or stored);
the cache never fails a request.

``interrupts`` are exceptions that end a whole pass rather than one request (the worker passes
Celery's soft time limit): they are never kept in a request's slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..store.cache import FixCache
from ..ops.metrics import ServiceMetrics
from ..errors import HeimdallError, PayloadCode, PayloadError, StorageError, TransientError
from ..core.payload import DecodedPayload, is_valid_id
from ..core.localizer import Localizer, RawPayload
from ..store import Store, fix_row, rejection_row

__all__ = ["Service", "Counters", "Request", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Request:
    """One heimdall.predict call: the payload, its task id and when the producer sent it."""

    payload: RawPayload
    task_id: str | None
    sent_at_s: float | None = None


@dataclass
class Counters:
    """Per-process counts (exported as metrics)."""

    fixes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0
    stored_new: int = 0
    stored_duplicate: int = 0
    batches: int = 0  #: predict_requests passes (fixes / batches = mean micro-batch size)


class Service:
    """One worker process' pipeline around a warm :class:`Localizer`."""

    def __init__(self, localizer: Localizer, store: Store, cache: FixCache | None = None, *,
                 alias: str | None = None, metrics: ServiceMetrics | None = None,
                 interrupts: tuple[type[BaseException], ...] = ()) -> None:
        self.localizer = localizer
        self.store = store
        self.cache = cache
        self.alias = alias
        self.metrics = metrics
        self.interrupts = interrupts
        self.counters = Counters()

    @property
    def serves(self) -> frozenset[str]:
        """What ``options.model`` may ask for here: the served alias and version, bare or with the model's name
        (``production``, ``3``, ``localization_model@production``, ``localization_model/3``, ``models:/…``)."""
        name, version = self.localizer.name, self.localizer.version
        out = {version, f"{name}/{version}", f"models:/{name}/{version}"}
        if self.alias:
            out |= {self.alias, f"{name}@{self.alias}", f"models:/{name}@{self.alias}"}
        return frozenset(out)

    @property
    def model_version(self) -> str:
        """The cache's model key: version and file hash, so a new model never serves a stale fix."""
        return f"{self.localizer.version}-{self.localizer.session.sha256[:12]}"

    def model_info(self) -> dict[str, Any]:
        """Name, version, hash, providers and card of the served model (never its path on the worker's disk)."""
        info = {k: v for k, v in self.localizer.session.info().items() if k != "path"}
        return {**info, "name": self.localizer.name, "version": self.localizer.version,
                "file_version": self.localizer.spec.version, "alias": self.alias}

    # -- single payloads ----------------------------------------------------------------------
    def predict(self, payload: RawPayload, *, task_id: str | None, sent_at_s: float | None = None) -> dict[str, Any]:
        """One payload -> one stored fix (idempotent on request id, else task id)."""
        out = self.predict_requests([Request(payload, task_id, sent_at_s)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def predict_requests(self, requests: Sequence[Request]) -> list[dict[str, Any] | Exception]:
        """Single-task requests in one pass: one feature pass, one session run, one transaction.

        Each slot gets what it would get alone: its fix, its PayloadError (recorded), its
        InferenceError (non-finite output), its StorageError (its row refused), its TransientError (an
        iq_ref store down: that task retries) or the exception of a server fault (logged). An
        unreachable database raises TransientError for all of them (the tasks retry; nothing was
        acknowledged).
        """
        t0 = time.time()
        out: list[dict[str, Any] | Exception | None] = [None] * len(requests)
        decoded: list[tuple[int, DecodedPayload]] = []
        for i, r in enumerate(requests):
            try:
                decoded.append((i, self._decode_or_record(r.payload, r.task_id, digest=self.cache is not None)))
            except self.interrupts:
                raise
            except Exception as exc:  # PayloadError (recorded), TransientError (an iq_ref store or the database
                out[i] = self._own_failure(exc, r.task_id)  # down while recording), or a bug
        decode_ms = (time.time() - t0) * 1e3 / max(1, len(requests))
        misses: list[tuple[int, DecodedPayload]] = []
        for (i, d), hit in zip(decoded, self._cached([d for _, d in decoded], [requests[i].task_id for i, _ in decoded])):
            if hit is None:
                misses.append((i, d))
            else:
                hit["timings_ms"]["decode"] = round(decode_ms, 3)
                out[i] = hit
        if misses:
            for (i, _), fix in zip(misses, self._locate([d for _, d in misses], decode_ms * len(misses),
                                                        [requests[i].task_id for i, _ in misses])):
                out[i] = fix
        for r, f in zip(requests, out):
            if isinstance(f, dict):
                f["batch_size"] = len(requests)  # handled in one pass with this many requests
                if r.sent_at_s is not None:
                    f["timings_ms"]["queue"] = round(max(0.0, t0 - r.sent_at_s) * 1e3, 3)
        slots = [i for i, f in enumerate(out) if isinstance(f, dict)]
        if slots:
            digests = {i: d.digest for i, d in decoded}
            for i, failure in zip(slots, self._store([out[i] for i in slots],  # type: ignore[misc]
                                                     [digests.get(i, "") for i in slots],
                                                     [requests[i].payload for i in slots])):
                if failure is not None:
                    out[i] = failure
        if misses:  # only what was stored is cached: a refused fix is not served again from the cache
            self._cache_put([(d, out[i]) for i, d in misses if isinstance(out[i], dict)])  # type: ignore[misc]
        good = [f for f in out if isinstance(f, dict)]
        self.counters.fixes += len(good)
        self.counters.batches += 1
        if self.metrics is not None:
            self.metrics.batch.observe(len(requests))
            self.metrics.fixes_done(good)
        return out  # type: ignore[return-value]

    def _locate(self, decoded: list[DecodedPayload], decode_ms: float,
                task_ids: list[str | None]) -> list[dict[str, Any] | Exception]:
        """The batch's fixes in one pass; if the pass fails as a whole, each payload again alone, so that
        a payload that breaks the model fails by itself."""
        try:
            return list(self.localizer.fixes(decoded, decode_ms=decode_ms, task_ids=task_ids, alias=self.alias))
        except self.interrupts:
            raise
        except Exception as exc:
            if len(decoded) == 1:
                return [self._own_failure(exc, task_ids[0])]
            log.warning("locating a batch of %d failed (%r); locating each alone", len(decoded), exc)
        out: list[dict[str, Any] | Exception] = []
        for d, task_id in zip(decoded, task_ids):
            try:
                out.append(self.localizer.fixes([d], decode_ms=decode_ms / len(decoded), task_ids=[task_id],
                                                alias=self.alias)[0])
            except self.interrupts:
                raise
            except Exception as exc:
                out.append(self._own_failure(exc, task_id))
        return out

    @staticmethod
    def _own_failure(exc: Exception, task_id: str | None) -> Exception:
        """One request's failure, kept in its slot; a server fault is logged with its traceback."""
        if not isinstance(exc, HeimdallError):
            log.error("request %s failed on a server fault", task_id, exc_info=exc)
        return exc

    def _decode_or_record(self, payload: RawPayload, task_id: str | None, *, digest: bool = True,
                          key: str | None = None) -> DecodedPayload:
        """Decode; a PayloadError is recorded first (TransientError if the database is down: the task
        retries, and records it once the database is back)."""
        try:
            decoded = self.localizer.decode(payload, digest=digest)
            wanted = decoded.options.model
            if wanted is not None and wanted not in self.serves:
                raise PayloadError(PayloadCode.UNKNOWN_MODEL, f"options.model {wanted[:64]!r} is not served here; this "
                                   f"worker serves {sorted(self.serves)}", "options.model")
            return decoded
        except PayloadError as exc:
            self._reject(exc, payload, task_id, key)
            raise

    def _reject(self, exc: PayloadError, payload: RawPayload, task_id: str | None, key: str | None = None) -> None:
        """Record one rejection (once per request and code). A refused row is logged, never a crash;
        an unreachable database raises TransientError."""
        receivers, request_id, own = [], None, None
        if isinstance(payload, dict):
            rid = payload.get("request_id")
            request_id = rid[:128] if isinstance(rid, str) else None
            # the row's key: the request id only when it is a valid one (a 500-character id cut to 128 would
            # merge distinct requests), else this task's (or chunk slot's) own
            own = rid if is_valid_id(rid) else None
            recs = payload.get("receivers")
            if isinstance(recs, list):
                receivers = [r["id"][:64] for r in recs[:16] if isinstance(r, dict) and isinstance(r.get("id"), str)]
        size = len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else exc.context.get("size_bytes")
        row = rejection_row(exc.to_dict(), task_id=task_id, request_id=request_id, receivers=receivers,
                            size_bytes=size, key=own or key or task_id)
        try:
            self.store.write_rejections([row])
        except StorageError:  # a row the database refuses for good must not turn a clean rejection into a crash
            log.exception("could not record a rejected payload (%s)", exc.code)
        self.counters.rejected[exc.code] = self.counters.rejected.get(exc.code, 0) + 1
        if self.metrics is not None:
            self.metrics.rejections.labels(code=exc.code).inc()

    def _cached(self, decoded: Sequence[DecodedPayload], task_ids: Sequence[str | None]) -> list[dict[str, Any] | None]:
        """Cached fixes for the payloads that allow it (one round trip), None for the others."""
        out: list[dict[str, Any] | None] = [None] * len(decoded)
        asks = [k for k, d in enumerate(decoded) if d.options.cache]
        if self.cache is None or not asks:
            return out
        hits = self.cache.get_many(self.model_version, [decoded[k].digest for k in asks])
        found = sum(h is not None for h in hits)
        self.counters.cache_hits += found
        self.counters.cache_misses += len(hits) - found
        if self.metrics is not None:
            self.metrics.cache_lookups(found, len(hits) - found)
        for k, hit in zip(asks, hits):
            if hit is None:
                continue
            d = decoded[k]
            hit.update(task_id=task_ids[k], request_id=d.request_id, captured_at=d.captured_at, cached=True,
                       timings_ms={"features": 0.0, "inference": 0.0})
            hit["model"] = {"name": self.localizer.name, "version": self.localizer.version, "alias": self.alias}
            out[k] = hit
        return out

    def _cache_put(self, computed: Sequence[tuple[DecodedPayload, dict[str, Any]]]) -> None:
        if self.cache is not None:
            self.cache.put_many(self.model_version, [(d.digest, fix) for d, fix in computed if d.options.cache])

    def _store(self, fixes: list[dict[str, Any]], digests: Sequence[str],
               payloads: Sequence[RawPayload]) -> list[HeimdallError | None]:
        """Store the fixes in one transaction; each slot's failure: StorageError if the database refused
        its row, PayloadError ``conflict`` (recorded) if its request id is stored with other IQ.

        A refused batch is written again row by row (idempotent), so one bad row fails alone. An
        unreachable database raises TransientError for all of them.
        """
        t0 = time.perf_counter()
        rows = [fix_row(f, d) for f, d in zip(fixes, digests)]
        failures: list[HeimdallError | None] = [None] * len(rows)
        conflicts: set[int] = set()
        try:
            try:
                done = self.store.write_fixes(rows)
                new, conflicts = done.new, set(done.conflicts)
            except StorageError as exc:
                if len(rows) == 1:
                    failures, new = [exc], 0
                else:
                    log.warning("the database refused a batch of %d fixes (%s); writing them one by one", len(rows), exc)
                    new = 0
                    for k, row in enumerate(rows):
                        try:
                            one = self.store.write_fixes([row])
                            new += one.new
                            if one.conflicts:
                                conflicts.add(k)
                        except StorageError as row_exc:
                            failures[k] = row_exc
            for k in sorted(conflicts):
                failures[k] = self._conflict(fixes[k], payloads[k])
        except TransientError:
            if self.metrics is not None:
                self.metrics.store_errors.inc()
            raise
        for failure, row in zip(failures, rows):
            if isinstance(failure, StorageError):
                log.error("the database refused the fix of %s: %s", row["fix_key"], failure)
        stored = len(rows) - sum(f is not None for f in failures)
        self.counters.stored_new += new
        self.counters.stored_duplicate += stored - new
        ms = (time.perf_counter() - t0) * 1e3 / max(1, len(fixes))
        for f, failure in zip(fixes, failures):
            if failure is None:
                f["timings_ms"]["store"] = round(ms, 3)
        return failures

    def _conflict(self, fix: dict[str, Any], payload: RawPayload) -> PayloadError:
        """The producer reused a request id for other IQ: a typed error, recorded like any rejection."""
        exc = PayloadError(PayloadCode.CONFLICT, f"request_id {fix['request_id']!r} is already stored for captured_at "
                           f"{fix['captured_at']} with other receivers or IQ; a new payload needs a new request_id",
                           "request_id")
        self._reject(exc, payload, fix.get("task_id"))
        return exc

    # -- chunks ---------------------------------------------------------------------------------
    def predict_chunk(self, payloads: Sequence[RawPayload], *, task_id: str | None,
                      offset: int = 0) -> dict[str, Any]:
        """Many payloads, one vectorised pass, one database transaction; returns a small summary.

        A payload without a request id is keyed ``<task id>:<index>`` so that a redelivered chunk
        writes nothing twice.
        """
        t0 = time.perf_counter()
        decoded: list[DecodedPayload] = []
        keys: list[str | None] = []
        where: list[int] = []  #: index in the chunk of each decoded payload
        errors: list[dict[str, Any]] = []
        for i, p in enumerate(payloads):
            key = f"{task_id}:{offset + i}" if task_id else None
            try:
                decoded.append(self._decode_or_record(p, task_id, digest=False, key=key))  # chunks skip the cache
                keys.append(key)
                where.append(i)
            except PayloadError as exc:
                errors.append({"index": offset + i, **exc.to_dict()})
            except (TransientError, *self.interrupts):
                raise  # an iq_ref store or the database down, a time limit: the chunk task retries (idempotent keys)
            except Exception as exc:  # a server fault on this payload: its own error entry
                self._own_failure(exc, key)
                errors.append(_internal_error(offset + i, exc))
        t1 = time.perf_counter()
        outcomes = self._locate(decoded, (t1 - t0) * 1e3, keys)
        t2 = time.perf_counter()
        computed = [(i, o) for i, o in zip(where, outcomes) if isinstance(o, dict)]
        failed: list[tuple[int, Exception]] = [(i, o) for i, o in zip(where, outcomes) if not isinstance(o, dict)]
        digests = [d.digest for d, o in zip(decoded, outcomes) if isinstance(o, dict)]
        failures = self._store([f for _, f in computed], digests, [payloads[i] for i, _ in computed]) \
            if computed else []
        failed += [(i, e) for (i, _), e in zip(computed, failures) if e is not None]
        fixes = [f for (_, f), e in zip(computed, failures) if e is None]
        for i, exc in failed:  # a conflict is the producer's; server faults of single payloads are not the neighbours'
            errors.append({"index": offset + i, **exc.to_dict()} if isinstance(exc, PayloadError)
                          else _internal_error(offset + i, exc))
        errors.sort(key=lambda e: e["index"])
        t3 = time.perf_counter()
        self.counters.fixes += len(fixes)
        if self.metrics is not None:
            self.metrics.fixes_done(fixes)
        return {"payloads": len(payloads), "fixes": len(fixes), "errors": errors,
                "timings_ms": {"decode": round((t1 - t0) * 1e3, 3), "locate": round((t2 - t1) * 1e3, 3),
                               "store": round((t3 - t2) * 1e3, 3)}}

    def close(self, keep: "Service | None" = None) -> None:
        """Close the database pool and cache client, except those ``keep`` (a swapped-in service) shares."""
        if keep is None or keep.store is not self.store:
            self.store.close()
        if self.cache is not None and (keep is None or keep.cache is not self.cache):
            self.cache.close()


def _internal_error(index: int, exc: Exception) -> dict[str, Any]:
    """A chunk's error entry for a server fault on one payload (never presented as the producer's)."""
    return {"index": index, "code": "internal_error", "error": type(exc).__name__, "message": str(exc)[:300]}


def summarize(chunks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The chord callback's summary over chunk summaries."""
    errors = [e for c in chunks for e in c.get("errors", [])]
    timings: dict[str, float] = {}
    for c in chunks:
        for k, v in c.get("timings_ms", {}).items():
            timings[k] = round(timings.get(k, 0.0) + v, 3)
    return {"schema": "heimdall.batch/v1", "chunks": len(chunks), "payloads": sum(c["payloads"] for c in chunks),
            "fixes": sum(c["fixes"] for c in chunks), "errors": len(errors), "error_details": errors[:100],
            "timings_ms": timings}
