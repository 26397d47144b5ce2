#!/usr/bin/env python3
"""The official OpenAI Python client against `llama32 serve`: every call must parse into the client's models, and
the answers must keep the promises OpenAI's API reference makes.

Serves a tiny random-weight model that has the real Llama 3 tokenizer and the 3B-Instruct chat template (a
config.json, tokenizer.model and tokenizer_config.json in a temporary directory) on a free loopback port, runs the
checks, prints one line per check and exits 1 if any failed.

    python scripts/openai_client_check.py --bin target/release/llama32 --data ../shared/llama32

Needs `openai` (pip install openai==3.57.0). tests/openai_client.rs runs it when LLAMA32_OPENAI_PYTHON names a
Python that has it (.ci/run sets one up).
"""

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
FAILED = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
    if not ok:
        FAILED.append(name)


def model_dir(data: Path, out: Path) -> Path:
    """The golden tied-gqa4 config widened to the Llama 3 vocabulary, with the real tokenizer and template."""
    cfg = json.loads((ROOT / "tests/golden/tied-gqa4/config.json").read_text())
    cfg.update(vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
               max_position_embeddings=2048)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(data / "tokenizer.model", out / "tokenizer.model")
    shutil.copy(data / "Llama-3.2-3B-Instruct/tokenizer_config.json", out / "tokenizer_config.json")
    return out


def vision_model_dir(data: Path, out: Path) -> Path:
    """The golden mllama-two-images config widened to the Llama 3 vocabulary, with the vision chat template."""
    cfg = json.loads((ROOT / "tests/golden/mllama-two-images/config.json").read_text())
    cfg["image_token_index"] = 128256
    cfg["text_config"].update(vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                              pad_token_id=128004, max_position_embeddings=1024)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(data / "tokenizer.model", out / "tokenizer.model")
    template = json.loads((data / "Llama-3.2-11B-Vision-Instruct/chat_template.reconstructed.json").read_text())
    tc = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template["chat_template"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


def png_url(name: str) -> str:
    data = (ROOT / "tests/golden/mllama-two-images" / name).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary: str, model: Path, port: int, log: Path, name: str = MODEL) -> subprocess.Popen:
    args = [binary, "serve", "--model", str(model), "--random-weights", "--served-model-name", name,
            "--port", str(port), "--kv-tokens", "8192"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"llama32 serve exited with {proc.returncode}:\n{log.read_text()}")
        if "listening on" in log.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"llama32 serve did not listen within 120 s:\n{log.read_text()}")


HI = [{"role": "user", "content": "Hi there"}]


