"""cca.attention and cca.KvCache against the contract written in PyTorch (contract.py).

Runs on CPU tensors by default (CI: Debian's python3-torch 1.13); CCA_TEST_DEVICE=cuda runs the
same cases on CUDA tensors with the dtypes and head dims the cuda backend takes
(bench/gpu_python.sh). Library outputs in float32/16-bit are compared with the reference in
float64 on the same (rounded) inputs.
"""
import itertools
import os
import subprocess
import sys
import unittest

import torch

import cca
from contract import reference_attention

DEVICE = torch.device(os.environ.get("CCA_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"
# The cuda backend takes 16-bit inputs and D in {64, 128}; the cpu backend any float dtype and D.
DTYPES = [torch.bfloat16, torch.float16] if ON_CUDA else [torch.float32, torch.bfloat16]
HEAD_DIMS = [64, 128] if ON_CUDA else [16, 8]
# max |x - ref| / max |ref| allowed, forward and gradients
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 3e-2), torch.float16: (4e-3, 1e-2)}

VARIANTS = [
    dict(variant="cca", group=4, window=8, pool="cca", pool_heads="kv"),
    dict(variant="cca", group=4, window=8, pool="cca", pool_heads="query"),
    dict(variant="cca", group=3, window=5, pool="mean", pool_heads="kv"),
    dict(variant="cca", group=3, window=5, pool="max", pool_heads="query"),
    dict(variant="cca", group=5, window=7, pool="max", pool_heads="kv"),
    dict(variant="cca", group=4, window=7, pool="mean", pool_heads="query"),
    dict(variant="full"),
    dict(variant="sliding", window=6),
    dict(variant="streaming", sinks=2, window=5),
    dict(variant="lminfinite", sinks=3, window=4),
]
SHAPES = [  # B, Hq, Hkv, T
    (1, 2, 2, 37), (2, 4, 2, 21), (1, 6, 2, 70), (2, 3, 3, 1), (1, 4, 1, 9),
]


def rel_err(x, ref, scale=None):
    """max |x - ref| over max |ref| (or over `scale`, where ref may be ~0)."""
    scale = ref.abs().max().clamp(min=1e-30) if scale is None else scale
    return ((x.double() - ref).abs().max() / scale).item()


def untie_groups(x, group):
    """x with the positions of every complete group replaced by values that are distinct within
    the group (multiples of 1/16 in [-2, 2), exact in every dtype): with ties, the gradient of a
    max is a matter of choice, and implementations choose differently."""
    B, H, T, D = x.shape
    m = T // group
    gen = torch.Generator().manual_seed(T * 31 + group)
    idx = torch.rand(B, H, m, D, 64, generator=gen).argsort(dim=-1)[..., :group]  # distinct
    vals = (idx.to(torch.float32) - 32) / 16  # [B, H, m, D, g]
    x = x.clone()
    x[:, :, : m * group] = vals.permute(0, 1, 2, 4, 3).reshape(B, H, m * group, D).to(x)
    return x


def make_qkv(B, Hq, Hkv, T, D, dtype, seed, layout="bhtd"):
    """q, k, v [B, H, T, D] with the strides transformers produces (views of [B, T, H, D]
    projections: layout 'bhtd'), or from one packed qkv projection ('packed'), or contiguous
    [B, H, T, D] ('contiguous')."""
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        qkv = torch.randn(B, T, Hq + 2 * Hkv, D, generator=g)
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    else:
        q, k, v = (torch.randn(B, T, H, D, generator=g) for H in (Hq, Hkv, Hkv))
    q, k, v = (x.to(DEVICE, dtype).transpose(1, 2) for x in (q, k, v))
    if layout == "contiguous":
        q, k, v = (x.contiguous() for x in (q, k, v))
    return q, k, v


def cases():
    """Every variant over every shape, cycling through the (head dim, dtype) pairs."""
    configs = list(itertools.product(HEAD_DIMS, DTYPES))
    for i, params in enumerate(VARIANTS):
        for j, shape in enumerate(SHAPES):
            D, dtype = configs[(i + j) % len(configs)]
            yield params, shape, D, dtype


