"""Optional fused CPU kernels for task arithmetic, TIES and SLERP, compiled on first use with the system C
compiler.

Eager torch runs TIES's combine as about thirty element-wise passes per block and the top-k bracket as
seven; `_kernels.c` does each in one pass, with the same float32 operations in the same order, so the
results are bit-identical to the torch path (tested). SLERP's float64 sums follow their own fixed order
(equal to the torch path's to float64 rounding); its combination is bit-identical. It is plain C (no Python or torch headers): the
first merge on a machine compiles it in well under a second with `$CC` (default `cc`) into
`$SAFEMERGE_CACHE/native/` (default ~/.cache/safemerge), keyed by the source, the compiler, the flags
and the CPU's feature flags, so a shared home directory on a mixed cluster never runs a binary built for
another CPU. Calls go through ctypes, which releases the GIL, so the engine's compute threads run the
kernels in parallel.

Nothing depends on it: without a compiler, with SAFEMERGE_NATIVE=0, on a GPU, for non-contiguous
tensors or other dtypes, every method takes the torch path. `status()` says which path is in use.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_kernels.c")
# no -ffast-math and no contraction into fused multiply-adds: the results must stay bit-identical to torch's;
# -fno-trapping-math only lets the compiler turn selects into SIMD blends (it changes no result)
FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-fast-math", "-fPIC", "-shared", "-std=c11"]
TUNE = ["-march=native"]  # dropped (and the build retried) where the compiler does not know it
ABI = 4
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_state: dict = {}


def _disabled() -> bool:
    return os.environ.get("SAFEMERGE_NATIVE", "").strip().lower() in ("0", "off", "false", "no")


def _cache_dir() -> Path:
    """$SAFEMERGE_CACHE/native (default ~/.cache/safemerge/native). A library is only loaded from a folder
    that this user owns and nobody else can write to; otherwise (or with SAFEMERGE_CACHE=off) from a fresh
    private temporary folder, rebuilt in each process."""
    from safemerge.checkpoint import cache_root

    try:
        root = cache_root()
    except RuntimeError:  # no home directory
        root = None
    if root is not None:
        try:
            folder = root / "native"
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = folder.stat()
            owned = not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)
            if owned and os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    folder = Path(tempfile.mkdtemp(prefix="safemerge-native-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> tuple[ctypes.CDLL | None, str]:
    if _disabled():
        return None, "off (SAFEMERGE_NATIVE=0)"
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return None, f"off (no C compiler {' '.join(cc) or 'cc'!r} on PATH; set CC)"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *cc, version, *FLAGS, *TUNE, platform.machine(),
                                        _cpu_flags()]).encode()).hexdigest()[:20]
        lib = _cache_dir() / f"kernels-{key}.so"
        if not lib.is_file():
            errors = []
            for tune in (TUNE, []):
                err = _compile(cc, [*FLAGS, *tune], lib)
                if err is None:
                    break
                errors.append(err)
            else:
                return None, f"off ({cc[0]} failed: {errors[-1]})"
        dll = ctypes.CDLL(str(lib))
    except Exception as e:  # whatever goes wrong, the torch path runs
        return None, f"off ({type(e).__name__}: {e})"
    if dll.sm_abi() != ABI:
        return None, "off (stale kernel library)"
    i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    dll.sm_bracket.restype = i64
    dll.sm_bracket.argtypes = [i64, vp, i32, vp, i32, f32, f32, vp, i64, vp]
    dll.sm_combine.restype = i32
    dll.sm_combine.argtypes = [i64, vp, i32, i32, vp, vp, i32, vp, vp, vp, vp, i32, i32, f32, f32, i32, f32, vp, i32]
    dll.sm_dots.restype = None
    dll.sm_dots.argtypes = [i64, vp, i32, vp, i32, vp]
    dll.sm_lerp.restype = None
    dll.sm_lerp.argtypes = [i64, vp, i32, vp, i32, f32, f32, vp, i32]
    return dll, f"on ({lib})"


def _compile(cc: list[str], flags: list[str], lib: Path) -> str | None:
    """Compile SOURCE into `lib` (atomically: a concurrent build never sees a partial file); the compiler's
    last error line on failure."""
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            return lines[-1] if lines else f"exit status {done.returncode}"
        os.replace(tmp, lib)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state["why"], _state["f16"] = why, bool(lib is not None and lib.sm_has_f16())
                _state["lib"] = lib  # last: other threads test for "lib"
    return _state["lib"]


def status() -> str:
    """'on (<library>)' or 'off (<why>)'."""
    _lib()
    return _state["why"]


def _code(x: torch.Tensor) -> int | None:
    """The kernel's dtype code for a CPU tensor it can read in place, else None."""
    if x.device.type != "cpu" or not x.is_contiguous():
        return None
    c = _CODES.get(x.dtype)
    if c == 2 and not _state.get("f16"):
        return None
    return c


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors together (None entries are ignored): each readable in place,
    and all of one length, since a kernel runs one loop over all of them (other sizes take the torch path,
    which raises torch's own error)."""
    given = [t for t in tensors if t is not None]
    if _lib() is None or len({t.numel() for t in given}) > 1:
        return False
    return all(_code(t) is not None for t in given)


def bracket(src: torch.Tensor, base: torch.Tensor | None, lo: float, hi: float, cap: int):
    """(entries with |τ| > hi, the |τ| within [lo, hi]) for τ = src − base (or src when base is None), or
    None when more than `cap` are within (the caller falls back)."""
    lib = _lib()
    inside = torch.empty(cap, dtype=torch.float32)
    above = ctypes.c_int64(0)
    count = lib.sm_bracket(src.numel(), src.data_ptr(), _code(src), None if base is None else base.data_ptr(),
                           0 if base is None else _code(base), lo, hi, inside.data_ptr(), cap, ctypes.byref(above))
    if count > cap:
        return None
    return above.value, inside[:count]


def combine(base: torch.Tensor, srcs: list[torch.Tensor], *, has_base: bool, weights: list[float],
            trims: list[tuple[float, int] | None], consensus: bool, divide: int, fixed_divisor: float,
            floor: float | None, lambda_: float, out: torch.Tensor) -> bool:
    """The fused combine (see `sm_combine` in _kernels.c); False when it cannot run (the caller falls back).
    trims[i]: None, or (threshold, short) with short = −1 for an inclusive threshold, else the number of
    entries equal to the threshold still to keep, admitted in index order as the torch path admits them."""
    lib = _lib()
    nt = len(srcs)
    if nt > 64:
        return False
    ptrs = (ctypes.c_void_p * nt)(*[s.data_ptr() for s in srcs])
    codes = (ctypes.c_int * nt)(*[_code(s) for s in srcs])
    w = (ctypes.c_float * nt)(*weights)
    kinds = (ctypes.c_int * nt)(*[0 if t is None else 1 for t in trims])
    thr = (ctypes.c_float * nt)(*[0.0 if t is None else t[0] for t in trims])
    short = (ctypes.c_int64 * nt)(*[-1 if t is None else t[1] for t in trims])
    rc = lib.sm_combine(base.numel(), base.data_ptr(), _code(base), nt, ptrs, codes, int(has_base), w, kinds, thr,
                        short, int(consensus), divide, fixed_divisor, floor if floor is not None else 0.0,
                        int(lambda_ != 1), float(lambda_), out.data_ptr(), _code(out))
    return rc == 0


def dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(Σa², Σb², Σab) in float64, in the kernel's fixed order."""
    res = (ctypes.c_double * 3)()
    _lib().sm_dots(a.numel(), a.data_ptr(), _code(a), b.data_ptr(), _code(b), res)
    return res[0], res[1], res[2]


def lerp(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float, out: torch.Tensor) -> None:
    """out = a·ca + b·cb in float32 (each product rounded), cast into out's dtype."""
    _lib().sm_lerp(a.numel(), a.data_ptr(), _code(a), b.data_ptr(), _code(b), ca, cb, out.data_ptr(), _code(out))
