"""CCA for Hugging Face transformers (5.x): an attention implementation named "cca" and a Cache
backed by the compressed decode cache.

    import cca.transformers
    cca.transformers.register(group=16, window=1024)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="cca")
    model(**batch).loss.backward()                        # trains with CCA (cca.attention)
    model.generate(ids, past_key_values=cca.transformers.CCACache(model.config))

register() adds "cca" to transformers' AttentionInterface (the function every attention layer
of Llama, Mistral, Qwen2 and most recent models calls) and to AttentionMaskInterface (which
builds the mask that function receives). The parameters come from register(), overridden per
model by a `cca` entry of its config (cca.finetune writes one into the checkpoint's config.json).
GQA models pool per KV head by default (pool_heads="kv"). CCA replaces the model's attention
pattern entirely: a model's own sliding window (Mistral, Qwen2) is not applied.

What it cannot honour raises a ValueError naming the input: padding at the start or inside a
sequence (left padding, packed sequences: groups are pooled by absolute position), custom 4-D
masks, bidirectional attention, attention dropout > 0, decoding with another Cache than
CCACache, and head dims or dtypes the backend does not take (the library's message).
"""
import weakref

import torch

from ._lib import CcaError, check_names
from .attention import attention
from .kv_cache import KvCache

DEFAULTS = dict(variant="cca", group=16, window=1024, sinks=4, pool="cca", pool_heads="kv")
_SETTINGS = {}  # registered name -> parameters
_ACTIVE_CACHES = weakref.WeakSet()  # CCACaches holding keys that an attention call will consume


def register(name="cca", **params):
    """Registers attention implementation `name` with `params` (variant, group, window, sinks,
    pool, pool_heads; defaults: DEFAULTS). Returns the name for attn_implementation=."""
    settings = _check_params(dict(DEFAULTS), params, "cca.transformers.register")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _SETTINGS[name] = settings
    AttentionInterface.register(name, cca_attention_forward)
    AttentionMaskInterface.register(name, cca_mask)
    return name


def _check_params(base, params, where):
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {sorted(unknown)} "
                         f"(expected {', '.join(DEFAULTS)})")
    base.update(params)
    check_names(base["variant"], base["pool"], base["pool_heads"])
    for key in ("group", "window", "sinks"):
        value = base[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "sinks"
                                                                             else 1):
            raise ValueError(f"{where}: {key} = {value!r} must be an integer >= "
                             f"{0 if key == 'sinks' else 1}")
    return base


def settings_for(config):
    """The CCA parameters of a model: the registered ones, updated by config.cca."""
    name = getattr(config, "_attn_implementation", None) or "cca"
    if name not in _SETTINGS:
        raise ValueError(f"attention implementation {name!r} is not registered: call "
                         f"cca.transformers.register() before loading the model")
    own = getattr(config, "cca", None) or {}
    return _check_params(dict(_SETTINGS[name]), dict(own), f"config.cca of the model")


def _is_compiling():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


def cca_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
             mask_function=None, attention_mask=None, **kwargs):
    """The mask the "cca" attention function receives: always None, since CCA's own masks are
    built by the library. Rejects padding that CCA cannot honour: only a 2-D padding mask that
    keeps every sequence's tokens at positions 0.. (right padding, without cached tokens) is
    accepted; its padding rows come last, so no real token attends to them."""
    if attention_mask is None or attention_mask.dim() != 2 or _is_compiling():
        return None
    mask = attention_mask[:, -kv_length:].bool() if kv_length else attention_mask.bool()
    if bool(mask.all()):
        return None
    past = mask.shape[1] - (q_length or mask.shape[1])
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    if right_padded and past == 0:
        return None
    row = int((~mask.all(dim=1)).nonzero()[0, 0])
    first_pad = int((~mask[row]).nonzero()[0, 0])
    raise ValueError(
        f"cca: the attention mask has padding {'after cached tokens' if right_padded else 'at the start of or inside a sequence'} "
        f"(row {row}, position {first_pad}); CCA pools groups by absolute position, so it takes "
        f"unpadded sequences, or right padding in a forward without a cache. Pad on the right "
        f"for training, and generate ragged prompts one at a time")


