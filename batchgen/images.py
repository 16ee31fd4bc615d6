"""Images for multimodal rows: table cells to content parts, local files to ``data:`` URIs.

A cell names one image or several (a list column, or a JSON array in a text cell); each is a
URL, a ``data:`` URI or a local file. A missing or unsupported file is that row's error,
found before anything is sent. Local files stay ``file://`` references until the request is
sent (``materialize``): a batch of rows waiting in memory never holds their base64 bytes.
The reference carries the file's size and mtime, so a changed image is a changed request
for the journal.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from batchgen.api.native import MAX_BODY_BASE64, TOO_LARGE
from batchgen.errors import RowProblem

IMAGE_NOT_FOUND = "batchgen.ImageNotFound"
BAD_IMAGE = "batchgen.InvalidImage"

# What DashScope's VL models read (its documented image formats).
MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".jpe": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
}
_REMOTE = ("http://", "https://", "data:", "oss://")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
_BMP_HEADERS = (12, 40, 52, 56, 64, 108, 124)  # the DIB header's size, after the 14-byte file header
SNIFF_BYTES = 32
NOT_AN_IMAGE = "{path} is named like an image but its first bytes are not those of a {types} file"
TYPES = "png, jpeg, webp, gif, bmp, tiff or heic"


def sniff(head: bytes) -> str | None:
    """The MIME type a file's first bytes show, or None when they are no image DashScope reads.

    The name is not enough: a text file saved as ``.png`` would be sent and refused (and
    billed as a failed row) by the service.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return "image/bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "image/heic"
    return None


def cell_refs(cell: Any) -> list[str] | RowProblem:
    """The image references in one cell: none, one, or a list (a list cell or a JSON array)."""
    if cell is None:
        return []
    if isinstance(cell, str):
        text = cell.strip()
        if not text:
            return []
        if not text.startswith("["):
            return [text]
        try:
            cell = json.loads(text)
        except ValueError:
            return [text]  # a file name that starts with "[", e.g. "[1].png"
    if hasattr(cell, "to_list"):  # a polars Series from a list column
        cell = cell.to_list()
    if not isinstance(cell, list | tuple) or not all(isinstance(x, str) or x is None for x in cell):
        return RowProblem(BAD_IMAGE, "an image cell must hold a URL, a file path or a list of them")
    return [x.strip() for x in cell if x and x.strip()]


def _path_of(uri: str) -> Path:
    """The local path of a ``file:`` URI; ``file://dir/a.png`` is taken as the relative dir/a.png."""
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc and parts.netloc != "localhost":
        return Path(urllib.request.url2pathname(parts.netloc + parts.path))
    return Path(urllib.request.url2pathname(parts.path))


def resolve(ref: str, root: Path) -> str | RowProblem:
    """A URL as is; a local file (relative to ``root``) as ``file://`` + its fingerprint."""
    if ref.lower().startswith(_REMOTE):
        return ref
    path = _path_of(ref) if ref.lower().startswith("file:") else Path(ref).expanduser()
    if not path.is_absolute():
        path = root / path
    if path.suffix.lower() not in MIME_TYPES:
        return RowProblem(
            BAD_IMAGE, f"{ref} is not an image type DashScope reads (png, jpeg, webp, gif, bmp, tiff, heic)"
        )
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        return RowProblem(
            IMAGE_NOT_FOUND,
            f"image file {path} does not exist (relative paths are read from the input table's folder)",
        )
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        return RowProblem(IMAGE_NOT_FOUND, f"image file {path} cannot be read: {exc.strerror or exc}")
    if sniff(head) is None:
        return RowProblem(BAD_IMAGE, NOT_AN_IMAGE.format(path=path, types=TYPES))
    return f"{path.resolve().as_uri()}#{stat.st_size}-{stat.st_mtime_ns}"


class _Refused(Exception):
    def __init__(self, problem: RowProblem) -> None:
        self.problem = problem


def _checked(ref: str, root: Path) -> str:
    resolved = resolve(ref, root)
    if isinstance(resolved, RowProblem):
        raise _Refused(resolved)
    return resolved


