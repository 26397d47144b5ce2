//! Tokenizer tests against reference data: llama.cpp's and Meta's vectors, computed chat-template renderings,
//! and tiktoken-made multilingual vectors (tests/data/tokenizer_multilingual.json, from
//! scripts/make_tokenizer_vectors.py). Both backends (`tokenizer.model` and `tokenizer.computed.json`) must
//! reproduce the ids exactly and agree with each other on decoding.
//!
//! Run: `LLAMA32_TEST_DATA=/work/shared/llama32 cargo test --test tokenizer`

use llama32::tokenizer::{EncodeOptions, Tokenizer, LLAMA3_PATTERN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

mod common;
use common::data_dir;

const PLAIN: EncodeOptions = EncodeOptions { add_bos: false, parse_special: false };
const SPECIAL: EncodeOptions = EncodeOptions { add_bos: false, parse_special: true };

/// Both backends, loaded once for the whole test binary: (tiktoken, tokenizer.json).
fn tokenizers() -> Option<&'static [Tokenizer; 2]> {
    static TOKS: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    let dir = data_dir()?;
    Some(TOKS.get_or_init(|| {
        let t0 = Instant::now();
        let tt = Tokenizer::from_file(&dir.join("tokenizer.model")).expect("load tokenizer.model");
        let t1 = Instant::now();
        let hf = Tokenizer::from_file(&dir.join("tokenizer.computed.json")).expect("load tokenizer.computed.json");
        eprintln!(
            "load: tokenizer.model {:.0} ms, tokenizer.computed.json {:.0} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3
        );
        [tt, hf]
    }))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn cases(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().unwrap_or_else(|| panic!("missing `{key}`")).clone()
}

/// Reference-checked encode + decode round trip on both backends.
fn check_case(toks: &[Tokenizer; 2], text: &str, opts: EncodeOptions, want: &[u32], what: &str) {
    for tok in toks {
        let got = tok.encode(text, opts).unwrap();
        assert_eq!(got, want, "{} [{}]: {text:?}", what, tok.backend_name());
        assert_eq!(tok.decode(&got, false).unwrap(), text, "{} [{}] decode", what, tok.backend_name());
    }
}

#[test]
fn pattern_constant_equals_pattern_txt() {
    let Some(dir) = data_dir() else { return };
    let txt = std::fs::read_to_string(dir.join("pattern.txt")).unwrap();
    assert_eq!(LLAMA3_PATTERN, txt.trim_end_matches('\n'));
}

#[test]
fn vocab_and_special_tokens() {
    let Some(dir) = data_dir() else { return };
    let toks = tokenizers().expect("data dir is set");
    let names = read_json(&dir.join("special_tokens.hf_text.json"));
    let names = names.as_object().unwrap();
    assert_eq!(names.len(), 256);
    for tok in toks {
        let b = tok.backend_name();
        assert_eq!(tok.vocab_size(), 128_256, "{b}");
        assert_eq!(tok.bos_id(), Some(128_000), "{b}");
        for (name, id) in names {
            let id = id.as_u64().unwrap() as u32;
            assert_eq!(tok.token_to_id(name), Some(id), "{b}: {name}");
            assert_eq!(tok.id_to_token(id).as_deref(), Some(name.as_str()), "{b}: {id}");
            assert!(tok.is_special(id), "{b}: {id}");
        }
        assert_eq!(tok.special_tokens().len(), 256, "{b}");
        assert!(!tok.is_special(127_999) && !tok.is_special(0) && !tok.is_special(128_256), "{b}");
        assert_eq!(tok.id_to_token(128_256), None, "{b}");
        assert_eq!(tok.token_to_id("ĠHello"), Some(22691), "{b}");
        assert_eq!(tok.id_to_token(271).as_deref(), Some("ĊĊ"), "{b}");
    }
    // Token spelling agrees between the backends over the whole vocabulary.
    for id in 0..128_256u32 {
        let spelled = toks[0].id_to_token(id);
        assert_eq!(spelled, toks[1].id_to_token(id), "id_to_token({id})");
        assert_eq!(toks[0].token_bytes(id), toks[1].token_bytes(id), "token_bytes({id})");
        let spelled = spelled.unwrap();
        assert_eq!(toks[0].token_to_id(&spelled), Some(id), "tiktoken token_to_id({spelled:?})");
    }
}

#[test]
fn llama_cpp_vectors() {
    let Some(dir) = data_dir() else { return };
    let toks = tokenizers().expect("data dir is set");
    let v = read_json(&dir.join("test_vectors/llama_cpp_llama_bpe_vectors.json"));
    let cases = cases(&v, "cases");
    assert_eq!(cases.len(), 44);
    for (i, c) in cases.iter().enumerate() {
        let text = c["text"].as_str().unwrap();
        check_case(toks, text, PLAIN, &ids_of(&c["ids"]), &format!("llama.cpp case {i}"));
        // Streaming gives the same text.
        for tok in toks {
            let mut s = tok.stream_decoder(false);
            let mut out = String::new();
            for id in ids_of(&c["ids"]) {
                out += &s.push(id).unwrap();
            }
            out += &s.finish();
            assert_eq!(out, text, "llama.cpp case {i} streamed [{}]", tok.backend_name());
        }
    }
}

#[test]
fn meta_llama_models_vectors() {
    let Some(dir) = data_dir() else { return };
    let toks = tokenizers().expect("data dir is set");
    let v = read_json(&dir.join("test_vectors/llama_models_test_tokenizer.json"));
    let header = |role: &str| format!("<|start_header_id|>{role}<|end_header_id|>\n\n");
    let mut seen = 0;
    for c in cases(&v, "cases") {
        let name = c["name"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        for tok in toks {
            let b = tok.backend_name();
            if name.starts_with("encode bos+eos") {
                let mut got =
                    tok.encode(c["text"].as_str().unwrap(), EncodeOptions { add_bos: true, ..PLAIN }).unwrap();
                got.push(tok.token_to_id("<|end_of_text|>").unwrap());
                assert_eq!(got, want, "{name} [{b}]");
            } else if name == "decode" {
                assert_eq!(tok.decode(&want, false).unwrap(), c["text"].as_str().unwrap(), "{name} [{b}]");
                assert_eq!(tok.decode(&want, true).unwrap(), "This is a test sentence.", "{name} [{b}] skip");
            } else if name.starts_with("encode_message") {
                let m = &c["message"];
                let text = header(m["role"].as_str().unwrap()) + m["content"].as_str().unwrap() + "<|eot_id|>";
                assert_eq!(tok.encode(&text, SPECIAL).unwrap(), want, "{name} [{b}]");
            } else if name.starts_with("encode_dialog_prompt") {
                let mut text = String::new();
                for m in c["messages"].as_array().unwrap() {
                    text += &(header(m["role"].as_str().unwrap()) + m["content"].as_str().unwrap() + "<|eot_id|>");
                }
                text += &header("assistant");
                let opts = EncodeOptions { add_bos: true, parse_special: true };
                assert_eq!(tok.encode(&text, opts).unwrap(), want, "{name} [{b}]");
            } else {
                panic!("unknown case {name}");
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn chat_template_renderings() {
    let Some(dir) = data_dir() else { return };
    let toks = tokenizers().expect("data dir is set");
    let v = read_json(&dir.join("test_vectors/chat_template_rendered.computed.json"));
    // The file maps <|image|> to 128256 (the HF vision id), which the text vocabulary does not have: for those
    // cases check the text around each <|image|> and that the image sits where the file says.
    const IMAGE_ID: u32 = 128_256;
    let mut n = 0;
    for c in cases(&v, "cases") {
        let name = c["name"].as_str().unwrap();
        let rendered = c["rendered"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        for tok in toks {
            let b = tok.backend_name();
            if want.contains(&IMAGE_ID) {
                let mut got = Vec::new();
                for (i, part) in rendered.split("<|image|>").enumerate() {
                    if i > 0 {
                        got.push(IMAGE_ID);
                    }
                    got.extend(tok.encode(part, SPECIAL).unwrap());
                }
                assert_eq!(got, want, "{name} [{b}] (image parts)");
            } else {
                assert_eq!(tok.encode(rendered, SPECIAL).unwrap(), want, "{name} [{b}]");
                assert_eq!(tok.decode(&want, false).unwrap(), rendered, "{name} [{b}] decode");
                // The rendering already starts with BOS: add_bos must not double it.
                let with_bos = tok.encode(rendered, EncodeOptions { add_bos: true, parse_special: true }).unwrap();
                assert_eq!(with_bos, want, "{name} [{b}] add_bos");
            }
        }
        n += 1;
    }
    assert_eq!(n, 7);
}

#[test]
fn multilingual_vectors_from_tiktoken() {
    let Some(toks) = tokenizers() else { return };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer_multilingual.json");
    let v = read_json(&path);
    let cs = cases(&v, "cases");
    let names: Vec<&str> = cs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for lang in ["english", "german", "french", "italian", "portuguese", "hindi", "spanish", "thai"] {
        assert!(names.contains(&lang), "no {lang} case");
    }
    for c in &cs {
        let what = format!("multilingual {}", c["name"].as_str().unwrap());
        check_case(toks, c["text"].as_str().unwrap(), PLAIN, &ids_of(&c["ids"]), &what);
    }
    let special = cases(&v, "special_cases");
    assert!(special.len() >= 8);
    for c in &special {
        let parse = c["parse_special"].as_bool().unwrap();
        let opts = EncodeOptions { add_bos: false, parse_special: parse };
        check_case(toks, c["text"].as_str().unwrap(), opts, &ids_of(&c["ids"]), &format!("special parse={parse}"));
    }
}

#[test]
fn special_token_text_vs_parse_special() {
    let Some(toks) = tokenizers() else { return };
    for tok in toks {
        let b = tok.backend_name();
        // As text: exactly the ids of its pieces, no special id.
        let as_text = tok.encode("<|eot_id|>", PLAIN).unwrap();
        assert_eq!(as_text, vec![27, 91, 68, 354, 851, 91, 29], "{b}");
        assert_eq!(tok.encode("<|eot_id|>", SPECIAL).unwrap(), vec![128_009], "{b}");
        // Near-misses stay text even when parsing.
        assert_eq!(tok.encode("<|eot_id|", SPECIAL).unwrap(), tok.encode("<|eot_id|", PLAIN).unwrap(), "{b}");
        // add_bos: one BOS in front, also when the text spells BOS but is not parsed.
        let t = "<|begin_of_text|>Hi";
        let plain_bos = tok.encode(t, EncodeOptions { add_bos: true, parse_special: false }).unwrap();
        assert_eq!(plain_bos[0], 128_000, "{b}");
        assert_eq!(&plain_bos[1..], &tok.encode(t, PLAIN).unwrap()[..], "{b}");
        assert_eq!(
            tok.encode(t, EncodeOptions { add_bos: true, parse_special: true }).unwrap(),
            vec![128_000, 13347],
            "{b}"
        );
        assert_eq!(
            tok.encode("", EncodeOptions { add_bos: true, parse_special: false }).unwrap(),
            vec![128_000],
            "{b}"
        );
        assert_eq!(tok.encode("", PLAIN).unwrap(), Vec::<u32>::new(), "{b}");
        // skip_special in decode and streaming.
        let ids = tok.encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", SPECIAL).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\n\nHi", "{b}");
        let mut s = tok.stream_decoder(true);
        let streamed: String = ids.iter().map(|&id| s.push(id).unwrap()).collect::<String>() + &s.finish();
        assert_eq!(streamed, "user\n\nHi", "{b}");
    }
}

/// Deterministic pseudo-random numbers (no extra dev-dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
}

#[test]
fn streaming_never_splits_a_char_and_matches_decode() {
    let Some(toks) = tokenizers() else { return };
    let texts = [
        "Grüße aus München! 你好，世界 🦙🦙 नमस्ते สวัสดี 👨‍👩‍👧‍👦 🇩🇪",
        "日本語のテキストと絵文字🤖🚀✨、そしてα≠β∑∫",
        "<|eot_id|> as text, then ÿ and \u{10FFFF} and \u{FFFD} itself",
    ];
    for tok in toks {
        let b = tok.backend_name();
        for text in texts {
            let ids = tok.encode(text, PLAIN).unwrap();
            // Some ids must be partial characters, or this test tests nothing.
            assert!(ids.iter().any(|&id| std::str::from_utf8(tok.token_bytes(id).unwrap()).is_err()), "{b}");
            let mut s = tok.stream_decoder(false);
            let mut out = String::new();
            for &id in &ids {
                let chunk = s.push(id).unwrap();
                assert!(!chunk.contains('\u{FFFD}') || text.contains('\u{FFFD}'), "{b}: chunk {chunk:?}");
                out += &chunk;
            }
            assert_eq!(s.finish(), "", "{b}");
            assert_eq!(out, text, "{b}");
        }
        // Random id sequences (partial and invalid UTF-8 included): stream == decode, for both skip settings.
        let mut rng = Lcg(42);
        for round in 0..200 {
            let len = 1 + rng.next() as usize % 40;
            let ids: Vec<u32> = (0..len)
                .map(|_| match rng.next() % 4 {
                    0 => 128_000 + rng.next() % 256,
                    1 => rng.next() % 256 + 100, // single bytes, many of them UTF-8 lead/continuation bytes
                    _ => rng.next() % 128_000,
                })
                .collect();
            for skip in [false, true] {
                let whole = tok.decode(&ids, skip).unwrap();
                let mut s = tok.stream_decoder(skip);
                let streamed: String = ids.iter().map(|&id| s.push(id).unwrap()).collect::<String>() + &s.finish();
                assert_eq!(streamed, whole, "{b} round {round} skip={skip} ids {ids:?}");
            }
        }
    }
}

#[test]
fn backends_decode_alike() {
    let Some(toks) = tokenizers() else { return };
    let mut rng = Lcg(7);
    for _ in 0..500 {
        let len = rng.next() as usize % 64;
        let ids: Vec<u32> = (0..len).map(|_| rng.next() % 128_256).collect();
        for skip in [false, true] {
            assert_eq!(toks[0].decode(&ids, skip).unwrap(), toks[1].decode(&ids, skip).unwrap(), "{ids:?}");
        }
    }
}

#[test]
fn round_trip_random_unicode() {
    let Some(toks) = tokenizers() else { return };
    let mut rng = Lcg(99);
    let pools: [&[(u32, u32)]; 3] = [
        &[(0x20, 0x7e), (0x0a, 0x0d), (0x09, 0x09)],
        &[(0xa0, 0x24f), (0x900, 0x97f), (0xe00, 0xe7f), (0x3040, 0x30ff), (0x4e00, 0x4fff), (0x1f300, 0x1f64f)],
        &[(0x00, 0x10ffff)],
    ];
    for round in 0..300 {
        let pool = pools[round % 3];
        let text: String = (0..rng.next() % 80)
            .filter_map(|_| {
                let (lo, hi) = pool[rng.next() as usize % pool.len()];
                char::from_u32(lo + rng.next() % (hi - lo + 1))
            })
            .collect();
        let a = toks[0].encode(&text, PLAIN).unwrap();
        let b = toks[1].encode(&text, PLAIN).unwrap();
        assert_eq!(a, b, "backends differ on {text:?}");
        assert_eq!(toks[0].decode(&a, false).unwrap(), text);
        assert_eq!(toks[1].decode(&b, false).unwrap(), text);
    }
}

#[test]
fn encode_speed_and_long_pieces() {
    let Some(toks) = tokenizers() else { return };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer_multilingual.json");
    let v = read_json(&path);
    let mut corpus = String::new();
    while corpus.len() < 100_000 {
        for c in cases(&v, "cases") {
            corpus += c["text"].as_str().unwrap();
            corpus.push('\n');
        }
    }
    let long_word = "a".repeat(50_000) + &" ".repeat(20_000) + "\n" + &"🦙".repeat(5_000);
    let mut results = Vec::new();
    for (label, text) in [("100KB multilingual", corpus.as_str()), ("70KB+ long pieces", long_word.as_str())] {
        let mut per = Vec::new();
        for tok in toks {
            let t = Instant::now();
            let ids = tok.encode(text, PLAIN).unwrap();
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            eprintln!(
                "encode {label} ({} bytes) [{}]: {} ids in {:.1} ms",
                text.len(),
                tok.backend_name(),
                ids.len(),
                dt * 1e3
            );
            assert!(dt < 5.0, "{label} [{}] took {dt:.2} s", tok.backend_name());
            per.push(ids);
        }
        assert_eq!(per[0], per[1], "{label}: backends differ");
        results.push(per);
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama32-tok-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_inputs_give_named_errors() {
    let missing = Path::new("/nonexistent/dir/tokenizer.model");
    let e = Tokenizer::from_file(missing).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/dir/tokenizer.model"), "{e}");
    let e = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");

    let dir = scratch("bad");
    let e = Tokenizer::from_model_dir(&dir).unwrap_err().to_string();
    for name in ["tokenizer.json", "tokenizer.model", "original/tokenizer.model"] {
        assert!(e.contains(name), "{e}");
    }

    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let p = write("bad.json", "{\"version\": \"1.0\", \"model\": ");
    let e = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("bad.json"), "{e}");

    // Valid lines for all 256 bytes, then one broken line.
    let mut good = String::new();
    for b in 0..=255u8 {
        use base64::Engine as _;
        good += &format!("{} {b}\n", base64::engine::general_purpose::STANDARD.encode([b]));
    }
    for (name, tail, needle) in [
        ("truncated.model", "SGVsbG8=\n", "line 257"),
        ("garbage.model", "!!!notbase64 256\n", "line 257"),
        ("badrank.model", "SGVsbG8= x12\n", "line 257"),
        ("gap.model", "SGVsbG8= 300\n", "300"),
        ("dup.model", "SGVsbG8= 255\n", "255"),
    ] {
        let p = write(name, &(good.clone() + tail));
        let e = Tokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
    }
    let p = write("empty.model", "");
    assert!(Tokenizer::from_file(&p).unwrap_err().to_string().contains("empty.model"));
    // A complete minimal file loads, and a model dir prefers tokenizer.json, then tokenizer.model.
    write("tokenizer.model", &good);
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    assert_eq!(tok.backend_name(), "tiktoken");
    assert_eq!(tok.vocab_size(), 256 + 256);
    assert_eq!(tok.encode("hi", PLAIN).unwrap(), vec![104, 105]);
    std::fs::remove_dir_all(&dir).ok();

    let Some(toks) = tokenizers() else { return };
    // An added token declared past the vocabulary's next free id: the tokenizers crate would renumber it silently.
    let mut v = read_json(&data_dir().unwrap().join("tokenizer.computed.json"));
    assert_eq!(v["added_tokens"][0]["content"], "<|begin_of_text|>");
    v["added_tokens"][0]["id"] = 200_000.into();
    let dir = scratch("renumbered");
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, v.to_string()).unwrap();
    let e = Tokenizer::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("<|begin_of_text|>") && e.contains("declares id 200000"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    for tok in toks {
        let e = tok.decode(&[9906, 128_256], false).unwrap_err().to_string();
        assert!(e.contains("128256"), "{e}");
        let e = tok.decode(&[u32::MAX], false).unwrap_err().to_string();
        assert!(e.contains(&u32::MAX.to_string()), "{e}");
        // A generated id the tokenizer lacks decodes to nothing (the engine's other sequences go on).
        let mut s = tok.stream_decoder(false);
        assert_eq!(s.push(200_000).unwrap(), "");
        assert_eq!(s.push(9906).unwrap(), "Hello");
    }
}
