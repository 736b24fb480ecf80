#!/usr/bin/env python3
"""Render tests/fixtures/chat/cases.json through the real chat templates with jinja2, writing one
golden file per case (tests/fixtures/chat/<name>.txt) for tests/test_tok_chat.c.

The templates are not kept in this repository; pass their paths:
  --m3  MiniMax-M3.jinja          llama.cpp models/templates/MiniMax-M3.jinja (the official template;
                                  sha256 11421244f67553498e5c8112dae02802025bcc4305ec45ad380af95c96f9fe64,
                                  the LFS object of that path in a llama.cpp fork)
  --m2  unsloth-MiniMax-M2.jinja  ggml-org/llama.cpp models/templates/unsloth-MiniMax-M2.jinja

The environment is set up the way transformers' apply_chat_template does it: sandboxed,
trim_blocks + lstrip_blocks, loop controls, a `tojson` filter that is json.dumps with
ensure_ascii=False and the default separators, and raise_exception. Tool-call arguments are given
in cases.json as JSON text (the OpenAI wire form) and parsed into dicts before rendering, as vLLM
does. A case whose template raises gets "ERROR: <message>" as its golden."""
import argparse
import json
import pathlib

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols"])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def wire_to_template(messages):
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            calls = []
            for c in m["tool_calls"]:
                c = json.loads(json.dumps(c))
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m3", required=True)
    ap.add_argument("--m2", required=True)
    ap.add_argument("--dir", default=str(pathlib.Path(__file__).resolve().parent.parent /
                                         "tests/fixtures/chat"))
    args = ap.parse_args()
    env = make_env()
    templates = {"m3": env.from_string(pathlib.Path(args.m3).read_text()),
                 "m2": env.from_string(pathlib.Path(args.m2).read_text())}
    out_dir = pathlib.Path(args.dir)
    cases = json.loads((out_dir / "cases.json").read_text())
    for case in cases:
        kwargs = {"messages": wire_to_template(case["messages"]),
                  "add_generation_prompt": case.get("add_generation_prompt", True)}
        if case.get("tools"):
            kwargs["tools"] = case["tools"]
        if "thinking_mode" in case:
            kwargs["thinking_mode"] = case["thinking_mode"]
        try:
            text = templates[case["format"]].render(**kwargs)
        except jinja2.exceptions.TemplateError as e:
            text = "ERROR: " + str(e)
        (out_dir / (case["name"] + ".txt")).write_bytes(text.encode("utf-8"))
        print(case["name"], len(text))


if __name__ == "__main__":
    main()
