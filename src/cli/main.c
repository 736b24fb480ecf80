/* m3: command-line entry point. Dispatches to one function per subcommand (commands.h). */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

typedef struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} command;

static const command commands[] = {
    {"inspect", m3_cmd_inspect, "describe a checkpoint: layers, parameters, memory, quantization"},
    {"tiny", m3_cmd_tiny, "write a small deterministic random checkpoint in the official layout"},
    {"tiny-draft", m3_cmd_tiny_draft, "write a small random EAGLE3 draft for a target model"},
    {"bench", m3_cmd_bench, "benchmarks: ops, model, engine, tok, serve (m3 bench --help)"},
    {"logits", m3_cmd_logits, "write the float32 logits of every position of an id sequence"},
    {"perplexity", m3_cmd_perplexity, "the model's perplexity on a text, in chunks of N tokens"},
    {"run", m3_cmd_run, "generate tokens from a prompt and report prompt and generation speed"},
    {"chat", m3_cmd_chat, "chat with the model interactively in its chat format"},
    {"tokenize", m3_cmd_tokenize, "print the token ids of a text"},
    {"detokenize", m3_cmd_detokenize, "print the text of token ids"},
    {"serve", m3_cmd_serve, "serve the OpenAI- and Anthropic-compatible HTTP API"},
};

static void usage(FILE *f) {
  fprintf(f, "usage: m3 <command> [options]\n\ncommands:\n");
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].summary);
  fprintf(f, "\n`m3 <command> --help` describes each command's options.\n");
}

int m3_cli_fail(const char *cmd, m3_status status) {
  fprintf(stderr, "m3 %s: %s\n", cmd, m3_last_error());
  switch (status) {
    case M3_ERR_NOMEM:
    case M3_ERR_UNSUPPORTED: return 1;
    default: return 2;
  }
}

int main(int argc, char **argv) {
  if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp(argv[1], commands[i].name) == 0) return commands[i].run(argc - 1, argv + 1);
  fprintf(stderr, "m3: unknown command '%s'\n", argv[1]);
  usage(stderr);
  return 2;
}
