#!/usr/bin/env python3
"""Generate tests/data/chat_rendered.json: OpenAI-style chat requests rendered by transformers' own
`apply_chat_template` (tokenize=False), for the genuine Llama-3.2-3B-Instruct template and the Llama 3.2 Vision
template, both read from $LLAMA32_TEST_DATA.

The tokenizer is a PreTrainedTokenizerFast built from `tokenizer.computed.json` and the genuine
`Llama-3.2-3B-Instruct/tokenizer_config.json`, so the template gets exactly the kwargs transformers passes
(bos_token, eos_token, tools, documents, add_generation_prompt, plus our extra kwargs).

Each case holds the OpenAI request body (as the engine receives it) and HF's rendering. The OpenAI -> HF
conversion below is the one the engine implements (engine/chat_template.rs):
  * tool_calls[].function.arguments given as a JSON string is parsed (HF wants a dict);
  * content parts: for a template that iterates over message content (vision), image_url parts become
    {"type": "image"} and text parts stay; for one that does not (3B text), text parts are joined with "\n".
Cases with "date_string": null render with today's date; the output stores it as "{DATE}" (today's
strftime("%d %b %Y") at generation time), which the Rust test substitutes.

Run:  LLAMA32_TEST_DATA=/work/shared/llama32 /work/venv-golden/bin/python scripts/make_chat_vectors.py
"""

import copy
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import transformers
from transformers import PreTrainedTokenizerFast

DATA = Path(os.environ.get("LLAMA32_TEST_DATA", "/work/shared/llama32"))
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_rendered.json"
DATE = "26 Jul 2024"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather — température, humidité — for a city (東京, Zürich…)",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"São Paulo\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "when": {
                    "type": "object",
                    "properties": {
                        "day": {"type": "integer", "minimum": 0, "maximum": 6},
                        "hours": {"type": "array", "items": {"type": "number"}},
                    },
                    "required": [],
                },
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web. Returns <b>HTML</b> & text snippets; tab:\t end.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "max_results": {"type": "integer", "default": 5},
                "threshold": {"type": "number", "default": 0.25},
                "filters": {"type": "object", "properties": {}},
                "safe": {"type": "boolean", "default": True},
                "lang": {"type": ["string", "null"], "default": None},
            },
            "required": ["query"],
        },
    },
}
NOOP = {"type": "function", "function": {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}}

ARGS_STR = json.dumps(
    {"city": "Zürich", "unit": "celsius", "when": {"day": 1, "hours": [9, 12.5, 1e-07, 1e16, -0.0, 3.0]},
     "note": "quote \" backslash \\ newline \n tab \t </script> & 🦙", "big": 12345678901234567, "flag": False,
     "none": None, "empty": {}, "list": []},
    ensure_ascii=True,
)


def user(text):
    return {"role": "user", "content": text}


