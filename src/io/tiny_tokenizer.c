/* tiny_tokenizer.c: trains a small byte-level BPE and writes it as a tokenizer.json.
 *
 * Training is the textbook BPE loop: split the text into pre-tokens, count every adjacent pair of
 * symbols weighted by how often the pre-token occurs, merge the most frequent pair (ties: the
 * smallest (left id, right id)), repeat until MERGES_MAX merges or no pair occurs twice. */
#include "io/tiny_tokenizer.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MERGES_MAX = 320, TOKENS_MAX = 256 + MERGES_MAX, WORDS_MAX = 2048, WORD_LEN_MAX = 64 };

/* What the merges are learned from: everyday English and a little C and Python, ASCII only. */
static const char training_text[] =
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into\n"
    "the forest where the other foxes were waiting. Hello world! Hello, world? It's a small model,\n"
    "and it doesn't know much, but it's deterministic: the same seed gives the same weights.\n"
    "We'll test the tokenizer on numbers like 12345, 2024 and 3.14159, on punctuation (like this),\n"
    "and on words such as tokenization, attention, transformer, expert, routing and inference.\n"
    "In the beginning the model reads the prompt, then it writes one token at a time until it\n"
    "stops. A token is a piece of text; the tokenizer turns text into tokens and back again.\n"
    "\n"
    "int main(int argc, char **argv) {\n"
    "  for (int i = 0; i < argc; i++) printf(\"%s\\n\", argv[i]);\n"
    "  return 0;\n"
    "}\n"
    "\n"
    "static float dot(const float *a, const float *b, int n) {\n"
    "  float sum = 0.0f;\n"
    "  for (int i = 0; i < n; i++) sum += a[i] * b[i];\n"
    "  return sum;\n"
    "}\n"
    "\n"
    "def fibonacci(n):\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    print(\"hello\", fibonacci(10))\n"
    "\n"
    "The weather is nice today, so we went for a walk along the river and talked about the\n"
    "things we want to build: a server that answers questions, a tool that reads images, and a\n"
    "program that writes programs. She said that the best code is the code you do not write;\n"
    "he said that the best test is the one that fails when the code is wrong. They were both\n"
    "right. Then they went home, made tea, and wrote the tests first.\n"
    "\n"
    "Question: what is the capital of France? Answer: Paris is the capital of France, and it is\n"
    "also the largest city in the country. Question: how many days are there in a week? Answer:\n"
    "there are seven days in a week, and the weekend has two of them.\n"
    "\n"
    "#include <stdio.h>\n"
    "#include <stdlib.h>\n"
    "\n"
    "typedef struct {\n"
    "  int count;\n"
    "  const char *name;\n"
    "} item;\n"
    "\n"
    "static int compare_items(const void *a, const void *b) {\n"
    "  const item *x = a, *y = b;\n"
    "  return x->count - y->count;\n"
    "}\n"
    "\n"
    "class Counter:\n"
    "    def __init__(self):\n"
    "        self.counts = {}\n"
    "\n"
    "    def add(self, word):\n"
    "        self.counts[word] = self.counts.get(word, 0) + 1\n"
    "        return self.counts[word]\n"
    "\n"
    "The students read the book, wrote their answers, and handed in the paper before the bell.\n"
    "Their teacher read every answer carefully and wrote a short comment under each one.\n";

/* Pre-tokenization of ASCII text by M3's regex (m3_vision_chat_spec.md §6.2); the training text
 * is ASCII, so the Unicode classes reduce to their ASCII members. Returns the match length. */
static int is_upper(int c) { return c >= 'A' && c <= 'Z'; }
static int is_lower(int c) { return c >= 'a' && c <= 'z'; }
static int is_letter(int c) { return is_upper(c) || is_lower(c); }
static int is_digit(int c) { return c >= '0' && c <= '9'; }
static int is_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static int is_newline(int c) { return c == '\n' || c == '\r'; }

/* (?i:'s|'t|'re|'ve|'m|'ll|'d) at s: its length or 0. */
static int contraction(const char *s) {
  if (s[0] != '\'') return 0;
  static const char *const suffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
  for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
    size_t n = strlen(suffixes[i]), k = 0;
    while (k < n && s[1 + k] && (s[1 + k] | 0x20) == suffixes[i][k]) k++;
    if (k == n) return (int)n + 1;
  }
  return 0;
}

