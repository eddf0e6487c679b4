"""The attention contract (/work/shared/docs/cca-semantics.md, docs/semantics.md) written directly
in PyTorch with dense masks: the reference the package's tests compare against. Differentiable
by autograd, so its gradients are the contract's gradients. Layout as cca.attention: q
[B, Hq, T, D], k, v [B, Hkv, T, D]; computes in the inputs' dtype (tests pass float64)."""
import torch


def core_tokens(q, k, v, group, window, pool, pool_heads, scale):
    """(kc, vc) [B, Hc, m, D] for the m = max(0, floor((T - s)/g)) groups some query sees."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    r = Hq // Hkv
    m = max(0, (T - window) // group)
    kg = k[:, :, : m * group].reshape(B, Hkv, m, group, D)
    vg = v[:, :, : m * group].reshape(B, Hkv, m, group, D)
    if pool_heads == "query":  # every query head pools its own copy of its KV head's group
        kg, vg = kg.repeat_interleave(r, dim=1), vg.repeat_interleave(r, dim=1)
    if pool == "mean":
        return kg.mean(dim=3), vg.mean(dim=3)
    if pool == "max":
        return kg.amax(dim=3), vg.amax(dim=3)
    q_last = q[:, :, group - 1: m * group: group]  # [B, Hq, m, D]: position (i+1)g - 1
    if pool_heads == "query":
        w = (torch.einsum("bhmd,bhmnd->bhmn", q_last, kg) * scale).softmax(dim=-1)
    else:  # softmax per query head, then the mean over the r query heads of each KV head
        q_last = q_last.reshape(B, Hkv, r, m, D)
        w = (torch.einsum("bcrmd,bcmnd->bcrmn", q_last, kg) * scale).softmax(dim=-1).mean(dim=2)
    return torch.einsum("bhmn,bhmnd->bhmd", w, kg), torch.einsum("bhmn,bhmnd->bhmd", w, vg)


def reference_attention(q, k, v, variant="cca", group=16, window=1024, sinks=4, pool="cca",
                        pool_heads="kv", scale=None, return_lse=False):
    B, Hq, T, D = q.shape
    r = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    t = torch.arange(T, device=q.device)[:, None]  # query position
    x = torch.arange(T, device=q.device)[None, :]  # raw key position
    causal = x <= t
    if variant == "full":
        raw = causal
    elif variant == "sliding":
        raw = causal & (x > t - window)
    elif variant in ("streaming", "lminfinite"):
        raw = causal & ((x > t - window) | (x < sinks))
    elif variant == "cca":
        j = torch.div(t + 1 - window, group, rounding_mode="floor").clamp(min=0)  # j(t)
        raw = causal & (x >= j * group)
    else:
        raise ValueError(variant)
    keys, values, visible = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1), raw
    if variant == "cca":
        kc, vc = core_tokens(q, k, v, group, window, pool, pool_heads, scale)
        if pool_heads == "kv":
            kc, vc = kc.repeat_interleave(r, dim=1), vc.repeat_interleave(r, dim=1)
        core = torch.arange(kc.shape[2], device=q.device)[None, :] < j  # core token i < j(t)
        keys, values = torch.cat([kc, keys], dim=2), torch.cat([vc, values], dim=2)
        visible = torch.cat([core, raw], dim=1)
    logits = (q @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    out = logits.softmax(dim=-1) @ values
    return (out, logits.logsumexp(dim=-1)) if return_lse else out
