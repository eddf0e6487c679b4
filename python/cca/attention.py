"""cca.attention: the library's attention on torch tensors, differentiable.

Layout: q [B, Hq, T, D], k and v [B, Hkv, T, D] (what transformers' attention functions and
torch.nn.functional.scaled_dot_product_attention take), post-RoPE, Hq a multiple of Hkv (query
head h reads KV head h // (Hq/Hkv)). The output is [B, Hq, T, D] as a transposed view of a
contiguous [B, T, Hq, D] tensor, so `out.transpose(1, 2)` is the [B, T, Hq, D] that transformers
expects from an attention function, without a copy; lse (return_lse=True) is float32
[B, Hq, T] and carries no gradient. Inputs are passed to the library by their strides (the
last dimension must be contiguous, else it is copied once).

On torch >= 2.4 the forward and backward are torch.library custom ops (cca::attention_fwd,
cca::attention_bwd) with fake implementations and an autograd formula, so torch.compile with
fullgraph=True traces through them; on older torch (Debian's 1.13) a torch.autograd.Function
calls the same two functions.
"""
import ctypes
from typing import Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _lib

_DTYPES = {torch.float32: _lib.DTYPE_F32, torch.float16: _lib.DTYPE_F16,
           torch.bfloat16: _lib.DTYPE_BF16}


def _describe(t):
    """The C descriptor of tensor `t` (any number of dims up to 4), by its strides."""
    return _lib.make_tensor(t.data_ptr(), _DTYPES[t.dtype],
                            _lib.DEVICE_CUDA if t.is_cuda else _lib.DEVICE_CPU,
                            t.shape, t.stride())


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _run(device):
    """Run options for tensors on `device`: torch's CPU thread count, or its current stream."""
    if device.type == "cuda":
        return _lib.make_run(stream=torch.cuda.current_stream(device).cuda_stream)
    return _lib.make_run(threads=torch.get_num_threads())


