"""vLLM's OpenAI-compatible server with the plugin: adaptive PruMerge, bad images, bad configs.

One server per module serves the embedded default model with adaptive PruMerge, configured
raw through ``--hf-overrides`` as a user would. Configs the plugin cannot serve are given to
servers that must fail at start-up, before any engine starts. Needs the vLLM environment
(scripts/setup-vllm.sh); skipped without it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prumerge.serve.config import ARCHITECTURE, QWEN_ARCHITECTURE
from tests.serve.conftest import (
    ADAPTIVE,
    EXAMPLE_QUESTION,
    EXAMPLES,
    MAX_TOKENS,
    REPO,
    _hf_answers,
    _vllm_available,
)
from tests.serve.openai_server import (
    chat_request,
    data_url,
    free_port,
    health,
    log_tail,
    post,
    server_command,
    start_server,
    stop_server,
    wait_until_healthy,
)
from tests.serve.tiny_qwen import tiny_served_qwen

#: Tokens the in-flight request generates (EOS ignored), so it is still running when the
#: broken images arrive.
LONG_TOKENS = 48


@dataclass
class Served:
    base: str
    model: str
    log: Path
    images: list[str]  # the examples' data URLs
    hf_texts: list[str]
    hf_counts: list[int]  # each example's adaptive PruMerge count on the Hugging Face path
    text_lengths: list[int]  # each prompt's tokens with a single <image> token
    start_seconds: float


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    reason = _vllm_available()
    if reason:
        pytest.skip(reason)
    from prumerge.models.default import format_prompt, load_default_model

    model, processor = load_default_model()
    work = tmp_path_factory.mktemp("vllm-server")
    port = free_port()
    log = work / "server.log"
    # The config as a user types it: no prumerge.serve helper in between.
    overrides = {"architectures": [ARCHITECTURE], "prumerge": ADAPTIVE}
    start = time.monotonic()
    server = start_server(server_command(model.name_or_path, overrides, port), log)
    try:
        # The Hugging Face side runs while the server starts.
        paths = [REPO / "examples" / name for name in EXAMPLES]
        items = [
            {"prompt": format_prompt(processor, EXAMPLE_QUESTION), "image": str(path)}
            for path in paths
        ]
        hf_texts, hf_counts, lengths = _hf_answers(model, processor, items, ADAPTIVE)
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, base, log, timeout=900)
        ready = time.monotonic() - start
        print(f"vLLM server ready in {ready:.1f} s", file=sys.stderr)
        mime = {".jpg": "image/jpeg", ".png": "image/png"}
        yield Served(
            base=base,
            model=model.name_or_path,
            log=log,
            images=[data_url(path.read_bytes(), mime[path.suffix]) for path in paths],
            hf_texts=hf_texts,
            hf_counts=hf_counts,
            text_lengths=lengths,
            start_seconds=ready,
        )
    finally:
        stop_server(server)


def _ask(served: Served, image_url: str, **sampling: Any) -> tuple[int, Any]:
    sampling.setdefault("max_tokens", MAX_TOKENS)
    body = chat_request(served.model, image_url, EXAMPLE_QUESTION, **sampling)
    return post(served.base, "/v1/chat/completions", body)


def test_server_answers_like_the_hugging_face_path_with_each_images_count(served: Served):
    """Adaptive PruMerge over the OpenAI API: the greedy answers equal the Hugging Face
    path's, and usage's prompt_tokens holds each image's own count (17, 30 and 14)."""
    assert len(set(served.hf_counts)) == len(EXAMPLES), served.hf_counts
    for image, text, count, length in zip(
        served.images, served.hf_texts, served.hf_counts, served.text_lengths, strict=True
    ):
        status, reply = _ask(served, image)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"].strip() == text.strip()
        assert text.strip()
        # The one <image> of the chat prompt became this image's count of placeholders.
        assert reply["usage"]["prompt_tokens"] == length - 1 + count


def _truncated_png() -> bytes:
    return (REPO / "examples" / "easy-vqa-test-0.png").read_bytes()[:200]


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(data_url(_truncated_png()), id="truncated-png"),
        pytest.param(data_url(b"this is not an image\n" * 8), id="text-as-png"),
    ],
)
def test_a_broken_image_is_an_error_for_that_request_only(served: Served, broken: str):
    """A request with an image that cannot be decoded gets vLLM's error response (HTTP 400,
    an OpenAI error object) while a request already in flight answers, and the server stays
    up and answers the next request as before."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Long enough (EOS ignored) to be generating still when the broken image arrives.
        running = pool.submit(
            _ask, served, served.images[0], max_tokens=LONG_TOKENS, ignore_eos=True
        )
        time.sleep(1.0)
        status, reply = _ask(served, broken)
        broken_answered = running.done()
        long_status, long_reply = running.result()
    print(f"broken image: HTTP {status} {reply['error']['message']!r}", file=sys.stderr)
    assert status == 400, reply
    assert reply["error"]["message"], reply
    assert reply["error"]["code"] == 400
    assert not broken_answered, "the first request finished before the broken image was sent"
    assert long_status == 200, long_reply
    assert long_reply["usage"]["completion_tokens"] == LONG_TOKENS
    # Greedy: its first tokens are the short answer.
    long_text = long_reply["choices"][0]["message"]["content"]
    assert long_text.strip().startswith(served.hf_texts[0].strip())
    assert health(served.base) == 200
    status, again = _ask(served, served.images[1])
    assert status == 200
    assert again["choices"][0]["message"]["content"].strip() == served.hf_texts[1].strip()


@pytest.mark.parametrize(
    ("family", "config", "reason"),
    [
        pytest.param(
            "llava",
            {"method": "fastv", "keep": 64},
            "prunes inside the language model",
            id="fastv",
        ),
        pytest.param(
            "llava",
            {"method": "prumerge+", "keep": 64, "colour": "red"},
            "does not take option(s) colour",
            id="unknown-option",
        ),
        pytest.param(
            "qwen",
            {"method": "cdpruner", "keep": 8},
            "reads the prompt's instruction",
            id="qwen-cdpruner",
        ),
    ],
)
def test_a_config_the_plugin_cannot_serve_fails_at_start_up_in_one_line(
    tmp_path: Path, family: str, config: dict[str, Any], reason: str
):
    """Given raw through --hf-overrides, a config the plugin refuses stops the server before
    its engine starts; the last line the user sees is the plugin's one-line reason."""
    unavailable = _vllm_available()
    if unavailable:
        pytest.skip(unavailable)
    if family == "qwen":
        checkpoint, architecture = str(tiny_served_qwen(tmp_path)), QWEN_ARCHITECTURE
    else:
        from prumerge.models.default import load_default_model

        checkpoint, architecture = load_default_model()[0].name_or_path, ARCHITECTURE
    log = tmp_path / "server.log"
    overrides = {"architectures": [architecture], "prumerge": config}
    server = start_server(server_command(checkpoint, overrides, free_port()), log)
    try:
        server.wait(timeout=600)
    finally:
        stop_server(server)
    output = log.read_text(errors="replace")
    lines = [line for line in output.splitlines() if line.strip()]
    assert server.returncode != 0, log_tail(log)
    assert lines[-1].startswith("prumerge.errors.PrumergeError: "), log_tail(log)
    assert reason in lines[-1]
    # It failed in the API server's process, before an engine process was started.
    assert "EngineCore" not in output, log_tail(log)
    assert f"method {config['method']!r}" in lines[-1]
