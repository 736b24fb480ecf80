#!/usr/bin/env python3
"""Writes the tokenizer test corpus: JSON lines, one text per line, deterministic (fixed seed).

  python3 tools/make_tok_corpus.py tests/fixtures/tok/corpus.jsonl

Texts mix English, code, CJK, emoji (with ZWJ sequences, skin tones, flags), Arabic and Hebrew,
combining marks, long runs of spaces/tabs/newlines (also CRLF and U+0085/U+00A0/U+3000), digits,
contractions in every case, and the added tokens of every tokenizer under test, so the regex
alternatives, the added-token matcher and long-word merging are all exercised. Characters come
from blocks assigned long ago, so Unicode-version differences between Oniguruma and PCRE2 don't
decide the outcome. About 1.1 MB.
"""
import json
import random
import sys

SEED = 20240531
TARGET_BYTES = 1_100_000

ENGLISH = ("the of and to in is was that for it with as his on be at by had are but from or have an they "
           "which one you were her all she there would their we him been has when who will more no if out "
           "so said what up its about into than them can only other new some could time these two may then "
           "do first any my now such like our over man me even most made after also did many before must "
           "through back years where much your way well down should because each just those people Mr how "
           "too little state good very make world still own see men work long get here between both life "
           "being under never day same another know while last might us great old year off come since "
           "against go came right used take three tokenization transformer attention inference expert "
           "routing quantization throughput latency MiniMax HuggingFace GPU CUDA JSON HTTP API").split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL", "'D",
                "'x", "''", "'"]
CODE = [
    "def {f}(x, y=None):\n    if y is None:\n        y = []\n    return [i * 2 for i in range(x)] + y\n",
    "int {f}(const char *s) {{\n\tint n = 0;\n\twhile (*s++) n++;\n\treturn n; // length\n}}\n",
    "for (let i = 0; i < arr.length; ++i) {{ console.log(`${{i}}: ${{arr[i]}}`); }}\n",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%{f}%' ORDER BY id DESC;\n",
    "<div class=\"{f}\"><a href=\"https://example.com/{f}?q=1&r=2\">link</a></div>\n",
    "fn {f}(v: &[u8]) -> Result<Vec<u32>, String> {{ Ok(v.iter().map(|&b| b as u32).collect()) }}\n",
    "    x = np.array([[1.5, -2.25e-3], [0x1F, 0b1010]]) @ W.T  # matmul\r\n",
    "#include <stdio.h>\n#define MAX(a,b) ((a)>(b)?(a):(b))\n/* {f} */\n",
    "{{\"key\": \"{f}\", \"values\": [1, 2, 3], \"nested\": {{\"ok\": true, \"none\": null}}}}\n",
    "$ ls -la /usr/local/bin | grep -E '^-rwx' >> /tmp/{f}.log 2>&1 && echo done\n",
]
CJK = ([chr(c) for c in range(0x4E00, 0x9FA5, 7)] + [chr(c) for c in range(0x3041, 0x3097)] +
       [chr(c) for c in range(0x30A1, 0x30FB)] + [chr(c) for c in range(0xAC00, 0xD7A3, 37)] +
       list("，。！？、：；「」『』（）…—～·"))
EMOJI = ["😀", "😂", "🥲", "👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "✨", "🚀", "🤖", "🧠", "⭐", "☕",
         "👩🏿‍💻", "🙏", "🎉", "🔥", "💯", "1️⃣", "©️", "™"]
ARABIC = "مرحبا بالعالم هذا نص عربي للاختبار مع أرقام ١٢٣٤٥ وكلمات مثل الذكاء الاصطناعي والتعلم".split()
HEBREW = "שלום עולם זה טקסט בעברית לבדיקה עם מספרים ומילים כמו בינה מלאכותית".split()
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "\u0915\u094d\u0937", "\u0928\u092e\u0938\u094d\u0924\u0947",
             "Tiê\u0301ng Viê\u0323t", "Z\u0351\u0358a\u0336\u0321l\u0322g\u0315o\u0327", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
             "ñ", "é", "Ångström", "naïve café", "ﬁ ligature", "ſ long s", "ǅ titlecase", "ß straße",
             "Ελληνικά κείμενο", "Русский текст, ЁЖИК", "Ⅻ roman", "½ ¾ ² ³", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "١٢٣ ٤٥٦", "३४५"]