def chat_checks(c: OpenAI):
    hi = HI
    # Chat, plain: the client's model, the usage arithmetic, and the id in x-request-id.
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=hi, max_tokens=5, temperature=0)
    r = raw.parse()
    u = r.usage
    check("chat: object and role", r.object == "chat.completion" and r.choices[0].message.role == "assistant")
    check("chat: usage adds up", u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 5,
          str(u))
    check("chat: finish_reason", r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check("chat: x-request-id is the id", r._request_id == r.id, f"{r._request_id} vs {r.id}")

    # Streaming: role first, finish reason, a usage chunk with no choices, the same text as the plain call.
    chunks = list(c.chat.completions.create(model=MODEL, messages=hi, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check("stream: first chunk has the role", chunks[0].choices[0].delta.role == "assistant")
    check("stream: a finish reason", any(ch.choices and ch.choices[0].finish_reason for ch in chunks))
    check("stream: usage chunk last, without choices", chunks[-1].choices == [] and chunks[-1].usage is not None)
    check("stream: same text as the plain call", text == (r.choices[0].message.content or ""), f"{text!r}")



def openai_field_checks(c: OpenAI):
    hi = HI
    # The `developer` role (OpenAI's name for system) and top_p 0 (the most likely token alone).
    dev = [{"role": "developer", "content": "Be brief."}] + hi
    sys_ = [{"role": "system", "content": "Be brief."}] + hi
    a = c.chat.completions.create(model=MODEL, messages=dev, max_tokens=4, temperature=0)
    b = c.chat.completions.create(model=MODEL, messages=sys_, max_tokens=4, temperature=0)
    check("developer role reads as system", a.choices[0].message.content == b.choices[0].message.content)
    t = c.chat.completions.create(model=MODEL, messages=hi, max_tokens=6, temperature=1, top_p=0, seed=3)
    g = c.chat.completions.create(model=MODEL, messages=hi, max_tokens=6, temperature=0)
    check("top_p 0 is the most likely token", t.choices[0].message.content == g.choices[0].message.content)

    # Chat log-probabilities.
    r = c.chat.completions.create(model=MODEL, messages=hi, max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    check("chat logprobs: one entry a token, three alternatives",
          len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content))



def completions_checks(c: OpenAI):
    # Completions log-probabilities: the sampled token among top_logprobs, character offsets into `text`, and the
    # same offsets streamed.
    kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1, seed=11, logprobs=2)
    r = c.completions.create(**kw)
    lp = r.choices[0].logprobs
    check("completions logprobs: sampled token in top_logprobs (at most logprobs + 1)",
          all(tok in top and len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs)), str(lp.top_logprobs))
    offs = lp.text_offset
    check("completions logprobs: offsets within the text, non-decreasing",
          all(x <= y for x, y in zip(offs, offs[1:])) and (not offs or offs[-1] <= len(r.choices[0].text)), str(offs))
    streamed = []
    for ch in c.completions.create(**kw, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed.extend(ch.choices[0].logprobs.text_offset)
    check("completions logprobs: streamed offsets run on", streamed == offs, f"{streamed} vs {offs}")

    # Several prompts, n, echo.
    r = c.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=2)
    check("completions: prompts x n choices", sorted(ch.index for ch in r.choices) == [0, 1, 2, 3])
    r = c.completions.create(model=MODEL, prompt="Echo me", max_tokens=2, echo=True)
    check("completions: echo", r.choices[0].text.startswith("Echo me"))

    # Prompt log-probabilities as lm-evaluation-harness asks for them: echo + logprobs, token-id prompts, max_tokens
    # 0 (the prompt alone) or 1 (its last entry is the generated token).
    text = "Score me, please"
    r = c.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ch, u = r.choices[0], r.usage
    lp = ch.logprobs
    check("completions: echo + logprobs + max_tokens 0 gives the prompt alone",
          ch.text == text and ch.finish_reason == "length" and u.completion_tokens == 0
          and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == u.prompt_tokens,
          f"{ch} {u}")
    check("completions: echo + logprobs: the first token has none, the others are log-probabilities",
          lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
          and all(v is not None and v <= 0 for v in lp.token_logprobs[1:]), str(lp.token_logprobs))
    ids = c.completions.create(model=MODEL, prompt=text, max_tokens=1,
                               extra_body={"return_token_ids": True}).choices[0].prompt_token_ids
    r = c.completions.create(model=MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234)
    lp1 = r.choices[0].logprobs
    same = len(lp1.token_logprobs) == len(ids) + 1 and all(
        (a is None and b is None) or abs(a - b) < 1e-4 for a, b in zip(lp1.token_logprobs, lp.token_logprobs))
    check("completions: echo + logprobs with token ids and max_tokens 1 (lm-eval's request)", same,
          f"{lp1.token_logprobs} vs {lp.token_logprobs}")
    greedy = lp1.token_logprobs[-1] == max(lp1.top_logprobs[-1].values())
    check("completions: the generated token of a greedy request is its position's best", greedy, str(lp1.top_logprobs[-1]))
    r = c.completions.create(model=MODEL, prompt=[ids], max_tokens=1, extra_body={"prompt_logprobs": 0})
    pl = getattr(r.choices[0], "prompt_logprobs", None)
    check("completions: vLLM prompt_logprobs", isinstance(pl, list) and len(pl) == len(ids) and pl[0] is None
          and all(abs(e[str(t)]["logprob"] - v) < 1e-4 for e, t, v in zip(pl[1:], ids[1:], lp.token_logprobs[1:])),
          str(pl)[:300])



def other_checks(c: OpenAI):
    hi = HI
    # Tools are accepted and the answer parses (random weights make no call to check).
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = c.chat.completions.create(model=MODEL, messages=hi, tools=tools, max_tokens=4)
    check("tools: accepted", r.choices[0].finish_reason in ("stop", "length", "tool_calls"))

    # Structured outputs: a JSON schema in OpenAI's response_format, and vLLM's guided_choice.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    r = c.chat.completions.create(model=MODEL, messages=hi, max_tokens=32, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    try:
        v = json.loads(r.choices[0].message.content)
        ok = isinstance(v.get("ok"), bool) and v.get("color") in ("red", "green") and len(v) == 2
    except ValueError:
        ok = False
    check("structured outputs: response_format json_schema", ok and r.choices[0].finish_reason == "stop",
          str(r.choices[0]))
    r = c.completions.create(model=MODEL, prompt="Pick:", max_tokens=8, extra_body={"guided_choice": ["left", "right"]})
    check("structured outputs: guided_choice", r.choices[0].text in ("left", "right"), r.choices[0].text)

    # Models.
    check("models.list", [m.id for m in c.models.list()] == [MODEL])
    check("models.retrieve", c.models.retrieve(MODEL).id == MODEL)

    # Errors: the client's exception classes, with the field named.
    try:
        c.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=2)
        check("unknown model: NotFoundError", False, "no error")
    except openai.NotFoundError:
        check("unknown model: NotFoundError", True)
    try:
        c.chat.completions.create(model=MODEL, messages=hi, temperature=-1)
        check("bad temperature: BadRequestError", False, "no error")
    except openai.BadRequestError as e:
        check("bad temperature: BadRequestError naming the field", e.param == "temperature" if hasattr(e, "param")
              else "temperature" in str(e), str(e))


