"""Server instances of a test's own, on free loopback ports: PostgreSQL, Redis, RabbitMQ, MLflow (+ S3).

The fault tests stop, kill, freeze and restart these, never the shared servers on the standard
ports. Each one lives in a temporary folder that ``close()`` removes. Needs the servers' binaries
(Debian's packages) and root, to run them as their own users; otherwise the tests that use them skip
(and fail under CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .live import unavailable

__all__ = ["free_port", "PrivatePostgres", "PrivateRedis", "PrivateRabbit", "PrivateMlflow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float, *, up: bool = True) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                is_up = True
        except OSError:
            is_up = False
        if is_up == up:
            return True
        time.sleep(0.1)
    return False


def _as(user: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command as ``user`` (we are root in CI; as that user already, run it directly)."""
    import pwd

    if os.geteuid() == 0 and pwd.getpwuid(os.geteuid()).pw_name != user:
        cmd = ("runuser", "-u", user, "--", *cmd)
    return subprocess.run(cmd, check=True, capture_output=True, timeout=120, **kwargs)


def _own_dir(prefix: str, user: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(d, user, user)
    return d


def _pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb into a temporary folder, its own port)."""

    BIN = Path(f"/usr/lib/postgresql/{os.environ.get('PG_MAJOR', '15')}/bin")

    def __init__(self, *, preload: str = "") -> None:
        if not (self.BIN / "initdb").exists():
            unavailable(f"PostgreSQL binaries in {self.BIN}")
        self.dir = _own_dir("heimdall-pg-", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.preload = preload
        _as("postgres", str(self.BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        if self.preload:
            opts += f" -c shared_preload_libraries={self.preload} -c timescaledb.telemetry_level=off"
        _as("postgres", str(self.BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
            "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        _as("postgres", str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def freeze(self) -> None:
        """Every process of the cluster stopped: connections are accepted by the kernel, never answered."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        for p in [pid, *map(int, children)]:
            os.kill(p, signal.SIGSTOP)
        self._frozen = [pid, *map(int, children)]

    def thaw(self) -> None:
        for p in getattr(self, "_frozen", []):
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._frozen = []

    def close(self) -> None:
        self.thaw()
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the test's own on a free port (nothing on disk)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            unavailable("redis-server")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _wait_port(self.port, 20):
            raise RuntimeError(f"redis-server on {self.port} did not start")

    def kill(self) -> None:
        """Gone at once (kill -9): clients see refused connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _wait_port(self.port, 10, up=False)

    def close(self) -> None:
        self.kill()


class PrivateRabbit:
    """A RabbitMQ node of the test's own: own node name, ports, data folder (started in ~5 s).

    ``join`` makes it a member of another private node's cluster.
    """

    def __init__(self, *, name: str | None = None) -> None:
        if shutil.which("rabbitmq-server") is None:
            unavailable("rabbitmq-server")
        self.node = f"{name or 'hq' + uuid.uuid4().hex[:8]}@localhost"
        self.dir = _own_dir("heimdall-rmq-", "rabbitmq")
        self.port = free_port()
        self.dist_port = free_port()
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                                                "loopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            for f in self.dir.iterdir():
                shutil.chown(f, "rabbitmq", "rabbitmq")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                    "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(self.dir / "log"), "RABBITMQ_PID_FILE": str(self.dir / "pid"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "ERL_EPMD_ADDRESS": "127.0.0.1"}
        self.start()

    def url(self, vhost: str = "/") -> str:
        from urllib.parse import quote

        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], check=True, capture_output=True,
                              text=True, timeout=timeout_s, env=self.env).stdout

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", timeout_s=30)
                if _wait_port(self.port, 10):
                    return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                time.sleep(0.5)
        raise RuntimeError(f"RabbitMQ node {self.node} did not start:\n{self.log()}")

    def stop(self) -> None:
        """Stop the node (clients see the connection close); ``start()`` brings it back with its data."""
        try:
            self.ctl("stop", timeout_s=60)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            for pid in _pids_of(f"-sname {self.node.split('@')[0]}") + _pids_of(self.node):
                os.kill(pid, signal.SIGKILL)
        _wait_port(self.port, 30, up=False)

    def join(self, other: "PrivateRabbit") -> None:
        self.ctl("stop_app")
        self.ctl("join_cluster", other.node)
        self.ctl("start_app")

    def log(self) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")) if (self.dir / "log").exists() else []:
            out.append(f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateMlflow:
    """A real MLflow tracking server (SQLite backend store) whose artifacts go to S3 on a ``moto`` server,
    both on free loopback ports, each in a process group of its own (MLflow's job consumers outlive a killed
    server process otherwise). ``env`` is what a client needs: MLFLOW_TRACKING_URI and the S3 settings."""

    BUCKET = "heimdall-models"

    def __init__(self) -> None:
        if shutil.which("mlflow") is None or shutil.which("moto_server") is None:
            unavailable("mlflow and moto_server (pip install -e '.[test]')")
        self.dir = Path(tempfile.mkdtemp(prefix="heimdall-mlflow-"))
        self.s3_port, self.port = free_port(), free_port()
        self.s3_url = f"http://127.0.0.1:{self.s3_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                    "MLFLOW_S3_ENDPOINT_URL": self.s3_url, "MLFLOW_TRACKING_URI": self.url}
        # no job runner (MLflow starts huey consumers for server-side jobs this registry does not use)
        env = {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._logs = []
        self._moto = self._start(["moto_server", "-H", "127.0.0.1", "-p", str(self.s3_port)], "moto.log", env)
        if not _wait_port(self.s3_port, 30):
            self.close()
            raise RuntimeError("moto_server did not start")
        import boto3

        boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=self.BUCKET)
        self._server = self._start(["mlflow", "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
                                    "--artifacts-destination", f"s3://{self.BUCKET}", "--host", "127.0.0.1",
                                    "--port", str(self.port), "--workers", "1"], "mlflow.log", env)
        if not self._healthy(90):
            log = (self.dir / "mlflow.log").read_text(errors="replace")[-2000:]
            self.close()
            raise RuntimeError(f"mlflow server did not start:\n{log}")

    def _start(self, cmd: list[str], log: str, env: dict[str, str]) -> subprocess.Popen:
        f = open(self.dir / log, "wb")
        self._logs.append(f)
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True)

    def _healthy(self, timeout_s: float) -> bool:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def s3_keys(self) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        return [o["Key"] for o in s3.list_objects_v2(Bucket=self.BUCKET).get("Contents", [])]

    def close(self) -> None:
        for proc in (getattr(self, "_server", None), getattr(self, "_moto", None)):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
        for f in self._logs:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)
