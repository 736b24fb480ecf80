#!/usr/bin/env python3
"""The drift of the FP8 KV cache: logits with `--kv-dtype fp8` against those with the float32
cache, for the first --tokens tokens of a text cut into independent chunks of --ctx (as
`m3 perplexity` cuts them), and both perplexities over the whole text.

Per position: relative L2 ||fp8 - f32|| / ||f32|| of the logit row, and whether the argmax is the
same. Prints the median, p90, p99 and worst, and one line of JSON with the same figures.

Usage: kv_fp8_drift.py --m3 BUILD/m3 --model DIR --file TEXT [--tokens 2048] [--ctx 512]
                       [--device cpu|cuda] [--chunk N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def logits(args, ids, kv, path):
    cmd = [args.m3, "logits", "--model", args.model, "--ids", ",".join(map(str, ids)), "--out", path,
           "--device", args.device, "--kv-dtype", kv]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    run(cmd)
    rows = np.fromfile(path, dtype="<f4")
    if rows.size % len(ids):
        sys.exit(f"{path}: {rows.size} floats is not a whole number of rows for {len(ids)} ids")
    return rows.reshape(len(ids), -1).astype(np.float64)


def perplexity(args, kv):
    out = run([args.m3, "perplexity", "--model", args.model, "--file", args.file, "--ctx", str(args.ctx),
               "--device", args.device, "--kv-dtype", kv, "--json"])
    return json.loads(out)["perplexity"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m3", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=0, help="feed each sequence N tokens a step")
    args = ap.parse_args()

    ids = json.loads(run([args.m3, "tokenize", "--model", args.model, "--file", args.file, "--json"]))
    if len(ids) < args.tokens:
        sys.exit(f"{args.file}: {len(ids)} tokens, fewer than --tokens {args.tokens}")
    drift, same = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, args.tokens, args.ctx):
            seq = ids[start: min(start + args.ctx, args.tokens)]
            ref = logits(args, seq, "f32", os.path.join(tmp, "f32"))
            got = logits(args, seq, "fp8", os.path.join(tmp, "fp8"))
            drift += list(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1))
            same += int((got.argmax(1) == ref.argmax(1)).sum())
    d = np.array(drift)
    figures = {"positions": len(d), "median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)),
               "p99": float(np.quantile(d, 0.99)), "worst": float(d.max()), "same_argmax": same,
               "perplexity_f32": perplexity(args, "f32"), "perplexity_fp8": perplexity(args, "fp8")}
    print(f"{len(d)} positions: relative L2 median {figures['median']:.4f}, p90 {figures['p90']:.4f}, "
          f"p99 {figures['p99']:.4f}, worst {figures['worst']:.3f}; same argmax {same}/{len(d)}; "
          f"perplexity f32 {figures['perplexity_f32']:.4f}, fp8 {figures['perplexity_fp8']:.4f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
