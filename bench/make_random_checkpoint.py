#!/usr/bin/env python3
"""Writes a random bfloat16 Llama checkpoint of a real model's shape in Hugging Face layout
(config.json, sharded model-*.safetensors + index, generation_config.json), fast: the tensors are
drawn on the GPU and written shard by shard. For benchmarks on the GPU machine; not committed.
    python3 bench/make_random_checkpoint.py --shape llama3-8b --out /tmp/llama3-8b
Shapes: llama3-8b (32 layers, 4096, 32/8 heads, MLP 14336, vocab 128256), llama2-7b (32/32 heads,
MLP 11008, vocab 32000)."""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      rope_theta=10000.0, rope_scaling=None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=0, help="override the layer count")
    ap.add_argument("--max-positions", type=int, default=1048576)
    args = ap.parse_args()
    c = dict(SHAPES[args.shape])
    if args.layers:
        c["num_hidden_layers"] = args.layers
    os.makedirs(args.out, exist_ok=True)
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = H // c["num_attention_heads"]
    qd, kvd = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(torch.bfloat16).cpu()

    shards, weight_map, cur, cur_bytes = [], {}, {}, 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(cur, os.path.join(args.out, name), metadata={"format": "pt"})
            shards.append(name)
            for k in cur:
                weight_map[k] = name
            cur, cur_bytes = {}, 0

    def add(name, t):
        nonlocal cur_bytes
        cur[name] = t
        cur_bytes += t.numel() * 2
        if cur_bytes > (4 << 30):
            flush()

    add("model.embed_tokens.weight", rnd(V, H, std=1.0))
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        add(p + "input_layernorm.weight", (1 + rnd(H, std=0.1).float()).to(torch.bfloat16))
        add(p + "post_attention_layernorm.weight", (1 + rnd(H, std=0.1).float()).to(torch.bfloat16))
        for n, shape in (("self_attn.q_proj", (qd, H)), ("self_attn.k_proj", (kvd, H)),
                         ("self_attn.v_proj", (kvd, H)), ("self_attn.o_proj", (H, qd)),
                         ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                         ("mlp.down_proj", (H, I))):
            add(p + n + ".weight", rnd(*shape, std=shape[1] ** -0.5))
    add("model.norm.weight", (1 + rnd(H, std=0.1).float()).to(torch.bfloat16))
    add("lm_head.weight", rnd(V, H, std=H ** -0.5))
    flush()
    # Shard names with their count, as Hugging Face spells them.
    n = len(shards)
    final = {}
    for i, s in enumerate(shards):
        want = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(args.out, s), os.path.join(args.out, want))
        final[s] = want
    weight_map = {k: final[v] for k, v in weight_map.items()}
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": D,
           "max_position_embeddings": args.max_positions, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "torch_dtype": "bfloat16", **c}
    if cfg["rope_scaling"] is None:
        del cfg["rope_scaling"]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    print("wrote", args.out, n, "shards")


if __name__ == "__main__":
    main()