static int pretoken_length(const char *s) {
  int c = (unsigned char)s[0];
  /* 1, 2: [^\r\n\p{L}\p{N}]? then Upper* Lower+ or Upper+ Lower*, then a contraction. */
  int j = (!is_newline(c) && !is_letter(c) && !is_digit(c) && is_letter((unsigned char)s[1])) ? 1 : 0;
  if (is_letter((unsigned char)s[j])) {
    while (is_upper((unsigned char)s[j])) j++;
    while (is_lower((unsigned char)s[j])) j++;
    return j + contraction(s + j);
  }
  /* 3: \p{N}{1,3} */
  if (is_digit(c)) {
    int n = 1;
    while (n < 3 && is_digit((unsigned char)s[n])) n++;
    return n;
  }
  /* 4: ' ?[^\s\p{L}\p{N}]+[\r\n/]*' */
  j = c == ' ' ? 1 : 0;
  int p = j;
  while (s[p] && !is_space((unsigned char)s[p]) && !is_letter((unsigned char)s[p]) && !is_digit((unsigned char)s[p])) p++;
  if (p > j) {
    while (is_newline((unsigned char)s[p]) || s[p] == '/') p++;
    return p;
  }
  /* 5: \s*[\r\n]+ takes the whitespace run up to its last newline. */
  int end = 0, last_newline = -1;
  while (is_space((unsigned char)s[end])) {
    if (is_newline((unsigned char)s[end])) last_newline = end;
    end++;
  }
  if (last_newline >= 0) return last_newline + 1;
  /* 6: \s+(?!\S) leaves the last space to the next word; 7: \s+ when that would be empty. */
  if (s[end] != 0 && end > 1) return end - 1;
  return end;
}

/* GPT-2's byte -> code point table: printable Latin-1 bytes map to themselves, the others to
 * 256, 257, ... in byte order. */
static int byte_codepoint(int b) {
  if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) return b;
  int n = 0;
  for (int i = 0; i < b; i++)
    if (!((i >= '!' && i <= '~') || (i >= 0xa1 && i <= 0xac) || (i >= 0xae && i <= 0xff))) n++;
  return 256 + n;
}

/* Appends the byte-level spelling of bytes[0..n) as UTF-8 (code points < 0x800: 1 or 2 bytes). */
static void byte_level_string(const unsigned char *bytes, int n, char *out) {
  char *o = out;
  for (int i = 0; i < n; i++) {
    int cp = byte_codepoint(bytes[i]);
    if (cp < 0x80) {
      *o++ = (char)cp;
    } else {
      *o++ = (char)(0xc0 | (cp >> 6));
      *o++ = (char)(0x80 | (cp & 0x3f));
    }
  }
  *o = 0;
}

typedef struct {
  unsigned char bytes[WORD_LEN_MAX];
  int len;
} token_bytes;

typedef struct {
  int sym[WORD_LEN_MAX];
  int len;
  int count;
} word;

typedef struct {
  token_bytes tokens[TOKENS_MAX];
  int num_tokens;
  int merge_left[MERGES_MAX], merge_right[MERGES_MAX];
  int num_merges;
  word words[WORDS_MAX];
  int num_words;
  int pair_count[TOKENS_MAX][TOKENS_MAX];
} trainer;

static void add_word(trainer *t, const char *s, int n) {
  for (int i = 0; i < t->num_words; i++) {
    word *w = &t->words[i];
    int same = w->len == n;
    for (int k = 0; same && k < n; k++) same = w->sym[k] == (unsigned char)s[k];
    if (same) {
      w->count++;
      return;
    }
  }
  word *w = &t->words[t->num_words++];
  for (int k = 0; k < n; k++) w->sym[k] = (unsigned char)s[k];
  w->len = n;
  w->count = 1;
}

static int find_token(const trainer *t, const unsigned char *bytes, int len) {
  for (int i = 0; i < t->num_tokens; i++)
    if (t->tokens[i].len == len && memcmp(t->tokens[i].bytes, bytes, (size_t)len) == 0) return i;
  return -1;
}

static void merge_in_words(trainer *t, int a, int b, int merged) {
  for (int i = 0; i < t->num_words; i++) {
    word *w = &t->words[i];
    int out = 0;
    for (int k = 0; k < w->len; k++) {
      if (k + 1 < w->len && w->sym[k] == a && w->sym[k + 1] == b) {
        w->sym[out++] = merged;
        k++;
      } else {
        w->sym[out++] = w->sym[k];
      }
    }
    w->len = out;
  }
}

