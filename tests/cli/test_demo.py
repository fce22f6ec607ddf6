"""The embedded default: the README's first command, with no server at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from heimdall_inference.cli.demo import run_demo

pytestmark = pytest.mark.slow

DEAD = {  # every server URL points at a closed port: nothing external may be used
    "HEIMDALL_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//",
    "HEIMDALL_RESULT_BACKEND": "redis://127.0.0.1:1/0",
    "HEIMDALL_CACHE_URL": "redis://127.0.0.1:1/0",
    "HEIMDALL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
}


def test_demo_runs_a_real_worker_tasks_and_a_chord(tmp_path, capsys):
    png = tmp_path / "map.png"
    out = run_demo(count=5, batch=40, seed=3, plot=png, data_dir=tmp_path / "data")
    text = capsys.readouterr().out
    # 5 transmissions on 2 m and one on 70 cm, each answered by its band's model
    assert "6 heimdall.predict tasks" in text and "batch chord: 40 payloads" in text
    assert len(out["errors_km"]) == 6 and max(out["errors_km"]) < 300
    assert out["models"] == ["localization_model"] * 5 + ["localization_model_70cm"]
    assert out["batch"]["fixes"] == 40 and out["rows"] == 40
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "data" / "heimdall.sqlite3").exists()


def test_demo_command_with_every_server_unreachable(tmp_path):
    env = {**os.environ, **DEAD}
    res = subprocess.run([sys.executable, "-m", "heimdall_inference", "demo", "--count", "3", "--batch", "16",
                          "--plot", str(tmp_path / "demo.png")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "median error" in res.stdout and "16 fixes, 0 errors, 16 new rows" in res.stdout
