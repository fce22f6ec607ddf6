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

import numpy as np

from ..store.cache import FixCache
from ..ops.metrics import ServiceMetrics
from ..errors import HeimdallError, PayloadCode, PayloadError, StorageError, TransientError
from ..core.features import FeatureConfig
from ..core.payload import DecodedPayload, PayloadDecoder, is_valid_id
from ..core.localizer import FeatureBatch, Localizer, RawPayload
from ..store import Store, fix_row, rejection_row, shadow_row
from .routing import Arm, Router

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
    """One worker process' pipeline around a warm :class:`Localizer` (and, with routes, the other models
    its :class:`~.routing.Router` holds: A/B arms, the shadow, allow-listed versions)."""

    def __init__(self, localizer: Localizer, store: Store, cache: FixCache | None = None, *,
                 alias: str | None = None, metrics: ServiceMetrics | None = None,
                 interrupts: tuple[type[BaseException], ...] = (), router: Router | None = None) -> None:
        if router is not None and router.primary.localizer is not localizer:
            raise ValueError("the router's served model must be this service's localizer")
        self.router = router or Router(Arm(localizer, alias=alias))
        self.localizer = localizer
        #: with band models, one decoder for every model here: the served model's rules, the centre frequencies of
        #: every band served (None: the served model's own decoder)
        self.decoder = None if not self.router.bands else PayloadDecoder(
            localizer.spec, localizer.decoder.limits, localizer.decoder.fetch_iq_ref, bands_hz=self.router.bands_hz)
        self.store = store
        self.cache = cache
        self.alias = self.router.primary.alias
        self.metrics = metrics
        self.interrupts = interrupts
        self.counters = Counters()

    @property
    def serves(self) -> frozenset[str]:
        """What ``options.model`` may ask for here: each served model's alias and version, bare or with the
        model's name (``production``, ``3``, ``localization_model@production``, ``localization_model/3``, ``models:/…``)."""
        return self.router.serves

    @property
    def model_version(self) -> str:
        """The cache's model key of the served model: version and file hash (a new model never serves a stale fix)."""
        return self.router.primary.cache_key

    def model_info(self) -> dict[str, Any]:
        """Name, version, hash, providers and card of the served model (never its path on the worker's disk), and
        the other models the routes serve here."""
        from threadpoolctl import threadpool_info

        info = {k: v for k, v in self.localizer.session.info().items() if k != "path"}
        out = {**info, "name": self.localizer.name, "version": self.localizer.version,
               "file_version": self.localizer.spec.version, "alias": self.alias,
               # the native thread pools of this process (one thread each in a worker: ops/cpu.py)
               "native_threads": {f"{i['internal_api']} {i.get('version') or ''}".strip(): int(i["num_threads"])
                                  for i in threadpool_info()}}
        r = self.router
        if r.routes.active:
            out["routes"] = {"split": [{"ref": ref, "share": share} for ref, share in r.routes.split],
                             "shadow": r.routes.shadow, "allow": list(r.routes.allow),
                             "loaded": [{"ref": a.ref, "alias": a.alias, "version": a.version,
                                         "sha256": a.localizer.session.sha256} for a in r.arms[1:]]}
        if r.bands:
            out["bands"] = [{"name": a.name, "version": a.version, "alias": a.alias, "source": a.source,
                             "sha256": a.localizer.session.sha256, "bands_hz": [list(b) for b in a.localizer.spec.bands_hz]}
                            for a in r.bands]
            out["bands_hz"] = [list(b) for b in self.localizer.spec.bands_hz]
        return out

    # -- single payloads ----------------------------------------------------------------------
    def predict(self, payload: RawPayload, *, task_id: str | None, sent_at_s: float | None = None) -> dict[str, Any]:
        """One payload -> one stored fix (idempotent on request id, else task id)."""
        out = self.predict_requests([Request(payload, task_id, sent_at_s)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def predict_requests(self, requests: Sequence[Request]) -> list[dict[str, Any] | Exception]:
        """Single-task requests in one pass: one feature pass, one session run per model, one transaction.

        Each slot gets what it would get alone: its fix, its PayloadError (recorded), its
        InferenceError (non-finite output), its StorageError (its row refused), its TransientError (an
        iq_ref store down: that task retries) or the exception of a server fault (logged). An
        unreachable database raises TransientError for all of them (the tasks retry; nothing was
        acknowledged). With a shadow model, its fixes are stored beside the served ones.
        """
        t0 = time.time()
        out: list[dict[str, Any] | Exception | None] = [None] * len(requests)
        task_ids = [r.task_id for r in requests]
        admitted: list[tuple[int, DecodedPayload, Arm]] = []
        rejected: list[tuple[int, PayloadError, dict[str, Any]]] = []  #: recorded together, in one write
        for i, r in enumerate(requests):
            try:
                admitted.append((i, *self._admit(r.payload, r.task_id, digest=self.cache is not None)))
            except self.interrupts:
                raise
            except PayloadError as exc:
                out[i] = exc
                rejected.append((i, exc, self._rejection_row(exc, r.payload, r.task_id)))
            except Exception as exc:  # TransientError (an iq_ref store down), or a bug
                out[i] = self._own_failure(exc, r.task_id)
        if rejected:
            try:
                self._record([(exc, row) for _, exc, row in rejected])
            except self.interrupts:
                raise
            except Exception as exc:  # TransientError: the database is down; each rejected task retries, and records
                for i, _, _ in rejected:  # its rejection once it is back
                    out[i] = self._own_failure(exc, task_ids[i])
        decode_ms = (time.time() - t0) * 1e3 / max(1, len(requests))
        bank = _FeatureBank()
        misses: list[tuple[int, DecodedPayload, Arm]] = []
        for (i, d, arm), hit in zip(admitted, self._cached([(d, arm, task_ids[i]) for i, d, arm in admitted])):
            if hit is None:
                misses.append((i, d, arm))
            else:
                hit["timings_ms"]["decode"] = round(decode_ms, 3)
                out[i] = hit
        if misses:
            for (i, _, _), fix in zip(misses, self._locate(misses, decode_ms * len(misses), task_ids, bank)):
                out[i] = fix
        for r, f in zip(requests, out):
            if isinstance(f, dict):
                f["batch_size"] = len(requests)  # handled in one pass with this many requests
                if r.sent_at_s is not None:
                    f["timings_ms"]["queue"] = round(max(0.0, t0 - r.sent_at_s) * 1e3, 3)
        served = [(i, d, arm) for i, d, arm in admitted if isinstance(out[i], dict)]
        shadows, computed = self._shadows(served, task_ids, bank)
        if served:
            for (i, d, _), failure in zip(served, self._store([out[i] for i, _, _ in served],  # type: ignore[misc]
                                                              [d.digest for _, d, _ in served],
                                                              [requests[i].payload for i, _, _ in served],
                                                              [shadows.get(i) for i, _, _ in served])):
                if failure is not None:
                    out[i] = failure
        # only what was stored is cached: a refused fix is not served again from the cache
        self._cache_put([(d, arm, out[i]) for i, d, arm in misses if isinstance(out[i], dict)])  # type: ignore[misc]
        if computed and self.router.shadow is not None:
            self._cache_put([(d, self.router.shadow, shadows[i]) for i, d in computed if isinstance(out[i], dict)])
        good = [f for f in out if isinstance(f, dict)]
        self.counters.fixes += len(good)
        self.counters.batches += 1
        if self.metrics is not None:
            self.metrics.batch.observe(len(requests))
            self.metrics.fixes_done(good)
        return out  # type: ignore[return-value]

    def _locate(self, items: Sequence[tuple[int, DecodedPayload, Arm]], decode_ms: float,
                task_ids: Sequence[str | None], bank: "_FeatureBank", *,
                geojson: bool = True) -> list[dict[str, Any] | Exception]:
        """The fixes of ``items`` (slot, payload, arm): one feature pass, one session run per arm; if an arm's
        run fails as a whole, each of its payloads again alone, so that a payload that breaks the model fails
        by itself. ``task_ids`` by slot; ``geojson=False`` for fixes that only go to the database."""
        out: list[dict[str, Any] | Exception | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        plans: dict[FeatureConfig, list[int]] = {}  #: one feature pass per feature plan (arms, band models)
        for k, (_, _, arm) in enumerate(items):
            groups.setdefault(id(arm), []).append(k)
            plans.setdefault(arm.localizer.spec.features, []).append(k)
        feats: dict[FeatureConfig, tuple[dict[int, int], FeatureBatch] | None] = {}
        for plan, ks in plans.items():
            try:
                feats[plan] = ({k: row for row, k in enumerate(ks)},
                               bank.get([items[k][0] for k in ks], [items[k][1] for k in ks], items[ks[0]][2].localizer))
            except self.interrupts:
                raise
            except Exception as exc:  # the pass failed as a whole: each payload's features again alone, below
                if len(items) == 1:
                    return [self._own_failure(exc, task_ids[items[0][0]])]
                log.warning("the features of a batch of %d failed (%r); locating each alone", len(ks), exc)
                feats[plan] = None
        per_ms = decode_ms / max(1, len(items))
        for ks in groups.values():
            arm = items[ks[0]][2]
            mine = feats[arm.localizer.spec.features]
            try:
                got = arm.localizer.fixes([items[k][1] for k in ks], decode_ms=per_ms * len(ks),
                                          task_ids=[task_ids[items[k][0]] for k in ks], alias=arm.alias,
                                          features=mine[1].take([mine[0][k] for k in ks]) if mine is not None else None,
                                          geojson=geojson)
                for k, f in zip(ks, got):
                    out[k] = f
                continue
            except self.interrupts:
                raise
            except Exception as exc:
                if len(ks) == 1 and mine is not None:
                    out[ks[0]] = self._own_failure(exc, task_ids[items[ks[0]][0]])
                    continue
                if mine is not None:
                    log.warning("locating a batch of %d failed (%r); locating each alone", len(ks), exc)
            for k in ks:
                i, d, _ = items[k]
                try:
                    out[k] = arm.localizer.fixes([d], decode_ms=per_ms, task_ids=[task_ids[i]], alias=arm.alias,
                                                 geojson=geojson)[0]
                except self.interrupts:
                    raise
                except Exception as exc:
                    out[k] = self._own_failure(exc, task_ids[i])
        return out  # type: ignore[return-value]

    def _shadows(self, served: Sequence[tuple[int, DecodedPayload, Arm]], task_ids: Sequence[str | None],
                 bank: "_FeatureBank") -> tuple[dict[int, dict[str, Any]], list[tuple[int, DecodedPayload]]]:
        """The shadow model's fixes of the served requests another model answered (slot -> fix), from the cache
        or computed on the features the pass has (one more session run), and which of them were computed. A
        shadow failure is logged and counted, never the request's."""
        shadow = self.router.shadow
        jobs = [(i, d) for i, d, arm in served if shadow is not None and self.router.shadow_for(arm) is not None]
        if not jobs or shadow is None:
            return {}, []
        out: dict[int, dict[str, Any]] = {}
        hits = self._cached([(d, shadow, task_ids[i]) for i, d in jobs], count=False)
        todo = [(i, d) for (i, d), hit in zip(jobs, hits) if hit is None]
        out.update({i: hit for (i, _), hit in zip(jobs, hits) if hit is not None})
        computed: list[tuple[int, DecodedPayload]] = []
        if todo:
            try:
                got = shadow.localizer.fixes([d for _, d in todo], task_ids=[task_ids[i] for i, _ in todo],
                                             alias=shadow.alias, features=bank.get([i for i, _ in todo],
                                                                                   [d for _, d in todo], shadow.localizer))
            except self.interrupts:
                raise
            except Exception as exc:
                log.error("the shadow model %s failed on a batch of %d: %r; the served fixes are unaffected",
                          shadow.version, len(todo), exc)
                got = [exc] * len(todo)
            for (i, d), f in zip(todo, got):
                if isinstance(f, dict):
                    out[i] = f
                    computed.append((i, d))
                elif self.metrics is not None:
                    self.metrics.shadow_failed()
        return out, computed

    @staticmethod
    def _own_failure(exc: Exception, task_id: str | None) -> Exception:
        """One request's failure, kept in its slot; a server fault is logged with its traceback."""
        if not isinstance(exc, HeimdallError):
            log.error("request %s failed on a server fault", task_id, exc_info=exc)
        return exc

    def _admit(self, payload: RawPayload, task_id: str | None, *, digest: bool = True,
               route_key: str | None = None) -> tuple[DecodedPayload, Arm]:
        """Decode and route (``route_key``, else the task id, when the payload has no session or request id). A
        PayloadError (invalid input, an ``options.model`` not served here) is the caller's to record: a batch
        records its rejections in one write (:meth:`_record`)."""
        decoded = (self.localizer.decode(payload, digest=digest) if self.decoder is None else
                   self.decoder.decode(payload, digest=digest))
        return decoded, self.router.choose(decoded, route_key or task_id)

    def _reject(self, exc: PayloadError, payload: RawPayload, task_id: str | None, key: str | None = None) -> None:
        """Record one rejection (once per request and code). A refused row is logged, never a crash;
        an unreachable database raises TransientError."""
        self._record([(exc, self._rejection_row(exc, payload, task_id, key))])

    def _record(self, rejected: Sequence[tuple[PayloadError, dict[str, Any]]]) -> None:
        """Record rejections in one write and count them. If the database refuses the write for good, each row
        is tried alone, so that one row it refuses (logged, never a crash) costs no other its record; an
        unreachable database raises TransientError."""
        try:
            self.store.write_rejections([row for _, row in rejected])
        except StorageError:
            if len(rejected) == 1:
                log.exception("could not record a rejected payload (%s)", rejected[0][0].code)
            else:
                for one in rejected:
                    self._record([one])
                return
        for exc, _ in rejected:
            self.counters.rejected[exc.code] = self.counters.rejected.get(exc.code, 0) + 1
            if self.metrics is not None:
                self.metrics.rejections.labels(code=exc.code).inc()

    @staticmethod
    def _rejection_row(exc: PayloadError, payload: RawPayload, task_id: str | None,
                       key: str | None = None) -> dict[str, Any]:
        """The rejections row of a payload refused with ``exc``."""
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
        return rejection_row(exc.to_dict(), task_id=task_id, request_id=request_id, receivers=receivers,
                             size_bytes=size, key=own or key or task_id)

    def _cached(self, asked: Sequence[tuple[DecodedPayload, Arm, str | None]], *,
                count: bool = True) -> list[dict[str, Any] | None]:
        """Cached fixes for the (payload, arm, task id) that allow it (one round trip per model), None for the
        others. ``count``: the lookups are the served fixes' (a shadow's are not the hit rate operators watch)."""
        out: list[dict[str, Any] | None] = [None] * len(asked)
        if self.cache is None:
            return out
        groups: dict[int, list[int]] = {}
        for k, (d, arm, _) in enumerate(asked):
            if d.options.cache:
                groups.setdefault(id(arm), []).append(k)
        for ks in groups.values():
            arm = asked[ks[0]][1]
            hits = self.cache.get_many(arm.cache_key, [asked[k][0].digest for k in ks])
            found = sum(h is not None for h in hits)
            if count:
                self.counters.cache_hits += found
                self.counters.cache_misses += len(hits) - found
                if self.metrics is not None:
                    self.metrics.cache_lookups(found, len(hits) - found)
            for k, hit in zip(ks, hits):
                if hit is None:
                    continue
                d, _, task_id = asked[k]
                hit.update(task_id=task_id, request_id=d.request_id, captured_at=d.captured_at, cached=True,
                           timings_ms={"features": 0.0, "inference": 0.0})
                hit["model"] = {"name": arm.name, "version": arm.version, "alias": arm.alias}
                out[k] = hit
        return out

    def _cache_put(self, computed: Sequence[tuple[DecodedPayload, Arm, dict[str, Any]]]) -> None:
        if self.cache is None:
            return
        groups: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        arms: dict[int, Arm] = {}
        for d, arm, fix in computed:
            if d.options.cache:
                groups.setdefault(id(arm), []).append((d.digest, fix))
                arms[id(arm)] = arm
        for key, items in groups.items():
            self.cache.put_many(arms[key].cache_key, items)

    def _store(self, fixes: list[dict[str, Any]], digests: Sequence[str], payloads: Sequence[RawPayload],
               shadows: Sequence[dict[str, Any] | None] = ()) -> list[HeimdallError | None]:
        """Store the fixes in one transaction, with the shadow model's fix beside each that has one; each slot's
        failure: StorageError if the database refused its row, PayloadError ``conflict`` (recorded) if its
        request id is stored with other IQ (its shadow is not stored).

        A refused batch is written again row by row (idempotent), so one bad row fails alone. An
        unreachable database raises TransientError for all of them.
        """
        t0 = time.perf_counter()
        rows = [fix_row(f, d) for f, d in zip(fixes, digests)]
        beside = [shadow_row(s, f) if s is not None else None for s, f in zip(shadows, fixes)] if any(shadows) else None

        def write(k: slice) -> Any:  # the store's signature is the plain one when no shadow runs
            return self.store.write_fixes(rows[k], beside[k]) if beside else self.store.write_fixes(rows[k])

        failures: list[HeimdallError | None] = [None] * len(rows)
        conflicts: set[int] = set()
        try:
            try:
                done = write(slice(None))
                new, conflicts, shadow_error = done.new, set(done.conflicts), done.shadow_error
            except StorageError as exc:
                shadow_error = None
                if len(rows) == 1:
                    failures, new = [exc], 0
                else:
                    log.warning("the database refused a batch of %d fixes (%s); writing them one by one", len(rows), exc)
                    new = 0
                    for k in range(len(rows)):
                        try:
                            one = write(slice(k, k + 1))
                            new += one.new
                            shadow_error = shadow_error or one.shadow_error
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
        if shadow_error is not None:
            log.error("%s; the served fixes are stored", shadow_error)
        if beside and self.metrics is not None:
            for fix, shadow, failure in zip(fixes, shadows, failures):
                if shadow is None or failure is not None:
                    continue
                if shadow_error is None:
                    self.metrics.shadow_stored(fix, shadow)
                else:
                    self.metrics.shadow_failed()
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
        admitted: list[tuple[int, DecodedPayload, Arm]] = []  #: (index in the chunk, payload, arm)
        keys: list[str | None] = [f"{task_id}:{offset + i}" if task_id else None for i in range(len(payloads))]
        errors: list[dict[str, Any]] = []
        rejected: list[tuple[PayloadError, dict[str, Any]]] = []  #: recorded together, in one write
        for i, p in enumerate(payloads):
            try:  # chunks skip the cache
                admitted.append((i, *self._admit(p, task_id, digest=False, route_key=keys[i])))
            except PayloadError as exc:
                errors.append({"index": offset + i, **exc.to_dict()})
                rejected.append((exc, self._rejection_row(exc, p, task_id, keys[i])))
            except (TransientError, *self.interrupts):
                raise  # an iq_ref store or the database down, a time limit: the chunk task retries (idempotent keys)
            except Exception as exc:  # a server fault on this payload: its own error entry
                self._own_failure(exc, keys[i])
                errors.append(_internal_error(offset + i, exc))
        if rejected:
            self._record(rejected)  # TransientError: the database is down; the chunk retries (idempotent keys)
        t1 = time.perf_counter()
        bank = _FeatureBank()
        outcomes = self._locate(admitted, (t1 - t0) * 1e3, keys, bank, geojson=False)  # stored, never returned
        t2 = time.perf_counter()
        served = [(i, d, arm) for (i, d, arm), o in zip(admitted, outcomes) if isinstance(o, dict)]
        found = {i: o for (i, _, _), o in zip(admitted, outcomes)}
        failed: list[tuple[int, Exception]] = [(i, o) for i, o in found.items() if not isinstance(o, dict)]
        shadows, _ = self._shadows(served, keys, bank)
        failures = self._store([found[i] for i, _, _ in served], [d.digest for _, d, _ in served],  # type: ignore[misc]
                               [payloads[i] for i, _, _ in served], [shadows.get(i) for i, _, _ in served]) \
            if served else []
        failed += [(i, e) for (i, _, _), e in zip(served, failures) if e is not None]
        fixes = [found[i] for (i, _, _), e in zip(served, failures) if e is None]
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


class _FeatureBank:
    """A pass's features, computed at most once per payload and feature plan: the models that share a plan (the served
    model, its A/B arms and shadow, a band model with the same plan) share them. Keyed by the request's slot in the
    pass."""

    def __init__(self) -> None:
        self._plans: dict[FeatureConfig, _PlanFeatures] = {}

    def get(self, slots: Sequence[int], decoded: Sequence[DecodedPayload], localizer: Localizer) -> FeatureBatch:
        """The features of ``decoded`` (at ``slots``) under ``localizer``'s plan, computing those not computed yet."""
        plan = localizer.spec.features
        if plan not in self._plans:
            self._plans[plan] = _PlanFeatures(localizer)
        return self._plans[plan].get(slots, decoded)


class _PlanFeatures:
    """One feature plan's share of a :class:`_FeatureBank`."""

    def __init__(self, localizer: Localizer) -> None:
        self.localizer = localizer
        self._batch: FeatureBatch | None = None  #: the first pass, as computed
        self._slots: dict[int, int] = {}  #: slot -> row of _batch
        self._more: dict[int, tuple[Any, Any, float]] = {}  #: slot -> (features, mask, ms) computed later

    def get(self, slots: Sequence[int], decoded: Sequence[DecodedPayload]) -> FeatureBatch:
        """The features of ``decoded`` (at ``slots``), computing those not computed yet in one pass."""
        if self._batch is None:
            self._batch = self.localizer.features(decoded)
            self._slots = {s: k for k, s in enumerate(slots)}
            return self._batch
        rows = [self._slots.get(s) for s in slots]
        if all(r is not None for r in rows) and rows == list(range(len(self._batch.feats))):
            return self._batch
        missing = [(s, d) for s, d, r in zip(slots, decoded, rows) if r is None and s not in self._more]
        if missing:
            fb = self.localizer.features([d for _, d in missing])
            for k, (s, _) in enumerate(missing):
                self._more[s] = (fb.feats[k], fb.mask[k], fb.ms / len(missing))
        parts = [(self._batch.feats[r], self._batch.mask[r], self._batch.ms / len(self._batch.feats))
                 if r is not None else self._more[s] for s, r in zip(slots, rows)]
        return FeatureBatch(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), sum(p[2] for p in parts))
