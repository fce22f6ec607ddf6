"""The command line, end to end, on files a user would have."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from heimdall_inference.cli import main


def test_simulate_then_predict_json_and_msgpack_with_a_map(tmp_path, capsys):
    for fmt in ("json", "msgpack"):
        out = tmp_path / fmt
        assert main(["simulate", "--count", "3", "--seed", "4", "--out", str(out), "--format", fmt]) == 0
        files = sorted(out.glob(f"scene-*.{fmt}"))
        assert len(files) == 3 and len(list(out.glob("*.truth"))) == 3
        capsys.readouterr()
        png = tmp_path / f"{fmt}.png"
        assert main(["predict", *map(str, files), "--plot", str(png)]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [f["request_id"] for f in lines] == ["sim-4-0", "sim-4-1", "sim-4-2"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    json_fixes = lines  # msgpack run; the same scenes as JSON give the same fixes
    assert all(f["schema"] == "heimdall.fix/v1" for f in json_fixes)


def test_predict_reports_invalid_files_as_structured_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "heimdall.iq/v1"}')
    assert main(["predict", str(bad)]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["code"] == "missing_field" and doc["error"]["field"] == "captured_at"


def test_single_predict_is_pretty_json(tmp_path, capsys):
    main(["simulate", "--count", "1", "--seed", "2", "--out", str(tmp_path), "--receivers", "3", "--dtype", "ci16"])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "scene-0000.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("{\n") and len(json.loads(out)["receivers_used"]) == 3


def test_model_info(capsys):
    assert main(["model", "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "localization_model" and len(info["receivers"]) == 7


def test_bench_in_process_prints_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--in-process", "--batch-sizes", "1,16", "--seconds", "0.2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fixes/s" in text
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 16]
    for r in report["results"]:
        assert r["fixes"] >= r["batch"] and r["fixes_per_s"] > 0
        assert sum(r["share_pct"].values()) == pytest.approx(100, abs=0.5)


@pytest.mark.slow
def test_evaluate_command(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--scenes", "16", "--seed", "9", "--grid-step-m", "6000", "--json", str(out)]) == 0
    assert "grid posterior" in capsys.readouterr().out
    assert json.loads(out.read_text())["scenes"] == 16


def test_console_script_entry_point(tmp_path):
    res = subprocess.run([sys.executable, "-m", "heimdall_inference", "model", "info"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(res.stdout)["version"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "heimdall_inference", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_db_init_failures_are_one_line_without_a_traceback(tmp_path):
    """An unreachable database, TimescaleDB required where it is not preloaded, SQLite asked for it."""
    from ..servers import PrivatePostgres

    down = _cli("db", "init", env={"HEIMDALL_DATABASE_URL": "postgresql://heimdall:secret@127.0.0.1:1/heimdall"})
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert down.stderr.strip().count("\n") == 0 and "TransientError" in down.stderr and "secret" not in down.stderr
    pg = PrivatePostgres()  # no shared_preload_libraries
    try:
        env = {"HEIMDALL_DATABASE_URL": pg.url, "HEIMDALL_DB_SCHEMA": "heimdall"}
        on = _cli("db", "init", env={**env, "HEIMDALL_TIMESCALEDB": "on"})
        assert on.returncode == 2 and "Traceback" not in on.stderr and on.stderr.strip().count("\n") == 0
        assert "HEIMDALL_TIMESCALEDB=on" in on.stderr
        auto = _cli("db", "init", env=env)
        assert auto.returncode == 0 and json.loads(auto.stdout)["timescaledb"] is False
        assert "using a plain table" in auto.stderr and "Traceback" not in auto.stderr
    finally:
        pg.close()
    lite = _cli("db", "init", env={"HEIMDALL_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}",
                                    "HEIMDALL_TIMESCALEDB": "on"})
    assert lite.returncode == 2 and "needs a PostgreSQL" in lite.stderr and "Traceback" not in lite.stderr


def test_db_init_on_a_real_timescaledb_makes_the_hypertable():
    from ..servers import PrivatePostgres

    if not (PrivatePostgres.BIN.parent / "lib" / "timescaledb.so").exists():
        pytest.skip("TimescaleDB is not built into this PostgreSQL (.ci/run installs it where it can)")
    pg = PrivatePostgres(preload="timescaledb")
    try:
        out = _cli("db", "init", env={"HEIMDALL_DATABASE_URL": pg.url, "HEIMDALL_TIMESCALEDB": "on"})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"backend": "postgresql", "schema": "public", "timescaledb": True}
    finally:
        pg.close()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.json")]) == 1
    err = capsys.readouterr().err
    assert "nope.json" in err and err.count("\n") == 1
