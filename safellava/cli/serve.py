"""``safellava serve``: an OpenAI-compatible server for safe captions and chat."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UsageError
from . import common
from .common import EXIT_OK, say
from .options import add_generation, add_model, generation_overrides, positive_int, resolved

HELP = "serve the model over an OpenAI-compatible HTTP API (extra: safellava[serve])"
DESCRIPTION = (
    "Serve /v1/chat/completions (streamed or not), /v1/models, /health and a playground page at /. "
    "Binds 127.0.0.1 unless --host says otherwise; with --api-key (or SAFELLAVA_API_KEY) every route but "
    "/health and the page needs it."
)
KEY_VARIABLE = "SAFELLAVA_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve command's flags."""
    add_model(parser)
    add_generation(parser, batched=False)
    http = parser.add_argument_group("server")
    http.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    http.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    http.add_argument("--api-key", help=f"the key clients must send as a Bearer token (or ${KEY_VARIABLE})")
    http.add_argument(
        "--served-model-name", help="the model's name in the API (default: the preset or model id)"
    )
    http.add_argument(
        "--max-body-mb", type=positive_int, default=20, help="largest request body (default 20)"
    )
    http.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting at most (default 64)"
    )
    http.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="greedy requests answered in one generate call (default 8)",
    )
    http.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)"
    )
    media = parser.add_argument_group("images")
    media.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: data: URLs only)"
    )
    media.add_argument(
        "--allowed-local-media-path", metavar="DIR", help="serve file:// image URLs under DIR only"
    )
    media.add_argument(
        "--max-image-mb", type=positive_int, default=20, help="largest image file (default 20)"
    )
    media.add_argument(
        "--remote-timeout", type=float, default=10.0, help="seconds per remote image (default 10)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also serve the checkpoint's own tower, as NAME-original-tower"
    )


def _settings(args: argparse.Namespace, name: str) -> Any:
    from ..serve.app import ServerSettings
    from ..serve.media import MediaPolicy

    local = None
    if args.allowed_local_media_path:
        local = Path(args.allowed_local_media_path).expanduser()
        if not local.is_dir():
            raise UsageError(f"--allowed-local-media-path {local} is not a folder")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: use 1 to 65535")
    return ServerSettings(
        served_model_name=args.served_model_name or name,
        api_key=args.api_key or os.environ.get(KEY_VARIABLE) or None,
        max_body_bytes=args.max_body_mb * 2**20,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_s=max(0.0, args.batch_wait_ms) / 1000,
        media=MediaPolicy(
            allow_remote=args.allow_remote_images,
            local_root=local,
            max_bytes=args.max_image_mb * 2**20,
            timeout_s=args.remote_timeout,
        ),
        compare=args.compare,
    )


def run(args: argparse.Namespace) -> int:
    """Start the server; the model loads while /health says 503; SIGTERM or Ctrl-C stops it."""
    try:
        import uvicorn

        from ..serve.app import ServerState, create_app
    except ImportError as exc:
        raise UsageError(
            f"safellava serve needs its extra ({exc.name} is missing): pip install 'safellava[serve]'"
        ) from None
    from .. import logs
    from ..loader import check_setup

    options, _, preset = resolved(args)
    if args.compare:
        from ..compare import check_comparable

        check_comparable(options)
    settings = _settings(args, preset or options.model)
    logs.configure(args.verbose)
    check_setup(options)  # a model or tower that cannot load stops here, in one line, before serving
    _check_port(args.host, args.port)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        say(f"serving on {args.host} without --api-key: anyone who reaches this port can use the model")

    def load_model() -> Any:
        loaded = common.load_model(args)
        loaded.generation = loaded.generation_options(**generation_overrides(args))  # the API's defaults
        return loaded

    failed: list[str] = []

    def stop(reason: str) -> None:
        failed.append(reason)
        say(f"error: {reason}")
        server.should_exit = True

    state = ServerState()
    app = create_app(load_model, settings, state, on_load_failure=stop)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_shutdown()  # no new work, and a running stream stops now
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # As uvicorn's, but a stop asked for by SIGTERM or Ctrl-C ends with exit code 0 rather
            # than the signal raised again once the server has shut down.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        access_log=args.verbose,
    )
    say(f"serving {settings.served_model_name} on http://{args.host}:{args.port} (the model is loading)")
    server = Server(config)
    server.run()
    return ModelLoadError.exit_code if failed else EXIT_OK


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is taken (uvicorn would exit with its own code and message)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}: choose another --port"
            ) from None
