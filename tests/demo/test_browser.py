"""`prumerge demo` on the real default model, driven by headless Chromium through Playwright.

The server runs as a subprocess of `prumerge demo` with a Python audit hook that reports any
socket connection or name lookup leaving the machine; the browser aborts and records any
request that is not for the page's own address. Needs Debian's `chromium` (CI installs it in
`.ci/run`); without it the browser tests are skipped with the reason. Set
PRUMERGE_DEMO_SCREENSHOT=PATH to save the page with its results (docs/images/demo.png is
taken this way).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("PRUMERGE_CHROMIUM") or shutil.which("chromium")
# Chromium on a closed network: no sandbox (root in a container), no GPU, nothing in the
# background that would call out (QUIC, component updates, sync, first-run pages).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Starts `prumerge demo` with an audit hook that prints every non-loopback connection.
SERVER = """
import sys

def local(host):
    return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))

def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and not local(args[1][0]):
        print(f"OUTBOUND connect {args[1]!r}", file=sys.stderr, flush=True)
    elif event == "socket.getaddrinfo" and args[0] is not None and not local(args[0]):
        print(f"OUTBOUND lookup {args[0]!r}", file=sys.stderr, flush=True)

sys.addaudithook(hook)
from prumerge.cli import main
sys.exit(main(sys.argv[1:]))
"""
START_TIMEOUT = 900  # the first use builds the default model (about a minute on 2 cores)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """In the server process: end when the test process ends, even if it is killed (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Server:
    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVER, "demo", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )

    def wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prumerge demo exited with {self.process.returncode}:\n{self.text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        pytest.fail(f"prumerge demo did not answer within {START_TIMEOUT} s:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def outbound(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.startswith("OUTBOUND")]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("demo") / "server.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


def test_the_page_is_served_on_loopback_only_and_calls_nothing_outside(server):
    with urllib.request.urlopen(server.url, timeout=10) as response:
        page = response.read().decode()
    assert "prumerge demo" in page  # the page's title
    ss = shutil.which("ss")  # iproute2
    listening = ss and subprocess.run([ss, "-Hltn"], capture_output=True, text=True).stdout
    if listening:  # the demo's port is bound to 127.0.0.1 alone
        ours = [line for line in listening.splitlines() if f":{server.port} " in line]
        assert ours and all(f"127.0.0.1:{server.port}" in line for line in ours), ours
    assert "prumerge demo: http://127.0.0.1:" in server.text()
    assert server.outbound() == []


# -- the browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium); "
            "see docs/demo.md for running the browser test"
        )
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir).
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A page on the demo; requests for any other address are aborted and recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.outside = []

    def only_local(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            page.outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(server.url, wait_until="networkidle")
    yield page
    context.close()


def results_table(page) -> dict[str, dict[str, str]]:
    """``{config label: {row label: cell}}`` read from the page's results table."""
    rows = page.locator("#results [role=row]")  # the grid's ARIA roles, not its markup
    cells = [
        [
            c.strip()
            for c in rows.nth(i).locator("[role=columnheader], [role=gridcell]").all_inner_texts()
        ]
        for i in range(rows.count())
    ]
    header, body = cells[0], cells[1:]
    return {
        label: {row[0]: row[column] for row in body}
        for column, label in enumerate(header)
        if column > 0
    }


def test_compare_in_the_browser(page, server):
    page.locator("#image input[type=file]").set_input_files(
        str(REPO / "examples/easy-vqa-test-0.png")
    )
    page.locator("#image img").first.wait_for()
    page.locator("#question textarea").fill("what is the color of the shape?")
    page.locator("#methods").get_by_label("pool").check()  # pool at its default, 64
    page.locator("#compare").click()
    # The progress bar names the method running; each one takes about a second on a CPU.
    tracker = page.locator("[data-testid=status-tracker]")
    running = re.compile(r"running (none|prumerge|pool)")
    tracker.filter(has_text=running).first.wait_for(timeout=600_000)
    pictures = page.locator("#pictures img")
    pictures.nth(3).wait_for(timeout=600_000)

    table = results_table(page)
    assert list(table) == ["none", "prumerge", "prumerge+", "pool@64"]
    tokens = {}
    for label, column in table.items():
        assert column["answer"], f"{label} gave no answer"
        match = re.fullmatch(r"(\d+) -> (\d+)", column["visual tokens in -> out"])
        assert match, column
        tokens[label] = (int(match[1]), int(match[2]))
        for row in ("vision ms", "prefill ms"):
            assert float(column[row]) > 0
        assert re.fullmatch(r"\d+ \(\d+\)", column["generation ms (new tokens)"])
        assert re.fullmatch(r"\d+\.\d\dx", column["prefill speedup, predicted on V100"])
    assert tokens["none"] == (256, 256) and tokens["pool@64"] == (256, 64)
    assert 1 < tokens["prumerge"][1] < tokens["prumerge+"][1] < 256
    assert table["none"]["prefill speedup, predicted on V100"] == "1.00x"
    assert float(table["prumerge"]["prefill speedup, predicted on V100"][:-1]) > 1

    captions = page.locator("#pictures").inner_text()
    for label, (n_in, n_out) in tokens.items():
        assert f"{label}: {n_in} -> {n_out} tokens" in captions
    assert pictures.count() == 4
    for i in range(4):  # every kept-token picture was served and decoded
        # Under load the <img> may still be fetching when its caption shows: wait for it to
        # finish loading (or fail) before reading its decoded width.
        loaded = pictures.nth(i).evaluate(
            """img => img.complete ? img.naturalWidth : new Promise(done => {
                img.addEventListener("load", () => done(img.naturalWidth), {once: true});
                img.addEventListener("error", () => done(0), {once: true});
            })"""
        )
        assert loaded == 448

    if os.environ.get("PRUMERGE_DEMO_SCREENSHOT"):
        page.screenshot(path=os.environ["PRUMERGE_DEMO_SCREENSHOT"], full_page=True)
    assert page.outside == []
    assert server.outbound() == []


def test_bad_input_gets_a_message_on_the_page(page, server, tmp_path):
    def message(text: str) -> None:
        page.locator(".toast-body", has_text=text).wait_for()
        assert "Traceback" not in page.content()

    page.locator("#compare").click()  # no image yet
    message("upload an image or pick a sample first")

    page.locator("#image input[type=file]").set_input_files(str(REPO / "examples/coffee.jpg"))
    page.locator("#question textarea").fill("   ")
    page.locator("#compare").click()
    message("the question is empty")

    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not a picture")
    page.locator("#image").get_by_label("Remove Image").click()
    page.locator("#image input[type=file]").set_input_files(str(fake))
    page.locator("#question textarea").fill("what is it?")
    page.locator("#compare").click()
    message("notes.png is not an image file PIL can read")
    assert page.outside == []
    assert server.outbound() == []
