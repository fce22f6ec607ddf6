"""The prefork pool's pipes (no quadratic copies, 1 MiB instead of 64 KiB) and cheap picklable tracebacks."""

from __future__ import annotations

import fcntl
import os
import pickle
import traceback
from types import SimpleNamespace

import billiard.compat
import pytest
from billiard.einfo import ExceptionInfo

from heimdall_inference.errors import PayloadCode, PayloadError
from heimdall_inference.worker import celery_internals as internals
from heimdall_inference.worker.tasks import bare

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def pipe_sizes(pid: int) -> list[int]:
    """The capacity of every pipe a process holds open (each reopened through /proc, never read)."""
    sizes = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            if not os.readlink(path).startswith("pipe:"):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            sizes.append(fcntl.fcntl(fd, F_GETPIPE_SZ))
        finally:
            os.close(fd)
    return sizes


def test_a_job_written_through_a_view_in_partial_writes_arrives_whole():
    """billiard writes a job as far as the pipe takes it and comes back for the rest: from a view, the same
    bytes arrive as with billiard's own slicing, and the job is never copied."""
    job = os.urandom(300_000)
    for send in (billiard.compat.send_offset, internals._send_offset_view):
        r, w = os.pipe()
        os.set_blocking(w, False)
        got, off = bytearray(), 0
        while off < len(job):
            try:
                off += send(w, job, off)
            except BlockingIOError:
                got += os.read(r, 1 << 20)
        os.close(w)
        while chunk := os.read(r, 1 << 20):
            got += chunk
        os.close(r)
        assert bytes(got) == job


def test_the_pool_queues_get_pipes_of_one_mib():
    inq, outq, synq = internals._create_process_queues_grown(SimpleNamespace(synack=False))
    try:
        assert fcntl.fcntl(inq._writer.fileno(), F_GETPIPE_SZ) == internals.POOL_PIPE_BYTES
        assert fcntl.fcntl(outq._reader.fileno(), F_GETPIPE_SZ) == internals.POOL_PIPE_BYTES
        assert synq is None
    finally:
        for q in (inq, outq):
            q.close()


def _failing(depth: int) -> None:
    if depth == 0:
        values = [1, 2]
        values[5] += 1  # an IndexError with a caret under the subscript
    _failing(depth - 1)


def _einfo() -> ExceptionInfo:
    try:
        _failing(3)
    except IndexError:
        return ExceptionInfo()
    raise AssertionError("unreachable")


def test_compact_positions_are_the_code_objects_own():
    code = _failing.__code__
    assert list(internals.CodePositions.of(code)) == list(code.co_positions())
    assert internals.CodePositions.of(code) is internals.CodePositions.of(code)  # listed once per code object
    clone = pickle.loads(pickle.dumps(internals.CodePositions.of(code)))
    assert list(clone) == list(code.co_positions())


def test_a_compact_traceback_formats_exactly_as_billiards_own(monkeypatch):
    monkeypatch.setattr(internals.billiard.einfo._Code, "__init__", internals._billiard_code_init)
    before = _einfo()
    internals.compact_tracebacks()
    after = _einfo()
    assert after.traceback == before.traceback and "values[5] += 1" in after.traceback
    shipped = [pickle.loads(pickle.dumps(e)) for e in (before, after)]  # as the child sends it to the main process
    formatted = ["".join(traceback.format_tb(e.tb)) for e in shipped]
    assert formatted[0] == formatted[1] and "~~~~~~^^^" in formatted[1]  # the 3.11 carets survive


def test_a_bare_payload_error_keeps_its_type_code_field_and_message_and_drops_its_frames():
    try:
        try:
            raise ValueError("the decoder's own")
        except ValueError:
            raise PayloadError(PayloadCode.TOO_FEW_RECEIVERS, "2 receivers; at least 3", "receivers")
    except PayloadError as exc:
        raised = exc
    assert raised.__traceback__ is not None
    with pytest.raises(PayloadError) as info:
        raise bare(raised) from None
    err = info.value
    assert (err.code, err.field, err.message) == ("too_few_receivers", "receivers", "2 receivers; at least 3")
    text = "".join(traceback.format_exception(err))
    assert "the decoder's own" not in text and "raise PayloadError(" not in text
