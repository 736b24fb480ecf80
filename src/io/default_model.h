/* default_model.h: where the model that run, chat, serve, perplexity and inspect load without
 * --model lives.
 *
 * The default model is models/m3-small of the source tree: a small trained model of the exact
 * MiniMax-M3 text architecture (official text-only layout), committed with its EAGLE3 draft in
 * models/m3-small-eagle3. It is looked for, in order, in
 *   $M3_MODEL_DIR                                  (when set and not empty; then it must hold
 *                                                   a config.json, else M3_ERR_MISSING names it)
 *   <install prefix>/share/m3/models/m3-small      (`cmake --install` copies models/ there)
 *   <source tree>/models/m3-small                  (a build run from its own tree)
 * and the first of these folders that holds a config.json is the one. */
#ifndef M3_IO_DEFAULT_MODEL_H
#define M3_IO_DEFAULT_MODEL_H

#include <stddef.h>

#include "base/status.h"

/* The draft folder next to the default model. */
#define M3_DEFAULT_DRAFT_NAME "m3-small-eagle3"

/* Writes the default model's folder into out[cap]. None found is M3_ERR_MISSING naming the
 * folders looked at; a path longer than cap is M3_ERR_ARG. */
m3_status m3_default_model_dir(char *out, size_t cap);

/* The first of candidates[n] (NULL or "" entries are skipped) that holds a config.json, written
 * into out[cap]; m3_default_model_dir with its three places. Errors as above. */
m3_status m3_model_dir_first(const char *const *candidates, int n, char *out, size_t cap);

#endif
