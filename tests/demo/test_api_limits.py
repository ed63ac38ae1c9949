"""The demo's HTTP API enforces what the page does (issue 29): slider ranges, the question,
the upload size; and uploads are deleted when the server stops."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from prumerge.demo.app import MAX_NEW_TOKENS, REPEATS, build_app, launch, run_request
from prumerge.errors import PrumergeError

pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _upload(base: str, name: str, data: bytes) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return _post(f"{base}gradio_api/upload", body, f"multipart/form-data; boundary={boundary}")


def _call(base: str, data: list) -> str:
    """One API call of the Compare button: the server's answer, as its event stream."""
    status, text = _post(
        f"{base}gradio_api/call/on_compare", json.dumps({"data": data}).encode(), "application/json"
    )
    assert status == 200, text
    event = json.loads(text)["event_id"]
    with urllib.request.urlopen(f"{base}gradio_api/call/on_compare/{event}", timeout=120) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def served(tiny_demo):
    app = build_app(tiny_demo, samples=[])
    port = _free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.mark.parametrize(
    ("max_new", "repeats", "needle"),
    [
        (1e12, 1, "max new tokens must be a whole number from 1 to 64; got 1000000000000.0"),
        (0, 1, "max new tokens must be a whole number from 1 to 64; got 0"),
        (2.5, 1, "max new tokens must be a whole number"),
        (2, "nan", "timed runs per method must be a whole number from 1 to 5; got 'nan'"),
        (2, 6, "timed runs per method must be a whole number from 1 to 5; got 6"),
        (2, None, "timed runs per method must be a whole number"),
    ],
)
def test_the_api_refuses_values_the_page_does_not_offer(
    served, photo, tmp_path: Path, max_new, repeats, needle
) -> None:
    _, base = served
    photo.save(tmp_path / "photo.png")
    status, text = _upload(base, "photo.png", (tmp_path / "photo.png").read_bytes())
    assert status == 200, text
    image = {
        "path": json.loads(text)[0],
        "orig_name": "photo.png",
        "meta": {"_type": "gradio.FileData"},
    }  # noqa: E501
    stream = _call(base, [image, "what color?", ["pool"], "9", "v100", max_new, repeats])
    assert "event: error" in stream and needle in stream, stream


def test_the_api_answers_values_in_range(served, photo, tmp_path: Path) -> None:
    _, base = served
    photo.save(tmp_path / "photo.png")
    status, text = _upload(base, "photo.png", (tmp_path / "photo.png").read_bytes())
    image = {
        "path": json.loads(text)[0],
        "orig_name": "photo.png",
        "meta": {"_type": "gradio.FileData"},
    }  # noqa: E501
    stream = _call(base, [image, "what color?", ["pool"], "9", "v100", 2, 1])
    assert "event: complete" in stream and "pool@9" in stream, stream


def test_an_upload_past_the_limit_is_refused(served) -> None:
    _, base = served
    status, text = _upload(base, "huge.png", b"\0" * (21 * 1024 * 1024))
    assert status == 413, (status, text[:200])


def test_uploads_are_deleted_when_the_server_stops(tiny_demo, photo, tmp_path: Path) -> None:
    app = build_app(tiny_demo, samples=[])
    port = _free_port()
    launch(app, "127.0.0.1", port, block=False)
    photo.save(tmp_path / "photo.png")
    status, text = _upload(
        f"http://127.0.0.1:{port}/", "p.png", (tmp_path / "photo.png").read_bytes()
    )
    uploaded = Path(json.loads(text)[0])
    assert status == 200 and uploaded.is_file()
    app.close()
    assert not uploaded.exists()


@pytest.mark.parametrize(
    ("question", "hardware", "needle"),
    [
        ("what\x00?", "v100", "holds the control character U+0000"),
        ("w" * 2001, "v100", "longer than 2000 characters"),
        (12, "v100", "the question is empty"),
        ("what?", "tpu", "unknown hardware 'tpu'"),
    ],
)
def test_other_api_values_are_checked(tiny_demo, photo, tmp_path, question, hardware, needle):
    photo.save(tmp_path / "photo.png")
    with pytest.raises(PrumergeError, match=re.escape(needle)):
        run_request(tiny_demo, str(tmp_path / "photo.png"), question, ["pool"], "9", hardware, 2, 1)


def test_the_ranges_are_the_sliders() -> None:
    assert MAX_NEW_TOKENS == (1, 64) and REPEATS == (1, 5)
