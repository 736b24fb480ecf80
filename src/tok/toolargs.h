/* toolargs.h: tool-call argument values typed by the tool's JSON schema (spec §8.3 rule 6, the
 * coercions of vLLM's MiniMax parsers).
 *
 * A property schema gives candidate types, in order: its "type" (string or list), else object
 * for properties/additionalProperties, array for items/prefixItems, the types of const/enum
 * values, the union over anyOf/oneOf/allOf, and string when nothing is said. Text is converted
 * by every candidate and the most confident conversion wins (first on ties):
 *   null     "null" (any case)                      -> null    (confident; other text: weak)
 *   string   the text verbatim                                  (weak)
 *   integer  Python int(): sign, digits               -> integer
 *   number   Python float(); integral values become integers; NaN/±inf the strings
 *            "NaN"/"Infinity"/"-Infinity"
 *   boolean  true/false (confident), yes/on/1, no/off/0, anything else false (weak)
 *   object, array: the text parsed as JSON
 * Empty text is {} / [] / null / "" for object / array / null / other candidates. Unlike vLLM no
 * jsonschema validation reorders the candidates. */
#ifndef M3_TOK_TOOLARGS_H
#define M3_TOK_TOOLARGS_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

/* tools[i].function.parameters.properties[param] of the tool named `tool` (NULL if absent). */
const cJSON *m3_tool_param_schema(const cJSON *tools, const char *tool, const char *param);
/* True when the only candidate is string: the value is then streamed as it is generated. */
bool m3_arg_is_plain_string(const cJSON *schema);
/* The value of `text` under `schema`, as a cJSON tree (scalars are Raw JSON text). */
cJSON *m3_arg_from_text(const char *text, size_t n, const cJSON *schema);
/* The value of an M3 element body (namespace-prefixed child elements, spec §8.3 rule 6):
 * array schema + <item> children -> list; otherwise an object keyed by child names (repeated
 * names collect into a list, text beside children goes under "$text"); leaves by their schema. */
cJSON *m3_arg_from_elements(const char *body, size_t n, const char *ns, const cJSON *schema);

#endif
