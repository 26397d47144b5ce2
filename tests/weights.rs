//! Bad checkpoints are rejected with errors that name the tensor and the file; presets match the genuine configs.

use std::path::{Path, PathBuf};

use llama32::config::{LlamaConfig, Preset};
use llama32::weights::safetensors::{serialize, DType};
use llama32::weights::{check_checkpoint, Checkpoint, ModelWeights};

mod common;

fn golden(name: &str) -> PathBuf {
    common::golden_dir(name)
}

/// A scratch copy of a golden case whose single model.safetensors is rewritten by `edit`.
fn edited_copy(tag: &str, edit: impl Fn(&mut Vec<(String, DType, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let src = golden("tied-gqa4");
    let dir = std::env::temp_dir().join(format!("llama32-weights-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let file = llama32::weights::SafeTensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .keys()
        .map(|n| {
            let v = file.get(n).unwrap();
            (n.clone(), v.dtype, v.shape.to_vec(), v.bytes.to_vec())
        })
        .collect();
    edit(&mut tensors);
    let refs: Vec<(&str, DType, &[usize], &[u8])> =
        tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    std::fs::write(dir.join("model.safetensors"), serialize(&refs)).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let cfg = LlamaConfig::from_model_dir(dir).unwrap();
    let err = match Checkpoint::open(dir) {
        Err(e) => e,
        Ok(ckpt) => ModelWeights::load(&ckpt, &cfg, &|_| {}).unwrap_err(),
    };
    std::fs::remove_dir_all(dir).ok();
    err.to_string()
}

#[test]
fn unchanged_copy_loads() {
    let dir = edited_copy("same", |_| {});
    let cfg = LlamaConfig::from_model_dir(&dir).unwrap();
    check_checkpoint(&Checkpoint::open(&dir).unwrap(), &cfg).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_copy("missing", |t| t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight"));
    let e = load_err(&dir);
    assert!(e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`") && e.contains("[256, 128]"), "{e}");
}

#[test]
fn extra_tensor_is_named() {
    let dir = edited_copy("extra", |t| t.push(("model.layers.9.bogus".into(), DType::F32, vec![1], vec![0; 4])));
    let e = load_err(&dir);
    assert!(e.contains("unexpected tensor `model.layers.9.bogus`"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = edited_copy("shape", |t| {
        let k = t.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
        k.2 = vec![16, 128 * 2];
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[16, 256]")
            && e.contains("expected [32, 128]")
            && e.contains("model.safetensors"),
        "{e}"
    );
}

/// A dense weight stored as integers would convert by value: refused, naming the tensor, the file and the dtype.
#[test]
fn integer_dense_weight_is_refused() {
    let dir = edited_copy("int", |t| {
        let k = t.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
        k.1 = DType::I8;
        k.3.truncate(32 * 128);
        let norm = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        norm.1 = DType::I32;
        norm.3.resize(128 * 4, 0);
    });
    let e = load_err(&dir);
    for want in ["`model.layers.0.self_attn.k_proj.weight` in model.safetensors is I8", "`model.norm.weight`", "I32"] {
        assert!(e.contains(want) && e.contains("expected BF16, F16 or F32"), "{want}: {e}");
    }
}

#[test]
fn truncated_file_is_rejected_naming_the_tensor() {
    let dir = edited_copy("trunc", |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn missing_checkpoint_and_shard_are_reported() {
    let dir = std::env::temp_dir().join(format!("llama32-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
    // A directory where a shard should be is named as such (mapping it failed with "No such device").
    std::fs::create_dir(dir.join("model-00001-of-00002.safetensors")).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("not a regular file"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The shard index must agree with the shards' headers: a tensor listed in another shard than the one holding it
/// and an empty file name are refused, naming the index and the tensor. An entry no shard holds (Hugging Face's
/// safetensors conversion leaves a tied lm_head's) and a tensor the index leaves out are tolerated, as by
/// transformers.
#[test]
fn shard_index_disagreements_are_named() {
    let src = golden("untied-gqa2-sharded");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model.safetensors.index.json")).unwrap()).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "moved",
            |m| m["lm_head.weight"] = "model-00001-of-00002.safetensors".into(),
            "lists `lm_head.weight` in model-00001-of-00002.safetensors, but it is in model-00002-of-00002.safetensors",
        ),
        ("ghost", |m| m["model.ghost.weight"] = "model-00001-of-00002.safetensors".into(), ""),
        (
            "unlisted",
            |m| {
                m.as_object_mut().unwrap().remove("model.norm.weight");
            },
            "",
        ),
        ("empty", |m| m["model.norm.weight"] = "".into(), "weight_map[`model.norm.weight`]: bad file name ``"),
    ];
    for (tag, edit, want) in cases {
        let dir = std::env::temp_dir().join(format!("llama32-index-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let mut idx = index.clone();
        edit(&mut idx["weight_map"]);
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
        match Checkpoint::open(&dir) {
            Ok(c) if want.is_empty() => assert!(c.get("model.norm.weight").is_some(), "{tag}"),
            Ok(_) => panic!("{tag}: opened"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    !want.is_empty() && e.contains(want) && e.contains("model.safetensors.index.json"),
                    "{tag}: {e}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn sharded_checkpoint_spans_both_files() {
    let ckpt = Checkpoint::open(&golden("untied-gqa2-sharded")).unwrap();
    let files: std::collections::BTreeSet<_> = ckpt.names().map(|n| ckpt.get(n).unwrap().1.to_path_buf()).collect();
    assert_eq!(files.len(), 2);
    assert!(ckpt.get("lm_head.weight").is_some());
}

#[test]
fn presets_match_the_genuine_configs() {
    let Some(data) = std::env::var_os("LLAMA32_TEST_DATA") else {
        eprintln!("skipped: LLAMA32_TEST_DATA not set");
        return;
    };
    let data = PathBuf::from(data);
    for (preset, dir, file) in [
        (Preset::Llama32_1B, "Llama-3.2-1B", "config.json"),
        (Preset::Llama32_1B, "Llama-3.2-1B-Instruct", "config.json"),
        (Preset::Llama32_3B, "Llama-3.2-3B-Instruct", "config.json"),
        (Preset::Llama32_3B, "Llama-3.2-3B", "config.derived.json"),
    ] {
        let mut cfg = LlamaConfig::from_file(&data.join(dir).join(file)).unwrap();
        let mut want = preset.config();
        // The published configs name one eos id (base) or three (instruct); the preset stops on all three.
        cfg.eos_token_ids = want.eos_token_ids.clone();
        want.dtype = cfg.dtype.clone();
        assert_eq!(cfg, want, "{dir}/{file}");
    }
    // The genuine 90B vision config is not a LlamaForCausalLM: rejected with a message naming the field.
    let e = LlamaConfig::from_file(&data.join("Llama-3.2-90B-Vision-Instruct/config.json")).unwrap_err().to_string();
    assert!(e.contains("architectures") && e.contains("MllamaForConditionalGeneration"), "{e}");
}
