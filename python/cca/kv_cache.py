"""cca.KvCache: the library's per-layer decode cache (compressed for cca) on torch tensors.

For inference: append() takes the new tokens' q [B, Hq, n, D] and k, v [B, Hkv, n, D]
(post-RoPE, the layout of cca.attention) and returns their attention output [B, Hq, n, D] over
everything appended so far, exactly the rows a prefill of the whole sequence gives. It keeps
floor(length/g) core tokens and a raw window of at most s + g - 1 tokens per KV head.
"""
import ctypes

import torch

from . import _lib
from .attention import _DTYPES, _DeviceGuard, _describe, _last_dim_contiguous, _run


class KvCache:
    def __init__(self, num_heads, num_kv_heads, head_dim, batch=1, dtype=torch.float32,
                 device="cpu", variant="cca", group=16, window=1024, sinks=4, pool="cca",
                 pool_heads="kv", scale=None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype not in _DTYPES:
            raise TypeError(f"cca.KvCache: dtype {dtype}; the library takes float32, float16 or "
                            f"bfloat16")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"cca.KvCache: device {device}; only cpu and cuda are supported")
        self.shape = (int(batch), int(num_heads), int(num_kv_heads), int(head_dim))
        self.dtype, self.device = dtype, device
        variant_c = _lib.make_variant(variant, group, window, sinks, pool, pool_heads, scale)
        handle = ctypes.c_void_p()
        with _DeviceGuard(device):
            # The cache keeps these run options: on CUDA, the stream current now.
            self._run = _run(device)
            _lib.check(_lib.lib().cca_kv_cache_create(
                ctypes.byref(variant_c), *self.shape, _DTYPES[dtype],
                _lib.DEVICE_CUDA if device.type == "cuda" else _lib.DEVICE_CPU,
                ctypes.byref(self._run), ctypes.byref(handle)))
        self._handle = handle

    def append(self, q, k, v, return_lse=False):
        """Attention output [B, Hq, n, D] of n new tokens (and lse [B, Hq, n] float32)."""
        B, Hq, Hkv, D = self.shape
        for name, x, heads in (("q", q, Hq), ("k", k, Hkv), ("v", v, Hkv)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"cca.KvCache.append: {name} must be a 4-d tensor [B, H, n, D]")
            want = (B, heads, x.shape[2], D)
            if tuple(x.shape) != want or x.shape[2] != q.shape[2] or x.shape[2] < 1:
                raise ValueError(f"cca.KvCache.append: {name} has shape {tuple(x.shape)}, "
                                 f"expected {want} with n >= 1 tokens, the same n for q, k, v")
            if x.dtype != self.dtype or x.device != self.device:
                raise ValueError(f"cca.KvCache.append: {name} is {x.dtype} on {x.device}; this "
                                 f"cache holds {self.dtype} on {self.device}")
            if x.requires_grad and torch.is_grad_enabled():
                raise RuntimeError("cca.KvCache.append has no backward (it is for inference); "
                                   "use cca.attention for training, or torch.no_grad()")
        if self._handle is None:
            raise RuntimeError("cca.KvCache: the cache was closed")
        n = q.shape[2]
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        out = torch.empty(B, n, Hq, D, dtype=self.dtype, device=self.device)
        lse = torch.empty(B, Hq, n, dtype=torch.float32, device=self.device) if return_lse else None
        descs = [_describe(x.transpose(1, 2)) for x in (q, k, v)] + [_describe(out)]
        lse_ptr = ctypes.byref(_describe(lse)) if return_lse else None
        with _DeviceGuard(self.device):
            _lib.check(_lib.lib().cca_kv_cache_append(
                self._handle, *(ctypes.byref(d) for d in descs), lse_ptr))
        out = out.transpose(1, 2)
        return (out, lse) if return_lse else out

    def _stat(self, fn):
        return getattr(_lib.lib(), fn)(self._handle) if self._handle is not None else 0

    @property
    def length(self):
        """Tokens appended so far."""
        return self._stat("cca_kv_cache_length")

    @property
    def core_tokens(self):
        return self._stat("cca_kv_cache_core_tokens")

    @property
    def raw_tokens(self):
        return self._stat("cca_kv_cache_raw_tokens")

    @property
    def memory_bytes(self):
        """Bytes of keys and values held."""
        return self._stat("cca_kv_cache_memory_bytes")

    @property
    def full_cache_bytes(self):
        """Bytes a full (uncompressed) cache would hold for the same tokens."""
        return self._stat("cca_kv_cache_full_bytes")

    def close(self):
        if getattr(self, "_handle", None) is not None:
            _lib.lib().cca_kv_cache_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