def cca_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D]
    (post-RoPE) -> ([B, T, Hq, D], None)."""
    where = f"cca attention (layer {getattr(module, 'layer_idx', '?')})"
    if attention_mask is not None:
        raise ValueError(f"{where}: custom attention masks (got one of shape "
                         f"{tuple(attention_mask.shape)}) are not supported; CCA builds its own")
    if dropout:
        raise ValueError(f"{where}: attention dropout {dropout} is not supported; set "
                         f"config.attention_dropout = 0")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{where}: bidirectional attention is not supported (CCA is causal)")
    for packed in ("cu_seq_lens_q", "cu_seqlens_q", "cu_seq_lens_k"):
        if kwargs.get(packed) is not None:
            raise ValueError(f"{where}: packed sequences ({packed}) are not supported; give "
                             f"one sequence per batch row")
    settings = settings_for(module.config)
    compiling = _is_compiling()
    if not compiling:
        cache = _cache_holding(module, key)
        if cache is not None:
            return (cache.attend(module, query, key, value, settings, scaling).transpose(1, 2),
                    None)
        if getattr(module, "layer_idx", 0) == 0:
            _check_positions(where, kwargs.get("position_ids"), query.shape[2])
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{where}: {query.shape[2]} queries over {key.shape[2]} cached keys: decoding with "
            f"a standard transformers cache is not supported by CCA; pass "
            f"past_key_values=cca.transformers.CCACache(model.config) to generate(), or "
            f"use_cache=False")
    try:
        out = attention(query, key, value, scale=scaling, **settings)
    except CcaError as e:
        raise ValueError(f"{where}: {e}") from None
    return out.transpose(1, 2), None


def _check_positions(where, position_ids, T):
    """Packed sequences show as position ids that restart inside a row."""
    if position_ids is None or T < 2 or position_ids.shape[-1] != T:
        return
    steps = position_ids[..., 1:] - position_ids[..., :-1]
    if not bool((steps == 1).all()):
        raise ValueError(f"{where}: position_ids restart or skip inside a row (packed or "
                         f"padded sequences); CCA needs consecutive positions per row")


def _cache_holding(module, key):
    for cache in list(_ACTIVE_CACHES):
        if cache._holds(getattr(module, "layer_idx", None), key):
            return cache
    return None


try:
    from transformers.cache_utils import Cache as _CacheBase
except ImportError:  # transformers missing: CCACache() raises when used
    _CacheBase = object


class CCACache(_CacheBase):
    """A transformers Cache whose layers are cca.KvCache: compressed (core tokens and a raw
    window of at most s + g - 1 tokens per KV head), for decoding with attn_implementation="cca".

    update() only hands the new keys and values through; the "cca" attention function then
    appends them, with their queries (pooling needs each group's last query), to the layer's
    KvCache. No beam search, cropping or batch reordering (the compressed state cannot be
    edited that way)."""

    is_compileable = False

    def __init__(self, config, **_ignored):
        if _CacheBase is object:
            raise ImportError("cca.transformers.CCACache needs transformers (5.x)")
        try:
            from transformers.cache_utils import DynamicLayer
            super().__init__(layer_class_to_replicate=DynamicLayer)
        except (TypeError, ImportError):
            super().__init__()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        impl = getattr(text, "_attn_implementation", None)
        if impl is not None and impl not in _SETTINGS:
            raise ValueError(f"CCACache needs a model loaded with a registered cca attention "
                             f"implementation (cca.transformers.register(), then "
                             f"attn_implementation='cca'); this one uses {impl!r}")
        self.layers = []  # no transformers layers: every query goes through the methods below
        self.num_layers = text.num_hidden_layers
        self._caches = [None] * self.num_layers
        self._pending = {}  # layer -> the key tensor that update() handed to the layer
        _ACTIVE_CACHES.add(self)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        if layer_idx in self._pending:
            raise RuntimeError("CCACache: layer {} got new keys before attending to the last "
                               "ones: the model does not use attn_implementation='cca'"
                               .format(layer_idx))
        self._pending[layer_idx] = key_states
        return key_states, value_states

    def _holds(self, layer_idx, key):
        return self._pending.get(layer_idx) is key

    def attend(self, module, query, key, value, settings, scaling=None):
        """Appends to layer module.layer_idx; the output [B, Hq, n, D]."""
        layer = module.layer_idx
        del self._pending[layer]
        cache = self._caches[layer]
        if cache is None:
            B, Hq, _, D = query.shape
            cache = KvCache(Hq, key.shape[1], D, batch=B, dtype=key.dtype, device=key.device,
                            scale=scaling, **settings)
            self._caches[layer] = cache
        with torch.no_grad():
            try:
                return cache.append(query, key, value)
            except CcaError as e:
                raise ValueError(f"cca attention (layer {layer}): {e}") from None

    def get_seq_length(self, layer_idx=0):
        cache = self._caches[layer_idx] if layer_idx < self.num_layers else None
        return cache.length if cache is not None else 0

    def get_mask_sizes(self, query, layer_idx=0, *args):
        """(kv_length, kv_offset) for the mask code; `query` is the query length or (older
        transformers) the cache positions."""
        n = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length(layer_idx) + n, 0

    def get_max_cache_shape(self, layer_idx=0):
        return -1

    def get_max_length(self):
        return None

    @property
    def is_sliding(self):
        return [False] * self.num_layers

    @property
    def max_batch_size(self):
        return next((c.shape[0] for c in self._caches if c is not None), -1)

    @property
    def max_cache_len(self):
        return -1

    @property
    def is_initialized(self):
        return any(c is not None for c in self._caches)

    def memory_bytes(self):
        """Bytes of keys and values held, all layers."""
        return sum(c.memory_bytes for c in self._caches if c is not None)

    def full_cache_bytes(self):
        """Bytes a full cache would hold for the same tokens, all layers."""
        return sum(c.full_cache_bytes for c in self._caches if c is not None)

    def reset(self):
        for c in self._caches:
            if c is not None:
                c.close()
        self._caches = [None] * self.num_layers
        self._pending.clear()

    def __len__(self):
        return self.num_layers

    def _unsupported(self, what):
        raise NotImplementedError(f"CCACache: {what} is not supported (the compressed cache "
                                  f"holds pooled core tokens, which cannot be cut or reordered)")

    def reorder_cache(self, beam_idx):
        self._unsupported("beam search (reorder_cache)")

    def crop(self, max_length):
        self._unsupported("crop (assisted decoding, contrastive search)")

    def batch_repeat_interleave(self, repeats):
        if self.is_initialized and repeats != 1:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")