SPACES = [" " * 2, " " * 3, " " * 7, " " * 33, "\t", "\t\t", "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n",
          " \n ", "  \n\n  ", "\u00a0", "\u3000", "\u2003", "\u0085", "\u2028", "\u200b", "\u200d",
          " \t \n", "\u000b", "\u000c"]
ADDED = ["<|endoftext|>", "<|endofprompt|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
         "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_7|>", "<|im_start|>",
         "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
         "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜fim▁hole｜>",
         "]~!b[", "]~b]", "[e~[", "<mm:think>", "</mm:think>", "]<]minimax[>[", "]<]image[>[", "]!p~[",
         "<fim_prefix>", "<|endoftext", "endoftext|>", "<|", "|>", "]~b", "<mm:thin"]


def word(rng):
    w = rng.choice(ENGLISH)
    r = rng.random()
    if r < 0.08:
        w = w.capitalize()
    elif r < 0.11:
        w = w.upper()
    if rng.random() < 0.05:
        w += rng.choice(CONTRACTIONS)
    return w


def english(rng):
    out = []
    for _ in range(rng.randint(8, 60)):
        out.append(word(rng))
        if rng.random() < 0.12:
            out[-1] += rng.choice([",", ".", ";", ":", "!", "?", "...", ")", "\"", "—", "'"])
    return " ".join(out)


def digits(rng):
    parts = [str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(1, 6))]
    seps = [" ", ",", ".", "-", "/", ":", "", " + ", "="]
    return "".join(p + rng.choice(seps) for p in parts) + rng.choice(["", "3.14159265358979", "1e-9", "0x7FFF"])


def chunk(rng, kind):
    if kind == "english":
        return english(rng)
    if kind == "code":
        return rng.choice(CODE).format(f=rng.choice(ENGLISH) + "_" + str(rng.randint(0, 99)))
    if kind == "cjk":
        return "".join(rng.choice(CJK) for _ in range(rng.randint(3, 80)))
    if kind == "emoji":
        return "".join(rng.choice(EMOJI) + (" " if rng.random() < 0.3 else "") for _ in range(rng.randint(1, 12)))
    if kind == "rtl":
        words = ARABIC if rng.random() < 0.5 else HEBREW
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
    if kind == "combining":
        return " ".join(rng.choice(COMBINING) for _ in range(rng.randint(1, 6)))
    if kind == "spaces":
        if rng.random() < 0.15:
            return rng.choice([" ", "\n", "\t", "\r\n"]) * rng.randint(40, 3000)
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 5)))
    if kind == "digits":
        return digits(rng)
    if kind == "added":
        return rng.choice(ADDED)
    raise ValueError(kind)


KINDS = ["english"] * 6 + ["code"] * 3 + ["cjk"] * 2 + ["emoji", "rtl", "combining", "digits", "added"] + ["spaces"] * 4


def text(rng):
    parts = []
    for _ in range(rng.randint(1, 40)):
        parts.append(chunk(rng, rng.choice(KINDS)))
        parts.append(rng.choice(["", " ", " ", "\n", "  ", "\n\n"]))
    return "".join(parts)


def main():
    rng = random.Random(SEED)
    texts, size = [], 0
    # Hand-picked edge cases first.
    texts += ["", " ", "  ", "\n", "a", "'s", "'S", "Hello world", " Hello", "x  y", "x \n y", "x\u00a0\u00a0y",
              "<|endoftext|><|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "]~b]ai\nhi[e~[", "123456789",
              "I'M DON'T we'VE", "ab\u0085cd", "\u0085\u0085 x", "😀😀😀", "👨‍👩‍👧‍👦", "e\u0301\u0301\u0301", "\r\n\r\n\r\n",
              "a" * 1000, " " * 5000, "ab" * 700, "\t\n" * 100 + "x"]
    while size < TARGET_BYTES:
        t = text(rng)
        texts.append(t)
        size += len(t.encode("utf-8"))
    with open(sys.argv[1], "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
