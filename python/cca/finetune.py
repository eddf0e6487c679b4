"""python -m cca.finetune: turn a Llama-family checkpoint into a CCA model by fine-tuning it with
CCA attention, as the paper does (swap the attention in, train about a thousand steps).

    python -m cca.finetune --model DIR --data FILE --seq-len 32768 --group 16 --window 1024 \\
        --steps 1000 --lr 2e-5 --out OUT

Loads the Hugging Face checkpoint in DIR (Llama, Mistral or Qwen2) with attn_implementation
"cca", trains it on FILE at --seq-len tokens per sequence with AdamW, bf16 autocast over float32
master weights (--precision), gradient checkpointing, a linear warm-up then a constant learning
rate, and gradient clipping; logs loss, learning rate, tokens/s and peak memory; saves OUT in the
Hugging Face layout (config.json with a `cca` entry recording g and s, model.safetensors, the
tokenizer files) that `cca generate --model OUT` runs with its own g and s.

Data (nothing is downloaded): plain text (*.txt, any other name: one document, tokenized with
the checkpoint's tokenizer), JSON lines (*.jsonl: objects with a "text" string or an
"input_ids" list; documents are joined with the EOS token) or token ids (*.ids: integers
separated by white space). The token stream is cut into sequences of --seq-len tokens, visited
in a seeded random order, epoch after epoch.

OUT is written to a temporary folder next to it and renamed at the end, so it is never left
half-written; it must not exist yet, or be empty.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

SUPPORTED_MODELS = ("llama", "mistral", "qwen2")  # what `cca generate` runs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


class UsageError(Exception):
    """Bad input: printed as `cca.finetune: error: ...`, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cca.finetune", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--data", required=True, help="training data: .txt, .jsonl or .ids file")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "jsonl", "ids"],
                   help="auto: by the file name's extension")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--group", type=int, default=16, help="CCA group size g")
    p.add_argument("--window", type=int, default=1024, help="CCA local window s")
    p.add_argument("--pool", default="cca", choices=["cca", "mean", "max"])
    p.add_argument("--pool-heads", default="kv", choices=["kv", "query"])
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "bf16", "fp32"],
                   help="bf16-mixed: float32 weights and optimizer, bf16 autocast; bf16: bf16 "
                        "weights and optimizer (half the memory; updates below bf16's "
                        "resolution are lost); auto: bf16-mixed on a GPU, fp32 on the CPU")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    args = p.parse_args(argv)
    for name in ("seq_len", "group", "window", "steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps = {args.warmup_steps} must be >= 0")
    for name in ("lr", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise UsageError(f"--{name.replace('_', '-')} = {value} must be a finite number "
                             f"{'> 0' if name == 'lr' else '>= 0'}")
    return args


# ---- data -------------------------------------------------------------------------------------
def data_format(path, requested):
    if requested != "auto":
        return requested
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".ids": "ids"}.get(ext, "text")


def read_tokens(path, fmt, vocab_size, eos_id=None, tokenize=None, text_field="text"):
    """The token stream of data file `path` (a list of ints). `tokenize(text) -> ids` is needed
    for text; UsageError names the file, the line or token, and what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"data file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not content.strip():
        raise UsageError(f"data file {path} is empty")

    def need_tokenizer():
        if tokenize is None:
            raise UsageError(f"data file {path} holds text, and the checkpoint has no usable "
                             f"tokenizer; give token ids (.ids, or JSONL input_ids) instead")
        return tokenize

    tokens = []
    if fmt == "ids":
        for i, word in enumerate(content.split()):
            try:
                tokens.append(int(word))
            except ValueError:
                raise UsageError(f"data file {path}: token {i} ({word[:20]!r}) is not an integer")
    elif fmt == "jsonl":
        for n, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"data file {path}, line {n}: not JSON ({e.msg})")
            if isinstance(doc, dict) and isinstance(doc.get("input_ids"), list):
                ids = doc["input_ids"]
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise UsageError(f"data file {path}, line {n}: input_ids must be integers")
            elif isinstance(doc, dict) and isinstance(doc.get(text_field), str):
                ids = need_tokenizer()(doc[text_field])
            else:
                raise UsageError(f"data file {path}, line {n}: expected an object with "
                                 f"{text_field!r} (a string) or 'input_ids' (integers)")
            tokens.extend(ids)
            if eos_id is not None:
                tokens.append(eos_id)
    elif fmt == "text":
        tokens = list(need_tokenizer()(content))
    else:
        raise UsageError(f"unknown data format {fmt!r}")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UsageError(f"data file {path}: token id {bad} is outside the model's vocabulary "
                         f"(0..{vocab_size - 1})")
    return tokens


def pack_sequences(tokens, seq_len, path="data"):
    """[N, seq_len] int64 tensor of consecutive, non-overlapping slices of the stream."""
    import torch
    n = len(tokens) // seq_len
    if n == 0:
        raise UsageError(f"{path} has {len(tokens)} tokens, fewer than --seq-len {seq_len}")
    return torch.tensor(tokens[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(sequences, batch_size, seed):
    """Endless micro-batches [batch_size, seq_len]: a seeded shuffle per epoch (needs
    batch_size <= len(sequences))."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(sequences), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield sequences[order[i: i + batch_size]]


