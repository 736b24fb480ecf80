/* toolcall.h: tool calls parsed out of streamed model content (spec §8.2-8.3, §9.2).
 *
 * M3 block:  ]<]minimax[>[<tool_call>\n
 *            ]<]minimax[>[<invoke name="f">]<]minimax[>[<k>v]<]minimax[>[</k>…]<]minimax[>[</invoke>\n
 *            ]<]minimax[>[</tool_call>
 * M2 block:  <minimax:tool_call>\n<invoke name="f">\n<parameter name="k">v</parameter>\n…
 *            </invoke>\n</minimax:tool_call>
 *
 * Rules:
 *  - Text outside blocks is content; whitespace that only separates content from a block (or
 *    blocks from each other, or trails the last block) is dropped. Several blocks per turn and
 *    several invokes per block are accepted.
 *  - A call is reported (TOOL_START with index, id "<id_prefix><index>", name) as soon as its
 *    invoke header is complete; its arguments follow as append-only JSON fragments, a parameter
 *    at a time: "{", "\"k\":v", ",\"k2\":…", "}". A parameter whose schema allows only a string
 *    streams as it is generated; other values are typed by the schema once complete (toolargs.h).
 *    Nested M3 elements become objects/arrays. Arguments JSON is compact; a parameter repeated at
 *    the top level appears twice (JSON readers keep the last).
 *  - Invoke names: name="x", name='x' or name=x; M3's "]<]minimax[>[invoke" with the "<"
 *    dropped is accepted. M3's elided parameter opener (…">]<]minimax[>[value]<]minimax[>[</k>)
 *    is recovered, the name taken from the closing tag. M2 values lose one leading and one
 *    trailing newline.
 *  - Robustness: text where a parameter should start ends the call; an invoke without a name is
 *    skipped to its </invoke>; junk between invokes is dropped; a block in which no call was
 *    recognised is reported as content verbatim; at the end of output an open call is closed.
 *    Nothing inside one call can swallow the calls or text after it.
 * Any chunking of the same text gives the same events (concatenated per kind and index). */
#ifndef M3_TOK_TOOLCALL_H
#define M3_TOK_TOOLCALL_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "base/status.h"
#include "tok/chat.h"
#include "tok/outevent.h"

typedef struct m3_toolcall m3_toolcall;

/* `tools`: the request's tools array (borrowed; may be NULL = every value a string unless it is
 * nested). `id_prefix` (NULL = "call_") should make ids unique across a conversation. */
m3_status m3_toolcall_new(m3_chat_format format, const cJSON *tools, const char *id_prefix,
                          m3_out_fn fn, void *user, m3_toolcall **out);
m3_status m3_toolcall_feed(m3_toolcall *tc, const char *text, size_t len);
m3_status m3_toolcall_finish(m3_toolcall *tc);
/* Number of calls reported so far (finish_reason "tool_calls" when > 0). */
int m3_toolcall_count(const m3_toolcall *tc);
void m3_toolcall_free(m3_toolcall *tc);

#endif
