"""`prumerge demo`: a local web page that compares reduction methods on your own image."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from prumerge.commands._args import add_model_placement_args, check_model_placement, int_arg
from prumerge.errors import PrumergeError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="a local web page: compare reduction methods on your own image",
        description="Serve a Gradio page on this machine: upload an image or pick a sample, "
        "ask a question, and compare reduction methods side by side with `none`: answers, "
        "visual tokens in and out, measured times, the cost model's predicted prefill "
        "speedup on a GPU preset, and the kept-token pictures. Without --model it uses the "
        "embedded default model. Nothing leaves the machine: no analytics, no share link.",
    )
    parser.add_argument(
        "--model",
        help="HF LLaVA model id or local directory, or default:base for the embedded model "
        "trained without reduction (default: the embedded model)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 serves "
        "your network)",
    )
    parser.add_argument("--port", default="7860", help="port to listen on (default 7860)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default: the GPU if any, else cpu)"
    )
    add_model_placement_args(parser)
    parser.add_argument("--cache-dir", help="cache of the built default model")
    parser.set_defaults(func=run)


def _check_address(host: str, port: int) -> None:
    """Fail now, before the model loads, if ``host:port`` cannot be listened on."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: resolved by bind
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PrumergeError(f"cannot listen on {host}:{port}: {reason}") from None


def run(args: argparse.Namespace) -> int:
    port = int_arg(args.port, "--port", 1)
    if port > 65535:
        raise PrumergeError(f"--port must be at most 65535, got {port}")
    host = args.host.strip()
    if not host:
        raise PrumergeError("--host is empty")
    _check_address(host, port)
    from prumerge.demo.app import offline_environment
    from prumerge.loading import default_variant, resolve_device

    device = resolve_device(args.device)
    check_model_placement(args, device)
    default_variant(args.model)  # an unknown default:VARIANT fails before loading

    offline_environment()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise PrumergeError(
            "the demo needs Gradio: pip install 'prumerge[demo]' (scripts/setup.sh installs it)"
        ) from None
    from prumerge.demo.app import build_app, launch
    from prumerge.demo.compare import DemoModel

    print("prumerge demo: loading the model ...", file=sys.stderr, flush=True)
    demo = DemoModel.load(
        args.model,
        device=device,
        cache_dir=args.cache_dir,
        dtype=args.dtype,
        device_map=args.device_map,
    )
    demo.warm_up()
    app = build_app(demo)
    shown = f"[{host}]" if ":" in host else host
    print(f"prumerge demo: http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        launch(app, host, port)
    except OSError as exc:  # the port was taken while the model loaded
        raise PrumergeError(f"cannot listen on {host}:{port}: {exc}") from None
    return 0
