"""Reliability rules on the real path: a database outage delays fixes, it does not lose them."""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
import time

import pytest

from heimdall_inference.client import submit

from ..live import PG_URL, isolated_worker

pytestmark = pytest.mark.integration


class GatedProxy:
    """A loopback TCP port that refuses connections until opened, then forwards to PostgreSQL."""

    def __init__(self, target: tuple[str, int]) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def open(self) -> None:
        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        async def stop():
            if self.server is not None:
                self.server.close()
                await self.server.wait_closed()
        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_database_down_then_up_the_fix_is_stored_late_not_lost(tmp_path, scenes_and_payloads):
    host, port = PG_URL.split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = GatedProxy((host, int(port)))
    try:
        with isolated_worker("dbdown", tmp_path / "w.log", store_url=PG_URL,
                             database_url=PG_URL.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")) as (_, store, worker):
            doc = copy.deepcopy(scenes_and_payloads[1][9])
            doc["request_id"] = "survives-an-outage"
            result = submit(doc)
            time.sleep(8.0)  # longer than the pool's 5 s wait: the first attempt fails and is retried
            assert store.count_fixes() == 0 and not result.ready()
            proxy.open()
            fix = result.get(timeout=90)
            assert fix["request_id"] == "survives-an-outage"
            assert store.count_fixes() == 1
            assert "Retry in" in worker.log()  # it was retried, with backoff, not failed
    finally:
        proxy.close()


def test_redis_down_the_fix_still_reaches_the_database(tmp_path, scenes_and_payloads):
    from heimdall_inference.worker.tasks import predict

    with isolated_worker("redisdown", tmp_path / "w.log", stop_timeout_s=10,
                         result_backend="redis://127.0.0.1:1/0", cache_url="") as (_, store, worker):
        doc = copy.deepcopy(scenes_and_payloads[1][11])
        doc["request_id"] = "no-redis"
        predict.apply_async((doc,), ignore_result=True)  # the producer cannot read results either
        deadline = time.monotonic() + 60
        while store.count_fixes() == 0 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert store.count_fixes() == 1
        assert worker.proc.poll() is None  # the worker survives a dead result backend
