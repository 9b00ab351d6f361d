#!/usr/bin/env python
"""Load-test ``safellava serve``: N clients for M seconds, with and without batching.

    python scripts/bench_serve.py                       # 8 clients, 20 s per setting, tiny model
    python scripts/bench_serve.py --clients 16 --seconds 30 --max-queue 8

The tiny random checkpoints are built in a temporary folder and served in-process (uvicorn on a
free port on 127.0.0.1). Each client sends greedy, non-streamed chat completions with an image
(a data: URL), one after another, for the duration. For ``--max-batch 1`` and ``--max-batch 8`` it
reports requests/s, the p50 and p95 latency of answered requests, and how every request ended:
answered (200), refused (429 or 503, with Retry-After: the client backs off for that long) or
other — which must be 0: nothing is lost.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_clients(url: str, clients: int, seconds: float, image_url: str, max_tokens: int) -> dict:
    """Each client: one request after another until time is up; every outcome counted."""
    body = json.dumps(
        {
            "model": "bench",
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": "Provide a one-sentence caption for the provided image."},
                    ],
                }
            ],
        }
    ).encode()
    lock = threading.Lock()
    latencies: list[float] = []
    outcomes = {"answered": 0, "refused": 0, "other": 0}
    stop_at = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            request = urllib.request.Request(
                f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    json.loads(response.read())
                    kind, wait = "answered", 0.0
            except urllib.error.HTTPError as error:
                refused = error.code in (429, 503) and error.headers.get("Retry-After")
                kind, wait = ("refused", float(error.headers["Retry-After"])) if refused else ("other", 0.0)
            except OSError:
                kind, wait = "other", 0.0
            with lock:
                outcomes[kind] += 1
                if kind == "answered":
                    latencies.append(time.monotonic() - started)
            time.sleep(min(wait, max(0.0, stop_at - time.monotonic())))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        **outcomes,
        "requests_per_s": outcomes["answered"] / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()

    import numpy as np
    import uvicorn
    from make_tiny_checkpoints import build_all
    from PIL import Image

    import safellava
    from safellava.serve.app import ServerSettings, create_app

    folder = Path(tempfile.mkdtemp(prefix="safellava-bench-serve-"))
    tiny = build_all(folder)
    loaded = safellava.load(model=str(tiny.llava), vision_tower=str(tiny.safeclip), device="cpu")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    print(
        f"{args.clients} clients, {args.seconds:.0f} s each, {args.max_tokens} new tokens, queue {args.max_queue}"
    )
    print(
        f"{'max batch':>9} {'requests/s':>10} {'p50 s':>7} {'p95 s':>7} {'answered':>8} {'refused':>7} {'other':>5}"
    )
    for max_batch in (1, 8):
        settings = ServerSettings(
            served_model_name="bench", max_batch=max_batch, batch_wait_s=0.01, max_queue=args.max_queue
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(lambda: loaded, settings), port=port, log_level="error")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        create_state = server.config.app.state.safellava
        create_state.ready.wait()
        result = run_clients(
            f"http://127.0.0.1:{port}", args.clients, args.seconds, image_url, args.max_tokens
        )
        server.should_exit = True
        thread.join()
        print(
            f"{max_batch:>9} {result['requests_per_s']:>10.2f} {result['p50']:>7.2f} {result['p95']:>7.2f} "
            f"{result['answered']:>8} {result['refused']:>7} {result['other']:>5}"
        )


if __name__ == "__main__":
    main()
