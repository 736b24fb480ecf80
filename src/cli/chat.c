/* m3 chat: an interactive conversation in the model's chat format, through the public engine API
 * plus the chat renderer and the output parser of src/tok.
 *
 * Each turn renders the whole history (the template decides what of it the model sees: M3 keeps
 * the reasoning of every assistant turn, M2 only after the last user turn), tokenizes it and
 * generates. The engine's prefix cache keeps the pages of the unchanged history, so a turn
 * prefills little more than its new text.
 *
 * The rendered prompt is tokenized with special tokens matched (m3_tokenize special = 1), as the
 * reference servers do after applying the chat template: the template writes its markers
 * (]~b]user, [e~[, <mm:think>) as text and they must become their ids. The same matching applies
 * to marker text a user types, exactly as in vLLM and HF.
 *
 * stdout carries only the replies, so a script can pipe messages in and read answers out;
 * prompts, notices and errors go to stderr. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli/commands.h"
#include "cli/model_args.h"
#include "m3.h"
#include "tok/chat.h"
#include "tok/output.h"

static const char usage[] =
    "usage: m3 chat [--model DIR] [--system TEXT] [--think on|off|adaptive]\n"
    "               [--temperature T] [--top-p P] [--top-k K] [--seed S] [--max-tokens N]\n"
    "               [--device cpu|cuda[:N]] [--threads N] " M3_CLI_SPEC_USAGE "\n"
    "  chats with the model in its chat format (M3 or M2), streaming each reply; reasoning is\n"
    "  shown apart from the answer. Without --model it runs\n"
    "  " M3_CLI_DEFAULT_MODEL ".\n" M3_CLI_DEFAULT_DRAFT_HELP
    "  Defaults: temperature 1, top-p 0.95, top-k 40 (the model card's), thinking adaptive,\n"
    "  replies until the end of the turn or the context (--max-tokens 0).\n"
    "input: a line is a message; a line ending in \\ continues on the next; a line \"\"\"\n"
    "  starts a block that the next \"\"\" line ends. Commands:\n"
    "  /reset            forget the conversation (the system prompt stays)\n"
    "  /system TEXT      set the system prompt (empty: the model's default)\n"
    "  /think MODE       on, off or adaptive (M3 only)\n"
    "  /quit             leave (so does end of input)\n";

typedef struct {
  const char *model, *system, *device;
  m3_thinking_mode think;
  long max_tokens, threads, seed, top_k;
  int has_seed;
  m3_cli_spec spec;
  double temperature, top_p;
} chat_args;

static m3_status parse_think(const char *flag, const char *value, m3_thinking_mode *out) {
  if (strcmp(value, "on") == 0) *out = M3_THINKING_ENABLED;
  else if (strcmp(value, "off") == 0) *out = M3_THINKING_DISABLED;
  else if (strcmp(value, "adaptive") == 0) *out = M3_THINKING_ADAPTIVE;
  else return m3_fail(M3_ERR_ARG, "%s '%s': expected on, off or adaptive", flag, value);
  return M3_OK;
}

static m3_status parse_args(int argc, char **argv, chat_args *a, int *help) {
  *a = (chat_args){.think = M3_THINKING_ADAPTIVE, .top_k = 40, .temperature = 1.0, .top_p = 0.95};
  *help = 0;
  for (int i = 1; i < argc; i++) {
    const char *flag = argv[i];
    if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
      *help = 1;
      return M3_OK;
    }
    if (i + 1 >= argc) return m3_fail(M3_ERR_ARG, "%s: missing value (see --help)", flag);
    const char *value = argv[++i];
    m3_status st = M3_OK;
    if (strcmp(flag, "--model") == 0) a->model = value;
    else if (strcmp(flag, "--system") == 0) a->system = value;
    else if (strcmp(flag, "--think") == 0) st = parse_think(flag, value, &a->think);
    else if (strcmp(flag, "--max-tokens") == 0) st = m3_cli_parse_long(flag, value, 0, 1L << 24, &a->max_tokens);
    else if (strcmp(flag, "--threads") == 0) st = m3_cli_parse_long(flag, value, 0, 4096, &a->threads);
    else if (strcmp(flag, "--device") == 0) a->device = value;
    else if (strcmp(flag, "--seed") == 0) {
      st = m3_cli_parse_long(flag, value, 0, 0x7fffffffL, &a->seed);
      a->has_seed = 1;
    } else if (strcmp(flag, "--top-k") == 0) st = m3_cli_parse_long(flag, value, 0, 1L << 30, &a->top_k);
    else if (strcmp(flag, "--temperature") == 0) st = m3_cli_parse_unit(flag, value, 100.0, &a->temperature);
    else if (strcmp(flag, "--top-p") == 0) st = m3_cli_parse_unit(flag, value, 1.0, &a->top_p);
    else if (!m3_cli_spec_flag(flag, value, &a->spec, &st))
      return m3_fail(M3_ERR_ARG, "unknown option '%s' (see --help)", flag);
    if (st != M3_OK) return st;
  }
  if (a->top_p <= 0.0) return m3_fail(M3_ERR_ARG, "--top-p must be > 0");
  return M3_OK;
}

/* ---- the conversation ---- */

