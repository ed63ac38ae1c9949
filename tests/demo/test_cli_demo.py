"""Bad options of `prumerge demo`: one line on stderr, exit 2, before any model loads."""

import socket
import subprocess
import sys

import pytest

from prumerge.cli import build_parser, main
from prumerge.demo.app import OFFLINE_ENVIRONMENT


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    for key in OFFLINE_ENVIRONMENT:  # `run` sets them; restore them after each test
        monkeypatch.setenv(key, "unset-by-test")


def test_demo_is_a_command_and_its_defaults_are_local():
    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", "7860", None)
    assert "demo" in build_parser().format_help()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "0"], "--port must be at least 1, got 0"),
        (["--port", "70000"], "--port must be at most 65535, got 70000"),
        (["--port", "web"], "--port must be an integer, got 'web'"),
        (["--host", " "], "--host is empty"),
    ],
)
def test_bad_options(capsys, options, message):
    assert run_cli(["demo", *options], capsys) == (2, [f"prumerge: error: {message}"])


def test_a_port_in_use_fails_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(["demo", "--port", str(port)], capsys)
    assert code == 2
    assert err == [f"prumerge: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_an_address_not_on_this_machine(capsys):
    code, err = run_cli(["demo", "--host", "192.0.2.1", "--port", "7999"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("prumerge: error: cannot listen on 192.0.2.1:7999: ")


def test_without_gradio_it_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = run_cli(["demo", "--port", str(port)], capsys)
    assert code == 2
    assert err == [
        "prumerge: error: the demo needs Gradio: pip install 'prumerge[demo]' "
        "(scripts/setup.sh installs it)"
    ]


def test_bad_device_prints_no_traceback():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "prumerge.cli", "demo", "--port", str(port), "--device", "tpu"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "prumerge: error: --device: unknown device 'tpu'; use cpu, cuda or cuda:N"
    ]


def test_an_unknown_default_variant_fails_before_the_model_loads(capsys, monkeypatch):
    import prumerge.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(prumerge.loading, "load_model", no_loading)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = run_cli(["demo", "--port", str(port), "--model", "default:nope"], capsys)
    assert code == 2
    assert err == [
        "prumerge: error: --model default:nope: unknown variant; "
        "choose default:default or default:base"
    ]
