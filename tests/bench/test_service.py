"""The service benchmark on tiny settings: its accounting, not its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from heimdall_inference.bench.service import BenchConfig, format_report, plot_report, run_service_bench


@pytest.mark.integration
def test_tiny_bench_on_the_real_servers_accounts_for_every_payload(live, live_worker, tmp_path):
    servers, _ = live
    report = run_service_bench(servers.settings, BenchConfig.tiny(workers=2), start_worker=False, log_dir=tmp_path,
                               progress=lambda m: None)
    a = report["accounting"]
    assert a["lost"] == 0 and a["submitted"] == a["fix_rows"] + a["rejection_rows"]
    assert a["rejection_rows"] == a["invalid_sent"]
    # the rejections burst: every one of its payloads a recorded rejection, none an unexpected error
    assert report["reject_errors"] == 0 and a["invalid_sent"] >= 40 and report["reject_per_s"] > 0
    eff = report["worker_efficiency"]
    assert eff["reject"]["efficiency"] is None  # a rejection computes no fix (the rest need the worker metered)
    assert report["batch"]["rows"] + report["batch"]["errors"] == 64
    lb = report["live_during_batch"]
    assert lb["batch_fixes"] + lb["batch_errors"] == 128 and lb["during"]["errors"] == lb["idle"]["errors"] == 0
    assert lb["idle"]["fixes"] > 0 and lb["during"]["fixes"] > 0 and lb["p95_during_over_idle"] > 0
    assert [c["producers"] for c in report["closed_loop"]] == [1, 4]
    assert all(c["errors"] == 0 for c in report["closed_loop"])
    assert report["ratios"]["single_over_noop"] > 0 and report["ratios"]["batch_over_inprocess"] > 0
    assert 1.0 < report["message_bytes"]["json_base64_bytes_per_fix"] / report["message_bytes"]["msgpack_bytes_per_fix"]
    text = format_report(report)
    assert "accounting" in text and "lost 0" in text and "-payload batch" in text and "rejections/s" in text
    assert plot_report(report, tmp_path / "b.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_command_on_the_embedded_transport(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "heimdall_inference", "bench", "--tiny", "--embedded", "--workers", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "HEIMDALL_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"})
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["accounting"]["lost"] == 0
    assert report["cold_start_to_first_fix_s"] < 30


@pytest.mark.integration
def test_the_writes_benchmark_stores_every_row_once_by_each_method():
    from heimdall_inference.bench.writes import bench_writes, format_writes

    from ..live import PG_URL, port_open, unavailable

    if not port_open(PG_URL.split("@", 1)[1].split("/", 1)[0]):
        unavailable("PostgreSQL")
    r = bench_writes(PG_URL, sizes=(1, 16), repeats=2)
    assert set(r["ms_per_row"]) == {1, 16} and all(v > 0 for m in r["ms_per_row"].values() for v in m.values())
    assert r["rows"] == 2 * (1 + 16) * 3  # each method, each batch, every row once
    assert "executemany" in format_writes(r)