class AttentionForward(unittest.TestCase):
    def test_matches_contract(self):
        for n, (params, (B, Hq, Hkv, T), D, dtype) in enumerate(cases()):
            layout = ["bhtd", "packed", "contiguous"][n % 3]
            with self.subTest(params=params, shape=(B, Hq, Hkv, T, D), dtype=dtype, layout=layout):
                q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype, seed=n, layout=layout)
                out, lse = cca.attention(q, k, v, return_lse=True, **params)
                ref, ref_lse = reference_attention(q.double(), k.double(), v.double(),
                                                   return_lse=True, **params)
                self.assertEqual(out.shape, q.shape)
                self.assertEqual(out.dtype, dtype)
                self.assertEqual(out.transpose(1, 2).stride(), (T * Hq * D, Hq * D, D, 1))
                self.assertLessEqual(rel_err(out, ref), TOL[dtype][0])
                self.assertEqual(lse.dtype, torch.float32)
                self.assertLess((lse.double() - ref_lse).abs().max().item(), 5 * TOL[dtype][0])

    def test_long_sequence_crosses_tiles(self):
        # T = 300 with s = 140 walks several 64-query and 128-key tiles of the kernels
        params = dict(variant="cca", group=4, window=140)
        q, k, v = make_qkv(1, 4, 2, 300, HEAD_DIMS[0], DTYPES[0], seed=7)
        ref = reference_attention(q.double(), k.double(), v.double(), **params)
        self.assertLessEqual(rel_err(cca.attention(q, k, v, **params), ref), TOL[DTYPES[0]][0])

    def test_scale_and_equivalence_to_full(self):
        q, k, v = make_qkv(1, 2, 2, 30, HEAD_DIMS[0], DTYPES[0], seed=3)
        full = cca.attention(q, k, v, variant="full", scale=0.3)
        # s >= T: CCA sees everything raw, so it is full causal attention
        same = cca.attention(q, k, v, variant="cca", group=4, window=30, scale=0.3)
        self.assertLessEqual(rel_err(same, full.double()), TOL[DTYPES[0]][0])
        ref = reference_attention(q.double(), k.double(), v.double(), variant="full", scale=0.3)
        self.assertLessEqual(rel_err(full, ref), TOL[DTYPES[0]][0])

    def test_last_dim_not_contiguous_is_copied(self):
        q, k, v = make_qkv(1, 2, 2, 12, HEAD_DIMS[0], DTYPES[0], seed=4)
        q2 = torch.stack([q, q], dim=-1)[..., 0]  # stride(-1) == 2
        self.assertNotEqual(q2.stride(-1), 1)
        a = cca.attention(q2, k, v, group=2, window=4)
        b = cca.attention(q, k, v, group=2, window=4)
        self.assertTrue(torch.equal(a, b))

    def test_autocast_runs_in_lower_precision(self):
        q, k, v = make_qkv(1, 2, 2, 20, HEAD_DIMS[0], torch.float32, seed=5)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = cca.attention(q, k.to(torch.bfloat16), v, group=4, window=8)
        self.assertEqual(out.dtype, torch.bfloat16)
        ref = reference_attention(*(x.to(torch.bfloat16).double() for x in (q, k, v)),
                                  group=4, window=8)
        self.assertLessEqual(rel_err(out, ref), TOL[torch.bfloat16][0])


