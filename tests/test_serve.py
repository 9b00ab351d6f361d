"""``safellava serve`` with the real ``openai`` client against a live server on 127.0.0.1."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import uvicorn

from safellava.chat import ChatSession
from safellava.serve.app import ServerSettings, ServerState, create_app
from safellava.serve.media import MediaPolicy
from safellava.serve.protocol import ApiError

from .conftest import MAX_NEW_TOKENS

KEY = "test-key-1234"
NAME = "tiny-safe"
CAPTION = "Provide a one-sentence caption for the provided image."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A uvicorn server in a thread, on a free port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.state: ServerState = app.state.safellava

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def wait_ready(self) -> LiveServer:
        assert self.state.ready.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


def _settings(**changes) -> ServerSettings:
    return ServerSettings(served_model_name=NAME, api_key=KEY, **changes)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(safe_llava, media_root):
    settings = _settings(
        media=MediaPolicy(local_root=media_root), compare=True, max_batch=8, batch_wait_s=0.05
    )
    with LiveServer(create_app(lambda: safe_llava, settings)) as live:
        yield live.wait_ready()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(path: Path, text: str = CAPTION) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(path)}},
            {"type": "text", "text": text},
        ],
    }


def test_answers_equal_the_caption_command_with_usage_counting_the_image(server, safe_llava, images):
    client = server.client()
    for path in images:
        response = client.chat.completions.create(
            model=NAME, messages=[image_message(path)], max_tokens=MAX_NEW_TOKENS
        )
        assert response.choices[0].message.content == safe_llava.caption(str(path))
        assert response.choices[0].finish_reason in ("stop", "length")
        inputs = safe_llava.engine.prepare(
            [safellava_image(path)], [safe_llava.engine.caption_prompt(safe_llava.generation)]
        )
        assert (
            response.usage.prompt_tokens == inputs["input_ids"].shape[1] > 64
        )  # the 64 image tokens included
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def safellava_image(path):
    import safellava

    return safellava.load_image(path)


def test_streamed_text_equals_the_whole_answer(server, images):
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=[image_message(images[0])], max_tokens=12)
    stream = client.chat.completions.create(
        model=NAME,
        messages=[image_message(images[0])],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_conversation_equals_the_chat_command(server, safe_llava, images):
    session = ChatSession(safe_llava, safe_llava.generation_options())
    session.set_image(str(images[1]))
    answers = []
    for question in ("Describe it", "What colour?"):
        answer = session.ask(question)
        list(answer)
        answers.append(answer.text)
    messages = [image_message(images[1], "Describe it"), {"role": "assistant", "content": answers[0]},
                {"role": "user", "content": "What colour?"}]  # fmt: skip
    response = server.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=MAX_NEW_TOKENS
    )
    assert response.choices[0].message.content == answers[1]


def test_sixteen_concurrent_requests_are_batched_and_all_correct(server, safe_llava, images):
    expected = {str(p): safe_llava.caption(str(p)) for p in images}
    client = server.client()
    calls = []
    real = safe_llava.engine.answer

    def spy(inputs, options):
        calls.append(inputs["input_ids"].shape[0])
        return real(inputs, options)

    safe_llava.engine.answer = spy
    try:
        paths = [images[i % len(images)] for i in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda p: client.chat.completions.create(
                model=NAME, messages=[image_message(p)], max_tokens=MAX_NEW_TOKENS), paths))  # fmt: skip
    finally:
        del safe_llava.engine.answer
    assert [r.choices[0].message.content for r in results] == [expected[str(p)] for p in paths]
    assert sum(calls) == 16 and max(calls) > 1  # some shared a generate call


def test_stop_sequences_and_sampling_settings(server, images):
    client = server.client()
    whole = client.chat.completions.create(
        model=NAME, messages=[image_message(images[0])], max_tokens=12
    ).choices[0]
    word = whole.message.content.split()[1]
    cut = client.chat.completions.create(
        model=NAME, messages=[image_message(images[0])], max_tokens=12, stop=[word]
    )
    assert cut.choices[0].message.content == whole.message.content[: whole.message.content.find(word)].strip()
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=NAME, messages=[image_message(images[0])], max_tokens=8,
                                              temperature=1.5, seed=3).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_compare_serves_the_original_tower_beside(server, images):
    from safellava.cli import main  # noqa: F401 - the same answer as compare's

    client = server.client()
    names = [m.id for m in client.models.list().data]
    assert names == [NAME, NAME + "-original-tower"]
    safe = client.chat.completions.create(
        model=names[0], messages=[image_message(images[0])], max_tokens=MAX_NEW_TOKENS
    )
    stock = client.chat.completions.create(
        model=names[1], messages=[image_message(images[0])], max_tokens=MAX_NEW_TOKENS
    )
    assert safe.choices[0].message.content != stock.choices[0].message.content


def _error(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_every_error_has_the_openai_shape_and_status(server, images, media_root, tmp_path):
    client = server.client()
    ok = image_message(images[0])

    def create(**kwargs):
        return lambda: client.chat.completions.create(
            **{"model": NAME, "messages": [ok], "max_tokens": 2, **kwargs}
        )

    cases = [
        (create(model="nope"), 404, "model_not_found"),
        (create(messages=[]), 400, None),
        (create(messages=[{"role": "user", "content": [ok["content"][0], ok["content"][0], {"type": "text", "text": "?"}]}]), 400, None),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), 400, "invalid_image_url"),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]), 400, "remote_images_disabled"),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{images[0]}"}}]}]), 400, "local_image_refused"),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]), 400, "invalid_image_url"),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]), 400, "invalid_image"),
        (create(messages=[{"role": "user", "content": "x " * 3000}]), 400, "context_length_exceeded"),
        (create(temperature=-1), 400, None),
        (create(n=2), 400, None),
        (create(messages=[{"role": ["user"], "content": "hi"}]), 400, None),
        (create(messages=[{"role": "user", "content": "what does <image> mean in HTML?"}]), 400, None),
        (create(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x%00y.png"}}]}]), 400, "invalid_image_url"),
    ]  # fmt: skip
    for call, status, code in cases:
        error = _error(call)
        assert error.status_code == status, error.body
        assert set(error.body) == {"message", "type", "param", "code"} and error.body["message"]
        if code:
            assert error.body["code"] == code
    # A file under the allowed folder is served.
    shutil.copy(images[0], media_root / "inside.png")
    inside = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media_root / 'inside.png'}"}}, {"type": "text", "text": CAPTION}]}  # fmt: skip
    assert (
        client.chat.completions.create(model=NAME, messages=[inside], max_tokens=2).choices[0].message.content
    )
    (media_root / "escape.png").symlink_to(images[0])  # a symlink out of the folder is refused
    escape = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media_root / 'escape.png'}"}}]}  # fmt: skip
    assert _error(create(messages=[escape])).body["code"] == "local_image_refused"


def test_malformed_json_unknown_routes_and_the_key(server):
    status, _, body = server.request(
        "POST", "/v1/chat/completions", b"{not json", {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = server.request("GET", "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/nothing", "GET")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, response_headers, body = server.request(
                method, path, b"{}" if method == "POST" else None, headers
            )
            assert status == 401, (path, headers)
            assert response_headers["www-authenticate"] == "Bearer"
            assert json.loads(body)["error"]["type"] == "authentication_error"
            assert KEY not in body.decode()
    assert server.request("GET", "/health")[0:1] == (200,)
    status, _, page = server.request("GET", "/")
    assert status == 200 and b"<title>safellava</title>" in page
    error = _error(lambda: server.client("wrong").models.list())
    assert error.status_code == 401


def test_an_oversized_body_is_refused_before_it_is_read(server):
    limit = 20 * 2**20  # the default --max-body-mb
    # Headers announcing 64 MB, and no body at all: the answer must come without waiting for it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {64 * 2**20}\r\n\r\n".encode()
        )
        reply = b""
        while b"request_too_large" not in reply:
            part = sock.recv(65536)
            if not part:
                break
            reply += part
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"code":"request_too_large"' in reply
    # A chunked body with no length: the 413 comes once the body passes the limit, while the client
    # has not finished sending (it never does here).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + f"Authorization: Bearer {KEY}\r\n\r\n".encode()
        )
        piece = b" " * 2**20
        for _ in range(limit // 2**20 + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413")


def test_health_while_loading_then_ready(safe_llava):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return safe_llava

    with LiveServer(create_app(slow_load, _settings())) as live:
        status, headers, body = live.request("GET", "/health")
        assert (status, json.loads(body)) == (503, {"status": "loading"}) and headers["retry-after"] == "5"
        error = _error(
            lambda: live.client().chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "hi"}]
            )
        )
        assert error.status_code == 503 and error.response.headers["retry-after"] == "5"
        release.set()
        live.wait_ready()
        assert live.request("GET", "/health")[0] == 200


def test_a_full_queue_is_429_with_retry_after(safe_llava):
    with LiveServer(create_app(lambda: safe_llava, _settings(max_queue=1))) as live:
        live.wait_ready()
        worker = live.state.worker
        worker.queue = queue.Queue(maxsize=1)
        worker.queue.put_nowait(
            "a job ahead"
        )  # the worker thread waits on its old queue: this one stays full
        error = _error(lambda: live.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2))  # fmt: skip
        assert error.status_code == 429 and error.response.headers["retry-after"] == "1"
        assert error.body["code"] == "queue_full"


def test_the_worker_refuses_work_past_its_queue_and_when_closing(safe_llava):
    from safellava.serve.worker import Worker

    worker = Worker(safe_llava, max_queue=2)
    for _ in range(2):
        worker.submit(object())
    with pytest.raises(ApiError) as caught:
        worker.submit(object())
    assert caught.value.status == 429
    worker.closing = True
    with pytest.raises(ApiError) as caught:
        worker.submit(object())
    assert caught.value.status == 503


def test_a_long_answer_is_pinged_and_a_client_that_leaves_stops_generation(tiny, tmp_path):
    import sys as _sys

    import safellava

    sys_path = str(Path(__file__).resolve().parent.parent / "scripts")
    if sys_path not in _sys.path:
        _sys.path.insert(0, sys_path)
    from make_tiny_checkpoints import build_llava, train_tokenizer

    folder = build_llava(tmp_path / "endless", train_tokenizer(tmp_path / "tok"), never_stop=True)
    loaded = safellava.load(model=str(folder), vision_tower=str(tiny.safeclip), device="cpu")
    answers = []
    real = loaded.engine.stream

    def slow_stream(inputs, options):
        answer = real(inputs, options)
        answers.append(answer)
        chunks = iter(answer)

        class Slow:  # the first chunk after a pause: longer than the ping interval
            def __iter__(self):
                time.sleep(0.3)
                yield from chunks

            def __getattr__(self, name):
                return getattr(answer, name)

        return Slow()

    loaded.engine.stream = slow_stream
    with LiveServer(create_app(lambda: loaded, _settings(ping_interval_s=0.1))) as live:
        live.wait_ready()
        connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        body = {
            "model": NAME,
            "stream": True,
            "max_tokens": 600,
            "messages": [{"role": "user", "content": "Describe a street."}],
        }
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"}
        )
        response = connection.getresponse()
        lines = []
        while len([line for line in lines if line.startswith(b"data: {")]) < 4:
            lines.append(response.readline().strip())
        connection.sock.shutdown(socket.SHUT_RDWR)  # the client leaves mid-answer
        connection.close()
        deadline = time.monotonic() + 30
        while live.state.worker.busy_with is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b": ping" in lines
        assert answers and answers[0].stopped
        assert answers[0].num_tokens < 500


def test_sigterm_stops_the_server_within_ten_seconds(tiny, images):
    port = free_port()
    command = [sys.executable, "-m", "safellava", "serve", "--model", str(tiny.llava), "--vision-tower",
               str(tiny.safeclip), "--device", "cpu", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(
        command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(model=str(tiny.llava), messages=[image_message(images[0])], max_tokens=900, stream=True)  # fmt: skip
        next(iter(stream))
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        assert code == 0 and time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in process.stderr.read()


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    from safellava.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "/nowhere"]) == 2
    assert "pip install 'safellava[serve]'" in capsys.readouterr().err


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_playground_page_in_a_real_browser(server, safe_llava, images, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.set_window_size(1100, 900)
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "image").send_keys(str(images[0]))
        question = driver.find_element(By.ID, "question")
        question.clear()
        question.send_keys(CAPTION)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(
            lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, ".answer .text") if e.text]) == 2
        )
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".answer .text")]
        assert texts[0] == safe_llava.caption(
            str(images[0]), max_new_tokens=safe_llava.generation.max_new_tokens
        )
        assert texts[1] and texts[1] != texts[0]  # the original tower's answer beside
        driver.save_screenshot(os.environ.get("SAFELLAVA_SCREENSHOT", str(tmp_path / "playground.png")))
    finally:
        driver.quit()


def _jobs(loop, count, prompts=None):
    from safellava.config import GenerationOptions
    from safellava.serve.worker import Job

    return [
        Job(
            None,
            None,
            (prompts or ["p"] * count)[i],
            GenerationOptions(),
            "safe",
            loop,
            future=loop.create_future(),
        )
        for i in range(count)
    ]


def test_closing_refuses_every_waiting_request_at_once(safe_llava):
    import asyncio

    from safellava.serve.worker import Worker

    loop = asyncio.new_event_loop()
    try:
        worker = Worker(safe_llava, max_queue=8)  # not started: everything waits
        jobs = _jobs(loop, 3)
        for job in jobs[:2]:
            worker.submit(job)
        worker._held.append(jobs[2])  # one taken aside while a batch was being formed
        worker.begin_close()
        loop.run_until_complete(asyncio.sleep(0))
        assert [job.future.exception().status for job in jobs] == [503, 503, 503]
    finally:
        loop.close()


def test_a_failing_request_in_a_batch_does_not_fail_the_others(safe_llava, monkeypatch):
    import asyncio

    from safellava.generate import Answer
    from safellava.serve.worker import Worker

    def answer(inputs, options):
        if (isinstance(inputs, str) and inputs == "bad") or inputs is None:
            raise ValueError("image features and tokens do not match")
        return [Answer("fine", 1, 1, "stop")]

    monkeypatch.setattr(safe_llava.engine, "answer", answer)
    monkeypatch.setattr(
        safe_llava.engine, "prepare", lambda images, prompts: None
    )  # the batch fails as a whole
    loop = asyncio.new_event_loop()
    try:
        jobs = _jobs(loop, 2)
        jobs[0].inputs, jobs[1].inputs = "good", "bad"
        Worker(safe_llava)._answer(jobs)
        loop.run_until_complete(asyncio.sleep(0))
        assert jobs[0].future.result().text == "fine"
        assert jobs[1].future.exception().status == 500
    finally:
        loop.close()


def test_a_batch_out_of_memory_is_answered_alone_and_a_request_too_big_alone_is_503(safe_llava, monkeypatch):
    import asyncio

    import torch

    from safellava.generate import OOM_MESSAGE, Answer
    from safellava.serve.worker import Worker

    calls = []

    def answer(inputs, options):
        calls.append(inputs)
        if inputs is None or inputs == "big":  # the batch together, or the one that is too big alone
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [Answer("fine", 1, 1, "stop")]

    monkeypatch.setattr(safe_llava.engine, "answer", answer)
    monkeypatch.setattr(safe_llava.engine, "prepare", lambda images, prompts: None)
    loop = asyncio.new_event_loop()
    try:
        jobs = _jobs(loop, 2)
        jobs[0].inputs, jobs[1].inputs = "small", "big"
        Worker(safe_llava)._answer(jobs)
        loop.run_until_complete(asyncio.sleep(0))
        assert calls == [None, "small", "big"]  # together, then each alone
        assert jobs[0].future.result().text == "fine"
        error = jobs[1].future.exception()
        assert (error.status, error.code, error.message, error.retry_after) == (
            503,
            "out_of_memory",
            OOM_MESSAGE,
            5,
        )
    finally:
        loop.close()


def test_serve_stops_at_once_for_a_model_that_cannot_load_or_a_port_in_use(tiny, capsys):
    from safellava.cli import main

    assert main(["serve", "--model", str(tiny.llava), "--vision-tower", str(tiny.clip_wide)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "does not fit" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert (
            main(
                [
                    "serve",
                    "--model",
                    str(tiny.llava),
                    "--vision-tower",
                    str(tiny.safeclip),
                    "--port",
                    str(port),
                ]
            )
            == 2
        )
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