static void train(trainer *t) {
  for (int b = 0; b < 256; b++) {
    t->tokens[b].bytes[0] = (unsigned char)b;
    t->tokens[b].len = 1;
  }
  t->num_tokens = 256;
  for (const char *s = training_text; *s;) {
    int n = pretoken_length(s);
    /* Every pre-token of the built-in text fits WORD_LEN_MAX; the cap only guards edits to it. */
    add_word(t, s, n < WORD_LEN_MAX ? n : WORD_LEN_MAX);
    s += n;
  }
  while (t->num_merges < MERGES_MAX) {
    /* Count, pick and clear through the pairs that occur, not the whole table. */
    for (int i = 0; i < t->num_words; i++)
      for (int k = 0; k + 1 < t->words[i].len; k++)
        t->pair_count[t->words[i].sym[k]][t->words[i].sym[k + 1]] += t->words[i].count;
    int best_a = -1, best_b = -1, best = 1;
    for (int i = 0; i < t->num_words; i++)
      for (int k = 0; k + 1 < t->words[i].len; k++) {
        int a = t->words[i].sym[k], b = t->words[i].sym[k + 1], n = t->pair_count[a][b];
        if (n > best || (n == best && best_a >= 0 && (a < best_a || (a == best_a && b < best_b)))) {
          best = n;
          best_a = a;
          best_b = b;
        }
      }
    for (int i = 0; i < t->num_words; i++)
      for (int k = 0; k + 1 < t->words[i].len; k++) t->pair_count[t->words[i].sym[k]][t->words[i].sym[k + 1]] = 0;
    if (best_a < 0) break;
    token_bytes joined;
    joined.len = t->tokens[best_a].len + t->tokens[best_b].len;
    if (joined.len > WORD_LEN_MAX) break;
    memcpy(joined.bytes, t->tokens[best_a].bytes, (size_t)t->tokens[best_a].len);
    memcpy(joined.bytes + t->tokens[best_a].len, t->tokens[best_b].bytes, (size_t)t->tokens[best_b].len);
    /* Two merge paths can spell the same string ("ab"+"c", "a"+"bc"): they share one id. */
    int merged = find_token(t, joined.bytes, joined.len);
    if (merged < 0) {
      merged = t->num_tokens++;
      t->tokens[merged] = joined;
    }
    t->merge_left[t->num_merges] = best_a;
    t->merge_right[t->num_merges] = best_b;
    t->num_merges++;
    merge_in_words(t, best_a, best_b, merged);
  }
}

/* M3's added tokens, ids 200000..200060 in order (m3_vision_chat_spec.md §6.4). */
static const char *const special_tokens[M3_SPECIAL_COUNT] = {
    "]!p~[", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<reponame>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
    "<commit_before>", "<commit_msg>", "<commit_after>", "]~b]", "[e~[", "]!d~[",
    "<function_call>", "<code_interpreter>", "]<]speech[>[", "]<]image[>[", "]<]video[>[",
    "]<]start of speech[>[", "]<]end of speech[>[", "]<]start of image[>[", "]<]end of image[>[",
    "]<]start of video[>[", "]<]end of video[>[", "]<]vision pad[>[", "]~!b[", "<jupyter_error>",
    "<add_file>", "<delete_file>", "<rename_file>", "<edit_file>", "<commit_message>",
    "<empty_source_file>", "<repo_struct>", "<code_context>", "<file_content>", "<source_files>",
    "<pr_start>", "<review_comment>", "<filepath>", "<file_sep>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "]<]frame[>[", "]<]start of frame[>[", "]<]end of frame[>[",
    "<|content_altered_placeholder|>", "]<]minimax[>[", "<mm:think>", "</mm:think>",
};

/* The o200k-style split pattern M3 ships (§6.2), alternatives tried left to right. */
static const char split_regex[] =
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    "|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
    "|\\s*[\\r\\n]+"
    "|\\s+(?!\\S)"
    "|\\s+";

static cJSON *byte_level(int add_prefix_space, int use_regex) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "type", "ByteLevel");
  cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space);
  cJSON_AddBoolToObject(o, "trim_offsets", 1);
  cJSON_AddBoolToObject(o, "use_regex", use_regex);
  return o;
}

