#!/usr/bin/env python3
"""Generate tests/data/tokenizer_multilingual.json: reference token ids for the Llama 3 tokenizer.

The ids come from OpenAI's `tiktoken` (the library Meta's own llama-models tokenizer.py uses) loaded with
the genuine `tokenizer.model`, the pre-tokenizer regex in `pattern.txt` and the special tokens of
`special_tokens.hf_text.json`, all read from $LLAMA32_TEST_DATA. No BOS is added.

Run:  LLAMA32_TEST_DATA=/work/shared/llama32 /work/venv-golden/bin/python scripts/make_tokenizer_vectors.py
"""

import base64
import json
import os
import sys
from pathlib import Path

import tiktoken

# One or more texts per official Llama 3.2 language, plus CJK, emoji, code and whitespace/number edge cases.
TEXTS = [
    ("english", "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—won't we? I'M SURE THEY'LL COME."),
    ("german", "Größere Übungen: Müller ißt Äpfel, während Straßenbahnen vorbeifahren. Die Donaudampfschifffahrtsgesellschaft!"),
    ("french", "L'élève a déjà reçu « une lettre » où l'on parle de Noël, d'œuvres et de garçons français."),
    ("italian", "Perché l'università è così costosa? Più di trent'anni fa, però, c'era già un'altra città."),
    ("portuguese", "A informação não está disponível; você poderá acessá-la amanhã, às 9h, com pão e açúcar."),
    ("hindi", "नमस्ते, आप कैसे हैं? मैं हिन्दी में लिख रहा हूँ। भारत की राजधानी नई दिल्ली है।"),
    ("spanish", "¿Dónde está el niño? ¡Mañana iremos a la montaña con señoras y pingüinos!"),
    ("thai", "สวัสดีครับ วันนี้อากาศดีมาก ฉันชอบกินข้าวผัดกุ้งและต้มยำกุ้ง"),
    ("chinese", "你好，世界！我们今天学习自然语言处理和机器学习。"),
    ("japanese", "こんにちは世界。東京は日本の首都です。カタカナとひらがな、漢字。"),
    ("korean", "안녕하세요, 세계! 한국어 토크나이저 테스트입니다."),
    ("emoji", "I ❤️ 🦙s! 👨‍👩‍👧‍👦 family, flags 🇩🇪🇫🇷🇹🇭, skin tones 👍🏽, and 🤖🚀✨."),
    ("code_python", "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n"),
    ("code_rust", "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{:?}\", v);\n}\r\n"),
    ("json", '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", "unit": "celsius"}}'),
    ("numbers", "1 12 123 1234 12345 123456 3.14159 -42 1,000,000 ٣٤٥ ४५६ 0x1F"),
    ("whitespace", "  leading and trailing  \n\n\n   \t\t mixed \r\n\r\n    spaces        end   "),
    ("contractions", "I'd've thought you'D know it's Bob's, they're we're you've I'm she'll HE'S"),
    ("mixed_scripts", "English, Deutsch, français, italiano, português, हिन्दी, español, ไทย — all in one line."),
    ("special_as_text", "Text with <|eot_id|> and <|begin_of_text|> and <|reserved_special_token_5|> inside."),
    ("combining", "e\u0301 vs \u00e9, A\u030a, \u1100\u1161\u11a8, zero\u200bwidth, nbsp\u00a0here"),
]

# Cases encoded with special tokens parsed (tiktoken allowed_special="all"), to check parse_special.
SPECIAL_TEXTS = [
    "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>",
    "a<|eot_id|>b<|eom_id|><|python_tag|>c <|reserved_special_token_247|>",
    "<|begin_of_text|><|begin_of_text|>x",
    "<|eot_id|  <|not_a_token|> <|eot_id|>",
]


def main() -> int:
    data = os.environ.get("LLAMA32_TEST_DATA")
    if not data:
        print("LLAMA32_TEST_DATA not set", file=sys.stderr)
        return 1
    data = Path(data)
    ranks = {}
    for line in (data / "tokenizer.model").read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    pattern = (data / "pattern.txt").read_text().rstrip("\n")
    specials = json.loads((data / "special_tokens.hf_text.json").read_text())
    enc = tiktoken.Encoding(name="llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)

    cases = []
    for name, text in TEXTS:
        ids = enc.encode(text, allowed_special=set(), disallowed_special=())
        assert enc.decode(ids) == text
        cases.append({"name": name, "text": text, "ids": ids})
    special_cases = []
    for text in SPECIAL_TEXTS:
        ids = enc.encode(text, allowed_special="all")
        special_cases.append({"text": text, "parse_special": True, "ids": ids})
        ids = enc.encode(text, allowed_special=set(), disallowed_special=())
        special_cases.append({"text": text, "parse_special": False, "ids": ids})

    out = {
        "source": "computed by scripts/make_tokenizer_vectors.py with tiktoken "
        + tiktoken.__version__
        + " from tokenizer.model + pattern.txt + special_tokens.hf_text.json; ids WITHOUT BOS",
        "cases": cases,
        "special_cases": special_cases,
    }
    dest = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_multilingual.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the file reviewable.
    lines = ["{", f' "source": {json.dumps(out["source"])},']
    for key in ("cases", "special_cases"):
        rows = [" " + json.dumps(c, ensure_ascii=False) for c in out[key]]
        lines.append(f' "{key}": [')
        lines.append(",\n".join(rows))
        lines.append(" ]," if key == "cases" else " ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == out
    dest.write_text(text)
    print(f"wrote {len(cases)} cases and {len(special_cases)} special cases to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