CASES = [
    # name, template kind, request body, add_generation_prompt, date_string
    ("plain user", "text", {"messages": [user("Hello!")]}, True, DATE),
    ("system prompt", "text",
     {"model": "llama", "messages": [{"role": "system", "content": "You are a helpful assistant"},
                                     user("Who are you?")], "temperature": 0.7}, True, DATE),
    ("no system prompt, default date", "text", {"messages": [user("What day is it?")]}, True, None),
    ("multi-turn", "text",
     {"messages": [{"role": "system", "content": "Be brief."}, user("What is 2+2?"),
                   {"role": "assistant", "content": "4"}, user("And 3+3?")]}, True, DATE),
    ("no generation prompt", "text",
     {"messages": [user("Hi"), {"role": "assistant", "content": "Hello! How can I help?"}]}, False, DATE),
    ("whitespace is trimmed", "text",
     {"messages": [{"role": "system", "content": "  \n sys \t\n"}, user("\u3000\u00a0 padded \x1c\n "),
                   {"role": "assistant", "content": "\n\nok\n"}]}, True, DATE),
    ("unicode content", "text",
     {"messages": [user("Ünïcödé: 日本語, Ελληνικά, עברית, हिन्दी, 🦙👨‍👩‍👧‍👦, e\u0301, \"quotes\" & <tags>")]}, True, DATE),
    ("tools in first user message", "text",
     {"messages": [user("What's the weather in Zürich tomorrow?")], "tools": [WEATHER, SEARCH, NOOP]}, True, DATE),
    ("tools with system prompt", "text",
     {"messages": [{"role": "system", "content": "Use tools when needed."}, user("Search for llamas")],
      "tools": [SEARCH], "tool_choice": "auto"}, True, DATE),
    ("tools in system message (tools_in_user_message=false)", "text",
     {"messages": [{"role": "system", "content": "You are a bot."}, user("Weather?")], "tools": [WEATHER],
      "chat_template_kwargs": {"tools_in_user_message": False}}, True, DATE),
    ("assistant tool call with string arguments, tool result", "text",
     {"messages": [user("Weather in Zürich?"),
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ARGS_STR}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"}],
      "tools": [WEATHER]}, True, DATE),
    ("tool call with object arguments, ipython result, follow-up", "text",
     {"messages": [{"role": "system", "content": "sys"}, user("Search llamas"),
                   {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                       "name": "web_search", "arguments": {"query": "llamas", "max_results": 3}}}]},
                   {"role": "ipython", "content": "Llamas are camelids."},
                   {"role": "assistant", "content": "Llamas are camelids."},
                   user("Thanks!")],
      "tools": [SEARCH]}, True, DATE),
    ("tool call without tools", "text",
     {"messages": [user("x"),
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "content": "ok", "tool_call_id": "c"}]}, False, DATE),
    ("text parts are joined", "text",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "first part"},
                                                {"type": "text", "text": "second part"}]}]}, True, DATE),
    ("custom date via kwargs", "text",
     {"messages": [user("hi")], "chat_template_kwargs": {"date_string": "01 Jan 2030"}}, True, None),
    ("second system message mid-conversation", "text",
     {"messages": [user("a"), {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"},
                   user("d")]}, True, DATE),
    ("error: two tool calls", "text",
     {"messages": [user("x"), {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "f", "arguments": "{}"}},
         {"type": "function", "function": {"name": "g", "arguments": "{}"}}]}]}, True, DATE),
    ("error: tools without a user message", "text",
     {"messages": [{"role": "system", "content": "only system"}], "tools": [NOOP]}, True, DATE),
    # Vision template
    ("vision: image_url + text", "vision",
     {"messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "https://example.com/llama.png"}},
         {"type": "text", "text": "Describe this image in two sentences"}]}]}, True, DATE),
    ("vision: text only (string)", "vision", {"messages": [user("Who are you?")]}, True, DATE),
    ("vision: text only (parts)", "vision",
     {"messages": [{"role": "system", "content": "Be terse."},
                   {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]},
     True, DATE),
    ("vision: default date", "vision", {"messages": [user("date?")]}, True, None),
    ("vision: two images, multi-turn", "vision",
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "Compare "},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}},
         {"type": "text", "text": " and "},
         {"type": "image"},
         {"type": "text", "text": " please."}]},
         {"role": "assistant", "content": "The first is bigger."},
         {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]}, True, DATE),
    ("vision: image, no generation prompt", "vision",
     {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "A llama."}]}]}, False, DATE),
    ("vision: tools", "vision",
     {"messages": [user("Weather in Zürich?"),
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
                   {"role": "tool", "content": "sunny"}],
      "tools": [WEATHER]}, True, DATE),
    ("error vision: image with system message", "vision",
     {"messages": [{"role": "system", "content": "sys"},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]}, True, DATE),
]


def to_hf_messages(messages, takes_parts):
    """The engine's OpenAI -> HF conversion (see the module docs)."""
    out = []
    for m in messages:
        d = {}
        for k, v in m.items():
            if v is None:
                continue
            if k == "content" and isinstance(v, list):
                if takes_parts:
                    v = [{"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": "image"} for p in v]
                else:
                    v = "\n".join(p["text"] for p in v)
            if k == "tool_calls":
                calls = []
                for c in v:
                    c = copy.deepcopy(c)
                    if isinstance(c["function"].get("arguments"), str):
                        c["function"]["arguments"] = json.loads(c["function"]["arguments"])
                    calls.append(c)
                v = calls
            d[k] = v
        out.append(d)
    return out


def main():
    config = json.loads((DATA / "Llama-3.2-3B-Instruct" / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    text_template = config["chat_template"]
    vision_template = json.loads(
        (DATA / "Llama-3.2-90B-Vision-Instruct" / "chat_template.reconstructed.json").read_text())["chat_template"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizer.computed.json"), **config)
    templates = {"text": (text_template, False), "vision": (vision_template, True)}

    cases = []
    for name, kind, request, agp, date in CASES:
        template, takes_parts = templates[kind]
        messages = to_hf_messages(request["messages"], takes_parts)
        kwargs = dict(request.get("chat_template_kwargs", {}))
        if date is not None:
            kwargs["date_string"] = date
        case = {"name": name, "template": kind, "request": request, "add_generation_prompt": agp,
                "date_string": date}
        try:
            today = datetime.now().strftime("%d %b %Y")
            rendered = tok.apply_chat_template(messages, tools=request.get("tools"), chat_template=template,
                                               add_generation_prompt=agp, tokenize=False, **kwargs)
            if date is None and "date_string" not in kwargs:
                assert today in rendered, name
                rendered = rendered.replace(today, "{DATE}")
            case["expected"] = rendered
        except jinja2.exceptions.TemplateError as e:
            case["expected_error"] = str(e)
        cases.append(case)

    doc = {
        "note": "Generated by scripts/make_chat_vectors.py with transformers "
                f"{transformers.__version__}, jinja2 {jinja2.__version__}: PreTrainedTokenizerFast.apply_chat_template"
                "(tokenize=False). 'text' = Llama-3.2-3B-Instruct tokenizer_config.json chat_template, 'vision' = "
                "Llama-3.2-90B-Vision-Instruct chat_template.reconstructed.json. '{DATE}' = today's date (%d %b %Y).",
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
