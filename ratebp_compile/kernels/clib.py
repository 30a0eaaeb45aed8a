"""The C libraries of the CPU kernels: compiled on first use with the system's C compiler, cached on disk,
loaded with ctypes.

A library is built with ``cc`` (or ``$CC``) into ``$RATEBP_CACHE`` (default ``~/.cache/ratebp_compile``),
keyed by its source, the flags, the compiler and the CPU, so that a cache shared between machines never
hands one a library built for another. Where this process runs PyTorch's operators on GNU OpenMP
(``libgomp``, as PyTorch's Linux wheels do), the library is built with ``-fopenmp`` and binds to that
same runtime: its parallel loops run on the threads PyTorch's own operators just used, rather than on a
second set that would compete with them for the cores while they spin-wait. ``RATEBP_CPU_LOOP=0`` turns
every library off (the ops then run their PyTorch reference).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable, Optional

__all__ = ["CLibrary"]

log = logging.getLogger(__name__)

# No FMA contraction (the references' rounding); no math errno or trapping math (results unchanged: only
# floating-point exceptions are ignored).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared",
         "-std=c11"]

#: What a library's C source starts with: the headers, the 32-byte vector types (8 float32 or 4 float64
#: lanes: AVX registers on x86-64, register pairs on AArch64, scalar code where there is no SIMD), and
#: ``openmp()``, which tells whether the library was built with OpenMP.
PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vf32 __attribute__((vector_size(32)));
typedef int32_t vi32 __attribute__((vector_size(32)));
typedef uint8_t vu8x8 __attribute__((vector_size(8)));
typedef double vf64 __attribute__((vector_size(32)));
typedef int64_t vi64 __attribute__((vector_size(32)));
typedef uint8_t vu8x4 __attribute__((vector_size(4)));

#define INLINE static inline __attribute__((always_inline))
#define SPLAT(V, c) ((V){0} + (c))
#define SELECT(I, V, mask, a, b) ((V)(((I)(a) & (mask)) | ((I)(b) & ~(mask))))

int openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
"""


def _cache_dir() -> str:
    return os.environ.get("RATEBP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ratebp_compile")


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: the machine and its instruction-set flags (Linux)."""
    signature = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            signature += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return signature


def _torch_runs_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded as ``libgomp.so.1`` (PyTorch's Linux wheels do, and run
    their operators on it): a library built with ``-fopenmp`` needs that name, so it binds to the copy
    already loaded and shares its threads. (A copy under another name, as other packages bundle it, would
    not be the one it binds to.)"""
    try:
        with open("/proc/self/maps") as f:
            return any(os.path.basename(line.split()[-1]) == "libgomp.so.1" for line in f if "/" in line)
    except OSError:
        return False


def _compile(name: str, source: str, compiler: str, flags: list) -> ctypes.CDLL:
    key = hashlib.sha256((source + " ".join(flags) + compiler + _cpu_signature()).encode()).hexdigest()[:16]
    directory = _cache_dir()
    path = os.path.join(directory, f"{name}_{key}.so")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src, out = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            done = subprocess.run([compiler, *flags, src, "-o", out, "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:2000]}")
            os.replace(out, path)            # atomic: a concurrent build leaves one complete library
    return ctypes.CDLL(path)


class CLibrary:
    """One C library (``PRELUDE`` + ``source``), built at the first :meth:`get`; ``declare`` sets its
    functions' ctypes signatures."""

    def __init__(self, name: str, source: str, declare: Callable[[ctypes.CDLL], None]):
        self.name = name
        self.source = PRELUDE + source
        self.declare = declare
        self._lock = threading.Lock()
        self._lib: Optional[ctypes.CDLL] = None
        self._reason: Optional[str] = None
        self.openmp = False       # whether its parallel loops run on PyTorch's OpenMP threads

    def _build(self) -> ctypes.CDLL:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc, gcc or $CC) on the PATH")
        lib = None
        if _torch_runs_libgomp():
            try:
                lib = _compile(self.name, self.source, compiler, FLAGS + ["-fopenmp"])
            except (OSError, RuntimeError) as e:     # no OpenMP with this compiler
                log.info("ratebp_compile: %s is built without OpenMP (%s)", self.name, e)
        lib = lib or _compile(self.name, self.source, compiler, FLAGS)
        lib.openmp.restype = ctypes.c_int
        self.declare(lib)
        self.openmp = bool(lib.openmp())
        return lib

    def get(self) -> Optional[ctypes.CDLL]:
        """The loaded library, or None where it cannot be built (:meth:`unavailable_reason` says why)."""
        if self._lib is None and self._reason is None:
            with self._lock:
                if os.environ.get("RATEBP_CPU_LOOP") == "0":
                    self._reason = "turned off by RATEBP_CPU_LOOP=0"
                if self._lib is None and self._reason is None:
                    try:
                        self._lib = self._build()
                    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                        self._reason = str(e)
                        log.info("ratebp_compile: the C library %s is unavailable (%s); the PyTorch "
                                 "reference runs instead", self.name, self._reason)
        return self._lib

    def unavailable_reason(self) -> Optional[str]:
        """Why :meth:`get` returns None (None while the library is available or not yet tried)."""
        self.get()
        return self._reason
