/* commands.h: one function per `m3` subcommand, each in its own file under src/cli.
 *
 * A command returns the process exit status: 0 on success, 2 for bad input (the command prints
 * one line "m3 <cmd>: <message naming the file, tensor or key>" to stderr), 1 for other failures.
 * argv[0] is the subcommand name. */
#ifndef M3_CLI_COMMANDS_H
#define M3_CLI_COMMANDS_H

#include "base/status.h"

int m3_cmd_inspect(int argc, char **argv);
int m3_cmd_tiny(int argc, char **argv);
int m3_cmd_tiny_draft(int argc, char **argv);
int m3_cmd_bench(int argc, char **argv);
int m3_cmd_logits(int argc, char **argv);
int m3_cmd_perplexity(int argc, char **argv);
int m3_cmd_run(int argc, char **argv);
int m3_cmd_chat(int argc, char **argv);
int m3_cmd_tokenize(int argc, char **argv);
int m3_cmd_detokenize(int argc, char **argv);
int m3_cmd_serve(int argc, char **argv);

/* Prints "m3 <cmd>: <last error>" and maps the status to the exit code (2 for input errors). */
int m3_cli_fail(const char *cmd, m3_status status);

#endif
