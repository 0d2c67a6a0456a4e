"""Shared-memory arenas: large arrays cross between the front ends and the model process without the socket.

A message's large arrays (SHM_MIN bytes or more) are written into an arena that the sender owns, and only their
place crosses over the connection (``service.messages.Arr`` with frame ARENA); the receiver maps the sender's arena
once, by the name the sender gave in its ``Hello`` or ``Info``, and reads them in place. Through the socket each
array would be copied into the kernel and out again, which counts as the model process's CPU.

Each side owns one arena per peer for what it sends, and frees a slot when the receiver is done with it: a front
end frees a request's input when the request's wait ends, the model process frees an answer when the front end
says it is done with it (``freed`` in its next message: the last reference to its view went). An arena that is
full never blocks or fails a request: that array crosses as a frame, as every array did before. The owner unlinks
its arena at stop; one left by a process that crashed is unlinked by multiprocessing's resource tracker, which the
supervisor's spawned processes share and which unlinks what is still registered when the last of them exits.

This module knows nothing of the engine or the front end: both import it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger("mha_serve.shm")

# The arena each side owns per peer (MHA_SHM_ARENA_MIB, declared with the other settings in service/settings.py and
# read here from the environment every process of the service shares): at 128 KiB a request, 16 MiB holds 128
# requests in flight, and what does not fit crosses as frames. Four arenas (two front ends) fit a container's
# default 64 MB /dev/shm. 0 turns the crossing off: every array goes as a frame.
ARENA_MIB_DEFAULT = 16
ARENA_BYTES = int(os.environ.get("MHA_SHM_ARENA_MIB", str(ARENA_MIB_DEFAULT))) << 20
# An arena that is full grows by a segment of ARENA_BYTES at a time, up to MHA_SHM_ARENA_MAX_MIB in all, while /dev/shm
# has room (a segment's pages are reserved when it is made). 1 MiB requests (8 rows of [128,512] bf16) at 256 in
# flight over 2 front ends overflowed 16 MiB: every array crossed the socket, and the model process spent 957 us a
# request against 195 with them in the arenas (2026-12-07, bench/procs.py's no-op set-up, wrk c=256 against c=32).
ARENA_MAX_MIB_DEFAULT = 128
ARENA_MAX_BYTES = int(os.environ.get("MHA_SHM_ARENA_MAX_MIB", str(ARENA_MAX_MIB_DEFAULT))) << 20
# A segment the arena grew by is given back (unmapped and unlinked: its pages return to /dev/shm) once it has been
# the last and held no slot at every ``trim`` for this long: a burst's room is not kept for good, and a load that
# needs it steadily keeps it (a segment made again costs a few ms: its reservation, its first writes).
TRIM_AFTER_S = 30.0
# Arrays of this size or more cross through the arena. Smaller ones share one packed frame a message
# (service.messages._Packer), which costs less than a slot and its freeing.
SHM_MIN = 1 << 16
ALIGN = 64  # each slot starts on a cache line
SHM_DIR = "/dev/shm"
PREFIX_ENV = "MHA_RUN_DIR"  # (service.settings.RUN_DIR_ENV) the supervisor's run directory names the arenas

_serial = itertools.count()


def arena_name() -> str:
    """A name nobody else uses, led by the run's directory name (``mha-serve-XXXXXXXX``), so that an operator can
    tell whose entry in /dev/shm is whose."""
    run = os.path.basename(os.environ.get(PREFIX_ENV, "")) or "mha-serve"
    return f"{run}-{os.getpid()}-{next(_serial)}"


def unlink_run(run_dir: str) -> int:
    """Unlink what is left of a run's arenas (named after its directory): those of processes killed with their
    resource tracker. The supervisor calls it as it exits; returns how many it found."""
    prefix = os.path.basename(run_dir.rstrip("/")) + "-"
    if not prefix.strip("-") or not os.path.isdir(SHM_DIR):
        return 0
    found = 0
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
                found += 1
    return found


def _reserve(name: str, size: int) -> None:
    """Reserve the pages of the shared memory ``name`` now (Linux: its file in /dev/shm), so that a /dev/shm too small
    (a container's is 64 MB unless told otherwise) fails here, where the caller falls back to frames, not with a
    SIGBUS at the first write past its room. Opened again by its path: SharedMemory keeps its own descriptor
    private."""
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return  # (no /dev/shm: its pages come as they are written)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


class Arena:
    """The sender's side: shared-memory segments and a first-fit allocator over them (OSError if the first cannot be
    had).

    Segment k (named ``<name>.k`` after the first) holds the offsets k * size to (k + 1) * size: a slot never spans
    two, and its place crosses as the segment's frame (``service.messages.ARENA`` - k) and its offset there. A put that
    finds no room makes the next segment, up to ``max_size`` in all; when one cannot be made (/dev/shm is full) the
    arena stops growing, and what does not fit crosses as frames. A grown segment that held no slot for TRIM_AFTER_S
    goes back (``trim``, which its owner calls now and then).

    The free extents are kept sorted by offset and merged with their neighbours in the same segment when a slot comes
    back, so the arena does not fragment under a steady mix of sizes. A few hundred slots at most are live at once: a
    scan of the free list is short.

    A slot may also be lent before it is sent (``lend``: an array to write into in place, from any thread, such as a
    GPU runner's download, which then needs no copy of its own); ``put`` of that array sends it where it lies. A lent
    array dropped unsent gives its slot back. ``on_segment`` is called with each segment's memoryview as it is made,
    and may return a callable that is called before the segment goes (a GPU's page-locking of it, and its undoing)."""

    def __init__(
        self,
        size: int | None = None,
        max_size: int | None = None,
        on_segment: Callable[[memoryview], Callable[[], object] | None] | None = None,
        threaded: bool = False,
    ) -> None:
        # (read now: tests make it small; an arena made with a size of its own does not grow unless told to)
        size = self.size = size or ARENA_BYTES
        if max_size is None:
            max_size = ARENA_MAX_BYTES if size == ARENA_BYTES else size
        self.max_segments = max(1, max_size // size)
        self._segments: list[shared_memory.SharedMemory] = []
        self._bufs: list[memoryview] = []  # each segment's own memoryview: assigning to a slice of it is the copy
        self._on_segment = on_segment
        self._undo: list[Callable[[], object] | None] = []  # per segment: what on_segment returned
        # Lent slots (``lend``): id of the lent array -> (its offset, the finaliser that gives the slot back if it is
        # dropped unsent). A finaliser may run in any thread, inside another call of this arena's: it only queues the
        # offset in _dropped, which the next _take or free gives back.
        self._lent: dict[int, tuple[int, weakref.finalize]] = {}
        self._dropped: list[int] = []
        # ``threaded``: slots are lent in another thread than the one that puts and frees (a GPU runner's forward
        # thread), so taking and freeing hold a lock; not otherwise, where it would add 0.5 us to a put and its free
        # (1.1 us against 0.6 for a take and a free, timeit, this VM).
        self._lock = threading.Lock() if threaded else contextlib.nullcontext()
        if threaded:
            self._take = self._take_guarded
            self.free = self._free_guarded
        self._late_undo: list[Callable[[], object]] = []  # (close, while a slot was lent)
        self.name = ""
        self.name = self._add_segment()
        self._starts: list[int] = [0]  # free extents: their offsets, sorted
        self._lengths: list[int] = [size]  # and their lengths
        self._taken: dict[int, int] = {}  # offset -> length of each live slot
        self.misses = 0  # arrays it had no room for (they crossed as frames), until its owner takes the count
        # How many times segments were given back (``trim``): every message says so, and a receiver that sees it
        # change maps the segments past the first again, by their names, which a later growth makes anew.
        self.shrinks = 0
        self._idle_since: float | None = None  # since when the last segment (past the first) was seen empty

    @property
    def segments(self) -> int:
        """How many segments it has: every message it sends says so, and the receiver maps the ones it lacks."""
        return len(self._segments)

    @property
    def page_locked(self) -> bool:
        """Every segment it has was set up by ``on_segment`` (False without one)."""
        return self._on_segment is not None and None not in self._undo

    def _add_segment(self) -> str:
        k = len(self._segments)
        shm = shared_memory.SharedMemory(name=f"{self.name}.{k}" if k else arena_name(), create=True, size=self.size)
        try:
            _reserve(shm.name, self.size)
        except OSError:
            shm.close()
            shm.unlink()
            raise
        undo = None
        if self._on_segment is not None:
            try:
                undo = self._on_segment(shm.buf)
            except Exception:
                _let_go(shm)
                raise
        self._segments.append(shm)
        self._bufs.append(shm.buf)
        self._undo.append(undo)
        return shm.name

    def _grow(self) -> bool:
        """One more segment at the end of the free list, if the cap and /dev/shm allow it."""
        if len(self._segments) >= self.max_segments:
            return False
        try:
            self._add_segment()
        except OSError:
            self.max_segments = len(self._segments)  # (no room in /dev/shm: not tried again)
            return False
        self._starts.append((len(self._segments) - 1) * self.size)
        self._lengths.append(self.size)
        return True

    def trim(self, now: float | None = None) -> int:
        """Give back the last segment (past the first) once it has held no slot at every call for TRIM_AFTER_S; its
        owner calls it now and then (a front end at each heartbeat, the model process at each of its pings).
        Returns how many segments went."""
        if _HELD:
            _close_held()
        if not self._last_empty():  # (or the first and only one)
            self._idle_since = None
            return 0
        now = time.monotonic() if now is None else now
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < TRIM_AFTER_S:
            return 0
        gone = 0
        with self._lock:
            while self._last_empty():  # (and any empty below it)
                del self._starts[-1], self._lengths[-1]
                self._bufs.pop()
                _let_go(self._segments.pop(), self._undo.pop())
                gone += 1
        self.shrinks += 1
        self._idle_since = None
        return gone

    def _last_empty(self) -> bool:
        """Whether the last segment, past the first, holds no slot: its whole extent is the last free one."""
        k, starts = len(self._segments), self._starts
        return k > 1 and bool(starts) and starts[-1] == (k - 1) * self.size and self._lengths[-1] == self.size

    @property
    def used(self) -> int:
        """Bytes in live slots (tests check that every slot came back)."""
        return sum(self._taken.values())

    def put(self, a: np.ndarray) -> int | None:
        """Copy ``a`` (C-contiguous) into a free slot and return its offset (its segment's number times ``size``,
        plus its offset there), or None when no extent fits and no segment can be added (counted in ``misses``). An
        array this arena lent (``lend``) is not copied: its slot's offset, which stays taken until it is freed."""
        if self._lent:
            lent = self._lent.pop(id(a), None)
            if lent is not None and lent[1].detach() is not None:  # (None: it died, and its id is another's now)
                if self._late_undo and not self._lent:  # (sent after close: nothing writes a slot any more)
                    self._run_late_undo()
                return lent[0]
        n = a.nbytes
        offset = self._take(n)
        if offset is None:
            return None
        segment, at = divmod(offset, self.size)
        # A memoryview's slice assignment is a memcpy: a numpy slice's went through its generic assignment, and a put
        # and its free took 3.4 us instead of 1.8 for a 128 KiB answer (timeit, this VM).
        self._bufs[segment][at : at + n] = memoryview(a).cast("B")
        return offset

    def put_rows(self, arrays: list[np.ndarray]) -> int | None:
        """``put`` of the arrays one after the other in one slot (C-contiguous each): their concatenation, made in
        place with one copy of each. Its offset, or None (counted in ``misses``)."""
        offset = self._take(sum(a.nbytes for a in arrays))
        if offset is None:
            return None
        segment, at = divmod(offset, self.size)
        buf = self._bufs[segment]
        for a in arrays:
            n = a.nbytes
            buf[at : at + n] = memoryview(a).cast("B")
            at += n
        return offset

    def lend(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A slot as a writable array of ``shape`` and ``dtype``, to fill in place and then ``put`` (which sends it
        without a copy); dropped unsent, it gives its slot back. None when there is no room, or for fewer than SHM_MIN
        bytes (which cross packed in their message, not through the arena). Any thread may call it."""
        dtype = np.dtype(dtype)
        n = dtype.itemsize * math.prod(shape)
        if n < SHM_MIN:
            return None
        offset = self._take(n)
        if offset is None:
            return None
        segment, at = divmod(offset, self.size)
        a = np.frombuffer(self._bufs[segment], dtype, n // dtype.itemsize, at).reshape(shape)
        key = id(a)
        self._lent[key] = (offset, weakref.finalize(a, self._drop, key, offset))
        return a

    def _drop(self, key: int, offset: int) -> None:
        """A lent array went unsent: its slot comes back with the next _take or free (see ``_lent``)."""
        self._lent.pop(key, None)
        self._dropped.append(offset)
        if self._late_undo and not self._lent:  # closed while it was lent: what close left undone, now
            self._run_late_undo()

    def _run_late_undo(self) -> None:
        late, self._late_undo = self._late_undo, []
        for undo in late:
            _undo(undo)

    def _take_guarded(self, n: int) -> int | None:
        with self._lock:
            return Arena._take(self, n)

    def _give_back_dropped(self) -> None:
        dropped = self._dropped
        while dropped:
            self._release(dropped.pop())

    def _take(self, n: int) -> int | None:
        """A slot of ``n`` bytes (rounded up to ALIGN): the first free extent that fits, in a new segment if none
        does and one can be made; None when neither."""
        if self._dropped:
            self._give_back_dropped()
        need = -(-n // ALIGN) * ALIGN
        starts, lengths = self._starts, self._lengths
        i = 0
        for length in lengths:  # (a plain loop: a generator a put cost as much as the scan)
            if length >= need:
                break
            i += 1
        else:
            if need > self.size or not self._grow():
                self.misses += 1
                return None
            length = lengths[i]  # (the new segment's extent: the last)
        offset = starts[i]
        if offset >= (len(self._segments) - 1) * self.size:  # (in the last segment: not idle, whatever trim saw)
            self._idle_since = None
        if length == need:
            del starts[i], lengths[i]
        else:
            starts[i] += need
            lengths[i] -= need
        self._taken[offset] = need
        return offset

    def view(self, offset: int, nbytes: int) -> memoryview:
        """The bytes of the slot at ``offset`` (tests and benchmarks read back what was put)."""
        segment, at = divmod(offset, self.size)
        return self._bufs[segment][at : at + nbytes]

    def free(self, offset: int) -> None:
        """A slot the receiver is done with; an offset that is not live (freed twice, or never) is ignored."""
        if self._dropped:
            self._give_back_dropped()
        self._release(offset)

    def _free_guarded(self, offset: int) -> None:
        with self._lock:
            Arena.free(self, offset)

    def _release(self, offset: int) -> None:
        need = self._taken.pop(offset, None)
        if need is None:
            return
        starts, lengths, size = self._starts, self._lengths, self.size
        i = bisect.bisect(starts, offset)
        end = offset + need
        if i < len(starts) and end == starts[i] and end % size:  # merge with the extent after it, in its segment
            need += lengths[i]
            del starts[i], lengths[i]
        if i and offset % size and starts[i - 1] + lengths[i - 1] == offset:  # and with the one before it
            lengths[i - 1] += need
        else:
            starts.insert(i, offset)
            lengths.insert(i, need)

    def take_misses(self) -> int:
        """The arrays it had no room for since the last call (the owner's metric)."""
        n, self.misses = self.misses, 0
        return n

    def close(self) -> None:
        """Unmap and unlink: the names go at once; a receiver's mapping lasts until it closes its own. While a slot is
        lent (a download may still be writing it), the segments' setup is undone when the last lent array goes."""
        self._bufs = []
        undos = self._undo
        if self._lent and any(u is not None for u in undos):
            self._late_undo = [u for u in undos if u is not None]
            undos = [None] * len(undos)
        for shm, undo in zip(self._segments, undos, strict=True):
            _let_go(shm, undo)


def _let_go(shm: shared_memory.SharedMemory, undo: Callable[[], object] | None = None) -> None:
    """Unlink a segment of one's own arena and unmap it (a view still held: the mapping goes with it); ``undo``
    first (what ``on_segment`` returned for it)."""
    if undo is not None:
        _undo(undo)
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()
    try:
        shm.close()
    except BufferError:  # (an array lent from it still lives: closed by a later trim, or its __del__ would complain)
        _HELD.append(shm)


_HELD: list[shared_memory.SharedMemory] = []  # segments let go while an array over them lived: closed once it is gone


def _close_held() -> None:
    for shm in list(_HELD):
        try:
            shm.close()
        except BufferError:
            continue
        _HELD.remove(shm)


def _undo(undo: Callable[[], object]) -> None:
    try:
        undo()
    except Exception:  # (at stop or trim: the segment goes whatever undoing its page-locking said)
        log.exception("undoing the setup of an arena segment failed")


_KEPT: list = []  # segments mapped as SharedMemory (no /dev/shm) that a receiver let go: see Mapped._unmap


class Mapped:
    """The receiver's side: a peer's arena, mapped once by its name, read-only; its arrays are read in place.

    Mapped as a plain file of /dev/shm where there is one (Linux: what shm_open opens), not as a SharedMemory: a
    mapping whose arrays outlive ``close`` (a request still queued or computing when its front end went away) is
    unmapped with the last of them (``_unmap``), and the receiver does not register the sender's name with its own
    resource tracker, which would unlink it when the receiver exits.

    ``tail`` is what a message's arena frames are (``service.messages._buffers``): the segments, last to first, so
    that segment k is the frame ``ARENA - k`` (-1 - k). A message says how many segments its sender has, and how
    many times it gave some back (``Arena.trim``); ``grow`` maps the ones not mapped yet before it is read, and
    those past the first again after a trim (a segment made again under the same name is another)."""

    def __init__(
        self,
        name: str,
        on_segment: Callable[[memoryview], Callable[[], object] | None] | None = None,
        retire: Callable[[Callable[[], None], list], object] | None = None,
    ) -> None:
        self.name = name
        # ``on_segment``: each segment's memoryview as it is mapped (a GPU's page-locking), which returns its undoing.
        # ``retire``: given what undoes the setup of segments let go, and their mappings (to hold until it ran), it runs
        # it when nothing reads them any more (the model process: once no batch is uploading). Without it, at once.
        self._on_segment, self._retire = on_segment, retire
        self._maps: list = []
        self._undo: list[Callable[[], object] | None] = []  # per mapping, as _maps
        self.buf = self._map_segment(name)  # the first segment
        self.tail: list[memoryview] = [self.buf]
        self.shrinks = 0

    @property
    def page_locked(self) -> bool:
        """Every segment mapped was set up by ``on_segment`` (False without one)."""
        return self._on_segment is not None and None not in self._undo

    def _map_segment(self, name: str) -> memoryview:
        if os.path.isdir(SHM_DIR):
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps.append(m)
            return self._set_up(memoryview(m))
        shm = shared_memory.SharedMemory(name=name)
        self._maps.append(shm)
        return self._set_up(shm.buf.toreadonly())  # what arrives is read, never written: a slot is its sender's

    def _set_up(self, buf: memoryview) -> memoryview:
        undo = None
        if self._on_segment is not None:
            try:
                undo = self._on_segment(buf)
            except Exception:  # (the mapping serves as it is: its arrays are copied, not read by a device)
                log.exception("setting up a mapped arena segment failed")
        self._undo.append(undo)
        return buf

    def grow(self, segments: int, shrinks: int = 0) -> None:
        """Map the sender's segments up to ``segments``, those not mapped yet, after unmapping those past the first
        if the sender gave segments back since (``shrinks``). OSError if one cannot be mapped: the message is not
        read."""
        if shrinks != self.shrinks:
            self.shrinks = shrinks
            self._let_go(self.tail[:-1], self._maps[1:], self._undo[1:])
            self.tail, self._maps, self._undo = self.tail[-1:], self._maps[:1], self._undo[:1]
        tail = self.tail
        while len(tail) < segments:
            self.tail = tail = [self._map_segment(f"{self.name}.{len(tail)}"), *tail]

    @staticmethod
    def _unmap(bufs: list[memoryview], maps: list) -> None:
        """Let segments go (``bufs`` last to first, ``maps`` first to last): each is unmapped when the last array
        read from it goes, at once if none is held.

        Not ``mmap.close()``: an array made over a slice of the mapping (``np.ndarray(shape, dtype, buf, offset)``,
        as ``service.messages._array`` makes a request's x) holds a reference to the mmap, not an export of its
        buffer, so the close would succeed under it and a later read of it (a batch computing when its front end
        went away) would fault the process. Dropped, the mmap is unmapped by its own deallocation, after them.
        Where there is no /dev/shm, a segment is a SharedMemory, whose finaliser closes it whatever is held: those
        are kept until the process exits."""
        for buf, m in zip(reversed(bufs), maps, strict=True):
            with contextlib.suppress(BufferError):  # (arrays that export it, np.frombuffer's: it goes after them)
                buf.release()
            if not isinstance(m, mmap.mmap):
                _KEPT.append(m)

    def _let_go(self, bufs: list[memoryview], maps: list, undos: list) -> None:
        """``_unmap``, after the segments' setup is undone, or handed to ``retire`` with the mappings it must hold."""
        undos = [u for u in undos if u is not None]
        if undos:

            def undo_all() -> None:
                for undo in undos:
                    _undo(undo)

            if self._retire is not None:
                self._retire(undo_all, list(maps))
            else:
                undo_all()
        self._unmap(bufs, maps)

    def close(self) -> None:
        self._let_go(self.tail, self._maps, self._undo)
        self.tail, self._maps, self._undo, self.buf = [], [], [], None