typedef struct {
  m3_chat_role role;
  char *content, *reasoning; /* reasoning: assistant turns only, "" when there was none */
  m3_chat_tool_call *calls;  /* owned strings */
  size_t n_calls;
} turn;

typedef struct {
  char *system; /* NULL: the template's default */
  m3_thinking_mode think;
  m3_chat_format format;
  turn *turns;
  size_t n, cap;
} history;

static void turn_free(turn *t) {
  free(t->content);
  free(t->reasoning);
  for (size_t i = 0; i < t->n_calls; i++) {
    free((char *)t->calls[i].id);
    free((char *)t->calls[i].name);
    free((char *)t->calls[i].arguments);
  }
  free(t->calls);
}

/* Takes ownership of t's strings, also on failure. */
static m3_status history_push(history *h, turn t) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? 2 * h->cap : 16;
    turn *turns = realloc(h->turns, cap * sizeof *turns);
    if (!turns) {
      turn_free(&t);
      return m3_fail(M3_ERR_NOMEM, "chat: out of memory for the history");
    }
    h->turns = turns;
    h->cap = cap;
  }
  h->turns[h->n++] = t;
  return M3_OK;
}

static void history_pop(history *h) { turn_free(&h->turns[--h->n]); }

static void history_reset(history *h) {
  while (h->n > 0) history_pop(h);
}

static m3_chat_options chat_options(const history *h) {
  return (m3_chat_options){.format = h->format, .thinking = h->think, .add_generation_prompt = true};
}

/* The history rendered with the generation prompt and tokenized. */
static m3_status history_prompt(const m3_engine *e, const history *h, int32_t **ids, int *n) {
  size_t n_msgs = h->n + (h->system != NULL);
  m3_chat_message *msgs = calloc(n_msgs ? n_msgs : 1, sizeof *msgs);
  if (!msgs) return m3_fail(M3_ERR_NOMEM, "chat: out of memory for the prompt");
  size_t k = 0;
  if (h->system) msgs[k++] = (m3_chat_message){.role = M3_ROLE_SYSTEM, .content = h->system};
  for (size_t i = 0; i < h->n; i++) {
    const turn *t = &h->turns[i];
    msgs[k++] = (m3_chat_message){.role = t->role, .content = t->content, .reasoning = t->reasoning,
                                  .tool_calls = t->calls, .n_tool_calls = t->n_calls};
  }
  m3_chat_options opt = chat_options(h);
  char *text = NULL;
  size_t len = 0;
  m3_status st = m3_chat_render(msgs, n_msgs, &opt, &text, &len);
  free(msgs);
  if (st == M3_OK) st = m3_tokenize(e, text, len, 1, ids, n);
  free(text);
  return st;
}

/* ---- showing a reply ---- */

#define DIM "\033[2m"
#define PLAIN "\033[0m"

typedef enum { SHOW_NOTHING, SHOW_REASONING, SHOW_CONTENT, SHOW_TOOL } show_state;