class _DeviceGuard:
    """Makes `device` the current CUDA device (the library launches on the current one)."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _variant(params):
    return _lib.make_variant(*params)


def forward_impl(q, k, v, params):
    """(out, lse) for q, k, v in [B, H, T, D]; params = (variant, group, window, sinks, pool,
    pool_heads, scale)."""
    B, Hq, T, D = q.shape
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    descs = [_describe(x.transpose(1, 2)) for x in (q, k, v)] + [_describe(out), _describe(lse)]
    variant, run = _variant(params), None
    with _DeviceGuard(q.device):
        run = _run(q.device)
        _lib.check(_lib.lib().cca_attn_fwd(*(ctypes.byref(d) for d in descs),
                                           ctypes.byref(variant), ctypes.byref(run)))
    return out.transpose(1, 2), lse


def backward_impl(q, k, v, out, lse, dout, params):
    """(dq, dk, dv) in the layouts of q, k, v ([B, H, T, D] views of [B, T, H, D] storage)."""
    q, k, v, out, dout = (_last_dim_contiguous(x) for x in (q, k, v, out, dout))
    grads = [torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=x.dtype,
                         device=x.device) for x in (q, k, v)]
    descs = ([_describe(x.transpose(1, 2)) for x in (q, k, v, out)] + [_describe(lse)] +
             [_describe(dout.transpose(1, 2))] + [_describe(g) for g in grads])
    variant = _variant(params)
    with _DeviceGuard(q.device):
        run = _run(q.device)
        _lib.check(_lib.lib().cca_attn_bwd(*(ctypes.byref(d) for d in descs),
                                           ctypes.byref(variant), ctypes.byref(run)))
    return tuple(g.transpose(1, 2) for g in grads)


# ---- autograd: torch.library custom ops where they exist, else an autograd.Function ----------
HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if HAVE_CUSTOM_OP:
    # Variant names travel as strings: custom-op schemas take str, int and float.
    @torch.library.custom_op("cca::attention_fwd", mutates_args=())
    def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, group: int,
                window: int, sinks: int, pool: str, pool_heads: str,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return forward_impl(q, k, v, (variant, group, window, sinks, pool, pool_heads,
                                      _scale_arg(scale)))

    @_fwd_op.register_fake
    def _fwd_fake(q, k, v, variant, group, window, sinks, pool, pool_heads, scale):
        B, Hq, T, D = q.shape
        return (q.new_empty(B, T, Hq, D).transpose(1, 2),
                q.new_empty(B, Hq, T, dtype=torch.float32))

    @torch.library.custom_op("cca::attention_bwd", mutates_args=())
    def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, dout: torch.Tensor, variant: str, group: int, window: int,
                sinks: int, pool: str, pool_heads: str,
                scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward_impl(q, k, v, out, lse, dout, (variant, group, window, sinks, pool,
                                                       pool_heads, _scale_arg(scale)))

    @_bwd_op.register_fake
    def _bwd_fake(q, k, v, out, lse, dout, *params):
        return tuple(x.new_empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)
                     for x in (q, k, v))

    def _setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        ctx.save_for_backward(q, k, v, *output)
        ctx.params = inputs[3:]

    def _backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(q, k, v, out, lse, dout, *ctx.params)
        return (dq, dk, dv) + (None,) * len(ctx.params)

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _scale_arg(scale):
    return None if scale != scale else scale  # NaN (the op's "default") -> None


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, params):
        out, lse = forward_impl(q, k, v, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        dq, dk, dv = backward_impl(*ctx.saved_tensors, dout, ctx.params)
        return dq, dk, dv, None


def _check_inputs(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cca.attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"cca.attention: {name} must have 4 dimensions [B, H, T, D], got "
                             f"shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"cca.attention: {name} has dtype {x.dtype}; the library takes "
                            f"float32, float16 or bfloat16")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"cca.attention: {name} is on {x.device}; only cpu and cuda tensors "
                             f"are supported")
    if not (q.device == k.device == v.device):
        raise ValueError(f"cca.attention: q, k, v are on different devices: {q.device}, "
                         f"{k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"cca.attention: k shape {tuple(k.shape)} differs from v shape "
                         f"{tuple(v.shape)}")
    (B, Hq, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"cca.attention: q [B, Hq, T, D] = {tuple(q.shape)} and k, v "
                         f"[B, Hkv, T, D] = {tuple(k.shape)} must agree in B, T and D "
                         f"(decoding with fewer queries than keys goes through cca.KvCache)")
    if Hq % Hkv != 0:
        raise ValueError(f"cca.attention: Hq = {Hq} query heads is not a multiple of Hkv = {Hkv} "
                         f"key/value heads")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"cca.attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")


def _autocast_dtype(device_type):
    """The dtype autocast runs `device_type` in, or None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


def _autocast(q, k, v):
    """Under autocast, run in its lower-precision dtype, as scaled_dot_product_attention does."""
    dtype = _autocast_dtype(q.device.type)
    if dtype is None:
        return q, k, v
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention(q, k, v, variant="cca", group=16, window=1024, sinks=4, pool="cca",
              pool_heads="kv", scale=None, return_lse=False):
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, T, D] under `variant` (docs/semantics.md).

    variant: "cca" (core tokens of groups of `group` tokens + a local window of `window`),
    "full", "sliding" (`window`), "streaming" / "lminfinite" (`sinks`, `window`).
    pool: "cca", "mean" or "max"; pool_heads: "kv" (one core token per KV head) or "query".
    scale: softmax scale, default 1/sqrt(D). Returns out [B, Hq, T, D] (and lse [B, Hq, T]).
    """
    _check_inputs(q, k, v)
    q, k, v = _autocast(q, k, v)
    if q.dtype != v.dtype or k.dtype != v.dtype:  # mixed inputs outside autocast
        raise TypeError(f"cca.attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _lib.check_names(variant, pool, pool_heads)
    if HAVE_CUSTOM_OP:
        out, lse = _fwd_op(q, k, v, variant, int(group), int(window), int(sinks), pool,
                           pool_heads, float("nan") if scale is None else float(scale))
    else:
        out, lse = _AttentionFunction.apply(
            q, k, v, (variant, group, window, sinks, pool, pool_heads, scale))
    return (out, lse.detach()) if return_lse else out
