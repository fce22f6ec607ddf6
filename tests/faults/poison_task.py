"""``heimdall.test.poison``: the child that runs it dies at once (SIGKILL), every time."""

from __future__ import annotations

import os
import signal

from heimdall_inference.worker.celery_app import app


@app.task(name="heimdall.test.poison")
def poison() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
