/* fuzz_chat: arbitrary bytes as a conversation, either a `messages` array or an object
 * {"messages": [...], "tools": [...]}, read by m3_chat_from_json and rendered as M3 (each
 * thinking mode) and M2, with and without the generation prompt. A read or render may fail but
 * must then name its cause; a render gives NUL-terminated text of the length it reports. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "tok/chat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void render(const m3_chat *chat, const m3_chat_options *opt) {
  char *out = NULL;
  size_t len = 0;
  m3_clear_error();
  if (m3_chat_render(chat->msgs, chat->n, opt, &out, &len) != M3_OK) {
    if (!m3_last_error()[0]) abort();
    return;
  }
  if (!out || strlen(out) != len) abort();
  free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  cJSON *root = cJSON_ParseWithLength((const char *)data, size);
  if (!root) return 0;
  const cJSON *messages = root, *tools = NULL;
  if (cJSON_IsObject(root)) {
    messages = cJSON_GetObjectItemCaseSensitive(root, "messages");
    tools = cJSON_GetObjectItemCaseSensitive(root, "tools");
    if (!cJSON_IsArray(tools)) tools = NULL;
  }
  m3_chat chat;
  m3_clear_error();
  if (m3_chat_from_json(messages, &chat) != M3_OK) {
    if (!m3_last_error()[0]) abort();
    cJSON_Delete(root);
    return 0;
  }
  static const m3_thinking_mode modes[] = {M3_THINKING_ADAPTIVE, M3_THINKING_ENABLED,
                                           M3_THINKING_DISABLED};
  for (int gen = 0; gen < 2; gen++) {
    for (int m = 0; m < 3; m++)
      render(&chat, &(m3_chat_options){M3_CHAT_FORMAT_M3, modes[m], gen, tools});
    render(&chat, &(m3_chat_options){M3_CHAT_FORMAT_M2, M3_THINKING_ADAPTIVE, gen, tools});
  }
  m3_chat_free(&chat);
  cJSON_Delete(root);
  return 0;
}