# ---- checkpoint and output ---------------------------------------------------------------------
def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--model {model_dir}: no config.json (expected a Hugging Face "
                         f"checkpoint folder)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_dir}: cannot read config.json ({e})")
    text = config.get("text_config", config)
    model_type = text.get("model_type", config.get("model_type"))
    if model_type not in SUPPORTED_MODELS:
        raise UsageError(f"--model {model_dir}: model_type {model_type!r} is not supported "
                         f"(expected one of {', '.join(SUPPORTED_MODELS)})")
    if not isinstance(text.get("vocab_size"), int) or text["vocab_size"] < 1:
        raise UsageError(f"--model {model_dir}: config.json has no valid vocab_size")
    if text.get("attention_dropout", 0.0):
        raise UsageError(f"--model {model_dir}: attention_dropout = "
                         f"{text['attention_dropout']}; CCA training takes none (set it to 0)")
    return text


def check_output(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} already exists and is not an empty folder; choose a "
                         f"new one")


def eos_token(config):
    eos = config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def pick_device(requested, torch):
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a device (cuda, cuda:N, cpu, auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no usable GPU")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {requested}: only cuda and cpu are supported")
    return device


def preflight(torch, device, dtype, head_dim, params):
    """A tiny forward and backward of the attention: the library's errors (a head dim or dtype
    the backend does not take, no backward) before the model is loaded."""
    import cca
    q = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        cca.attention(q, q, q, **params).sum().backward()
    except cca.CcaError as e:
        raise UsageError(f"CCA attention cannot run this model on {device} in {dtype}: {e}")


def run(args):
    config = read_config(args.model)
    check_output(args.out)
    fmt = data_format(args.data, args.data_format)

    tokenize = None
    if fmt in ("text", "jsonl"):
        tokenize = _tokenizer(args.model)  # None when the checkpoint has none
    tokens = read_tokens(args.data, fmt, config["vocab_size"], eos_token(config), tokenize,
                         args.text_field)
    import torch
    sequences = pack_sequences(tokens, args.seq_len, f"data file {args.data}")
    if len(sequences) < args.batch_size:
        raise UsageError(f"data file {args.data} gives {len(sequences)} sequences of "
                         f"{args.seq_len} tokens, fewer than --batch-size {args.batch_size}")

    transformers = _import_transformers()
    import cca
    import cca.transformers
    device = pick_device(args.device, torch)
    precision = args.precision if args.precision != "auto" else (
        "bf16-mixed" if device.type == "cuda" else "fp32")
    compute_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    params = dict(variant="cca", group=args.group, window=args.window, pool=args.pool,
                  pool_heads=args.pool_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    preflight(torch, device, compute_dtype, head_dim, params)

    torch.manual_seed(args.seed)
    cca.transformers.register(**params)
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, attn_implementation="cca", dtype=weight_dtype).to(device)
    model.config.cca = params  # saved in config.json; settings_for() reads it too
    model.config.use_cache = False
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=args.weight_decay)
    warmup = min(args.warmup_steps, args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    data = batches(sequences, args.batch_size, args.seed)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    print(f"cca.finetune: {args.model} ({config.get('model_type')}), {len(sequences)} sequences "
          f"of {args.seq_len} tokens, {args.steps} steps of {tokens_per_step} tokens, CCA g="
          f"{args.group} s={args.window}, {precision} on {device}", flush=True)

    out_parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(args.out))}.tmp-",
                           dir=out_parent)
    try:
        with open(os.path.join(tmp, "train_log.jsonl"), "w", encoding="utf-8") as log:
            train(args, torch, model, opt, sched, data, device, precision, tokens_per_step, log)
        model.config.use_cache = True
        model.to(getattr(torch, args.save_dtype)).save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            src = os.path.join(args.model, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(src, os.path.join(tmp, name))
        check_output(args.out)  # still free (nothing appeared meanwhile)
        if os.path.isdir(args.out):
            os.rmdir(args.out)
        os.rename(tmp, args.out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"cca.finetune: saved {args.out}; run it with:\n  cca generate --model {args.out} "
          f"--prompt '...'   (its config.json's \"cca\" entry sets the attention)", flush=True)


def train(args, torch, model, opt, sched, data, device, precision, tokens_per_step, log):
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else _nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    interval_start, interval_tokens, losses = time.perf_counter(), 0, []
    for step in range(1, args.steps + 1):
        step_loss = 0.0
        for _ in range(args.grad_accum):
            batch = next(data).to(device)
            with autocast:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"step {step}: the loss is {loss.item()} (try a lower --lr)")
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        interval_tokens += tokens_per_step
        if step % args.log_every == 0 or step == args.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - interval_start
            record = dict(step=step, loss=sum(losses) / len(losses), lr=sched.get_last_lr()[0],
                          tokens_per_s=interval_tokens / elapsed)
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"step {step}/{args.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"tokens/s {record['tokens_per_s']:.0f}" +
                  (f"  peak {record['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in record else ""),
                  flush=True)
            interval_start, interval_tokens, losses = time.perf_counter(), 0, []


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("cca.finetune needs Hugging Face transformers (5.x), which is not "
                         "installed in this Python")
    return transformers


def _tokenizer(model_dir):
    """tokenize(text) -> ids with the checkpoint's tokenizer, or None if it has none."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    transformers = _import_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # the library raises many types for unusable tokenizer files
        raise UsageError(f"--model {model_dir}: cannot load its tokenizer ({e})")
    return lambda text: tok(text, add_special_tokens=True, verbose=False)["input_ids"]


def main(argv=None):
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"cca.finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
