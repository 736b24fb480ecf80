#!/usr/bin/env python3
"""Times Hugging Face transformers on a checkpoint written by `m3 tiny`: the bar issue 7's
benchmark 4 compares m3 against (scripts/gpu-bench.sh runs both on the same GPU in one call).

Loads DIR in BF16 with attn_implementation="sdpa" on one CUDA device, then times
  prefill: --tokens random ids from an empty cache (use_cache=True, logits of the last position
           only, as generation asks for), the median of --reps runs after one warm-up;
  decode:  --decode steps of one token each through that prefill's KV cache (greedy: each step
           feeds the argmax of the previous logits), the median step after 2 warm-up steps.
Each timing is a host clock around the forward with torch.cuda.synchronize() on both sides.
Prints one JSON line: {"prefill_ms", "decode_ms", "tokens", "decode_steps", "device", ...}.

Checks that keep it from timing the wrong thing: every weight is on the GPU in BF16 (or F32),
every forward's logits have the shape asked for, and the cache holds exactly the tokens fed;
any failure exits non-zero with one line on stderr. Text weights left to random init and
checkpoint tensors not loaded are counted in the JSON (and warned about): they keep the work
the same but mean the layout was misread.

Needs torch, transformers 5.17 (MiniMaxM3SparseForConditionalGeneration) and a CUDA GPU.
Usage: bench_transformers.py DIR [--tokens 2048] [--decode 16] [--reps 3] [--seed 0]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers


def fail(message):
    print(f"bench_transformers: {message}", file=sys.stderr)
    sys.exit(1)


def load(folder):
    """The model class for the folder's layout: the VL wrapper (what `m3 tiny` writes without
    --no-vision, the layout the committed text fixtures load through) or the bare text config."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") == "minimax_m3_vl":
        cls = transformers.MiniMaxM3SparseForConditionalGeneration
        text = config["text_config"]
    else:
        cls = transformers.AutoModelForCausalLM
        text = config
    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa", output_loading_info=True)
    t0 = time.perf_counter()
    try:
        model, info = cls.from_pretrained(folder, device_map="cuda", **kwargs)
    except (ImportError, ValueError) as e:  # device_map may need accelerate: load, then move
        print(f"bench_transformers: device_map='cuda' failed ({e}); loading on the CPU, then .to('cuda')",
              file=sys.stderr)
        model, info = cls.from_pretrained(folder, **kwargs)
        model.to("cuda")
    load_s = time.perf_counter() - t0
    model.eval()
    # A text weight left to random init, or a checkpoint tensor not loaded, does not change the
    # work a forward does (same shapes), but means the layout was not read as meant: reported.
    missing = [k for k in info.get("missing_keys", []) if "vision" not in k and "patch_merge" not in k
               and "multi_modal_projector" not in k]
    unexpected = list(info.get("unexpected_keys", []))
    for what, keys in (("text weights not in the checkpoint (random init)", missing),
                       (f"checkpoint tensors unused by {cls.__name__}", unexpected)):
        if keys:
            print(f"bench_transformers: WARNING: {len(keys)} {what}, e.g. {keys[:3]}", file=sys.stderr)
    for name, p in model.named_parameters():
        if p.device.type != "cuda":
            fail(f"parameter {name} is on {p.device}, not the GPU")
        if p.dtype != torch.bfloat16 and p.dtype != torch.float32:
            fail(f"parameter {name} is {p.dtype}")
    return model, text, load_s, len(missing), len(unexpected)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA device")
    if args.tokens < 1 or args.decode < 1 or args.reps < 1:
        fail("--tokens, --decode and --reps must be positive")

    model, text, load_s, missing, unexpected = load(args.dir)
    vocab = text["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (1, args.tokens), generator=gen).to("cuda")

    def forward(input_ids, cache):
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if tuple(out.logits.shape) != (1, 1, vocab):
            fail(f"logits {tuple(out.logits.shape)}, expected (1, 1, {vocab})")
        return out

    def check_cache(cache, n):
        if cache is None or cache.get_seq_length() != n:
            fail(f"the KV cache holds {None if cache is None else cache.get_seq_length()} tokens "
                 f"after {n} were fed")

    with torch.inference_mode():
        prefill_ms, out = [], None
        for rep in range(args.reps + 1):  # rep 0 warms up
            out, ms = timed(lambda: forward(ids, None))
            check_cache(out.past_key_values, args.tokens)
            if rep:
                prefill_ms.append(ms)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_ms = []
        for step in range(args.decode + 2):  # 2 warm-up steps
            out, ms = timed(lambda: forward(token, cache))
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if step >= 2:
                decode_ms.append(ms)
        check_cache(cache, args.tokens + args.decode + 2)

    print(json.dumps({
        "prefill_ms": round(statistics.median(prefill_ms), 3),
        "decode_ms": round(statistics.median(decode_ms), 3),
        "tokens": args.tokens,
        "decode_steps": args.decode,
        "device": torch.cuda.get_device_name(),
        "load_s": round(load_s, 1),
        "layers": text["num_hidden_layers"],
        "missing_text_weights": missing,
        "unused_tensors": unexpected,
        "vocab": vocab,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
