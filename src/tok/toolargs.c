/* toolargs.c: schema-typed argument values (toolargs.h). */
#include "tok/toolargs.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "tok/pyjson.h"
#include "tok/textscan.h"

enum { T_NULL, T_STRING, T_INTEGER, T_NUMBER, T_BOOLEAN, T_ARRAY, T_OBJECT, T_OTHER, T_COUNT };

typedef struct {
  int n;
  unsigned char t[T_COUNT];
} types;

static void add_type(types *ts, int t) {
  for (int i = 0; i < ts->n; i++)
    if (ts->t[i] == t) return;
  ts->t[ts->n++] = (unsigned char)t;
}

static int type_named(const char *s) {
  static const struct { const char *name; int t; } names[] = {
      {"none", T_NULL},    {"null", T_NULL},       {"nil", T_NULL},     {"str", T_STRING},
      {"string", T_STRING}, {"text", T_STRING},    {"int", T_INTEGER},  {"integer", T_INTEGER},
      {"float", T_NUMBER}, {"number", T_NUMBER},   {"bool", T_BOOLEAN}, {"boolean", T_BOOLEAN},
      {"array", T_ARRAY},  {"list", T_ARRAY},      {"object", T_OBJECT}, {"dict", T_OBJECT},
      {"dictionary", T_OBJECT}, {"map", T_OBJECT}};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (strcasecmp(s, names[i].name) == 0) return names[i].t;
  return T_OTHER;
}

static int type_of_example(const cJSON *v) {
  if (cJSON_IsNull(v)) return T_NULL;
  if (cJSON_IsString(v)) return T_STRING;
  if (cJSON_IsBool(v)) return T_BOOLEAN;
  if (cJSON_IsNumber(v)) return v->valuedouble == floor(v->valuedouble) ? T_INTEGER : T_NUMBER;
  if (cJSON_IsArray(v)) return T_ARRAY;
  if (cJSON_IsObject(v)) return T_OBJECT;
  return T_OTHER;
}

static void collect_types(const cJSON *s, types *ts) {
  if (!cJSON_IsObject(s)) {
    add_type(ts, T_STRING);
    return;
  }
  const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
  const cJSON *add = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
  if (type) {
    if (cJSON_IsString(type)) {
      add_type(ts, type_named(type->valuestring));
    } else if (cJSON_IsArray(type)) {
      for (const cJSON *t = type->child; t; t = t->next)
        add_type(ts, cJSON_IsString(t) ? type_named(t->valuestring) : T_OTHER);
    } else {
      add_type(ts, T_OTHER);
    }
  } else if (cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(s, "properties")) ||
             (add && !cJSON_IsFalse(add))) {
    add_type(ts, T_OBJECT);
  } else if (cJSON_GetObjectItemCaseSensitive(s, "items") ||
             cJSON_GetObjectItemCaseSensitive(s, "prefixItems")) {
    add_type(ts, T_ARRAY);
  } else {
    int before = ts->n;
    const cJSON *cnst = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    if (cnst) {
      add_type(ts, type_of_example(cnst));
    } else if (cJSON_IsArray(en) && en->child) {
      for (const cJSON *e = en->child; e; e = e->next) add_type(ts, type_of_example(e));
    } else {
      static const char *const choices[] = {"anyOf", "oneOf", "allOf"};
      for (int k = 0; k < 3; k++) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(s, choices[k]);
        for (const cJSON *c = cJSON_IsArray(list) ? list->child : NULL; c; c = c->next)
          collect_types(c, ts);
      }
    }
    if (ts->n == before && !cnst) add_type(ts, T_STRING);
  }
}

static types types_of(const cJSON *schema) {
  types ts = {0};
  collect_types(schema, &ts);
  return ts;
}

static bool has_type(const types *ts, int t) {
  for (int i = 0; i < ts->n; i++)
    if (ts->t[i] == t) return true;
  return false;
}

bool m3_arg_is_plain_string(const cJSON *schema) {
  types ts = types_of(schema);
  return ts.n == 1 && ts.t[0] == T_STRING;
}

const cJSON *m3_tool_param_schema(const cJSON *tools, const char *tool, const char *param) {
  for (const cJSON *t = tools ? tools->child : NULL; t; t = t->next) {
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
    if (!fn) fn = t;
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(fn, "name"));
    if (!name || strcmp(name, tool) != 0) continue;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(fn, "parameters");
    return cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(params, "properties"),
                                            param);
  }
  return NULL;
}

/* Sub-schema of a property or of the array items, looking through anyOf/oneOf/allOf. */
static const cJSON *sub_schema(const cJSON *s, const char *key) {
  if (!cJSON_IsObject(s)) return NULL;
  const cJSON *found;
  if (key) {
    found = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(s, "properties"), key);
    if (!found) found = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (!cJSON_IsObject(found)) found = NULL;
  } else {
    found = cJSON_GetObjectItemCaseSensitive(s, "items");
    const cJSON *prefix = cJSON_GetObjectItemCaseSensitive(s, "prefixItems");
    if (!found && cJSON_IsArray(prefix)) found = prefix->child;
  }
  static const char *const choices[] = {"anyOf", "oneOf", "allOf"};
  for (int k = 0; k < 3 && !found; k++) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(s, choices[k]);
    for (const cJSON *c = cJSON_IsArray(list) ? list->child : NULL; c && !found; c = c->next)
      found = sub_schema(c, key);
  }
  return found;
}

