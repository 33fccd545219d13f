"""A bounded local append-only file of records Kafka has not acknowledged yet.

Layout: records back to back, each `[u32 length][u32 CRC-32 of payload][payload]` (big
endian); a side file `<name>.cursor` holds the byte offset up to which records are
published. Opening the spool checks every unpublished record and cuts the file at the
first one whose header or checksum does not hold: a write torn by a crash loses only that
record, never the ones before it. Publishing is at least once: a crash between Kafka's
acknowledgement and the cursor update re-sends those records, and consumers dedup by id.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from pathlib import Path

from tuneloop.common.durable import write_atomic

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 16 << 20


class SpoolBusyError(RuntimeError):
    """Another process holds the spool."""


class Spool:
    """Records in, oldest first out; one writer and reader (the publisher thread).

    `pending` and `size` may be read from any thread.
    """

    def __init__(self, path: Path, max_bytes: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cursor_path = self.path.with_name(self.path.name + ".cursor")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Two writers would interleave records and fight over the cursor.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            os.close(self._lock_fd)
            raise SpoolBusyError(f"{self.path} is in use by another process; give each replica its own spool") from None
        self.size = os.fstat(self._fd).st_size
        self._cursor = min(self._read_cursor(), self.size)
        self.pending = 0
        self._recover()

    @property
    def full(self) -> bool:
        return self.size >= self.max_bytes

    def _read_cursor(self) -> int:
        try:
            return int(self._cursor_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _write_cursor(self, offset: int) -> None:
        self._cursor = offset
        write_atomic(self._cursor_path, f"{offset}\n".encode())

    def _recover(self) -> None:
        offset, count = self._cursor, 0
        while True:
            payload = self._record_at(offset)
            if payload is None:
                break
            offset += _HEADER.size + len(payload)
            count += 1
        if offset < self.size:
            log.warning(
                "completion spool: dropping a torn or corrupt tail",
                extra={"fields": {"path": str(self.path), "offset": offset, "bytes": self.size - offset}},
            )
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
            self.size = offset
        self.pending = count

    def _record_at(self, offset: int) -> bytes | None:
        """The valid record starting at `offset`, or None (end of file, torn or corrupt)."""
        header = os.pread(self._fd, _HEADER.size, offset)
        if len(header) < _HEADER.size:
            return None
        length, crc = _HEADER.unpack(header)
        if length > MAX_RECORD_BYTES:
            return None
        payload = os.pread(self._fd, length, offset + _HEADER.size)
        if len(payload) < length or zlib.crc32(payload) != crc:
            return None
        return payload

    def append(self, payloads: list[bytes]) -> None:
        """Add records at the end (durably when fsync is on). Never refuses: see `full`."""
        if not payloads:
            return
        data = b"".join(_HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads)
        os.write(self._fd, data)
        if self._fsync:
            os.fsync(self._fd)
        self.size += len(data)
        self.pending += len(payloads)

    def read(self, max_records: int) -> tuple[list[bytes], int]:
        """Up to `max_records` oldest unpublished records and the offset just after them."""
        out: list[bytes] = []
        offset = self._cursor
        while len(out) < max_records:
            payload = self._record_at(offset)
            if payload is None:
                break
            out.append(payload)
            offset += _HEADER.size + len(payload)
        return out, offset

    def commit(self, offset: int, records: int) -> None:
        """Mark the records before `offset` (`records` of them) as published."""
        self.pending -= records
        if offset >= self.size:
            # Everything is published: start over with an empty file. A crash between the two
            # steps leaves a cursor past the end, which opening clamps to the (empty) end.
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self.size = 0
            self._write_cursor(0)
        elif offset >= self.max_bytes // 2:
            self._compact(offset)
        else:
            self._write_cursor(offset)

    def _compact(self, offset: int) -> None:
        """Drop the published head so the file stays near the bound while Kafka is flaky."""
        tail = os.pread(self._fd, self.size - offset, offset)
        # Cursor first: a crash before the file is replaced re-sends the published head
        # (duplicates, which consumers drop) rather than skipping unpublished records.
        self._write_cursor(0)
        write_atomic(self.path, tail)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self.size = len(tail)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._lock_fd)  # releases the lock
