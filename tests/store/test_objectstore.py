"""iq_ref claim checks over real S3 HTTP (moto's server on loopback) with boto3."""

from __future__ import annotations

import base64
import copy
import io
import socket

import numpy as np
import pytest

from heimdall_inference.core.codec import iq_from_bytes
from heimdall_inference.errors import PayloadError, TransientError
from heimdall_inference.store.objectstore import S3Fetcher
from heimdall_inference.core.payload import PayloadDecoder

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="heimdall-raw-iq")
    yield url, client
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_iq_ref_is_fetched_from_s3_and_decoded(s3, spec, payload):
    url, client = s3
    rec = payload["receivers"][0]
    iq = iq_from_bytes(base64.b64decode(rec["iq"]["data"]), rec["iq"]["dtype"], rec.get("gain_db", 0.0))
    buf = io.BytesIO()
    np.save(buf, iq)
    client.put_object(Bucket="heimdall-raw-iq", Key="sessions/1/a.npy", Body=buf.getvalue())
    dec = PayloadDecoder(spec, fetch_iq_ref=S3Fetcher(url))
    by_ref = copy.deepcopy(payload)
    by_ref["receivers"][0] = {"id": rec["id"], "iq_ref": "s3://heimdall-raw-iq/sessions/1/a.npy"}
    np.testing.assert_allclose(dec.decode(by_ref).iq, dec.decode(payload).iq, rtol=1e-5, atol=1e-9)
    by_ref["receivers"][0]["iq_ref"] = "s3://heimdall-raw-iq/sessions/1/missing.npy"
    with pytest.raises(PayloadError) as info:
        dec.decode(by_ref)
    assert info.value.code == "iq_ref_unavailable"


def test_unreachable_store_is_transient_and_not_a_rejection(spec, payload):
    fetch = S3Fetcher("http://127.0.0.1:1")
    with pytest.raises(TransientError):
        fetch("s3://heimdall-raw-iq/x.npy")
    by_ref = copy.deepcopy(payload)
    by_ref["receivers"][0] = {"id": by_ref["receivers"][0]["id"], "iq_ref": "s3://heimdall-raw-iq/x.npy"}
    with pytest.raises(TransientError):  # the task retries with backoff instead of rejecting the payload
        PayloadDecoder(spec, fetch_iq_ref=fetch).decode(by_ref)


def test_a_url_boto3_refuses_to_send_is_the_producers_error_not_a_retry(monkeypatch):
    """Before anything goes on the wire: an invalid bucket name was a BotoCoreError, hence a "transient"
    fault retried for half an hour."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    fetch = S3Fetcher("http://127.0.0.1:1")  # nothing listens there: the refusal happens before connecting
    with pytest.raises(PayloadError) as err:
        fetch("s3://Bad_Bucket!/x.npy")
    assert err.value.code == "invalid_field" and "Invalid bucket name" in err.value.message