static cJSON *raw(m3_sbuf *b) {
  cJSON *v = b->failed ? NULL : cJSON_CreateRaw(b->data ? b->data : "");
  m3_sbuf_free(b);
  return v;
}

static void strip(const char **s, const char **e) {
  while (*s < *e && isspace((unsigned char)**s)) (*s)++;
  while (*e > *s && isspace((unsigned char)(*e)[-1])) (*e)--;
}

/* Python int(): optional sign, decimal digits with single underscores between them. */
static bool as_integer(const char *s, const char *e, m3_sbuf *out) {
  strip(&s, &e);
  bool neg = false;
  if (s < e && (*s == '+' || *s == '-')) neg = *s++ == '-';
  if (s == e || !isdigit((unsigned char)*s) || !isdigit((unsigned char)e[-1])) return false;
  m3_sbuf digits = {0};
  for (const char *p = s; p < e; p++) {
    if (*p == '_' && isdigit((unsigned char)p[1]) && isdigit((unsigned char)p[-1])) continue;
    if (!isdigit((unsigned char)*p)) {
      m3_sbuf_free(&digits);
      return false;
    }
    if (digits.len == 0 && *p == '0') continue;
    m3_sbuf_putc(&digits, *p);
  }
  if (digits.len == 0) {
    m3_sbuf_putc(out, '0');
  } else {
    if (neg) m3_sbuf_putc(out, '-');
    m3_sbuf_put(out, digits.data, digits.len);
  }
  m3_sbuf_free(&digits);
  return true;
}

/* Python float(): decimal or exponent form, inf/nan words; not hex. */
static bool as_number(const char *s, const char *e, m3_sbuf *out) {
  strip(&s, &e);
  if (s == e || memchr(s, 'x', (size_t)(e - s)) || memchr(s, 'X', (size_t)(e - s))) return false;
  char tmp[64];
  size_t n = (size_t)(e - s);
  if (n >= sizeof tmp) {
    return as_integer(s, e, out);
  }
  memcpy(tmp, s, n);
  tmp[n] = 0;
  char *end;
  double x = strtod(tmp, &end);
  if (end != tmp + n) return false;
  if (isnan(x)) {
    m3_sbuf_puts(out, "\"NaN\"");
  } else if (isinf(x)) {
    m3_sbuf_puts(out, x > 0 ? "\"Infinity\"" : "\"-Infinity\"");
  } else if (x == floor(x)) {
    char d[400];
    snprintf(d, sizeof d, "%.0f", x);
    m3_sbuf_puts(out, strcmp(d, "-0") == 0 ? "0" : d);
  } else {
    m3_py_float(out, x);
  }
  return true;
}

/* One candidate's conversion: its confidence (0 = not applicable) and JSON text in `out`. */
static int convert_as(int t, const char *s, const char *e, m3_sbuf *out) {
  const char *ss = s, *se = e;
  strip(&ss, &se);
  size_t sn = (size_t)(se - ss);
  switch (t) {
    case T_NULL:
      m3_sbuf_puts(out, "null");
      return sn == 0 ? 3 : (sn == 4 && strncasecmp(ss, "null", 4) == 0) ? 10 : 1;
    case T_STRING:
      m3_pyjson_string(out, s, (size_t)(e - s));
      return 2;
    case T_INTEGER:
      return as_integer(s, e, out) ? 10 : 0;
    case T_NUMBER:
      return as_number(s, e, out) ? 10 : 0;
    case T_BOOLEAN: {
      static const struct { const char *w; bool v; int conf; } words[] = {
          {"true", true, 10}, {"false", false, 10}, {"yes", true, 9}, {"on", true, 9},
          {"1", true, 9},     {"no", false, 9},     {"off", false, 9}, {"0", false, 9}};
      for (size_t i = 0; sn <= 5 && i < sizeof words / sizeof words[0]; i++)
        if (sn == strlen(words[i].w) && strncasecmp(ss, words[i].w, sn) == 0) {
          m3_sbuf_puts(out, words[i].v ? "true" : "false");
          return words[i].conf;
        }
      m3_sbuf_puts(out, "false");
      return 1;
    }
    default: {
      char *text = strndup(s, (size_t)(e - s));
      cJSON *v = text ? cJSON_Parse(text) : NULL;
      free(text);
      if (!v) return 0;
      m3_pyjson_dump(out, v, true);
      cJSON_Delete(v);
      return 10;
    }
  }
}

