"""The TensorBoard event file behind the collector: torch's SummaryWriter, opened so a resumed
run's file is read after the folder's older ones, and kept writing through a full or
read-only disk by switching to a fresh file once the folder takes writes again."""

from __future__ import annotations

import os
import struct
import time

try:  # C CRC-32C: tensorboard's own is a Python loop over every byte, holding the GIL
    from google_crc32c import value as _crc32c
except ImportError:  # pragma: no cover - a dependency; tensorboard's stays correct
    _crc32c = None


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C TFRecord framing puts after a record's length and data."""
    if _crc32c is None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as py

        return py(data)
    c = _crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """``data`` as one TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


def _event_file(writer) -> str | None:
    # tensorboard's EventFileWriter keeps its path in a private attribute; absent, skip the check
    ev = getattr(writer._get_file_writer(), "event_writer", None)
    return getattr(ev, "_file_name", None)


def _read_out_of_order(path: str) -> bool:
    """True when TensorBoard, reading event files in name order, would read ``path`` before
    an older file of the same folder (``...<second>.<host>.<pid>.10`` sorts before ``.9``)."""
    folder, base = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n > base for n in names if n.startswith("events.out.tfevents.") and n != base)


def open_writer(logdir: str, **kwargs):
    """A SummaryWriter whose event file TensorBoard reads after the folder's earlier ones, so
    a resumed run's steps never come first (TensorBoard would purge the older steps)."""
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

    writer = SummaryWriter(log_dir=logdir, **kwargs)
    path = _event_file(writer)
    if path and _read_out_of_order(path):  # rare: same second, counter gained a digit
        writer.close()
        os.remove(path)
        now = time.time()
        time.sleep(int(now) + 1 - now + 1e-3)  # the next second sorts after every older file
        writer = SummaryWriter(log_dir=logdir, **kwargs)
    return writer


class _Records:
    """Stands in for the RecordWriter that tensorboard's writer thread writes through. It
    frames records with a C CRC, and the first failed write (ENOSPC, EROFS, a deleted folder)
    is kept in ``error`` instead of killing that thread with a traceback; every later record
    is dropped (``dropped``): the file may end in a torn record, so nothing more goes in."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._file = getattr(inner, "_writer", None)  # the GFile the RecordWriter frames into
        self.error: BaseException | None = None
        self.dropped = 0

    def write(self, data: bytes) -> None:
        if self.error is None:
            try:
                if self._file is None:
                    self.inner.write(data)
                else:
                    self._file.write(frame(data))
                return
            except Exception as exc:  # the thread must live: its death is a traceback
                self.error = exc
        self.dropped += 1

    def flush(self) -> None:
        if self.error is None:
            try:
                self.inner.flush()
            except Exception as exc:
                self.error = exc

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception as exc:
            self.error = self.error or exc


def _guard(writer) -> _Records | None:
    """Put a ``_Records`` between ``writer``'s thread and its file; None where tensorboard's
    writer has another shape (then its own error path stays)."""
    try:
        aw = writer._get_file_writer().event_writer._async_writer
        records = _Records(aw._writer)
        aw._writer = records
        aw._worker._record_writer = records
    except AttributeError:
        return None
    return records


def _takes_writes(folder: str) -> bool:
    """True when ``folder`` takes a 64 KiB file now (a full disk, a read-only mount: False)."""
    path = os.path.join(folder, f".optprobe-write-check-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)  # a folder deleted mid-run is made again
        with open(path, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
    finally:
        try:
            os.remove(path)
        except OSError:
            pass


class GuardedWriter:
    """A SummaryWriter for ``logdir`` whose write failures are counted, never fatal: after a
    failed write the file is left as it is and, at most every ``retry_secs``, a new event
    file is opened once the folder takes writes again (``reopened`` counts them).
    ``check()`` raises OSError while records are being lost, so the caller's fault counter
    sees each lost batch."""

    def __init__(self, logdir: str, retry_secs: float = 5.0, **kwargs) -> None:
        self.logdir = logdir
        self.retry_secs = retry_secs
        self._kwargs = kwargs
        self.writer = open_writer(logdir, **kwargs)
        self._records = _guard(self.writer)
        self._retry_at = 0.0
        self.reopened = 0
        self.dropped = 0  # records lost in files given up on

    @property
    def file_writer(self):
        return self.writer._get_file_writer()

    def check(self) -> bool:
        """True when the writer is healthy. After a failure: reopens when due and the folder
        takes writes (True: the caller should write its state again, e.g. the layout),
        else raises OSError naming the failure."""
        r = self._records
        if r is None or r.error is None:
            return False
        now = time.monotonic()
        if now >= self._retry_at:
            self._retry_at = now + self.retry_secs
            if _takes_writes(self.logdir) and self._reopen():
                return True
        raise OSError(f"TensorBoard event file in {self.logdir} cannot be written "
                      f"({r.error}); {r.dropped} records dropped, a new file is tried every "
                      f"{self.retry_secs:g} s")

    def _reopen(self) -> bool:
        old, records = self.writer, self._records
        try:
            old.close()  # the guard swallows its failed flush
        except Exception:
            pass
        try:
            writer = open_writer(self.logdir, **self._kwargs)
        except Exception:
            return False
        self.dropped += records.dropped
        self.writer, self._records = writer, _guard(writer)
        self.reopened += 1
        return True

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
