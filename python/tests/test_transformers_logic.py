"""cca.transformers' own logic where transformers is not installed (CI): the attention function,
the mask checks and CCACache, driven the way a transformers attention layer drives them
(cache.update, then the registered function), against a stand-in for the three transformers
registries they use. The integration with real transformers models is checked by hf_checks.py
on the GPU machine (bench/gpu_python.sh)."""
import importlib
import sys
import types
import unittest
from unittest import mock

import torch

import cca
from contract import reference_attention
from test_attention import DEVICE, DTYPES, HEAD_DIMS, TOL, make_qkv, rel_err


def stand_in_transformers():
    """Modules with the names and registration calls cca.transformers uses."""
    class Registry:
        @classmethod
        def register(cls, name, fn):
            cls.mapping[name] = fn

    top = types.ModuleType("transformers")
    top.AttentionInterface = type("AttentionInterface", (Registry,), {"mapping": {}})
    masking = types.ModuleType("transformers.masking_utils")
    masking.AttentionMaskInterface = type("AttentionMaskInterface", (Registry,), {"mapping": {}})
    cache_utils = types.ModuleType("transformers.cache_utils")

    class Cache:
        def __init__(self, layers=None, layer_class_to_replicate=None):
            self.layers = layers or []
    cache_utils.Cache, cache_utils.DynamicLayer = Cache, object
    return {"transformers": top, "transformers.masking_utils": masking,
            "transformers.cache_utils": cache_utils}


class TransformersLogic(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        modules = stand_in_transformers()
        with mock.patch.dict(sys.modules, modules):
            sys.modules.pop("cca.transformers", None)
            cls.ct = importlib.import_module("cca.transformers")
            cls.ct.register(group=4, window=8)
        cls.attend = staticmethod(modules["transformers"].AttentionInterface.mapping["cca"])
        cls.mask = staticmethod(
            modules["transformers.masking_utils"].AttentionMaskInterface.mapping["cca"])

    def setUp(self):
        self.config = types.SimpleNamespace(_attn_implementation="cca", num_hidden_layers=2)
        self.layers = [types.SimpleNamespace(config=self.config, layer_idx=i, is_causal=True)
                       for i in range(2)]
        self.q, self.k, self.v = make_qkv(2, 4, 2, 50, HEAD_DIMS[0], DTYPES[0], seed=9)

    def test_prefill_is_the_contract_in_transformers_layout(self):
        out, weights = self.attend(self.layers[0], self.q, self.k, self.v, None, scaling=0.2)
        self.assertIsNone(weights)
        self.assertEqual(out.shape, (2, 50, 4, HEAD_DIMS[0]))  # [B, T, Hq, D]
        self.assertTrue(out.is_contiguous())
        ref = reference_attention(self.q.double(), self.k.double(), self.v.double(), group=4,
                                  window=8, scale=0.2)
        self.assertLessEqual(rel_err(out.transpose(1, 2), ref), TOL[DTYPES[0]][0])

    def test_model_config_overrides_registered_parameters(self):
        self.config.cca = {"window": 64}  # s >= T: full causal attention
        out, _ = self.attend(self.layers[1], self.q, self.k, self.v, None)
        full = cca.attention(self.q, self.k, self.v, variant="full")
        self.assertLessEqual(rel_err(out.transpose(1, 2), full.double()), TOL[DTYPES[0]][0])
        self.config.cca = {"group": 0}
        with self.assertRaisesRegex(ValueError, "config.cca of the model: group = 0"):
            self.attend(self.layers[0], self.q, self.k, self.v, None)

    def test_cache_decodes_as_the_prefill(self):
        want, _ = self.attend(self.layers[0], self.q, self.k, self.v, None)
        cache = self.ct.CCACache(self.config)
        self.assertEqual(cache.get_seq_length(), 0)
        outs = []
        for t0, t1 in [(0, 19)] + [(t, t + 1) for t in range(19, 50)]:
            self.assertEqual(cache.get_mask_sizes(t1 - t0, 0), (t0 + t1 - t0, 0))
            for layer in self.layers:  # as LlamaAttention: update, then the attention function
                k, v = cache.update(self.k[:, :, t0:t1], self.v[:, :, t0:t1], layer.layer_idx)
                out, _ = self.attend(layer, self.q[:, :, t0:t1], k, v, None)
            outs.append(out)
        self.assertLessEqual(rel_err(torch.cat(outs, dim=1), want.double()), TOL[DTYPES[0]][0])
        self.assertEqual(cache.get_seq_length(1), 50)
        self.assertEqual(cache.get_mask_sizes(torch.arange(3), 1), (53, 0))  # older signature
        self.assertLess(cache.memory_bytes(), cache.full_cache_bytes())
        with self.assertRaisesRegex(NotImplementedError, "beam search"):
            cache.reorder_cache(torch.tensor([1, 0]))
        cache.reset()
        self.assertEqual(cache.get_seq_length(), 0)

    def test_cache_refuses_other_attention(self):
        cache = self.ct.CCACache(self.config)
        cache.update(self.k, self.v, 0)
        with self.assertRaisesRegex(RuntimeError, "does not use attn_implementation='cca'"):
            cache.update(self.k, self.v, 0)  # the last keys never reached the cca function
        sdpa = types.SimpleNamespace(_attn_implementation="sdpa", num_hidden_layers=2)
        with self.assertRaisesRegex(ValueError, "this one uses 'sdpa'"):
            self.ct.CCACache(sdpa)

    def test_padding_masks(self):
        right = torch.ones(2, 10, dtype=torch.bool)
        right[1, 7:] = False  # training batch, right padded: accepted, no mask needed
        self.assertIsNone(self.mask(batch_size=2, q_length=10, kv_length=10,
                                    attention_mask=right))
        self.assertIsNone(self.mask(batch_size=2, q_length=1, kv_length=10,
                                    attention_mask=torch.ones(2, 10, dtype=torch.bool)))
        left = torch.ones(2, 10, dtype=torch.bool)
        left[0, :3] = False
        with self.assertRaisesRegex(ValueError, r"padding at the start of or inside a sequence "
                                                r"\(row 0, position 0\)"):
            self.mask(batch_size=2, q_length=10, kv_length=10, attention_mask=left)
        with self.assertRaisesRegex(ValueError, "padding after cached tokens"):
            self.mask(batch_size=2, q_length=1, kv_length=10, attention_mask=right)

    def test_inputs_it_cannot_honour(self):
        layer, q, k, v = self.layers[0], self.q, self.k, self.v
        cases = [
            (dict(attention_mask=torch.zeros(2, 1, 50, 50)), "custom attention masks"),
            (dict(dropout=0.1), "attention dropout 0.1"),
            (dict(is_causal=False), "bidirectional"),
            (dict(cu_seq_lens_q=torch.tensor([0, 25, 50])), "packed sequences"),
            (dict(position_ids=torch.cat([torch.arange(25), torch.arange(25)]).expand(2, 50)),
             "position_ids restart"),
        ]
        for kwargs, text in cases:
            with self.subTest(text=text):
                mask = kwargs.pop("attention_mask", None)
                with self.assertRaisesRegex(ValueError, text):
                    self.attend(layer, q, k, v, mask, **kwargs)
        with self.assertRaisesRegex(ValueError, "CCACache"):  # decoding with a standard cache
            self.attend(layer, q[:, :, -1:], k, v, None)
        with self.assertRaisesRegex(ValueError, "group = 0 must be an integer >= 1"):
            self.ct.register(group=0)
        with self.assertRaisesRegex(ValueError, "unknown parameter"):
            self.ct.register(windw=3)


if __name__ == "__main__":
    unittest.main()
