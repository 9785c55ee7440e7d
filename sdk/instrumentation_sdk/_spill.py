"""The spill file: a span leaves process memory within microseconds of `report()`.

`report()` serialises the span and appends it to a memory-mapped file on a
memory-backed filesystem (/dev/shm). The kernel keeps the written pages when the
process dies, even by SIGKILL or the OOM killer, so a later process using the same WAL
path finds the spans its predecessor had not handed to the appliance or the WAL yet
and replays them. Memory-backed on purpose: the spans are raw (PII is redacted later,
on the sender thread), and the project rule is that unredacted text never touches a
disk. Where no such filesystem exists the spill is off (see `spill_directory`).

A process writes to its own segment files, `<key>-<pid>-<random>-<n>.spill` in a
per-user 0700 folder (`key`: a hash of the WAL path), each 0600 and held with an
exclusive flock for the process's lifetime. The kernel drops the lock when the process
dies, so "the lock can be taken" means "the owner is gone": that is how orphans are
found, with no pid file that could be stale or reused.

A segment: a 4 KiB header (magic, JSON meta: pid, WAL path, destination), then
records, each `[u32 length][u8 kind][u8 state][2 pad][f64 report time]` + JSON payload,
followed by a zero length that ends the walk. The record is copied with state WRITING
and only then set COMPLETE, so a process killed mid-copy leaves a torn last record
that the walk ignores (its report() had not returned: the caller cannot have counted
it as reported). The sender sets DONE once the span is durable elsewhere (202, a final
rejection, the SQLite WAL). A segment whose records are all DONE is rewound or
recycled; segments are preallocated (fallocate), so a full /dev/shm is an error when a
segment is made, never a SIGBUS on a write.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import time
import uuid
from threading import get_ident
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no spill
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("instrumentation_sdk")

MAGIC = b"LLMOSPL1"
HEADER_BYTES = 4096
SEGMENT_BYTES = 1 << 20  # a small span is ~300 bytes: ~3,000 per segment
_RECORD = struct.Struct("<IBBxxd")  # length of the whole record, kind, state, report time
RECORD_HEAD = _RECORD.size
STATE_AT = 5  # offset of the state byte in a record
WRITING, COMPLETE, DONE = 0, 1, 2
_END = b"\0\0\0\0"
_PAGE = mmap.PAGESIZE
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no page fault on the hot path
SUFFIX = ".spill"


def spill_key(wal_path: str | os.PathLike) -> str:
    """The file-name prefix shared by every process that uses this WAL path."""
    return hashlib.sha256(os.fsencode(os.path.abspath(wal_path))).hexdigest()[:16]


def _mount_type(path: Path) -> str | None:
    """The filesystem type under `path` (Linux: the longest matching mount point in /proc/mounts)."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) >= 3]
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for point, fstype in entries:
        point = point.replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def _preallocate(fd: int, size: int) -> None:
    """Reserve the segment's pages now: a full tmpfs is ENOSPC here, not SIGBUS on some later write."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)  # a filesystem without fallocate (the operator's choice of folder)


def memory_backed(path: Path) -> bool:
    return _mount_type(path) in ("tmpfs", "ramfs")


@functools.lru_cache(maxsize=16)
def spill_directory(configured: str | None) -> tuple[Path | None, str]:
    """Where this user's spill files live, or (None, why not).

    A configured folder is used as given (the operator chose it; a disk folder means raw
    prompts on disk, which they are warned about once). Otherwise only a memory-backed
    folder: /dev/shm, then $XDG_RUNTIME_DIR. Elsewhere (macOS, Windows, no tmpfs) the
    spill is off and the loss window on SIGKILL is the one of the in-memory queue.
    """
    if fcntl is None:
        return None, "this platform has no flock"
    if configured:
        return Path(configured), ""
    uid = os.getuid()
    for base, name in ((Path("/dev/shm"), f"llm-observe-{uid}"),
                       (Path(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent"), "llm-observe")):
        if base.is_dir() and os.access(base, os.W_OK) and memory_backed(base):
            return base / name, ""
    return None, "no memory-backed folder (/dev/shm or $XDG_RUNTIME_DIR on tmpfs)"


def ensure_private_dir(path: Path) -> None:
    """Create (0700) or check a folder that must be ours alone: /dev/shm is world-writable."""
    try:
        path.mkdir(mode=0o700, parents=False, exist_ok=False)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a folder")
    if st.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class Segment:
    __slots__ = ("path", "fd", "mm", "size", "pos", "records", "done", "gen")

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, size: int) -> None:
        self.path, self.fd, self.mm, self.size = path, fd, mm, size
        self.pos = HEADER_BYTES
        self.records = 0
        self.done = 0
        self.gen = 0

    def rewind(self) -> None:
        """Reuse from the start: every record is DONE, so nothing in it is needed any more."""
        self.mm[HEADER_BYTES:HEADER_BYTES + 4] = _END
        self.pos = HEADER_BYTES
        self.records = self.done = 0
        self.gen += 1

    def close(self, *, unlink: bool) -> None:
        if unlink:
            try:
                os.unlink(self.path)  # while still locked: nobody can adopt a file being removed
            except OSError:
                pass
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class SpillFull(Exception):
    pass


class SpillFile:
    """One process's spill segments. `write()` is called by any thread; the rest by the sender thread."""

    def __init__(self, directory: Path, *, key: str, meta: dict[str, Any], max_bytes: int,
                 dumps: Callable[[Any], bytes]) -> None:
        self.directory = directory
        self.key = key
        self.meta = meta
        self.max_bytes = max(max_bytes, SEGMENT_BYTES)
        self._dumps = dumps
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._prefix = f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._serial = 0
        self._active: Segment | None = None
        self._standby: Segment | None = None
        self._retired: list[Segment] = []
        self.bytes = 0  # of all live segments
        self.written = 0
        self.skipped = 0  # spans that could not be spilled (too large for the bound, not serialisable, full)
        self._closed = False
        self._inside: set[int] = set()  # threads in the lock (or about to be): see write()
        self._no_file_until = 0.0  # after a failed create (ENOSPC): not on every report()
        ensure_private_dir(directory)
        with self._held():
            self._active = self._new_segment(SEGMENT_BYTES)

    # -- segments ---------------------------------------------------------------------

    def _new_segment(self, size: int) -> Segment:
        """Under the lock (its accounting is shared with the hot path)."""
        name = self._reserve(size)
        try:
            return self._create(name, size)
        except BaseException:
            self.bytes -= size
            raise

    def _reserve(self, size: int) -> str:
        if self.bytes + size > self.max_bytes:
            raise SpillFull(f"the spill files would exceed {self.max_bytes} bytes")
        self.bytes += size
        self._serial += 1
        return f"{self._prefix}{self._serial}"

    def _create(self, name: str, size: int) -> Segment:
        """The file itself: needs no lock, it touches nothing shared."""
        # Made under a name the recovery does not look at, locked, sized and stamped, then renamed:
        # another process must never see (and adopt) a file of ours before we hold its lock.
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _preallocate(fd, size)
            try:
                mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
            except OSError:
                mm = mmap.mmap(fd, size)
            meta = json.dumps({**self.meta, "pid": os.getpid(), "created": time.time()}).encode()
            header = MAGIC + struct.pack("<I", len(meta)) + meta
            if len(header) > HEADER_BYTES - 4:
                raise ValueError("spill header too large")
            mm[:len(header)] = header
            mm[HEADER_BYTES:HEADER_BYTES + 4] = _END
            final = self.directory / f"{name}{SUFFIX}"
            os.rename(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            os.close(fd)
            raise
        return Segment(final, fd, mm, size)

    def _next(self, need: int) -> Segment | None:
        """The active segment is too full for `need` bytes: rewind it, or switch to another. Under the lock."""
        seg = self._active
        if seg is not None and seg.done == seg.records and HEADER_BYTES + need <= seg.size:
            seg.rewind()
            return seg
        self._reclaim()
        standby = self._standby
        if standby is not None and HEADER_BYTES + need <= standby.size:
            new, self._standby = standby, None
        else:
            if self._no_file_until and time.monotonic() < self._no_file_until:
                return None
            size = max(SEGMENT_BYTES, -(-(HEADER_BYTES + need) // _PAGE) * _PAGE)
            if standby is not None and self.bytes + size > self.max_bytes:
                self._standby = None  # a larger record: its room is worth more than a spare segment
                self._drop(standby)
            try:
                new = self._new_segment(size)
            except SpillFull:
                return None
            except OSError as exc:
                if not self._no_file_until:
                    log.warning("llm-observe: cannot make a spill segment in %s (%s); spans wait in memory only "
                                "until there is room", self.directory, exc)
                self._no_file_until = time.monotonic() + 1.0
                return None
            self._no_file_until = 0.0
        if seg is not None:
            self._retired.append(seg)
        self._active = new
        return new

    def _reclaim(self) -> None:
        """Retired segments whose spans are all done: one becomes the standby, the others go. Under the lock."""
        for seg in [s for s in self._retired if s.done == s.records]:
            self._retired.remove(seg)
            if self._standby is None and seg.size == SEGMENT_BYTES:
                seg.rewind()
                self._standby = seg
            else:
                self._drop(seg)

    def _drop(self, seg: Segment) -> None:
        self.bytes -= seg.size
        seg.close(unlink=True)

    # -- the hot path -----------------------------------------------------------------

    def write(self, span: dict, kind: int, when: float) -> tuple | None:
        """Append one span; its handle for mark_done(), or None when it could not be spilled."""
        try:
            payload = self._dumps(span)
        except Exception:  # noqa: BLE001 - the sender's own serialisation will say why
            self.skipped += 1
            return None
        length = RECORD_HEAD + len(payload)
        need = length + 4
        ident = get_ident()
        if ident in self._inside:
            # report() from a signal handler or a finaliser (a dropped stream reports itself) that
            # interrupted this very thread inside the lock: waiting for it would wait forever.
            self.skipped += 1
            return None
        self._inside.add(ident)
        try:
            with self._lock:
                seg = self._active
                if seg is None or seg.pos + need > seg.size:
                    if self._closed:
                        return None
                    seg = self._next(need)
                    if seg is None:
                        self.skipped += 1
                        return None
                off = seg.pos
                mm = seg.mm
                _RECORD.pack_into(mm, off, length, kind, WRITING, when)
                end = off + length
                mm[off + RECORD_HEAD:end] = payload
                mm[end:end + 4] = _END
                mm[off + STATE_AT] = COMPLETE  # last: a record is whole or ignored
                seg.pos = end
                seg.records += 1
                self.written += 1
                return seg, seg.gen, off
        finally:
            self._inside.discard(ident)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The lock, for everything but write(), which must see this thread in `_inside` meanwhile."""
        ident = get_ident()
        self._inside.add(ident)
        try:
            with self._lock:
                yield
        finally:
            self._inside.discard(ident)

    # -- the sender thread ------------------------------------------------------------

    def mark_done(self, handles: list) -> None:
        """These spans are durable elsewhere (delivered, rejected for good, in the WAL)."""
        if not handles:
            return
        with self._held():
            for seg, gen, off in handles:
                mm = seg.mm
                if seg.gen == gen and not mm.closed and mm[off + STATE_AT] == COMPLETE:
                    mm[off + STATE_AT] = DONE
                    seg.done += 1

    def collect(self) -> None:
        """Recycle or remove retired segments whose spans are all done; prepare the next segment early."""
        with self._held():
            self._reclaim()
            active = self._active
            if self._standby is not None or active is None or active.pos <= active.size // 2 or self._closed:
                return
            try:
                name = self._reserve(SEGMENT_BYTES)
            except SpillFull:
                return
        # Made off the lock: report() must not wait for a file to be created and zeroed.
        try:
            seg = self._create(name, SEGMENT_BYTES)
        except OSError:
            with self._held():
                self.bytes -= SEGMENT_BYTES
            return
        with self._held():
            if self._standby is None and not self._closed:
                self._standby = seg
                return
            self._drop(seg)

    def pending(self) -> int:
        with self._held():
            segs = [s for s in (self._active, *self._retired) if s is not None]
            return sum(s.records - s.done for s in segs)

    def segment_paths(self) -> list[Path]:
        with self._held():
            return [s.path for s in (self._active, self._standby, *self._retired) if s is not None]

    def close(self) -> bool:
        """Remove the files when every span is done (True); otherwise leave them for the next process."""
        with self._held():
            segs = [s for s in (self._active, self._standby, *self._retired) if s is not None]
            clean = all(s.done == s.records for s in segs)
            self._closed = True
            for seg in segs:
                seg.close(unlink=clean)
            self._active = self._standby = None
            self._retired = []
            self.bytes = 0
            return clean

    def abandon_in_child(self) -> None:
        """After fork: drop the parent's mappings and descriptors here without touching its files or lock."""
        for seg in (self._active, self._standby, *self._retired):
            if seg is not None:
                seg.close(unlink=False)


# -- orphans: spill files of processes that are gone --------------------------------------


class Orphan:
    """A spill segment whose owner died. Held locked while it is replayed."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap | None, meta: dict) -> None:
        self.path, self.fd, self.mm, self.meta = path, fd, mm, meta

    def records(self) -> Iterator[tuple[int, int, float, bytes]]:
        """(offset, kind, report time, payload) of every COMPLETE record, in order."""
        mm = self.mm
        if mm is None:
            return
        size = len(mm)
        pos = HEADER_BYTES
        while pos + RECORD_HEAD <= size:
            length, kind, state, when = _RECORD.unpack_from(mm, pos)
            if length < RECORD_HEAD or pos + length > size or kind > 2:
                return
            if state == COMPLETE:
                yield pos, kind, when, bytes(mm[pos + RECORD_HEAD:pos + length])
            elif state != DONE:
                return  # torn: the owner died while copying this record, and it was the last one
            pos += length

    def mark_done(self, offsets: list[int]) -> None:
        if self.mm is not None:
            for off in offsets:
                self.mm[off + STATE_AT] = DONE

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        os.close(self.fd)  # releases the lock


def _read_meta(mm: mmap.mmap) -> dict | None:
    if len(mm) < HEADER_BYTES or mm[:len(MAGIC)] != MAGIC:
        return None
    (size,) = struct.unpack_from("<I", mm, len(MAGIC))
    try:
        return json.loads(mm[len(MAGIC) + 4:len(MAGIC) + 4 + size])
    except ValueError:
        return None


def spill_files(directory: Path, key: str | None = None) -> list[Path]:
    try:
        return sorted(p for p in directory.glob(f"{key or ''}*{SUFFIX}") if p.is_file() and not p.is_symlink())
    except OSError:
        return []


def _open(path: Path, flags: int) -> int | None:
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _try_lock(fd: int, lock: int) -> bool:
    try:
        fcntl.flock(fd, lock | fcntl.LOCK_NB)
        return True
    except OSError:
        return False  # its owner lives, or someone else is replaying it


def _open_locked(path: Path, flags: int, lock: int) -> int | None:
    """A descriptor on `path` holding `lock` (taken without waiting), or None."""
    fd = _open(path, flags)
    if fd is not None and not _try_lock(fd, lock):
        os.close(fd)
        return None
    return fd


def _remove_unfinished(directory: Path, key: str | None) -> None:
    """Segments whose maker died before renaming them hold no span (the header comes first): remove them."""
    try:
        paths = list(directory.glob(f".{key or ''}*.tmp"))
    except OSError:
        return
    for path in paths:
        fd = _open_locked(path, os.O_RDONLY, fcntl.LOCK_EX)  # a maker still at it holds the lock...
        if fd is None:
            continue
        try:
            if os.fstat(fd).st_mtime < time.time() - 60:  # ...one that has just created it may not yet
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def orphans(directory: Path, key: str | None = None) -> Iterator[Orphan]:
    """Spill segments (of this WAL path's key, or all) whose owner is gone, locked, oldest first."""
    _remove_unfinished(directory, key)
    paths = spill_files(directory, key)
    paths.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0)
    for path in paths:
        fd = _open_locked(path, os.O_RDWR, fcntl.LOCK_EX)
        if fd is None:
            continue
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0 or st.st_uid != os.getuid():
                os.close(fd)  # removed by whoever replayed it just before we got the lock
                continue
            mm = mmap.mmap(fd, st.st_size) if st.st_size else None
        except (OSError, ValueError):
            os.close(fd)
            continue
        yield Orphan(path, fd, mm, (_read_meta(mm) if mm is not None else None) or {})


def describe(directory: Path, key: str | None = None) -> list[dict]:
    """For `llm-observe wal status`: every spill file with its owner's state and its pending spans."""
    out = []
    for path in spill_files(directory, key):
        entry: dict[str, Any] = {"path": str(path), "size": 0, "alive": True, "pending": None, "meta": {}}
        fd = _open(path, os.O_RDONLY)
        if fd is None:
            continue
        try:
            st = os.fstat(fd)
            entry["size"] = st.st_size
            entry["alive"] = not _try_lock(fd, fcntl.LOCK_SH)
            if st.st_size:
                with mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ) as mm:
                    entry["meta"] = _read_meta(mm) or {}
                    entry["pending"] = sum(1 for _ in Orphan(path, fd, mm, {}).records())
        finally:
            os.close(fd)
        out.append(entry)
    return out