def local_parts(messages: list[dict[str, Any]], root: Path) -> list[dict[str, Any]] | RowProblem:
    """``file:`` images inside messages (a messages column), resolved like a column's cells."""

    def part(p: Any) -> Any:
        if not isinstance(p, dict):
            return p
        image = p.get("image")
        if isinstance(image, str) and image.lower().startswith("file:"):
            return {**p, "image": _checked(image, root)}
        url = p.get("image_url")
        if isinstance(url, dict) and str(url.get("url", "")).lower().startswith("file:"):
            return {**p, "image_url": {**url, "url": _checked(url["url"], root)}}
        return p

    try:
        return [
            {**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages
        ]
    except _Refused as refused:
        return refused.problem


def row_images(cells: list[Any], root: Path) -> list[str] | RowProblem:
    """Every image of a row, from its image-column cells in order, resolved."""
    images: list[str] = []
    encoded = 0  # bytes the local files will take as base64
    for cell in cells:
        refs = cell_refs(cell)
        if isinstance(refs, RowProblem):
            return refs
        for ref in refs:
            resolved = resolve(ref, root)
            if isinstance(resolved, RowProblem):
                return resolved
            if resolved.startswith("file:"):
                encoded += 4 * -(-int(resolved.rsplit("#", 1)[1].split("-")[0]) // 3)
            images.append(resolved)
    if encoded > MAX_BODY_BASE64:
        return RowProblem(
            TOO_LARGE,
            f"the row's image files take {encoded / 2**20:.1f} MiB as "
            f"base64, over DashScope's {MAX_BODY_BASE64 // 2**20} MiB "
            "request limit: send fewer or smaller images, or URLs",
        )
    return images


def attach(messages: list[dict[str, Any]], images: list[str]) -> list[dict[str, Any]]:
    """Put the images before the text of the last user message, as native content parts."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            content = messages[i]["content"]
            parts = [{"text": content}] if isinstance(content, str) else list(content)
            return [
                *messages[:i],
                {**messages[i], "content": [{"image": u} for u in images] + parts},
                *messages[i + 1 :],
            ]
    return messages


def data_uri(reference: str) -> str:
    """Read a ``file:`` reference into a base64 ``data:`` URI.

    Raises OSError when the file cannot be read and ValueError when it is no image type
    (references from a messages column are checked only here).
    """
    path = _path_of(reference.split("#", 1)[0])
    if path.suffix.lower() not in MIME_TYPES:
        raise ValueError(
            f"{path} is not an image type DashScope reads (png, jpeg, webp, gif, bmp, tiff, heic)"
        )
    data = path.read_bytes()
    mime = sniff(data[:SNIFF_BYTES])  # what the bytes are, whatever the name says
    if mime is None:
        raise ValueError(NOT_AN_IMAGE.format(path=path, types=TYPES))
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def portable(body: dict[str, Any], root: Path | None) -> dict[str, Any]:
    """The body as the journal hashes it: local files by their path under ``root``.

    So moving the project (input table and images together) does not make every image row a
    new request; size and modification time stay in each reference.
    """
    if root is None or not has_local(body):
        return body
    prefix = root.resolve().as_uri().rstrip("/") + "/"
    return json.loads(json.dumps(body, ensure_ascii=False).replace(prefix, "file:./"))


def has_local(body: dict[str, Any]) -> bool:
    """Whether any content part of the body is a local file (cheap for text-only bodies)."""
    messages = body["input"]["messages"] if "input" in body else body["messages"]
    return any(isinstance(m.get("content"), list) and '"file:' in json.dumps(m["content"]) for m in messages)


def materialize(body: dict[str, Any]) -> dict[str, Any]:
    """The body to send: every local image reference replaced by its bytes, native or OpenAI."""

    def part(p: Any) -> Any:
        if not isinstance(p, dict):
            return p
        image = p.get("image")
        if isinstance(image, str) and image.startswith("file:"):
            return {**p, "image": data_uri(image)}
        url = p.get("image_url")
        if isinstance(url, dict) and str(url.get("url", "")).startswith("file:"):
            return {**p, "image_url": {**url, "url": data_uri(url["url"])}}
        return p

    def message(m: dict[str, Any]) -> dict[str, Any]:
        content = m.get("content")
        return {**m, "content": [part(p) for p in content]} if isinstance(content, list) else m

    if "input" in body:
        return {
            **body,
            "input": {**body["input"], "messages": [message(m) for m in body["input"]["messages"]]},
        }
    return {**body, "messages": [message(m) for m in body["messages"]]}