cJSON *m3_arg_from_text(const char *text, size_t n, const cJSON *schema) {
  types ts = types_of(schema);
  m3_sbuf best = {0};
  if (n == 0) {
    m3_sbuf_puts(&best, has_type(&ts, T_OBJECT) ? "{}" : has_type(&ts, T_ARRAY) ? "[]"
                        : has_type(&ts, T_NULL)  ? "null" : "\"\"");
    return raw(&best);
  }
  int best_conf = 0;
  for (int i = 0; i < ts.n; i++) {
    m3_sbuf b = {0};
    int conf = convert_as(ts.t[i], text, text + n, &b);
    if (conf > best_conf) {
      m3_sbuf_free(&best);
      best = b;
      best_conf = conf;
    } else {
      m3_sbuf_free(&b);
    }
  }
  if (best_conf == 0) m3_pyjson_string(&best, text, n);
  return raw(&best);
}

/* Element tree of an M3 parameter body. */
typedef struct node {
  char *tag;
  m3_sbuf text;
  struct node **kids;
  size_t n_kids;
} node;

static void node_free(node *nd) {
  for (size_t i = 0; i < nd->n_kids; i++) node_free(nd->kids[i]);
  free(nd->kids);
  free(nd->tag);
  m3_sbuf_free(&nd->text);
  free(nd);
}

static node *node_add(node *parent, const char *tag, size_t n) {
  node *kid = calloc(1, sizeof *kid);
  node **kids = realloc(parent->kids, (parent->n_kids + 1) * sizeof *kids);
  if (!kid || !kids) {
    free(kid);
    if (kids) parent->kids = kids;
    return NULL;
  }
  parent->kids = kids;
  kid->tag = strndup(tag, n);
  parent->kids[parent->n_kids++] = kid;
  return kid;
}

/* Splits the body at every namespace token: "<tag>" opens, "</tag>" closes the innermost open
 * element of that name (and any left open inside it; unknown closers are ignored), other text
 * goes to the innermost open element. */
static node *parse_elements(const char *s, size_t n, const char *ns) {
  node *root = calloc(1, sizeof *root);
  node *stack[64];
  int depth = 0;
  if (!root) return NULL;
  stack[0] = root;
  size_t nl = strlen(ns);
  const char *p = s, *e = s + n;
  while (p < e) {
    const char *next = m3_find(p, (size_t)(e - p), ns);
    const char *chunk_end = next ? next : e;
    m3_sbuf_put(&stack[depth]->text, p, (size_t)(chunk_end - p));
    if (!next) break;
    p = next + nl;
    const char *gt = memchr(p, '>', (size_t)(e - p));
    if (*p != '<' || !gt) continue;
    if (p[1] == '/') {
      for (int d = depth; d > 0; d--)
        if (strlen(stack[d]->tag) == (size_t)(gt - p - 2) && memcmp(stack[d]->tag, p + 2, (size_t)(gt - p - 2)) == 0) {
          depth = d - 1;
          break;
        }
    } else if (depth + 1 < 64) {
      node *kid = node_add(stack[depth], p + 1, (size_t)(gt - p - 1));
      if (kid) stack[++depth] = kid;
    }
    p = gt + 1;
  }
  return root;
}

static bool blank(const m3_sbuf *b) {
  for (size_t i = 0; i < b->len; i++)
    if (!isspace((unsigned char)b->data[i])) return false;
  return true;
}

static cJSON *node_value(const node *nd, const cJSON *schema) {
  if (nd->n_kids == 0) return m3_arg_from_text(nd->text.data ? nd->text.data : "", nd->text.len, schema);
  types ts = types_of(schema);
  if (has_type(&ts, T_ARRAY) && strcmp(nd->kids[0]->tag, "item") == 0) {
    cJSON *arr = cJSON_CreateArray();
    const cJSON *items = sub_schema(schema, NULL);
    for (size_t i = 0; arr && i < nd->n_kids; i++)
      cJSON_AddItemToArray(arr, node_value(nd->kids[i], items));
    return arr;
  }
  cJSON *obj = cJSON_CreateObject();
  for (size_t i = 0; obj && i < nd->n_kids; i++) {
    const char *tag = nd->kids[i]->tag;
    if (cJSON_GetObjectItemCaseSensitive(obj, tag)) continue; /* collected at first sight */
    size_t count = 0;
    for (size_t j = i; j < nd->n_kids; j++) count += strcmp(nd->kids[j]->tag, tag) == 0;
    const cJSON *sub = sub_schema(schema, tag);
    if (count == 1) {
      cJSON_AddItemToObject(obj, tag, node_value(nd->kids[i], sub));
      continue;
    }
    cJSON *list = cJSON_AddArrayToObject(obj, tag);
    for (size_t j = i; list && j < nd->n_kids; j++)
      if (strcmp(nd->kids[j]->tag, tag) == 0) cJSON_AddItemToArray(list, node_value(nd->kids[j], sub));
  }
  if (obj && !blank(&nd->text)) {
    m3_sbuf s = {0};
    m3_pyjson_string(&s, nd->text.data, nd->text.len);
    cJSON_AddItemToObject(obj, "$text", raw(&s));
  }
  return obj;
}

cJSON *m3_arg_from_elements(const char *body, size_t n, const char *ns, const cJSON *schema) {
  node *root = parse_elements(body, n, ns);
  if (!root) return NULL;
  cJSON *v = node_value(root, schema);
  node_free(root);
  return v;
}
