"""The image of a request, from a ``data:`` URL, an ``http(s)`` URL or a ``file://`` URL, within limits."""

from __future__ import annotations

import base64
import binascii
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from ..images import DEFAULT_MAX_PIXELS, load_image, read_file
from .protocol import bad_request


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from, and how big they may be."""

    allow_remote: bool = False  # http(s) URLs (off by default: the server would fetch what a client names)
    local_root: Path | None = None  # file:// URLs only under this folder (None: refused)
    max_bytes: int = 20 * 2**20  # an image's encoded size
    max_pixels: int = DEFAULT_MAX_PIXELS  # an image's decoded size
    timeout_s: float = 10.0  # per remote fetch


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http and https only (urllib would follow ftp too)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http URL refused ({newurl.split(':', 1)[0]})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise bad_request("a data URL image must be data:image/...;base64,...", code="invalid_image_url")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise bad_request(f"the image is over {policy.max_bytes // 2**20} MiB", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URL is not valid base64", code="invalid_image_url") from None


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise bad_request(
            "remote image URLs are off: send the image as a data: URL, or start the server with "
            "--allow-remote-images",
            code="remote_images_disabled",
        )
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    deadline = time.monotonic() + policy.timeout_s
    try:
        with opener.open(url, timeout=policy.timeout_s) as response:
            return _read_before(response, deadline, policy.max_bytes, url)
    except urllib.error.HTTPError as exc:
        raise bad_request(
            f"cannot download the image at {url}: HTTP {exc.code}", code="image_download_failed"
        ) from None
    except (urllib.error.URLError, OSError, ValueError):
        # One message for every network failure: the server's view of other hosts is not the client's business.
        raise bad_request(f"cannot download the image at {url}", code="image_download_failed") from None


def _read_before(response: Any, deadline: float, limit: int, url: str) -> bytes:
    """The body, in pieces, refused past ``limit`` bytes or past the deadline (a trickling server)."""
    parts, size = [], 0
    while chunk := response.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise bad_request(f"the image at {url} is over {limit // 2**20} MiB", code="image_too_large")
        if time.monotonic() > deadline:
            raise bad_request(f"the image at {url} took too long to download", code="image_download_failed")
        parts.append(chunk)
    return b"".join(parts)


def _local(url: str, policy: MediaPolicy) -> bytes:
    if policy.local_root is None:
        raise bad_request(
            "file:// image URLs are off: start the server with --allowed-local-media-path DIR",
            code="local_images_disabled",
        )
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request("file:// URLs must name a local path", code="invalid_image_url")
    try:
        path = os.path.realpath(urllib.request.url2pathname(parts.path))
    except ValueError:  # a NUL byte in the path
        raise bad_request("the file:// URL is not a valid path", code="invalid_image_url") from None
    root = os.path.realpath(policy.local_root)
    if os.path.commonpath([path, root]) != root:
        raise bad_request(f"file:// images must be under {policy.local_root}", code="local_image_refused")
    try:
        return read_file(path, url, policy.max_bytes)
    except ImageError as exc:
        raise bad_request(f"cannot read {url}: {exc.reason}", code="invalid_image") from None


def fetch_image(url: str, policy: MediaPolicy) -> Any:
    """The RGB image a URL names; an ``ApiError`` (400) for anything refused or unreadable."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, policy)
    elif scheme in ("http", "https"):
        data = _remote(url, policy)
    elif scheme == "file":
        data = _local(url, policy)
    else:
        raise bad_request("image URLs must be data:, http(s):// or file://", code="invalid_image_url")
    try:
        return load_image(data, policy.max_pixels)
    except ImageError as exc:
        raise bad_request(f"the image cannot be used: {exc.reason}", code="invalid_image") from None
