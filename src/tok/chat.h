/* chat.h: a conversation, rendered into the prompt text MiniMax-M3 (or M2) was trained on.
 *
 * The rendering reproduces the checkpoints' chat templates byte for byte:
 *   M3: llama.cpp models/templates/MiniMax-M3.jinja (the official template), spec §7.
 *   M2: llama.cpp models/templates/unsloth-MiniMax-M2.jinja, spec §9.1.
 * tests/fixtures/chat holds goldens rendered from those files with jinja2
 * (tools/make_chat_goldens.py).
 *
 * M3 in brief: "]~!b[]~b]system\n" identity + thinking instructions "[e~[\n", "]~b]developer\n"
 * system prompt + tool definitions "[e~[\n", then turns "]~b]user\n…[e~[\n",
 * "]~b]ai\n" (<mm:think>reasoning</mm:think> or a bare </mm:think>) content, tool calls "[e~[\n",
 * "]~b]tool" + "\n<response>…</response>" per consecutive result "[e~[\n", and the generation
 * prompt "]~b]ai\n" + "<mm:think>" (enabled) / "</mm:think>" (disabled) / nothing (adaptive).
 * M3 keeps the reasoning of every assistant turn; M2 only of the turns after the last user turn.
 *
 * Role handling follows the templates, including their silent parts: a leading `root` replaces
 * the M3 identity; the first system/developer message (after root) becomes the developer block;
 * system/developer/root messages anywhere else are dropped (M2 knows only a leading `system`).
 * A tool result with no assistant tool call before it fails (both templates raise). */
#ifndef M3_TOK_CHAT_H
#define M3_TOK_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "base/status.h"

typedef enum { M3_CHAT_FORMAT_M3, M3_CHAT_FORMAT_M2 } m3_chat_format;

/* chat_template_kwargs.thinking_mode; an absent kwarg renders exactly as adaptive. M2 ignores it
 * (its generation prompt always opens <think>). */
typedef enum { M3_THINKING_ADAPTIVE, M3_THINKING_ENABLED, M3_THINKING_DISABLED } m3_thinking_mode;

typedef enum {
  M3_ROLE_ROOT,
  M3_ROLE_SYSTEM,
  M3_ROLE_DEVELOPER,
  M3_ROLE_USER,
  M3_ROLE_ASSISTANT,
  M3_ROLE_TOOL,
} m3_chat_role;

typedef enum { M3_PART_TEXT, M3_PART_IMAGE, M3_PART_VIDEO } m3_chat_part_kind;

typedef struct {
  m3_chat_part_kind kind;
  const char *text; /* M3_PART_TEXT only */
} m3_chat_part;

typedef struct {
  const char *id;
  const char *name;
  const char *arguments; /* a JSON object, as text (the OpenAI wire form) */
} m3_chat_tool_call;

/* Content is either `content` (a string; NULL = none) or, when n_parts > 0, a list of parts.
 * The two forms render differently for M2 tool results, so both are kept. Strings are borrowed. */
typedef struct {
  m3_chat_role role;
  const char *content;
  const m3_chat_part *parts;
  size_t n_parts;
  const char *reasoning; /* assistant reasoning_content; NULL = absent (then a </mm:think> in
                            the content splits it out), "" = present and empty */
  const m3_chat_tool_call *tool_calls;
  size_t n_tool_calls;
  const char *tool_call_id; /* tool results; not rendered by either template */
} m3_chat_message;

typedef struct {
  m3_chat_format format;
  m3_thinking_mode thinking;
  bool add_generation_prompt;
  /* Array of {"type": "function", "function": {...}}; the inner function object is what the
   * templates print (a tool without "function" is printed whole). NULL or empty = no tools. */
  const cJSON *tools;
} m3_chat_options;

/* Renders into `out` (a NUL-terminated malloc'd string the caller frees). Fails with
 * M3_ERR_ARG naming the message index for a tool result without a preceding call, tool-call
 * arguments that are not a JSON object, or a missing tool-call name. */
m3_status m3_chat_render(const m3_chat_message *msgs, size_t n, const m3_chat_options *opt,
                         char **out, size_t *out_len);

/* Whether the generation prompt leaves the model inside its reasoning block (M3 enabled, M2
 * always): the output parser then starts in reasoning. */
bool m3_chat_prompt_opens_reasoning(const m3_chat_options *opt);

/* A conversation read from an OpenAI-style `messages` array. The structures point into the
 * cJSON, which must outlive them. */
typedef struct {
  m3_chat_message *msgs;
  size_t n;
  m3_chat_part *parts;
  m3_chat_tool_call *calls;
} m3_chat;

/* Roles root/system/developer/user/assistant/tool; content null, a string or a list of
 * {"type": "text"|"image"|"image_url"|"video"|"video_url", ...} parts; assistant
 * reasoning_content (or reasoning) and tool_calls [{id, function: {name, arguments}}] with
 * arguments as JSON text. Anything else fails with M3_ERR_FORMAT naming messages[i]. */
m3_status m3_chat_from_json(const cJSON *messages, m3_chat *out);
void m3_chat_free(m3_chat *chat);

#endif
