"""heimdall-inference dead list|show|replay|purge on the real broker: what died, why, and putting it back."""

from __future__ import annotations

import copy
import json
import uuid

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture()
def cli_env(monkeypatch):
    """The CLI reads HEIMDALL_* once per process: point it at the test's servers, and forget it after."""
    from heimdall_inference.settings import set_process_settings

    def use(settings):
        for k, v in settings.to_env().items():
            monkeypatch.setenv(k, v)
        set_process_settings(None)

    yield use
    set_process_settings(None)


def test_dead_letters_are_listed_explained_replayed_and_purged(tmp_path, scenes_and_payloads, capsys, cli_env):
    from kombu import Producer

    from heimdall_inference.cli import main
    from heimdall_inference.client import submit
    from heimdall_inference.worker.celery_app import app
    from heimdall_inference.worker.process import WorkerProcess
    from heimdall_inference.worker.topology import work_queue

    from ..live import isolated_worker

    with isolated_worker("dead", tmp_path / "w.log", concurrency=1) as (settings, store, worker):
        worker.stop()
        doc = {**copy.deepcopy(scenes_and_payloads[1][3]), "request_id": "died-once"}
        valid = submit(doc).id
        with app.connection_for_write() as conn:  # an operator's consumer rejected it: dead-lettered
            m = work_queue(settings)(conn.default_channel).get(no_ack=False)
            assert m.headers["id"] == valid
            m.reject(requeue=False)
            garbage = str(uuid.uuid4())
            Producer(conn.default_channel).publish(b"{not json", exchange="heimdall", routing_key="heimdall.predict.task",
                                                   content_type="application/json", content_encoding="utf-8",
                                                   headers={"task": "heimdall.predict", "id": garbage, "lang": "py"})
        second = WorkerProcess(settings, tmp_path / "w2.log", concurrency=1)
        try:
            second.wait_ready()
            cli_env(settings)
            from ..faults.accounting import wait_until

            def listed() -> list[dict]:
                capsys.readouterr()
                assert main(["dead", "list"]) == 0
                return [json.loads(x) for x in capsys.readouterr().out.splitlines()]

            assert wait_until(lambda: len(listed()) == 2, 30)
            letters = {d["task_id"]: d for d in listed()}  # browsing twice leaves them in place
            assert set(letters) == {valid, garbage}
            assert letters[valid]["reason"] == "rejected" and letters[valid]["routing_key"].startswith("heimdall.predict.")
            assert letters[valid]["exchange"] == "heimdall" and letters[valid]["queue"] == "heimdall.predict"
            assert letters[garbage]["error"]["type"] == "PayloadError"
            assert letters[garbage]["error"]["detail"][0] == "decode_error"
            assert main(["dead", "show", garbage]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert shown["task_id"] == garbage and shown["headers"]["task"] == "heimdall.predict"
            assert main(["dead", "show", "no-such-task"]) == 1
            assert main(["dead", "replay"]) == 2  # neither ids nor --all
            capsys.readouterr()
            assert main(["dead", "replay", valid]) == 0
            assert json.loads(capsys.readouterr().out) == {"replayed": [valid]}
            assert wait_until(lambda: store.fetch_fix("died-once") is not None, 30)  # it ran, as first published
            assert [d["task_id"] for d in listed()] == [garbage]
            assert main(["dead", "purge"]) == 2  # not without --yes
            capsys.readouterr()
            assert main(["dead", "purge", "--yes"]) == 0
            assert json.loads(capsys.readouterr().out) == {"purged": 1}
            assert listed() == []
        finally:
            second.stop()