def vision_checks(c: OpenAI):
    """Images as OpenAI content parts (data URLs), one and two per message, plain and streamed."""
    one = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url("image0.png")}},
                                        {"type": "text", "text": "What is this?"}]}]
    r = c.chat.completions.create(model=VISION_MODEL, messages=one, max_tokens=4, temperature=0)
    check("vision: an image part", r.usage.completion_tokens >= 1 and r.choices[0].message.role == "assistant",
          str(r.usage))
    chunks = list(c.chat.completions.create(model=VISION_MODEL, messages=one, max_tokens=4, temperature=0,
                                            stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check("vision: streamed, the same text", text == (r.choices[0].message.content or ""), f"{text!r}")
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url("image0.png")}},
                                        {"type": "image_url", "image_url": {"url": png_url("image1.png")}},
                                        {"type": "text", "text": "What is this?"}]}]
    r2 = c.chat.completions.create(model=VISION_MODEL, messages=two, max_tokens=3, temperature=0)
    check("vision: two images, one <|image|> token more", r2.usage.prompt_tokens == r.usage.prompt_tokens + 1,
          f"{r2.usage.prompt_tokens} vs {r.usage.prompt_tokens}")
    try:
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                            {"type": "text", "text": "x"}]}]
        c.chat.completions.create(model=VISION_MODEL, messages=bad, max_tokens=2)
        check("vision: a broken image is a BadRequestError", False, "no error")
    except openai.BadRequestError:
        check("vision: a broken image is a BadRequestError", True)


VISION_MODEL = "tiny-vision"


def run_checks(c: OpenAI):
    """Each group on its own: an exception (the client refusing an answer, say) fails that group only."""
    for group in (chat_checks, openai_field_checks, completions_checks, other_checks):
        try:
            group(c)
        except Exception as e:  # noqa: BLE001 -- any exception is the finding
            check(group.__name__, False, f"{type(e).__name__}: {e}")


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default=str(ROOT / "target/release/llama32"))
    p.add_argument("--data", default=os.environ.get("LLAMA32_TEST_DATA", str(ROOT.parent / "shared/llama32")))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="llama32-openai-") as tmp:
        model = model_dir(Path(a.data), Path(tmp) / "model")
        port = free_port()
        proc = start(a.bin, model, port, Path(tmp) / "serve.log")
        try:
            run_checks(OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60))
        finally:
            stop(proc)
        vision = vision_model_dir(Path(a.data), Path(tmp) / "vision")
        port = free_port()
        proc = start(a.bin, vision, port, Path(tmp) / "serve-vision.log", VISION_MODEL)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
            try:
                vision_checks(client)
            except Exception as e:  # noqa: BLE001 -- any exception is the finding
                check("vision_checks", False, f"{type(e).__name__}: {e}")
        finally:
            stop(proc)
    print(f"openai {openai.__version__}: {len(FAILED)} check(s) failed" + (f": {FAILED}" if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
