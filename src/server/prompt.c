/* prompt.c: the prompt text of a chat request (srv_render_chat in srv.h). */
#include <stdlib.h>

#include "server/srv.h"

static m3_chat_options chat_options(const srv_chat_setup *setup) {
  bool tools = setup->tools && cJSON_GetArraySize(setup->tools) > 0;
  return (m3_chat_options){.format = setup->format,
                           .thinking = setup->thinking,
                           .add_generation_prompt = true,
                           .tools = tools ? setup->tools : NULL};
}

/* The start of the assistant turn that commits the model to a tool call: reasoning closed (when
 * the prompt left it open or undecided), the block opened, and the invoke begun. */
static void forced_call_prefix(const srv_chat_setup *setup, bool in_reasoning, m3_sbuf *prompt,
                               m3_sbuf *prefix) {
  if (setup->format == M3_CHAT_FORMAT_M2) {
    m3_sbuf_puts(prompt, "</think>\n\n");
    m3_sbuf_puts(prefix, "<minimax:tool_call>\n<invoke name=\"");
  } else {
    if (in_reasoning || setup->thinking == M3_THINKING_ADAPTIVE) m3_sbuf_puts(prompt, "</mm:think>");
    m3_sbuf_puts(prefix, "]<]minimax[>[<tool_call>\n]<]minimax[>[<invoke name=\"");
  }
  if (setup->tool_choice == SRV_TOOLS_NAMED) {
    m3_sbuf_puts(prefix, setup->tool_name);
    m3_sbuf_puts(prefix, setup->format == M3_CHAT_FORMAT_M2 ? "\">\n" : "\">");
  }
}

m3_status srv_render_chat(const cJSON *messages, const srv_chat_setup *setup, char **text,
                          char **tool_prefix, bool *in_reasoning) {
  *text = NULL;
  *tool_prefix = NULL;
  m3_chat chat;
  m3_status st = m3_chat_from_json(messages, &chat);
  if (st != M3_OK) return st;
  m3_chat_options opt = chat_options(setup);
  char *rendered;
  size_t len;
  st = m3_chat_render(chat.msgs, chat.n, &opt, &rendered, &len);
  m3_chat_free(&chat);
  if (st != M3_OK) return st;
  *in_reasoning = m3_chat_prompt_opens_reasoning(&opt);
  bool forced = opt.tools && (setup->tool_choice == SRV_TOOLS_REQUIRED ||
                              setup->tool_choice == SRV_TOOLS_NAMED);
  if (!forced) {
    *text = rendered;
    return M3_OK;
  }
  m3_sbuf prompt = {0}, prefix = {0};
  m3_sbuf_put(&prompt, rendered, len);
  free(rendered);
  forced_call_prefix(setup, *in_reasoning, &prompt, &prefix);
  m3_sbuf_put(&prompt, prefix.data, prefix.len);
  if (prompt.failed || prefix.failed) {
    m3_sbuf_free(&prompt);
    m3_sbuf_free(&prefix);
    return m3_fail(M3_ERR_NOMEM, "rendering the prompt: out of memory");
  }
  *in_reasoning = false;
  *text = prompt.data;
  *tool_prefix = prefix.data;
  return M3_OK;
}
