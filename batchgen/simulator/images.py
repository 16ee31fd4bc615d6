"""Images in requests: which the service takes, how they are billed and named."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

from batchgen.simulator.text import _snippet

# Input tokens billed per image, whatever its size. Real Qwen-VL bills by pixels (one token per
# 28x28 patch); a constant keeps the usage of a test computable by hand.
IMAGE_TOKENS = 258


_IMAGE_FORMATS = ("png", "jpeg", "webp", "gif", "bmp", "tiff", "heic")
_DATA_URI_RE = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL | re.IGNORECASE)
_HTTP_URL_RE = re.compile(r"https?://[^\s/?#]+\S*", re.IGNORECASE)


def _data_uri_bytes(uri: str) -> bytes | None:
    """The decoded payload of a ``data:...;base64,...`` URI, or None if it is not one."""
    match = _DATA_URI_RE.fullmatch(uri)
    if match is None or ";base64" not in match[2].lower():
        return None
    try:
        return base64.b64decode(match[3], validate=True)
    except (binascii.Error, ValueError):
        return None


def image_id(uri: str) -> str:
    """The short name a reply gives an image: 8 hex digits of SHA-256.

    Of the decoded bytes for a base64 data URI (one picture, one name, whatever MIME type
    its data URI claims), of the URL string otherwise. Tests elsewhere compute it to check which
    images reached the model.
    """
    data = _data_uri_bytes(uri)
    return hashlib.sha256(uri.encode("utf-8") if data is None else data).hexdigest()[:8]


def _image_problem(value: Any) -> str | None:
    """Why the service would refuse this image value, or None if it takes it."""
    if not isinstance(value, str) or not value:
        return (
            "The image of a content part should be a non-empty string: an http(s) URL or a "
            "data:image/<format>;base64,<data> URI."
        )
    if _HTTP_URL_RE.fullmatch(value):
        return None  # never fetched: the simulator stays offline
    match = _DATA_URI_RE.fullmatch(value)
    if match is None:
        return (
            f"Invalid image {_snippet(value, 40)!r}: images must be http(s) URLs or "
            "data:image/<format>;base64,<data> URIs; the service cannot read local files or paths."
        )
    mime = match[1].lower()
    if not mime.startswith("image/") or mime.removeprefix("image/") not in _IMAGE_FORMATS:
        formats = ", ".join(f"image/{name}" for name in _IMAGE_FORMATS)
        return f"Unsupported image MIME type {match[1]!r} in a data URI; supported: {formats}."
    if ";base64" not in match[2].lower():
        return "An image data URI must be base64-encoded: data:image/<format>;base64,<data>."
    if not _data_uri_bytes(value):
        return "The base64 data of an image data URI is invalid or empty."
    return None


def _image_values(messages: list[Any]) -> list[Any]:
    """The ``image`` value of every image part, in request order."""
    return [
        part["image"]
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and "image" in part
    ]