typedef struct {
  int tty;
  show_state state;
  int at_line_start; /* the last byte printed was a newline (or nothing was printed) */
  m3_out_result result;
} printer;

static void put(printer *p, const char *s, size_t n) {
  if (n == 0) return;
  fwrite(s, 1, n, stdout);
  p->at_line_start = s[n - 1] == '\n';
}

static void end_line(printer *p) {
  if (!p->at_line_start) put(p, "\n", 1);
}

/* Reasoning on a terminal is dim; elsewhere each of its lines starts with "[thinking] ". */
static void show_reasoning(printer *p, const char *s, size_t n) {
  if (p->state != SHOW_REASONING) end_line(p);
  p->state = SHOW_REASONING;
  if (p->tty) {
    fputs(DIM, stdout);
    put(p, s, n);
    fputs(PLAIN, stdout);
    return;
  }
  while (n > 0) {
    if (p->at_line_start) {
      fputs("[thinking] ", stdout);
      p->at_line_start = 0;
    }
    const char *nl = memchr(s, '\n', n);
    size_t k = nl ? (size_t)(nl - s) + 1 : n;
    put(p, s, k);
    s += k;
    n -= k;
  }
}

static void on_output(void *user, const m3_out_event *ev) {
  printer *p = user;
  m3_out_collect(&p->result, ev);
  switch (ev->kind) {
    case M3_OUT_REASONING: show_reasoning(p, ev->text, ev->len); break;
    case M3_OUT_CONTENT:
      if (p->state == SHOW_REASONING || p->state == SHOW_TOOL) end_line(p);
      p->state = SHOW_CONTENT;
      put(p, ev->text, ev->len);
      break;
    case M3_OUT_TOOL_START:
      end_line(p);
      p->state = SHOW_TOOL;
      printf("[tool call] %s ", ev->name);
      p->at_line_start = 0;
      break;
    case M3_OUT_TOOL_ARGS: put(p, ev->text, ev->len); break;
    case M3_OUT_TOOL_END: end_line(p); break;
  }
  fflush(stdout);
}

/* ---- generating a reply ---- */

/* A token's text can end inside a UTF-8 character, which the detokenizer shows as U+FFFD until
 * the next token completes it; a decode that ends so is held back, for at most this many tokens
 * (a character has 4 bytes at most, a token at least one). */
enum { MAX_HELD_TOKENS = 8 };

typedef struct {
  const m3_engine *e;
  int32_t *ids; /* this reply's tokens */
  int n_ids, cap_ids, shown; /* ids[0 .. shown) went to the parser */
  m3_out_parser *parser;
  m3_status status;
  m3_finish_reason finish;
  char error[256];
} reply;

static int ends_incomplete(const char *s, size_t n) {
  return n >= 3 && memcmp(s + n - 3, "\xEF\xBF\xBD", 3) == 0;
}

/* Decodes ids[shown ..) with special tokens kept (the parser needs <mm:think> and the tool-call
 * markup) and feeds the text to the parser, unless it may end inside a character. */
static void feed_pending(reply *r, int final) {
  if (r->shown == r->n_ids || r->status != M3_OK) return;
  char *text = NULL;
  size_t len = 0;
  r->status = m3_detokenize(r->e, r->ids + r->shown, r->n_ids - r->shown, 0, &text, &len);
  if (r->status == M3_OK && (final || r->n_ids - r->shown >= MAX_HELD_TOKENS || !ends_incomplete(text, len))) {
    r->status = m3_out_parser_feed(r->parser, text, len);
    r->shown = r->n_ids;
  }
  free(text);
}

static void on_token(const m3_token_event *ev, void *user) {
  reply *r = user;
  /* A token that ends the turn is not part of the reply. */
  if (ev->token >= 0 && ev->finish != M3_FINISH_STOP) {
    if (r->n_ids == r->cap_ids) {
      int cap = r->cap_ids ? 2 * r->cap_ids : 256;
      int32_t *ids = realloc(r->ids, (size_t)cap * sizeof *ids);
      if (!ids) {
        if (r->status == M3_OK) r->status = m3_fail(M3_ERR_NOMEM, "chat: out of memory for the reply");
        return;
      }
      r->ids = ids;
      r->cap_ids = cap;
    }
    r->ids[r->n_ids++] = ev->token;
  }
  feed_pending(r, ev->finish != M3_FINISH_NONE);
  if (ev->finish != M3_FINISH_NONE) {
    r->finish = ev->finish;
    if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
  }
}

