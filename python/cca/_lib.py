"""ctypes binding to the C API of libcca.so (include/cca/cca.h).

The library is looked up, in order, at $CCA_LIBRARY, in this repository's build folders
(build/, build-gpu/, then any other build*/ newest first) and through the dynamic loader
(LD_LIBRARY_PATH, ld.so.cache). Nothing here depends on torch.
"""
import ctypes
import glob
import math
import os

C_API_VERSION = 1

OK, ERROR_INVALID, ERROR_OUT_OF_MEMORY, ERROR_INTERNAL = 0, 1, 2, 3
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
DEVICE_CPU, DEVICE_CUDA = 0, 1
VARIANTS = {"full": 0, "sliding": 1, "streaming": 2, "lminfinite": 3, "cca": 4}
POOLS = {"cca": 0, "mean": 1, "max": 2}
POOL_HEADS = {"kv": 0, "query": 1}
BACKENDS = {"auto": 0, "ref": 1, "cpu": 2, "cuda": 3}


class CcaError(RuntimeError):
    """An error reported by the cca library; the message names the bad value."""


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32),
                ("device", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("shape", ctypes.c_int64 * 4),
                ("stride", ctypes.c_int64 * 4)]


class Variant(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pool", ctypes.c_int32),
                ("pool_heads", ctypes.c_int32), ("reserved", ctypes.c_int32),
                ("group", ctypes.c_int64), ("window", ctypes.c_int64),
                ("sinks", ctypes.c_int64), ("scale", ctypes.c_double)]


class Run(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int32), ("threads", ctypes.c_int32),
                ("deterministic", ctypes.c_int32), ("reserved", ctypes.c_int32),
                ("stream", ctypes.c_void_p)]


def make_tensor(data_ptr, dtype, device, shape, stride):
    t = Tensor()
    t.data = data_ptr
    t.dtype, t.device, t.ndim = dtype, device, len(shape)
    for i, (n, s) in enumerate(zip(shape, stride)):
        t.shape[i], t.stride[i] = n, s
    return t


def _pick(table, value, name):
    if value not in table:
        raise ValueError(f"unknown {name} {value!r} (expected one of {', '.join(table)})")
    return table[value]


def check_names(variant, pool, pool_heads):
    """ValueError naming an unknown variant, pool or pool_heads (pure Python: traceable)."""
    _pick(VARIANTS, variant, "variant")
    _pick(POOLS, pool, "pool")
    _pick(POOL_HEADS, pool_heads, "pool_heads")


def make_variant(variant, group, window, sinks, pool, pool_heads, scale):
    """The C variant struct from the Python names; ValueError naming a bad name."""
    v = Variant()
    v.kind = _pick(VARIANTS, variant, "variant")
    v.pool = _pick(POOLS, pool, "pool")
    v.pool_heads = _pick(POOL_HEADS, pool_heads, "pool_heads")
    v.group, v.window, v.sinks = int(group), int(window), int(sinks)
    v.scale = math.nan if scale is None else float(scale)
    return v


def make_run(backend="auto", threads=0, stream=None, deterministic=False):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    r = Run()
    r.backend, r.threads, r.deterministic = BACKENDS[backend], int(threads), int(deterministic)
    r.stream = stream
    return r


def _candidates():
    env = os.environ.get("CCA_LIBRARY")
    if env:
        return [env]  # an explicit choice is the only one tried
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    first = [os.path.join(repo, d, "libcca.so") for d in ("build", "build-gpu")]
    others = sorted((p for p in glob.glob(os.path.join(repo, "build*", "libcca.so"))
                     if p not in first), key=os.path.getmtime, reverse=True)
    return first + others + ["libcca.so"]


def _load():
    tried = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            tried.append(f"{path} (no such file)")
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        _declare(lib)
        version = lib.cca_c_api_version()
        if version != C_API_VERSION:
            raise CcaError(f"{path} has C API version {version}, this package needs "
                           f"{C_API_VERSION}: rebuild the library (cmake --build build "
                           f"--target cca_shared) or point CCA_LIBRARY at a matching one")
        return lib, path
    raise CcaError("cannot load the cca library (libcca.so); build it with `cmake --build build "
                   "--target cca_shared` or set CCA_LIBRARY to its path. Tried: " +
                   "; ".join(tried))


def _declare(lib):
    T, V, R = ctypes.POINTER(Tensor), ctypes.POINTER(Variant), ctypes.POINTER(Run)
    i32, i64, p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    sigs = {
        "cca_c_api_version": (i32, []),
        "cca_last_error": (ctypes.c_char_p, []),
        "cca_backend_available": (i32, [i32]),
        "cca_attn_fwd": (i32, [T, T, T, T, T, V, R]),
        "cca_attn_bwd": (i32, [T, T, T, T, T, T, T, T, T, V, R]),
        "cca_kv_cache_create": (i32, [V, i64, i64, i64, i64, i32, i32, R, ctypes.POINTER(p)]),
        "cca_kv_cache_append": (i32, [p, T, T, T, T, T]),
        "cca_kv_cache_length": (i64, [p]),
        "cca_kv_cache_core_tokens": (i64, [p]),
        "cca_kv_cache_raw_tokens": (i64, [p]),
        "cca_kv_cache_memory_bytes": (i64, [p]),
        "cca_kv_cache_full_bytes": (i64, [p]),
        "cca_kv_cache_free": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


_LIB = None
_PATH = None


def lib():
    """The loaded library (loaded on first use, so importing cca never fails)."""
    global _LIB, _PATH
    if _LIB is None:
        _LIB, _PATH = _load()
    return _LIB


def library_path():
    lib()
    return _PATH


def check(status):
    """Raises CcaError with the library's message unless `status` is OK."""
    if status != OK:
        message = lib().cca_last_error().decode("utf-8", "replace")
        if status == ERROR_OUT_OF_MEMORY:
            raise MemoryError(f"cca: {message}")
        raise CcaError(message)


def backend_unavailable_reason(backend):
    """'' if `backend` can run here, else why not."""
    if lib().cca_backend_available(BACKENDS[backend]) == OK:
        return ""
    return lib().cca_last_error().decode("utf-8", "replace")
