/* tiny_tokenizer.h: the tokenizer.json of the tiny checkpoint (tiny.h).
 *
 * A byte-level BPE in the Hugging Face tokenizers format, shaped like M3's (m3_vision_chat_spec.md
 * §6): pre-tokenizer Sequence[Split(M3's regex, Isolated), ByteLevel(no prefix space, no regex)],
 * ByteLevel decoder, ids 0..255 the single bytes, then the merges learned by a small BPE trainer
 * over a built-in English + code text, then M3's 61 added tokens in M3's order: the added token
 * with M3 id 200000 + k gets id bpe_size + k. */
#ifndef M3_IO_TINY_TOKENIZER_H
#define M3_IO_TINY_TOKENIZER_H

#include "base/status.h"

#define M3_SPECIAL_ID_BASE 200000 /* M3's first added-token id */
#define M3_SPECIAL_COUNT 61       /* ids 200000..200060 */

/* Writes the tokenizer to path; *bpe_size gets the number of BPE tokens (the first added id). */
m3_status m3_tiny_tokenizer_write(const char *path, int *bpe_size);

#endif
