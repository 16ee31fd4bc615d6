"""The Files API's storage: uploaded input files and the result files batches write.

Ids are the real service's: ``file-batch-<24 hex>`` for an upload, ``file-batch_output-<24 hex>``
for a batch's output and error files alike. Only the latter can be downloaded. Storage is
limited as the account is (``BatchLimits.stored_files`` / ``stored_bytes``), result files
included, so a client that never deletes its files eventually cannot upload.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from batchgen.simulator.config import BatchLimits

INPUT_PREFIX = "file-batch-"
OUTPUT_PREFIX = "file-batch_output-"
_CHUNK = 1024 * 1024

_MSG_FILE_NUMBER = "Upload file number exceed limit."
_MSG_FILE_CAPACITY = "Upload file capacity exceed limit."


class _FileRefused(Exception):
    """An upload the service refuses: (message, param), always a 400."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass
class _File:
    id: str
    filename: str
    purpose: str  # "batch" for uploads, "batch_output" for results
    content: bytes
    created_at: int

    def describe(self) -> dict[str, Any]:
        """The file object, as ``GET /files/{id}`` answers it."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "created_at": self.created_at,
        }


class FileStore:
    """The files of the account, in upload order."""

    def __init__(self, limits: BatchLimits) -> None:
        self._limits = limits
        self._files: dict[str, _File] = {}
        self._bytes = 0

    def __iter__(self) -> Iterator[_File]:
        return iter(self._files.values())

    def get(self, file_id: str) -> _File | None:
        return self._files.get(file_id)

    def check_room(self, size: int) -> None:
        """Refuse an upload of ``size`` bytes the storage has no room for."""
        if len(self._files) >= self._limits.stored_files:
            raise _FileRefused(_MSG_FILE_NUMBER, None)
        if self._bytes + size > self._limits.stored_bytes:
            raise _FileRefused(_MSG_FILE_CAPACITY, None)

    def add(self, prefix: str, filename: str, purpose: str, content: bytes, created_at: int) -> _File:
        file = _File(prefix + uuid.uuid4().hex[:24], filename, purpose, content, created_at)
        self._files[file.id] = file
        self._bytes += len(content)
        return file

    def delete(self, file_id: str) -> bool:
        file = self._files.pop(file_id, None)
        if file is None:
            return False
        self._bytes -= len(file.content)
        return True


async def read_upload(request: web.Request, limits: BatchLimits) -> tuple[str, bytes]:
    """The (filename, bytes) of a ``multipart/form-data`` upload with ``purpose=batch``.

    The file is read in chunks past aiohttp's body limit (a file may be 500 MB); one over
    ``BatchLimits.file_bytes`` is refused, after reading the rest so the client can read the
    answer instead of meeting a reset connection.
    """
    if not request.content_type.startswith("multipart/"):
        raise _FileRefused("The request must be multipart/form-data with a file and purpose=batch.", None)
    reader = await request.multipart()
    purpose: str | None = None
    upload: tuple[str, bytes] | None = None
    too_large = False
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # a nested multipart: not a form field
            raise _FileRefused("Nested multipart bodies are not supported.", None)
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            chunks, size = [], 0
            while chunk := await part.read_chunk(_CHUNK):
                size += len(chunk)
                too_large = too_large or size > limits.file_bytes
                if not too_large:
                    chunks.append(chunk)
            upload = (part.filename or "upload.jsonl", b"".join(chunks))
        else:
            await part.release()
    if upload is None:
        raise _FileRefused("Missing required parameter: 'file'.", "file")
    if purpose != "batch":
        shown = "missing" if purpose is None else f"'{purpose}'"
        raise _FileRefused(f"The purpose must be 'batch' (got {shown}).", "purpose")
    if too_large:
        raise _FileRefused(f"The file is larger than the maximum of {limits.file_bytes} bytes.", "file")
    return upload