static cJSON *pre_tokenizer(void) {
  cJSON *split = cJSON_CreateObject();
  cJSON_AddStringToObject(split, "type", "Split");
  cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", split_regex);
  cJSON_AddStringToObject(split, "behavior", "Isolated");
  cJSON_AddBoolToObject(split, "invert", 0);
  cJSON *seq = cJSON_CreateObject();
  cJSON_AddStringToObject(seq, "type", "Sequence");
  cJSON *list = cJSON_AddArrayToObject(seq, "pretokenizers");
  cJSON_AddItemToArray(list, split);
  cJSON_AddItemToArray(list, byte_level(0, 0));
  return seq;
}

static cJSON *added_tokens(int first_id) {
  cJSON *list = cJSON_CreateArray();
  for (int k = 0; k < M3_SPECIAL_COUNT; k++) {
    cJSON *t = cJSON_CreateObject();
    cJSON_AddNumberToObject(t, "id", first_id + k);
    cJSON_AddStringToObject(t, "content", special_tokens[k]);
    cJSON_AddBoolToObject(t, "single_word", 0);
    cJSON_AddBoolToObject(t, "lstrip", 0);
    cJSON_AddBoolToObject(t, "rstrip", 0);
    cJSON_AddBoolToObject(t, "normalized", 0);
    cJSON_AddBoolToObject(t, "special", 1);
    cJSON_AddItemToArray(list, t);
  }
  return list;
}

static cJSON *bpe_model(const trainer *t) {
  cJSON *m = cJSON_CreateObject();
  cJSON_AddStringToObject(m, "type", "BPE");
  cJSON_AddNullToObject(m, "dropout");
  cJSON_AddNullToObject(m, "unk_token");
  cJSON_AddNullToObject(m, "continuing_subword_prefix");
  cJSON_AddNullToObject(m, "end_of_word_suffix");
  cJSON_AddBoolToObject(m, "fuse_unk", 0);
  cJSON_AddBoolToObject(m, "byte_fallback", 0);
  cJSON_AddBoolToObject(m, "ignore_merges", 0);
  cJSON *vocab = cJSON_AddObjectToObject(m, "vocab");
  char spelled[WORD_LEN_MAX * 2 + 1];
  for (int i = 0; i < t->num_tokens; i++) {
    byte_level_string(t->tokens[i].bytes, t->tokens[i].len, spelled);
    cJSON_AddNumberToObject(vocab, spelled, i);
  }
  /* "left right": byte-level spellings never contain a space (it is spelled U+0120). */
  cJSON *merges = cJSON_AddArrayToObject(m, "merges");
  char pair[sizeof spelled * 2 + 1];
  for (int i = 0; i < t->num_merges; i++) {
    const token_bytes *l = &t->tokens[t->merge_left[i]], *r = &t->tokens[t->merge_right[i]];
    byte_level_string(l->bytes, l->len, pair);
    size_t n = strlen(pair);
    pair[n] = ' ';
    byte_level_string(r->bytes, r->len, pair + n + 1);
    cJSON_AddItemToArray(merges, cJSON_CreateString(pair));
  }
  return m;
}

m3_status m3_tiny_tokenizer_write(const char *path, int *bpe_size) {
  trainer *t = calloc(1, sizeof *t);
  if (!t) return m3_fail(M3_ERR_NOMEM, "%s: out of memory training the tokenizer", path);
  train(t);
  cJSON *root = cJSON_CreateObject();
  cJSON_AddStringToObject(root, "version", "1.0");
  cJSON_AddNullToObject(root, "truncation");
  cJSON_AddNullToObject(root, "padding");
  cJSON_AddItemToObject(root, "added_tokens", added_tokens(t->num_tokens));
  cJSON_AddNullToObject(root, "normalizer");
  cJSON_AddItemToObject(root, "pre_tokenizer", pre_tokenizer());
  cJSON_AddNullToObject(root, "post_processor");
  cJSON_AddItemToObject(root, "decoder", byte_level(1, 1));
  cJSON_AddItemToObject(root, "model", bpe_model(t));
  *bpe_size = t->num_tokens;
  free(t);

  char *text = cJSON_Print(root);
  cJSON_Delete(root);
  if (!text) return m3_fail(M3_ERR_NOMEM, "%s: out of memory writing the tokenizer", path);
  FILE *f = fopen(path, "wb");
  m3_status st = M3_OK;
  if (!f) {
    st = m3_fail(M3_ERR_IO, "%s: cannot create file", path);
  } else {
    size_t n = strlen(text);
    int bad = fwrite(text, 1, n, f) != n || fputc('\n', f) == EOF;
    if (fclose(f) != 0 || bad) st = m3_fail(M3_ERR_IO, "%s: write failed", path);
  }
  free(text);
  return st;
}
