"""Settings: typed and range-checked, read from HEIMDALL_* only by from_env; the Celery config built from them."""

from __future__ import annotations

import pytest

from heimdall_inference.errors import ConfigError
from heimdall_inference.settings import Settings, process_settings, set_process_settings
from heimdall_inference.worker.config import build


@pytest.fixture(autouse=True)
def no_heimdall_environment(monkeypatch):
    """These tests set what they read: a developer's exported HEIMDALL_* must not leak in."""
    import os

    for key in [k for k in os.environ if k.startswith("HEIMDALL_")]:
        monkeypatch.delenv(key)


def test_defaults_follow_compose_service_names():
    s = Settings()
    assert "@rabbitmq:5672" in s.broker_url and "redis:6379" in s.result_backend and "@db:5432" in s.database_url


def test_constructing_settings_never_reads_the_environment(monkeypatch):
    monkeypatch.setenv("HEIMDALL_ONNX_THREADS", "3")
    assert Settings().onnx_threads == 1
    assert Settings.from_env().onnx_threads == 3


def test_from_env_types_and_overrides(monkeypatch):
    for k, v in {"HEIMDALL_ONNX_THREADS": "3", "HEIMDALL_BROKER_URL": "amqp://x//",
                 "HEIMDALL_TASK_TIME_LIMIT_S": "25.5", "UNRELATED": "1"}.items():
        monkeypatch.setenv(k, v)
    s = Settings.from_env(queue="q")
    assert (s.onnx_threads, s.broker_url, s.task_time_limit_s, s.queue) == (3, "amqp://x//", 25.5, "q")
    for k, v in s.to_env().items():
        monkeypatch.setenv(k, v)
    assert Settings.from_env() == s


@pytest.mark.parametrize("var, value, says", [
    ("HEIMDALL_ONNX_THREADS", "many", "valid integer"),
    ("HEIMDALL_PREFETCH_MULTIPLIER", "0", "greater than or equal to 1"),  # Celery would read 0 as "unlimited"
    ("HEIMDALL_BATCH_MAX", "-1", "greater than or equal to 1"),
    ("HEIMDALL_METRICS_PORT", "70000", "less than or equal to 65535"),
    ("HEIMDALL_DB_SCHEMA", "x; drop table predictions", "should match pattern"),
    ("HEIMDALL_TASK_TIME_LIMIT_S", "3600", "less than 1800"),  # RabbitMQ's consumer timeout
    ("HEIMDALL_TASK_SOFT_TIME_LIMIT_S", "45", "must be below task_time_limit_s"),
    ("HEIMDALL_REDIS_KEY_PREFIX", "myapp", "should match pattern"),  # Celery would make it "myapp_"
    ("HEIMDALL_NOT_A_SETTING", "1", None),  # unknown variables are not settings: ignored
])
def test_a_bad_variable_is_one_clear_line_naming_it(monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    if says is None:
        assert Settings.from_env() == Settings()
        return
    with pytest.raises(ConfigError) as err:
        Settings.from_env()
    msg = str(err.value)
    assert "\n" not in msg and says in msg
    if "must be below" not in says:
        assert var in msg
    assert isinstance(err.value, ValueError)


def test_passwords_never_appear_in_errors_or_reports(monkeypatch):
    monkeypatch.setenv("HEIMDALL_QUEUE", "amqp://u:hunter2@db/x")  # a URL pasted into the wrong variable
    with pytest.raises(ConfigError) as err:
        Settings.from_env()
    assert "HEIMDALL_QUEUE='amqp://u:***@db/x'" in str(err.value) and "hunter2" not in str(err.value)
    s = Settings(broker_url="amqp://user:s3cret@h:5672//")
    assert s.redacted()["broker_url"] == "amqp://user:***@h:5672//"
    assert "s3cret" not in str(s.redacted())


def test_replace_checks_what_it_changes():
    s = Settings().replace(batch_max=4)
    assert s.batch_max == 4 and Settings().batch_max == 32
    with pytest.raises(ConfigError, match="batch_max"):
        s.replace(batch_max=0)
    with pytest.raises(ConfigError, match="no_such_setting"):
        s.replace(no_such_setting=1)


def test_process_settings_are_read_once(monkeypatch):
    before = process_settings()
    set_process_settings(None)
    try:
        monkeypatch.setenv("HEIMDALL_BATCH_MAX", "7")
        first = process_settings()
        monkeypatch.setenv("HEIMDALL_BATCH_MAX", "9")
        assert process_settings() is first and first.batch_max == 7
    finally:
        set_process_settings(before)


def test_celery_config_is_safe_and_reliable():
    conf = build(Settings())
    assert conf["accept_content"] == ["json", "msgpack"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_time_limit"] < 30 * 60  # below RabbitMQ's consumer timeout
    assert [q.name for q in conf["task_queues"]] == ["heimdall.predict", "heimdall.batch"]
    for q in conf["task_queues"]:
        assert q.exchange.type == "topic" and q.routing_key == f"{q.name}.#"
        assert q.queue_arguments["x-queue-type"] == "quorum"
        assert q.queue_arguments["x-delivery-limit"] == 5
        assert q.queue_arguments["x-dead-letter-routing-key"] == "heimdall.dead"
    # batch work on its own queue; live fixes (and everything else) on the default one
    assert conf["task_routes"] == {name: {"queue": "heimdall.batch", "routing_key": "heimdall.batch.task"}
                                   for name in ("heimdall.predict_chunk", "heimdall.collect", "heimdall.predict_batch")}
    assert conf["task_default_routing_key"] == "heimdall.predict.task"
    assert conf["result_backend"] == "heimdall_inference.worker.result_backend:DeferredRedisBackend+redis://redis:6379/0"


@pytest.mark.parametrize("queue, batch_queue", [("work", "work"), ("work", "work.batch"), ("a.b.c", "a.b")])
def test_live_and_batch_queues_never_receive_each_others_messages(queue, batch_queue):
    """Each queue is bound as "<name>.#" on a topic exchange: "work.#" would also match "work.batch.task"."""
    with pytest.raises(ConfigError, match="must differ"):
        Settings().replace(queue=queue, batch_queue=batch_queue)
    assert Settings(queue="work", batch_queue="work-batch").batch_queue == "work-batch"


def test_celeryconfig_is_build_of_the_process_settings():
    import celeryconfig

    assert celeryconfig.build is build
    assert celeryconfig.task_queues[0].name == process_settings().queue


def test_embedded_settings_need_no_server(tmp_path):
    s = Settings.embedded(tmp_path)
    conf = build(s)
    assert s.broker_url == "heimdallfs://" and s.result_backend.startswith("file://") and s.cache_url == ""
    assert s.database_url.startswith("sqlite:///")
    assert conf["task_queues"][0].queue_arguments == {}
    assert (tmp_path / "broker" / "queue").is_dir()
