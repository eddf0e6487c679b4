"""cca: Core Context Aware attention (Chen et al., ICML 2025) for PyTorch, over the C++/CUDA
library of this repository (libcca.so, loaded through its C API on first use).

    cca.attention(q, k, v, ...)    differentiable attention on [B, H, T, D] tensors
    cca.KvCache(...)               the compressed decode cache (inference)
    cca.transformers.register()    attn_implementation="cca" for Hugging Face transformers
    python -m cca.finetune ...     turn a Llama-family checkpoint into a CCA model

See docs/python.md.
"""
from ._lib import CcaError, backend_unavailable_reason, library_path
from .attention import HAVE_CUSTOM_OP, attention
from .kv_cache import KvCache

__all__ = ["attention", "KvCache", "CcaError", "library_path", "backend_unavailable_reason",
           "HAVE_CUSTOM_OP"]
__version__ = "0.1.0"