static volatile sig_atomic_t interrupted;
static void on_sigint(int sig) {
  (void)sig;
  interrupted = 1;
}

/* Runs the request to its end; Ctrl-C (SIGINT) cancels it. */
static m3_status run_request(m3_engine *e, const int32_t *prompt, int n_prompt,
                             const m3_sampling_params *sp, reply *r) {
  uint64_t id;
  m3_status st = m3_submit(e, prompt, n_prompt, sp, on_token, r, &id);
  if (st != M3_OK) return st;
  struct sigaction sa = {.sa_handler = on_sigint}, old;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old);
  interrupted = 0;
  int cancelled = 0;
  for (int active = 1; active && st == M3_OK;) {
    if (interrupted && !cancelled) {
      m3_cancel(e, id);
      cancelled = 1;
    }
    st = m3_engine_step(e, &active);
  }
  sigaction(SIGINT, &old, NULL);
  return st;
}

/* Copies the parsed tool calls whose arguments the template can print (a JSON object). */
static m3_status copy_calls(const m3_out_result *res, turn *t) {
  if (res->n_calls == 0) return M3_OK;
  t->calls = calloc((size_t)res->n_calls, sizeof *t->calls);
  if (!t->calls) return m3_fail(M3_ERR_NOMEM, "chat: out of memory for tool calls");
  for (int i = 0; i < res->n_calls; i++) {
    const char *args = res->calls[i].arguments.data ? res->calls[i].arguments.data : "";
    cJSON *parsed = cJSON_Parse(args);
    int object = cJSON_IsObject(parsed);
    cJSON_Delete(parsed);
    if (!object) continue;
    m3_chat_tool_call *c = &t->calls[t->n_calls++];
    c->id = strdup(res->calls[i].id);
    c->name = strdup(res->calls[i].name.data ? res->calls[i].name.data : "");
    c->arguments = strdup(args);
    if (!c->id || !c->name || !c->arguments) return m3_fail(M3_ERR_NOMEM, "chat: out of memory for tool calls");
  }
  return M3_OK;
}

static char *sbuf_take(m3_sbuf *b) {
  char *s = b->data ? b->data : strdup("");
  *b = (m3_sbuf){0};
  return s;
}

/* One assistant turn for the history as it stands (ending in the user's message): streams it
 * and appends it. A turn that fails or is interrupted is dropped with the user's message. */
static m3_status reply_turn(m3_engine *e, history *h, const m3_sampling_params *sp, int tty) {
  int32_t *prompt = NULL;
  int n_prompt = 0;
  m3_status st = history_prompt(e, h, &prompt, &n_prompt);
  m3_chat_options opt = chat_options(h);
  m3_out_options oo = {.format = h->format, .starts_in_reasoning = m3_chat_prompt_opens_reasoning(&opt),
                       .parse_tools = true};
  printer pr = {.tty = tty, .at_line_start = 1};
  reply r = {.e = e};
  if (st == M3_OK) st = m3_out_parser_new(&oo, on_output, &pr, &r.parser);
  if (st == M3_OK) st = run_request(e, prompt, n_prompt, sp, &r);
  if (st == M3_OK && (st = r.status) == M3_OK) st = m3_out_parser_finish(r.parser);
  if (r.parser) end_line(&pr);
  fflush(stdout);
  if (st == M3_OK && r.finish == M3_FINISH_ERROR) st = m3_fail(M3_ERR_IO, "generation failed: %s", r.error);
  if (st == M3_OK && pr.result.failed) st = m3_fail(M3_ERR_NOMEM, "chat: out of memory for the reply");
  if (st == M3_OK && r.finish == M3_FINISH_CANCELLED) {
    fprintf(stderr, "[interrupted: the turn is dropped]\n");
    history_pop(h);
  } else if (st == M3_OK) {
    turn t = {.role = M3_ROLE_ASSISTANT};
    t.content = sbuf_take(&pr.result.content);
    t.reasoning = sbuf_take(&pr.result.reasoning);
    st = !t.content || !t.reasoning ? m3_fail(M3_ERR_NOMEM, "chat: out of memory") : copy_calls(&pr.result, &t);
    if (st == M3_OK) st = history_push(h, t);
    else turn_free(&t);
    if (st == M3_OK && r.finish == M3_FINISH_LENGTH)
      fprintf(stderr, "[the reply reached --max-tokens or the context limit]\n");
  }
  if (st != M3_OK) history_pop(h); /* the user's message */
  m3_out_parser_free(r.parser);
  m3_out_result_free(&pr.result);
  free(r.ids);
  free(prompt);
  return st;
}

