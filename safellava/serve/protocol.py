"""Chat-completion requests in, OpenAI-shaped responses, chunks and errors out."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..config import MAX_STOP_SEQUENCES, GenerationOptions, override
from ..errors import SafeLlavaError
from ..prompts import Turn

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Headers the status calls for."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A parsed chat-completion request."""

    model: str
    turns: list[Turn]  # the conversation, the image on the message that carried it
    image_url: str | None  # the one image's URL (data:, http(s):, file:), if any
    options: GenerationOptions
    stream: bool
    include_usage: bool


def _text_of(content: Any, index: int, role: str) -> tuple[str, str | None]:
    """A message's text and its image URL, from a string or a list of parts."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content, None
    if content is None and role == "assistant":
        return "", None
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of text and image_url parts", param)
    texts, images = [], []
    for number, part in enumerate(content):
        where = f"{param}[{number}]"
        if not isinstance(part, dict):
            raise bad_request("each content part must be an object", where)
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise bad_request("image_url needs a url", f"{where}.image_url")
            images.append(url)
        else:
            raise bad_request(f"unsupported content part {kind!r}: use text or image_url", where)
    if len(images) > 1:
        raise bad_request("one image per conversation: this message has several", param)
    return "".join(texts), images[0] if images else None


def _turns(messages: Any, default_system: str | None) -> tuple[list[Turn], str | None]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    turns: list[Turn] = []
    systems: list[str] = []
    image: str | None = None
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request("each message needs a role: system, user or assistant", f"messages[{index}]")
        role = ROLES[role]
        text, url = _text_of(message.get("content"), index, role)
        if url is not None:
            if role != "user":
                raise bad_request("images go in user messages", f"messages[{index}].content")
            if image is not None:
                raise bad_request(
                    "one image per conversation: send the others in new conversations", "messages"
                )
            image = url
        if role == "system":
            systems.append(text)
        else:
            turns.append(Turn(role, text, image=url is not None))
    if not turns or turns[-1].role != "user":
        raise bad_request("the last message must be the user's", "messages")
    if systems:
        return [Turn("system", "\n".join(systems)), *turns], image
    return ([Turn("system", default_system)] if default_system is not None else []) + turns, image


def _number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad_request(f"{name} must be {'a number' if kind is float else 'an integer'}", name)
    return value


def parse_chat_request(raw: bytes, defaults: GenerationOptions) -> ChatRequest:
    """A chat-completion request from its body; an ``ApiError`` (400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also bytes that are not UTF-8, and endless nesting
        reason = exc if isinstance(exc, ValueError) else "nested too deeply"
        raise bad_request(f"the body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required", "model")
    turns, image = _turns(body.get("messages"), defaults.system)
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES):
        raise bad_request(f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings", "stop")
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    try:
        options = override(
            defaults,
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", float),
            top_p=_number(body, "top_p", float),
            seed=_number(body, "seed", int),
            stop=tuple(stop) if stop is not None else None,
            system=None,
        )
    except SafeLlavaError as exc:
        raise bad_request(str(exc)) from None
    return ChatRequest(model, turns, image, options, stream, bool(stream_options.get("include_usage", False)))


def completion_id() -> str:
    """A new completion id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object: the image's tokens are counted in the prompt's."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    ident: str, model: str, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": counts,
    }


def chunk(
    ident: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None, counts: Any = None
) -> str:
    """One server-sent event with a ``chat.completion.chunk``; no choices when it carries only usage."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if counts is not None:
        body["usage"] = counts
    return event(body)


def event(body: dict[str, Any]) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
