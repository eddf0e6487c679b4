#!/usr/bin/env python3
"""Renders the chat templates of tests/data/chat_templates/*.jinja with Python's jinja2 the way
transformers' apply_chat_template does (ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loopcontrols, its tojson, raise_exception and strftime_now) for the cases
below, and writes tests/data/chat_templates/expected.json: what the C++ renderer
(src/server/jinja.cpp) must produce, byte for byte (tests/test_chat_template.cpp).
    python3 scripts/make_chat_template_fixtures.py
"""
import json
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "chat_templates")

SPECIALS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3.1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-v0.3": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen2": {"bos_token": "", "eos_token": "<|im_end|>"},
    "qwen2.5": {"bos_token": "", "eos_token": "<|im_end|>"},
}

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}

CASES = {
    "one_user": {"messages": [{"role": "user", "content": "Hello!"}]},
    "system_and_turns": {"messages": [
        {"role": "system", "content": "  You are terse.\n"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " Four. "},
        {"role": "user", "content": "And \"3+3\"? Say it\twith\nnewlines, ünïcödé and {{ braces }}."}]},
    "not_alternating": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    "tools": {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [TOOL]},
    "tool_call_turns": {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "{\"temp\": 21.5}"},
        {"role": "user", "content": "Thanks"}], "tools": [TOOL]},
}


def render(source, case, specials):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    t = env.from_string(source)
    try:
        return {"text": t.render(**case, add_generation_prompt=True, **specials)}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main():
    out = {}
    for name in sorted(SPECIALS):
        with open(os.path.join(HERE, name + ".jinja")) as f:
            source = f.read()
        out[name] = {"specials": SPECIALS[name], "cases": {}}
        for cname, case in CASES.items():
            out[name]["cases"][cname] = {"input": case, **render(source, case, SPECIALS[name])}
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", os.path.join(HERE, "expected.json"), "with jinja2", jinja2.__version__)


if __name__ == "__main__":
    main()
