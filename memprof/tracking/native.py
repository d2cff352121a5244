"""Allocator events recorded in C++, with no Python per allocation (``alloc_events.cpp``).

PyTorch's allocators report every allocation and free to a reporter in a thread-local slot; that is how
``torch.profiler(profile_memory=True)`` sees them. :class:`AllocationRecorder` puts a small C++ reporter in
that slot, which appends ``(pointer, bytes, device)`` per report: on the GPT-2-small step of
``experiments/floors.py`` it cost nothing measurable (0.999× ± 0.005, 4,632 events a step), where an empty
dispatch mode around forward and backward cost 1.016× and torch.profiler 1.029× (results/floors.json).

The C++ file is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++`` or ``g++``)
against the installed torch's headers, in a few seconds, and cached per torch build under
``$MEMPROF_CACHE_DIR`` (default ``$XDG_CACHE_HOME/memprof`` or ``~/.cache/memprof``). Where that fails (no
compiler, no headers, not Linux/macOS) or ``MEMPROF_NATIVE=0`` is set, :func:`available` is False and
callers use their pure-Python path; :func:`unavailable_reason` says why.

Used by the tracker to take backward on the host from the allocator instead of dispatching its ops
(:meth:`.ledger.Ledger.start_recording`), and by :mod:`.scratch` to measure an op's internal working memory
(about a microsecond, where a profiler session costs a millisecond and its first one a second). The
recorder sits in the slot as a disabled profiler state: torch sees no profiler running, and
torch.profiler cannot start on the thread while it records. Known limits: only the thread that starts a
recorder is seen, and autograd's worker threads that inherit its state (collective worker threads are
not); a recorder cannot start while torch.profiler runs on the thread, as both need the same slot; frees
of memory allocated before the recorder started are not reported by the CPU allocator (it keeps sizes only of
what it allocated while a reporter was listening, as with torch.profiler).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import MemprofError

__all__ = ["AllocationRecorder", "NativeUnavailable", "available", "unavailable_reason", "build"]

_SOURCE = Path(__file__).with_name("alloc_events.cpp")
_lib = None
_reason: str | None = None
_tried = False


class NativeUnavailable(MemprofError):
    """The C++ allocation recorder cannot be built, loaded or started here (the reason is in the message)."""


def _cache_dir() -> Path:
    if os.environ.get("MEMPROF_CACHE_DIR"):
        return Path(os.environ["MEMPROF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memprof"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(out_dir: Path | None = None, source: Path = _SOURCE, libs: tuple[str, ...] = ("c10", "torch_cpu")) -> Path:
    """Compile ``alloc_events.cpp`` (or another ``source`` linked with torch's ``libs``) for the installed
    torch, or find it already built; the library's path.

    Raises :class:`NativeUnavailable` with the compiler's message when it cannot be built.
    """
    if sys.platform not in ("linux", "darwin"):
        raise NativeUnavailable(f"no C++ allocation recorder on {sys.platform}")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    torch_dir = Path(torch.__file__).parent
    include, lib_dir = torch_dir / "include", torch_dir / "lib"
    if not (include / "c10" / "core" / "Allocator.h").exists():
        raise NativeUnavailable(f"this torch build has no C++ headers ({include})")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    source = Path(source)
    key = hashlib.sha256(b"\0".join([source.read_bytes(), torch.__version__.encode(), str(torch_dir).encode(),
                                     cxx.encode(), str(abi).encode(), " ".join(libs).encode()])).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else _cache_dir()
    target = out_dir / f"memprof_{source.stem}-{key}.so"
    if target.exists():
        return target
    # Built under a temporary name and renamed: processes building at once (torchrun ranks) never load a
    # half-written library.
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    except OSError as e:
        raise NativeUnavailable(f"cannot write the compiled library to {out_dir} ({e.strerror}); set "
                                "MEMPROF_CACHE_DIR to a writable folder") from None
    os.close(fd)
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}",
           str(source), f"-L{lib_dir}", *(f"-l{lib}" for lib in libs), f"-Wl,-rpath,{lib_dir}", "-o", tmp]
    if sys.platform == "darwin":
        cmd.insert(1, "-undefined")
        cmd.insert(2, "dynamic_lookup")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise NativeUnavailable(f"could not run the C++ compiler {cxx!r}: {e}") from None
    if done.returncode != 0:
        os.unlink(tmp)
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise NativeUnavailable(f"building {source.name} with {cxx!r} failed: {last}")
    os.replace(tmp, target)
    return target


def _load():
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MEMPROF_NATIVE", "1") == "0":
        _reason = "turned off by MEMPROF_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except NativeUnavailable as e:
        _reason = str(e)
        return None
    except OSError as e:
        _reason = f"could not load the C++ allocation recorder: {e}"
        return None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.memprof_rec_start.restype = vp
    lib.memprof_rec_start.argtypes = []
    lib.memprof_rec_stop.restype = ctypes.c_int
    lib.memprof_rec_stop.argtypes = [vp]
    lib.memprof_rec_count.restype = i64
    lib.memprof_rec_count.argtypes = [vp]
    lib.memprof_rec_count_address.restype = vp
    lib.memprof_rec_count_address.argtypes = [vp]
    lib.memprof_rec_read.restype = i64
    lib.memprof_rec_read.argtypes = [vp, i64, i64, ctypes.POINTER(i64)]
    lib.memprof_rec_peak.restype = None
    lib.memprof_rec_peak.argtypes = [vp, ctypes.POINTER(i64), ctypes.POINTER(i64)]
    lib.memprof_rec_free.restype = None
    lib.memprof_rec_free.argtypes = [vp]
    _lib = lib
    return lib


def available() -> bool:
    """Whether the C++ recorder can be used in this process (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    _load()
    return _reason


def _reset_for_tests() -> None:
    global _lib, _reason, _tried
    _lib, _reason, _tried = None, None, False
    _LOG_FLAG.clear()


_DEVICE_TYPES = {0: "cpu", 1: "cuda", 12: "xpu", 13: "mps"}  # c10::DeviceType values


def device_name(code: int) -> str:
    """``'cpu'``, ``'cuda:0'``: the device a recorded event's code stands for (type * 65536 + index + 1)."""
    dtype, index = divmod(code, 65536)
    index -= 1
    name = _DEVICE_TYPES.get(dtype) or f"device{dtype}"
    return name if index < 0 else f"{name}:{index}"


_LOG_FLAG: list = []  # the looked-up flag (or None), once


def log_level_flag():
    """c10's log level (``FLAGS_caffe2_log_level``) as a ctypes int, or None where the recorder is unavailable
    or torch logs through glog (its own flag, left alone)."""
    if not _LOG_FLAG:
        lib = _load()
        try:
            _LOG_FLAG.append(ctypes.c_int.in_dll(lib, "FLAGS_caffe2_log_level") if lib is not None else None)
        except ValueError:
            _LOG_FLAG.append(None)
    return _LOG_FLAG[0]


class quiet_allocator_log:
    """While it lasts, c10's log shows errors only (it normally shows warnings too).

    The CPU allocator logs "Memory block of unknown size was allocated before the profiling started" when
    memory allocated before a recorder started is freed under it (every thousandth time): in a backward
    recorded by the tracker that is every activation the forward saved, and the message, written for
    torch.profiler, means nothing to a memprof user. c10's log level is process-wide: other C++ warnings
    logged meanwhile are hidden too (Python warnings are not affected).
    """

    __slots__ = ("_flag", "_old")

    def __init__(self) -> None:
        self._flag = log_level_flag()
        self._old = None

    def __enter__(self):
        if self._flag is not None:
            self._old = self._flag.value
            self._flag.value = max(self._old, 2)  # c10's ERROR
        return self

    def __exit__(self, *exc) -> None:
        if self._flag is not None and self._old is not None:
            self._flag.value = self._old


_CHUNK = 4096  # events read per call by AllocationRecorder.raw
# Its buffer's type, made once: each ctypes array type is a class in reference cycles, left to the garbage
# collector when the recorder that made it is gone.
_BUFFER = ctypes.c_int64 * (3 * _CHUNK)


class AllocationRecorder:
    """Records the allocations and frees the calling thread's allocators report, until :meth:`stop`.

    ``with AllocationRecorder() as rec: ...`` then ``rec.events()``, a list of ``(pointer, bytes, device)``
    with bytes negative on free, in the order they happened; ``rec.peak()`` is ``(highest running sum,
    final sum)`` of the bytes, computed in C++. Raises :class:`NativeUnavailable` when the recorder
    cannot be built here or the thread's slot is taken (torch.profiler is running).
    """

    __slots__ = ("_h", "_lib", "_running", "n", "_buf")

    def __init__(self) -> None:
        self._h = None
        self._buf = None
        self.n = None  # once started: a c_int64 over the recorder's event count (``n.value``, no call)
        self._running = False
        self._lib = _load()
        if self._lib is None:
            raise NativeUnavailable(f"the C++ allocation recorder is unavailable: {_reason}")

    def start(self) -> AllocationRecorder:
        if self._h is not None:
            raise MemprofError("an AllocationRecorder can be started only once; make a new one")
        h = self._lib.memprof_rec_start()
        if not h:
            raise NativeUnavailable("cannot record allocations now: torch.profiler or another recorder is "
                                    "running on this thread")
        self._h = h
        self.n = ctypes.c_int64.from_address(self._lib.memprof_rec_count_address(h))
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._running = False
            if self._lib.memprof_rec_stop(self._h) != 0:
                raise MemprofError("the allocation recorder was not on top of the thread's profiler slot at "
                                   "stop (something started inside it was not stopped)")

    def __enter__(self) -> AllocationRecorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __len__(self) -> int:
        return int(self._lib.memprof_rec_count(self._h)) if self._h else 0

    def events(self, first: int = 0) -> list[tuple[int, int, str]]:
        if not self._h:
            return []
        flat = self.raw(first)
        names: dict[int, str] = {}
        out = []
        for i in range(len(flat) // 3):
            ptr, size, dev = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
            name = names.get(dev)
            if name is None:
                name = names[dev] = device_name(dev)
            out.append((ptr, size, name))
        return out

    def raw(self, first: int) -> list[int]:
        """Events from index ``first`` on, flat: ``[pointer, bytes, device code, pointer, ...]`` (the hot path
        of a ledger draining the recorder; :meth:`events` gives them as tuples with device names)."""
        n = self.n.value - first
        if n <= 0:
            return []
        buf = self._buf
        if buf is None:  # one buffer, reused: a ctypes array type per length would cost more than the read
            buf = self._buf = _BUFFER()
        out: list = []
        while n > 0:
            got = self._lib.memprof_rec_read(self._h, first, min(n, _CHUNK), buf)
            if got <= 0:
                break
            out += buf[:3 * got]
            first += got
            n -= got
        return out

    def count(self) -> int:
        """How many events were recorded so far."""
        return self.n.value

    def peak(self) -> tuple[int, int]:
        if not self._h:
            return 0, 0
        peak, end = ctypes.c_int64(), ctypes.c_int64()
        self._lib.memprof_rec_peak(self._h, ctypes.byref(peak), ctypes.byref(end))
        return peak.value, end.value

    def __del__(self) -> None:
        if self._h:
            if self._running:  # never leave the reporter in the thread's slot
                self._lib.memprof_rec_stop(self._h)
            self._lib.memprof_rec_free(self._h)
            self._h = None