/* ---- input ---- */

/* Reads one line without its newline into *line; 0 at end of input. */
static int read_line(char **line, size_t *cap, int tty, const char *prompt) {
  if (tty) {
    fputs(prompt, stderr);
    fflush(stderr);
  }
  ssize_t n;
  do {
    errno = 0;
    n = getline(line, cap, stdin);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return 0;
  while (n > 0 && ((*line)[n - 1] == '\n' || (*line)[n - 1] == '\r')) (*line)[--n] = '\0';
  return 1;
}

/* One message: a line, lines joined by trailing backslashes, or a """ block. *single: it was one
 * plain line (only those can be commands). Returns 0 at end of input with nothing read. */
static int read_message(m3_sbuf *msg, int tty, int *single) {
  char *line = NULL;
  size_t cap = 0;
  int got = 0;
  msg->len = 0;
  *single = 1;
  if (read_line(&line, &cap, tty, "> ")) {
    got = 1;
    if (strcmp(line, "\"\"\"") == 0) {
      *single = 0;
      for (int first = 1; read_line(&line, &cap, tty, "... ") && strcmp(line, "\"\"\"") != 0; first = 0) {
        if (!first) m3_sbuf_putc(msg, '\n');
        m3_sbuf_puts(msg, line);
      }
    } else {
      for (;;) {
        size_t n = strlen(line);
        int more = n > 0 && line[n - 1] == '\\';
        m3_sbuf_put(msg, line, n - (size_t)more);
        if (!more) break;
        *single = 0;
        m3_sbuf_putc(msg, '\n');
        if (!read_line(&line, &cap, tty, "... ")) break;
      }
    }
  }
  free(line);
  return got;
}

typedef enum { CMD_NONE, CMD_HANDLED, CMD_QUIT } command_result;

static int is_command(const char *text, size_t len, const char *name) {
  return len == strlen(name) && memcmp(text, name, len) == 0;
}

/* Runs `text` if it is a command. */
static command_result run_command(history *h, const char *text) {
  if (text[0] != '/') return CMD_NONE;
  const char *arg = strchr(text, ' ');
  size_t name_len = arg ? (size_t)(arg - text) : strlen(text);
  arg = arg ? arg + strspn(arg, " ") : "";
  if (is_command(text, name_len, "/quit") || is_command(text, name_len, "/exit")) return CMD_QUIT;
  if (is_command(text, name_len, "/reset")) {
    history_reset(h);
    fprintf(stderr, "[conversation cleared]\n");
  } else if (is_command(text, name_len, "/system")) {
    free(h->system);
    h->system = *arg ? strdup(arg) : NULL;
    fprintf(stderr, *arg ? "[system prompt set]\n" : "[system prompt cleared]\n");
  } else if (is_command(text, name_len, "/think")) {
    if (parse_think("/think", arg, &h->think) == M3_OK) fprintf(stderr, "[thinking: %s]\n", arg);
    else fprintf(stderr, "m3 chat: %s\n", m3_last_error());
  } else if (is_command(text, name_len, "/help")) {
    fputs(strstr(usage, "input:"), stderr);
  } else {
    fprintf(stderr, "m3 chat: unknown command '%.*s' (/help lists them)\n", (int)name_len, text);
  }
  return CMD_HANDLED;
}

int m3_cmd_chat(int argc, char **argv) {
  chat_args a;
  int help;
  m3_status st = parse_args(argc, argv, &a, &help);
  if (st != M3_OK) return m3_cli_fail("chat", st);
  if (help) {
    fputs(usage, stdout);
    return 0;
  }
  m3_cli_model_paths paths;
  if ((st = m3_cli_model_or_default(&a.model, &a.spec, &paths)) != M3_OK ||
      (st = m3_cli_parallel_gate(&a.spec, a.model)) != M3_OK)
    return m3_cli_fail("chat", st);
  const int tty_in = isatty(STDIN_FILENO), tty_out = isatty(STDOUT_FILENO);
  m3_engine_options o;
  m3_engine_options_init(&o);
  o.model_dir = a.model;
  o.threads = (int)a.threads;
  if (a.device) o.device = a.device;
  o.max_running = 1;
  o.prefix_cache = 1;
  m3_cli_spec_apply(&a.spec, &o);
  if (a.spec.node_rank > 0) return m3_cli_follow("chat", &o);
  if (isatty(STDERR_FILENO)) o.on_load_progress = m3_cli_load_progress;
  history h = {.think = a.think};
  m3_engine *e = NULL;
  m3_sbuf msg = {0};
  int32_t *probe = NULL;
  int n_probe;
  if ((st = m3_engine_open(&o, &e)) != M3_OK) goto done;
  m3_model_info info;
  m3_engine_model_info(e, &info);
  h.format = info.chat_format == M3_CHAT_M2 ? M3_CHAT_FORMAT_M2 : M3_CHAT_FORMAT_M3;
  if ((st = m3_tokenize(e, "", 0, 1, &probe, &n_probe)) == M3_ERR_UNSUPPORTED)
    st = m3_fail(M3_ERR_ARG, "--model: %s has no tokenizer.json, which chat needs", a.model);
  if (st != M3_OK) goto done;
  if (a.system && !(h.system = strdup(a.system))) {
    st = m3_fail(M3_ERR_NOMEM, "chat: out of memory");
    goto done;
  }
  fprintf(stderr, "%s: %s chat format, context %d tokens.%s\n", info.name,
          h.format == M3_CHAT_FORMAT_M2 ? "M2" : "M3", info.max_context,
          tty_in ? " /help lists the commands, /quit leaves." : "");

  m3_sampling_params sp;
  m3_sampling_params_init(&sp);
  sp.temperature = (float)a.temperature;
  sp.top_k = (int)a.top_k;
  sp.top_p = (float)a.top_p;
  sp.max_tokens = (int)a.max_tokens;
  sp.seed = (uint64_t)a.seed;
  sp.has_seed = a.has_seed;
  int single;
  while (read_message(&msg, tty_in, &single)) {
    if (msg.failed) {
      st = m3_fail(M3_ERR_NOMEM, "chat: out of memory for the input");
      break;
    }
    const char *text = msg.len ? msg.data : "";
    command_result cmd = single ? run_command(&h, text) : CMD_NONE;
    if (cmd == CMD_QUIT) break;
    if (cmd == CMD_HANDLED || msg.len == 0) continue;
    turn t = {.role = M3_ROLE_USER, .content = strdup(text)};
    if (!t.content) st = m3_fail(M3_ERR_NOMEM, "chat: out of memory");
    if (st == M3_OK) st = history_push(&h, t);
    if (st == M3_OK) st = reply_turn(e, &h, &sp, tty_out);
    /* A turn that could not be answered is reported and dropped; the chat goes on. */
    if (st == M3_ERR_LIMIT || st == M3_ERR_ARG || st == M3_ERR_FORMAT) {
      fprintf(stderr, "m3 chat: %s\n", m3_last_error());
      st = M3_OK;
    }
    if (st != M3_OK) break;
  }

done:
  m3_engine_close(e);
  history_reset(&h);
  free(h.turns);
  free(h.system);
  free(probe);
  m3_sbuf_free(&msg);
  return st == M3_OK ? 0 : m3_cli_fail("chat", st);
}