class AttentionBackward(unittest.TestCase):
    def test_gradients_match_contract(self):
        for n, (params, (B, Hq, Hkv, T), D, dtype) in enumerate(cases()):
            layout = ["bhtd", "packed", "contiguous"][n % 3]
            with self.subTest(params=params, shape=(B, Hq, Hkv, T, D), dtype=dtype, layout=layout):
                q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype, seed=100 + n, layout=layout)
                if params.get("pool") == "max":
                    k, v = untie_groups(k, params["group"]), untie_groups(v, params["group"])
                q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
                dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(n)).to(
                    DEVICE, dtype)
                cca.attention(q, k, v, **params).backward(dout)
                q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
                reference_attention(q64, k64, v64, **params).backward(dout.double())
                # relative to the largest gradient: dq is ~0 where a query sees one key
                scale = max(g.abs().max() for g in (q64.grad, k64.grad, v64.grad))
                for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                                        ("dv", v.grad, v64.grad)):
                    self.assertEqual(got.shape, want.shape, name)
                    self.assertEqual(got.dtype, dtype, name)
                    self.assertLessEqual(rel_err(got, want, scale), TOL[dtype][1], name)

    def test_gradient_through_sum_and_not_needed_inputs(self):
        # dout from .sum() has stride 0; k needs no gradient
        q, k, v = make_qkv(2, 4, 2, 40, HEAD_DIMS[0], DTYPES[0], seed=11)
        q.requires_grad_(True)
        v.requires_grad_(True)
        cca.attention(q, k, v, group=4, window=8).sum().backward()
        q64, v64 = (x.detach().double().requires_grad_(True) for x in (q, v))
        reference_attention(q64, k.double(), v64, group=4, window=8).sum().backward()
        self.assertIsNone(k.grad)
        self.assertLessEqual(rel_err(q.grad, q64.grad), TOL[DTYPES[0]][1])
        self.assertLessEqual(rel_err(v.grad, v64.grad), TOL[DTYPES[0]][1])

    @unittest.skipUnless(cca.HAVE_CUSTOM_OP, "torch.library.custom_op needs torch >= 2.4")
    def test_compile_fullgraph(self):
        D = HEAD_DIMS[0]
        proj = torch.nn.Linear(D, 3 * D).to(DEVICE, DTYPES[0])

        def layer(x):  # x [B, T, D] -> one head of CCA attention
            q, k, v = proj(x).unsqueeze(2).chunk(3, dim=-1)
            out = cca.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                group=4, window=8)
            return out.transpose(1, 2).flatten(2)

        x = torch.randn(2, 33, D, device=DEVICE, dtype=DTYPES[0], requires_grad=True)
        backend = "inductor" if ON_CUDA else "aot_eager"
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        y_eager = layer(x)
        (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        self.assertLessEqual(rel_err(y, y_eager.double()), TOL[DTYPES[0]][0])
        self.assertLessEqual(rel_err(gx, gx_eager.double()), TOL[DTYPES[0]][1])


class DecodeCache(unittest.TestCase):
    def test_chunks_and_steps_equal_prefill(self):
        for n, params in enumerate([dict(group=4, window=8), dict(group=3, window=5, pool="max",
                                                                   pool_heads="query"),
                                    dict(variant="streaming", sinks=2, window=5)]):
            with self.subTest(params=params):
                B, Hq, Hkv, T, D = 2, 4, 2, 45, HEAD_DIMS[0]
                q, k, v = make_qkv(B, Hq, Hkv, T, D, DTYPES[0], seed=20 + n)
                want = cca.attention(q, k, v, **params)
                cache = cca.KvCache(Hq, Hkv, D, batch=B, dtype=DTYPES[0], device=DEVICE, **params)
                pieces, t = [], 0
                for size in [7, 1, 1, 13, 1] + [1] * (T - 23):
                    pieces.append(cache.append(q[:, :, t:t + size], k[:, :, t:t + size],
                                               v[:, :, t:t + size]))
                    t += size
                self.assertEqual(cache.length, T)
                got = torch.cat(pieces, dim=2)
                self.assertLessEqual(rel_err(got, want.double()), TOL[DTYPES[0]][0])

    def test_memory_is_compressed(self):
        g, s, T, D = 4, 8, 100, HEAD_DIMS[0]
        cache = cca.KvCache(2, 2, D, dtype=DTYPES[0], device=DEVICE, group=g, window=s)
        q, k, v = make_qkv(1, 2, 2, T, D, DTYPES[0], seed=30)
        cache.append(q, k, v)
        self.assertEqual(cache.core_tokens, T // g)
        self.assertLessEqual(cache.raw_tokens, s + g - 1)
        self.assertLess(cache.memory_bytes, cache.full_cache_bytes)


class Errors(unittest.TestCase):
    def setUp(self):
        self.q, self.k, self.v = make_qkv(1, 4, 2, 10, HEAD_DIMS[0], DTYPES[0], seed=1)

    def assertRaisesWith(self, exc, text, fn, *args, **kwargs):
        with self.assertRaises(exc) as ctx:
            fn(*args, **kwargs)
        self.assertIn(text, str(ctx.exception))

    def test_bad_tensors(self):
        q, k, v = self.q, self.k, self.v
        self.assertRaisesWith(ValueError, "4 dimensions", cca.attention, q[0], k, v)
        self.assertRaisesWith(TypeError, "float64", cca.attention, q.double(), k, v)
        self.assertRaisesWith(TypeError, "dtypes differ", cca.attention, q, k.half()
                              if DTYPES[0] != torch.float16 else k.bfloat16(), v)
        self.assertRaisesWith(ValueError, "not a multiple", cca.attention, q[:, :3], k, v)
        self.assertRaisesWith(ValueError, "must agree", cca.attention, q[:, :, :5], k, v)
        self.assertRaisesWith(ValueError, "differs from v", cca.attention, q, k, v[:, :1])
        self.assertRaisesWith(ValueError, "empty", cca.attention, q[:, :, :0], k[:, :, :0],
                              v[:, :, :0])
        self.assertRaisesWith(TypeError, "torch.Tensor", cca.attention, q.tolist(), k, v)

    def test_bad_parameters_name_the_value(self):
        q, k, v = self.q, self.k, self.v
        self.assertRaisesWith(ValueError, "unknown variant 'ful'", cca.attention, q, k, v,
                              variant="ful")
        self.assertRaisesWith(ValueError, "unknown pool 'min'", cca.attention, q, k, v, pool="min")
        self.assertRaisesWith(ValueError, "pool_heads", cca.attention, q, k, v, pool_heads="all")
        self.assertRaisesWith(cca.CcaError, "group = 0", cca.attention, q, k, v, group=0)
        self.assertRaisesWith(cca.CcaError, "window = -1", cca.attention, q, k, v, window=-1)
        self.assertRaisesWith(cca.CcaError, "scale", cca.attention, q, k, v, scale=float("inf"))

    def test_cache_errors(self):
        D = HEAD_DIMS[0]
        cache = cca.KvCache(4, 2, D, dtype=DTYPES[0], device=DEVICE, group=4, window=8)
        q, k, v = self.q, self.k, self.v
        self.assertRaisesWith(ValueError, "expected (1, 2,", cache.append, q, q, v)
        self.assertRaisesWith(ValueError, "this cache holds", cache.append, q.float()
                              if DTYPES[0] != torch.float32 else q.bfloat16(), k, v)
        qg = q.detach().requires_grad_(True)
        self.assertRaisesWith(RuntimeError, "no backward", cache.append, qg, k, v)
        self.assertEqual(cache.length, 0)  # nothing was appended by the failed calls
        self.assertRaisesWith(cca.CcaError, "group = 0", cca.KvCache, 4, 2, D, group=0)
        self.assertRaisesWith(TypeError, "dtype", cca.KvCache, 4, 2, D, dtype=torch.float64)
        cache.close()
        self.assertRaisesWith(RuntimeError, "closed", cache.append, q, k, v)

    def test_missing_library_names_the_path(self):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(cca.__file__)))
        env = dict(os.environ, CCA_LIBRARY="/nonexistent/libcca.so", PYTHONPATH=package_root)
        code = ("import torch, cca\n"
                "try:\n    cca.attention(*[torch.randn(1, 1, 2, 8)] * 3)\n"
                "except cca.CcaError as e:\n    print('ERR', e)\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        self.assertIn("ERR cannot load the cca library", out.stdout, out.stderr)
        self.assertIn("/nonexistent/libcca.so (no such file)", out.stdout)


if __name__ == "__main__":
    unittest.main()
