#!/usr/bin/env python3
"""Reference ids and speed from HF `tokenizers` (run where it is installed, e.g. the GPU machine).

  python3 tools/tok_expected.py OUT_DIR NAME=TOKENIZER_JSON:TEXTS_JSONL ...
      writes OUT_DIR/NAME.ids.gz: per text line, its ids (add_special_tokens=False) separated by
      spaces
  python3 tools/tok_expected.py --bench TEXT_FILE TOKENIZER_JSON ...
      prints single-thread encode speed on TEXT_FILE, whole and line by line, like `m3 bench tok`

Set RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false so nothing runs in parallel.
"""
import gzip
import json
import re
import sys
import time

import tokenizers


def expected(out_dir, jobs):
    for job in jobs:
        name, rest = job.split("=", 1)
        tok_path, texts_path = rest.rsplit(":", 1)
        tok = tokenizers.Tokenizer.from_file(tok_path)
        with open(texts_path, encoding="utf-8", newline="") as f:
            texts = [json.loads(line) for line in f.read().split("\n") if line]
        with gzip.open(f"{out_dir}/{name}.ids.gz", "wt", encoding="ascii", compresslevel=9) as g:
            for t in texts:
                g.write(" ".join(map(str, tok.encode(t, add_special_tokens=False).ids)) + "\n")
        print(f"{name}: {len(texts)} texts", flush=True)


def bench(text_path, tok_paths, repeat=5):
    with open(text_path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"tokenizers {tokenizers.__version__}, {text_path}: {mb * 1e6:.0f} bytes, {len(lines)} lines")
    for path in tok_paths:
        for mode in ("whole", "lines"):
            tok = tokenizers.Tokenizer.from_file(path)
            times, n = [], 0
            for _ in range(repeat):
                t0 = time.perf_counter()
                if mode == "whole":
                    n = len(tok.encode(text, add_special_tokens=False).ids)
                else:
                    n = sum(len(tok.encode(l, add_special_tokens=False).ids) for l in lines)
                times.append(time.perf_counter() - t0)
            print(f"HF {path} {mode}: {n} tokens; first pass {mb / times[0]:.2f} MB/s, "
                  f"best of {repeat} {mb / min(times):.2f} MB/s, {n / min(times):.0f} tokens/s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--bench":
        bench(sys.argv[2], sys.argv[3:])
    else:
        expected(sys.argv[1], sys.argv[2:])
