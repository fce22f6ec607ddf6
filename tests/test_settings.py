"""Settings come from HEIMDALL_* variables, typed, once; celeryconfig builds from them."""

from __future__ import annotations

import celeryconfig
import pytest

from heimdall_inference.settings import Settings


def test_defaults_follow_compose_service_names():
    s = Settings()
    assert "@rabbitmq:5672" in s.broker_url and "redis:6379" in s.result_backend and "@db:5432" in s.database_url


def test_from_env_types_and_overrides():
    s = Settings.from_env({"HEIMDALL_ONNX_THREADS": "3", "HEIMDALL_BROKER_URL": "amqp://x//",
                           "HEIMDALL_TASK_TIME_LIMIT_S": "12.5", "UNRELATED": "1"}, queue="q")
    assert (s.onnx_threads, s.broker_url, s.task_time_limit_s, s.queue) == (3, "amqp://x//", 12.5, "q")
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(ValueError):
        Settings.from_env({"HEIMDALL_ONNX_THREADS": "many"})


def test_celery_config_is_safe_and_reliable():
    conf = celeryconfig.build(Settings())
    assert conf["accept_content"] == ["json", "msgpack"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_time_limit"] < 30 * 60  # below RabbitMQ's consumer timeout
    q = conf["task_queues"][0]
    assert q.name == "heimdall.predict" and q.exchange.type == "topic"
    assert q.queue_arguments["x-queue-type"] == "quorum"
    assert q.queue_arguments["x-delivery-limit"] == 5
    assert q.queue_arguments["x-dead-letter-routing-key"] == "heimdall.dead"


def test_embedded_settings_need_no_server(tmp_path):
    s = Settings.embedded(tmp_path)
    conf = celeryconfig.build(s)
    assert s.broker_url == "heimdallfs://" and s.result_backend.startswith("file://") and s.cache_url == ""
    assert s.database_url.startswith("sqlite:///")
    assert conf["task_queues"][0].queue_arguments == {}
    assert (tmp_path / "broker" / "queue").is_dir()
