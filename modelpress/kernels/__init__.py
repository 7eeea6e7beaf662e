"""Hand-written CPU kernels (cpu_kernels.c and the files it includes), compiled at first use and
called through ctypes (kernels/ops.py wraps each one with its checks).

`lib()` returns the loaded library, or None where it cannot be had (no C compiler, not x86/ARM
Linux or macOS, MODELPRESS_NO_KERNELS=1); the modules that use it then fall back to their
reference path, which gives the same results more slowly. The shared object is cached under
$XDG_CACHE_HOME/modelpress/kernels (default ~/.cache), named by a hash of the source, the
compiler and the flags, and written under a temporary name then renamed, so concurrent first
uses do not clash.

    from modelpress import kernels
    k = kernels.lib()   # ctypes.CDLL or None
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share its OpenMP pool)

from . import searches

SOURCE = Path(__file__).with_name("cpu_kernels.c")   # includes the others (one translation unit)
HEADER = SOURCE.with_name("mp_kernels.h")
# -ffp-contract=off: no multiply-add fusing behind the code's back, so the GGUF searches round like
# ggml's own (ISO C) build; the SIMD loops use explicit FMA intrinsics and keep their speed
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"]
_libs: dict[bool | str, ctypes.CDLL | None] = {}  # by `simd`; absent: not tried yet
_builds: dict[bool | str, str] = {}  # by `simd`: the loaded build's key (source, compiler, flags, CPU)
# the builds lib(simd) can give: the best this CPU runs, its AVX2 loops only, the plain C loops only
_VARIANTS = {True: [], "avx2": ["-DMP_NO_AVX512"], False: ["-DMP_NO_SIMD"]}

from .ops import KIND  # noqa: E402  (what a layer's weights are: mp_kernels.h's enum, mirrored)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "mp_code4_gemv": [_P, _I, _I, _P, _P, _P, _I, _I, _P],
    "mp_int8_linear": [_P, _I, _I, _P, _P, _P, _I, ctypes.c_float, _P],
    "mp_f32_gemv": [_P, _I, _I, _P, _I, _P],
    "mp_sparse24_gemv": [_P, _I, _I, _P, _P, _I, _P, _I],
    "mp_affine_gemv": [_P, _I, _I, _P, _P, _P, _I, _I, _P],
    "mp_affine_dequant": [_P, _P, _P, _I, _I, _I, _P],
    "mp_code4_dequant": [_P, _P, _P, _I, _I, _P, _I],
    "mp_w8a8_pack": [_P, _I, _I, _P, _P],
    "mp_w8a8_linear": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P, _I, _I],
    "mp_exp_f32": [_P, _I, _P],
    "mp_paged_attention": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P],
    "mp_make_qx_quants": [_P, _P, _I, _I, _I, _P, _P],
    "mp_quantize_legacy": [_P, _I, _I, _P],
    "mp_make_qkx2_quants": [_P, _P, _I, _I, _I, ctypes.c_float, ctypes.c_float, _I, _I, _P, _P, _P],
    "mp_block_gemv": [_P, _I, _I, _P, _I, _I, _P],
    "mp_pack_q8_0x16": [_P, _I, _I, _P],
    "mp_llama_decode": [_P, _I, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _I, _I],
    "mp_llama_logits": [_P, _P, ctypes.c_float, _P, _I, _P, _I, _P],
    "mp_linear_apply": [_P, _P, _I, _P],
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modelpress" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_name() -> str:
    """The processor's model name and the vector extensions the kernels use (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    simd = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx2") if f in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'})"


def build_id(simd: bool | str = True) -> str | None:
    """The key of the loaded build lib(simd) (a hash of source, compiler, flags and CPU features), or None."""
    return _builds.get(simd) if lib(simd) is not None else None


def _build(cc: str, flags: list[str]) -> Path:
    # the key covers what the object depends on: source, compiler, flags and this CPU's features
    # (-march=native), so a cache shared between machines never hands one a foreign build
    target_macros = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                                   capture_output=True, text=True).stdout
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]")))
    key = hashlib.sha256(sources + (version + target_macros + " ".join(flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise OSError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def lib(simd: bool | str = True) -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning saying why) where they are unavailable.
    simd=False builds the plain C loops only, simd="avx2" leaves out the AVX-512 block dots (the
    tests check every build the CPU runs; `mp_simd()` says which loops a build has: 0, 1 or 2)."""
    if simd in _libs:
        return _libs[simd]
    _libs[simd] = None
    if os.environ.get("MODELPRESS_NO_KERNELS") == "1":
        return None
    cc = _compiler()
    if cc is None or not sys.platform.startswith(("linux", "darwin")):
        warnings.warn("modelpress: no C compiler found (set CC or install gcc); compressed layers run "
                      "their slower reference path", stacklevel=2)
        return None
    try:
        path = _build(cc, [*FLAGS, *_VARIANTS[simd]])
        so = ctypes.CDLL(str(path))
    except OSError as e:
        warnings.warn(f"modelpress: the CPU kernels did not build ({e}); compressed layers run their "
                      "slower reference path", stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(so, name).argtypes = argtypes
        getattr(so, name).restype = None
    so.mp_max_rows.restype = ctypes.c_int
    so.mp_simd.restype = ctypes.c_int
    so.mp_w8a8_tiles.restype = ctypes.c_char_p
    so.mp_release_threads.restype = None
    _libs[simd], _builds[simd] = so, path.stem.split("-")[-1]
    return so


def release_threads() -> None:
    """Hand back the calling thread's OpenMP worker threads (torch's and the kernels' pool; see
    mp_release_threads). Call it on a thread that is done with parallel work before another thread
    takes that work over, as the HTTP server does before its engine thread starts: with two pools on
    two CPUs libgomp puts its workers to sleep between parallel regions."""
    k = lib()
    if k is not None:
        k.mp_release_threads()


searches.install(lib, KIND)  # core/kquants.py's GGUF searches run compiled from here on
