//! Llama 3.2 Vision configuration and weights: parsing (both RoPE spellings, bad fields named), presets against the
//! published configs, the expected tensor list against transformers' golden checkpoints, and weight loading.

use std::path::{Path, PathBuf};

use llama32::config::{RopeConfig, RopeScaling};
use llama32::vision::config::{MllamaConfig, MllamaPreset, VisionActivation, DEFAULT_ASPECT_RATIOS};
use llama32::vision::weights::{
    check_mllama_checkpoint, expected_tensors, MllamaLayout, MllamaWeights, TextLayerWeights,
};
use llama32::weights::safetensors::{serialize, DType};
use llama32::weights::{Checkpoint, SafeTensorsFile};
use serde_json::{json, Value};

mod common;

const GOLDEN: [&str; 3] = ["mllama-noresize", "mllama-resize", "mllama-two-images"];

fn golden_json(case: &str, file: &str) -> Value {
    let text = std::fs::read_to_string(common::golden_dir(case).join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse_value(v: &Value) -> llama32::Result<MllamaConfig> {
    MllamaConfig::from_json_str(&v.to_string(), Path::new("/models/vision/config.json"))
}

fn parse_err(v: &Value) -> String {
    match parse_value(v) {
        Ok(cfg) => panic!("accepted a bad config: {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

/// A golden config with `edit` applied.
fn edited(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = golden_json("mllama-two-images", "config.json");
    edit(&mut v);
    v
}

#[test]
fn golden_configs_parse_with_their_dimensions() {
    for case in GOLDEN {
        let dir = common::golden_dir(case);
        let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
        let reference = golden_json(case, "reference.json");
        let raw = golden_json(case, "config.json");
        assert_eq!(cfg.image_token_index as u64, reference["image_token_index"].as_u64().unwrap(), "{case}");
        assert_eq!(cfg.text.base.vocab_size as u64, reference["vocab_size"].as_u64().unwrap(), "{case}");
        assert_eq!(cfg.text.embed_rows(), cfg.text.base.vocab_size + 8);
        let cross: Vec<usize> = reference["cross_attention_layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(cfg.text.cross_attention_layers, cross, "{case}");
        assert_eq!(cfg.vision_tokens_per_image() as u64, reference["vision_tokens_per_image"].as_u64().unwrap());
        let v = &raw["vision_config"];
        assert_eq!(cfg.vision.hidden_size as u64, v["hidden_size"].as_u64().unwrap());
        assert_eq!(cfg.vision.attention_heads as u64, v["attention_heads"].as_u64().unwrap());
        assert_eq!(cfg.vision.num_global_layers as u64, v["num_global_layers"].as_u64().unwrap());
        assert_eq!(cfg.vision.image_size as u64, v["image_size"].as_u64().unwrap());
        assert_eq!(cfg.vision.supported_aspect_ratios, DEFAULT_ASPECT_RATIOS.to_vec());
        let t = &raw["text_config"];
        assert_eq!(
            cfg.text.base.head_dim as u64,
            t["hidden_size"].as_u64().unwrap() / t["num_attention_heads"].as_u64().unwrap()
        );
        assert_eq!(cfg.text.base.num_key_value_heads as u64, t["num_key_value_heads"].as_u64().unwrap());
        // transformers 5 writes rope_parameters (theta inside); the llama3 scaling must come through.
        assert!(t.get("rope_scaling").is_none() && t["rope_parameters"]["rope_type"] == "llama3");
        assert_eq!(
            cfg.text.base.rope,
            RopeConfig {
                theta: 500000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8
                }
            }
        );
        assert_eq!(cfg.text.base.eos_token_ids, vec![254, 255]);
        assert_eq!(cfg.text.pad_token_id, Some(253));
        assert_eq!(cfg.dtype.as_deref(), Some("bfloat16"));
    }
}

/// Rewrites `text_config.rope_parameters` into the published spelling (`rope_theta` + `rope_scaling`).
fn to_rope_scaling(mut v: Value) -> Value {
    let t = v["text_config"].as_object_mut().unwrap();
    let mut params = t.remove("rope_parameters").unwrap();
    let theta = params.as_object_mut().unwrap().remove("rope_theta").unwrap();
    t.insert("rope_theta".into(), theta);
    t.insert("rope_scaling".into(), params);
    v
}

/// The inverse: `rope_theta` moves inside `rope_parameters`.
fn to_rope_parameters(mut v: Value) -> Value {
    let t = v["text_config"].as_object_mut().unwrap();
    let mut params = t.remove("rope_scaling").unwrap();
    let theta = t.remove("rope_theta").unwrap();
    params.as_object_mut().unwrap().insert("rope_theta".into(), theta);
    t.insert("rope_parameters".into(), params);
    v
}

#[test]
fn both_rope_spellings_agree() {
    let new = golden_json("mllama-resize", "config.json");
    let old = to_rope_scaling(new.clone());
    assert!(old["text_config"]["rope_scaling"].is_object() && old["text_config"].get("rope_parameters").is_none());
    assert_eq!(parse_value(&old).unwrap(), parse_value(&new).unwrap());

    // A different theta must show up, whichever spelling carries it.
    let mut other = old.clone();
    other["text_config"]["rope_theta"] = json!(10000.0);
    assert_eq!(parse_value(&other).unwrap().text.base.rope.theta, 10000.0);

    let Some(data) = common::data_dir() else { return };
    let published: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("Llama-3.2-90B-Vision-Instruct/config.json")).unwrap())
            .unwrap();
    let as_new = to_rope_parameters(published.clone());
    assert_eq!(parse_value(&published).unwrap(), parse_value(&as_new).unwrap());
}

#[test]
fn presets_match_the_published_configs_field_by_field() {
    let Some(data) = common::data_dir() else { return };
    for (preset, file) in [
        (MllamaPreset::Vision90B, "Llama-3.2-90B-Vision-Instruct/config.json"),
        (MllamaPreset::Vision11B, "Llama-3.2-11B-Vision-Instruct/config.derived.json"),
    ] {
        let got = MllamaConfig::from_file(&data.join(file)).unwrap();
        let want = preset.config();
        assert_eq!(got.text.base, want.text.base, "{file}: text_config (Llama part)");
        assert_eq!(got.text.cross_attention_layers, want.text.cross_attention_layers, "{file}: cross_attention_layers");
        assert_eq!(got.text.pad_token_id, want.text.pad_token_id, "{file}: pad_token_id");
        assert_eq!(got.vision, want.vision, "{file}: vision_config");
        assert_eq!(got.image_token_index, want.image_token_index, "{file}: image_token_index");
        assert_eq!(got.dtype, want.dtype, "{file}: dtype");
        assert_eq!(got, want, "{file}");
        assert_eq!(got.vision.hidden_act, VisionActivation::Gelu);
        assert_eq!(MllamaPreset::from_name(preset.name()).unwrap(), preset);
    }
    assert!(MllamaPreset::from_name("7b-vision").unwrap_err().to_string().contains("11b-vision"));
}

#[test]
fn parameter_counts_match_the_tensor_list_and_published_sizes() {
    // transformers' MllamaForConditionalGeneration, counted on the meta device from the shared configs:
    // 11B: 10,670,220,835 (HF lists 10.67 B); 90B: 88,593,355,323 (88.6 B).
    for (preset, want) in [(MllamaPreset::Vision11B, 10_670_220_835u64), (MllamaPreset::Vision90B, 88_593_355_323)] {
        let cfg = preset.config();
        let from_list: u64 = expected_tensors(&cfg).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        assert_eq!(cfg.num_parameters(), from_list, "{preset:?}");
        assert_eq!(cfg.num_parameters(), want, "{preset:?}");
    }
    assert_eq!(expected_tensors(&MllamaPreset::Vision11B.config()).len(), 906);
    assert_eq!(expected_tensors(&MllamaPreset::Vision90B.config()).len(), 1494);
    for case in GOLDEN {
        let dir = common::golden_dir(case);
        let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let stored: u64 = ckpt.names().map(|n| ckpt.get(n).unwrap().0.numel() as u64).sum();
        assert_eq!(cfg.num_parameters(), stored, "{case}");
    }
}

#[test]
fn bad_fields_are_named_with_the_file() {
    let cases: Vec<(Value, &str)> = vec![
        (
            edited(|v| v["text_config"]["rope_parameters"]["rope_type"] = json!("yarn")),
            "text_config.rope_parameters.rope_type",
        ),
        (
            to_rope_scaling(edited(|v| {
                v["text_config"]["rope_parameters"].as_object_mut().unwrap().remove("original_max_position_embeddings");
            })),
            "text_config.rope_scaling.original_max_position_embeddings",
        ),
        (edited(|v| v["text_config"]["cross_attention_layers"] = json!([1, 9])), "text_config.cross_attention_layers"),
        (edited(|v| v["text_config"]["cross_attention_layers"] = json!([1, 1])), "text_config.cross_attention_layers"),
        (
            edited(|v| v["text_config"]["cross_attention_layers"] = json!([1, "x"])),
            "text_config.cross_attention_layers[1]",
        ),
        (edited(|v| v["text_config"]["tie_word_embeddings"] = json!(true)), "text_config.tie_word_embeddings"),
        (edited(|v| v["text_config"]["head_dim"] = json!(32)), "text_config.head_dim"),
        (edited(|v| v["text_config"]["num_key_value_heads"] = json!(3)), "text_config.num_key_value_heads"),
        (edited(|v| v["text_config"]["hidden_act"] = json!("gelu")), "text_config.hidden_act"),
        (edited(|v| v["text_config"]["rms_norm_eps"] = json!("small")), "text_config.rms_norm_eps"),
        (edited(|v| v["text_config"] = json!([1])), "text_config"),
        (edited(|v| v["vision_config"]["vision_output_dim"] = json!(64)), "vision_config.vision_output_dim"),
        (edited(|v| v["vision_config"]["hidden_act"] = json!("quick_gelu")), "vision_config.hidden_act"),
        (edited(|v| v["vision_config"]["patch_size"] = json!("14")), "vision_config.patch_size"),
        (edited(|v| v["vision_config"]["patch_size"] = json!(56)), "vision_config.patch_size"),
        (edited(|v| v["vision_config"]["image_size"] = json!([28, 56])), "vision_config.image_size"),
        (edited(|v| v["vision_config"]["image_size"] = json!(8192)), "vision_config.image_size"),
        (edited(|v| v["vision_config"]["image_size"] = json!([1u64 << 63, 1u64 << 63])), "vision_config.image_size"),
        (edited(|v| v["vision_config"]["norm_eps"] = json!(1e300)), "vision_config.norm_eps"),
        (edited(|v| v["vision_config"]["attention_heads"] = json!(5)), "vision_config.attention_heads"),
        (
            edited(|v| v["vision_config"]["intermediate_layers_indices"] = json!([0, 2])),
            "vision_config.intermediate_layers_indices",
        ),
        (
            edited(|v| v["vision_config"]["supported_aspect_ratios"] = json!([[1, 1], [1, 5]])),
            "vision_config.supported_aspect_ratios[1]",
        ),
        (
            edited(|v| v["vision_config"]["supported_aspect_ratios"] = json!([[1, 1], [1]])),
            "vision_config.supported_aspect_ratios[1]",
        ),
        (edited(|v| v["vision_config"]["max_num_tiles"] = json!(2)), "vision_config.max_num_tiles"),
        (
            edited(|v| {
                v["vision_config"]["max_num_tiles"] = json!(2);
                v["vision_config"].as_object_mut().unwrap().remove("supported_aspect_ratios");
            }),
            "vision_config.supported_aspect_ratios",
        ),
        (edited(|v| v["vision_config"]["norm_eps"] = json!(-1.0)), "vision_config.norm_eps"),
        (edited(|v| v["image_token_index"] = json!(300)), "image_token_index"),
        (edited(|v| v["architectures"] = json!(["LlamaForCausalLM"])), "architectures"),
        (edited(|v| v["model_type"] = json!("llama")), "model_type"),
    ];
    for (cfg, field) in cases {
        let e = parse_err(&cfg);
        assert!(e.contains(&format!("field `{field}`")) && e.contains("/models/vision/config.json"), "{field}: {e}");
    }
    let e = MllamaConfig::from_json_str("{", Path::new("cfg.json")).unwrap_err().to_string();
    assert!(e.contains("cfg.json") && e.contains("JSON"), "{e}");
    let e = MllamaConfig::from_model_dir(Path::new("/nonexistent/mllama")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/mllama/config.json"), "{e}");

    // Fine: the alias `num_attention_heads`, a square [n, n] size, and consistent explicit head_dim.
    let ok = edited(|v| {
        let vc = v["vision_config"].as_object_mut().unwrap();
        let heads = vc.remove("attention_heads").unwrap();
        vc.insert("num_attention_heads".into(), heads);
        vc.insert("image_size".into(), json!([28, 28]));
        v["text_config"]["head_dim"] = json!(16);
    });
    assert_eq!(parse_value(&ok).unwrap(), parse_value(&edited(|_| {})).unwrap());
}

fn golden_tensors(case: &str) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    let file = SafeTensorsFile::open(&common::golden_dir(case).join("model.safetensors")).unwrap();
    file.tensors()
        .keys()
        .map(|n| {
            let v = file.get(n).unwrap();
            (n.clone(), v.dtype, v.shape.to_vec(), v.bytes.to_vec())
        })
        .collect()
}

/// A scratch copy of a golden case (config + checkpoint) whose tensors are rewritten by `edit`.
fn edited_copy(case: &str, tag: &str, edit: impl FnOnce(&mut Vec<(String, DType, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama32-mllama-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::golden_dir(case).join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = golden_tensors(case);
    edit(&mut tensors);
    let refs: Vec<(&str, DType, &[usize], &[u8])> =
        tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    std::fs::write(dir.join("model.safetensors"), serialize(&refs)).unwrap();
    dir
}

#[test]
fn golden_checkpoints_hold_exactly_the_expected_tensors() {
    for case in GOLDEN {
        let dir = common::golden_dir(case);
        let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(check_mllama_checkpoint(&ckpt, &cfg).unwrap(), MllamaLayout::Original, "{case}");
        let expected = expected_tensors(&cfg);
        assert_eq!(expected.len(), ckpt.names().count(), "{case}");
        for (name, shape) in &expected {
            let (view, _) = ckpt.get(name).unwrap_or_else(|| panic!("{case}: no `{name}`"));
            assert_eq!(view.shape, shape.as_slice(), "{case}: {name}");
            assert_eq!(view.dtype, DType::BF16, "{case}: {name}");
        }
        let reference = golden_json(case, "reference.json");
        assert_eq!(expected.len() as u64, reference["num_tensors"].as_u64().unwrap());
    }
}

#[test]
fn removed_misshaped_and_extra_tensors_are_named() {
    let dir = edited_copy("mllama-two-images", "bad", |t| {
        t.retain(|(n, ..)| n != "language_model.model.layers.3.cross_attn.k_norm.weight");
        let tile =
            t.iter_mut().find(|(n, ..)| n == "vision_model.gated_positional_embedding.tile_embedding.weight").unwrap();
        tile.2 = vec![9, 4, 5, 32];
        t.push(("vision_model.global_transformer.layers.2.gate_attn".into(), DType::BF16, vec![1], vec![0; 2]));
    });
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let err = match Checkpoint::open(&dir) {
        Ok(ckpt) => MllamaWeights::load(&ckpt, &cfg).map(|_| ()).unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.contains("3 tensor problem(s) (1 missing, 1 misshapen, 1 unexpected)"), "{err}");
    assert!(
        err.contains("missing tensor `language_model.model.layers.3.cross_attn.k_norm.weight` (expected shape [16])"),
        "{err}"
    );
    assert!(
        err.contains("tensor `vision_model.gated_positional_embedding.tile_embedding.weight` in model.safetensors has shape [9, 4, 5, 32], expected [9, 640]"),
        "{err}"
    );
    assert!(err.contains("unexpected tensor `vision_model.global_transformer.layers.2.gate_attn`"), "{err}");
}

/// transformers 5's in-memory names for an original-layout name.
fn transformers5_name(n: &str) -> String {
    for (from, to) in [
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_model.", "model.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ] {
        if let Some(rest) = n.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    panic!("unexpected name {n}")
}

#[test]
fn transformers5_layout_is_accepted_and_loads_the_same_values() {
    let case = "mllama-resize";
    let dir = edited_copy(case, "t5", |t| t.iter_mut().for_each(|x| x.0 = transformers5_name(&x.0)));
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.get("model.language_model.layers.0.self_attn.q_proj.weight").is_some());
    assert_eq!(check_mllama_checkpoint(&ckpt, &cfg).unwrap(), MllamaLayout::Transformers5);
    let renamed = MllamaWeights::load(&ckpt, &cfg).unwrap();
    let original = MllamaWeights::load(&Checkpoint::open(&common::golden_dir(case)).unwrap(), &cfg).unwrap();
    assert_eq!(format!("{renamed:?}"), format!("{original:?}"));

    // Mixing layouts is reported, naming the original-layout stragglers.
    std::fs::remove_dir_all(&dir).ok();
    let dir = edited_copy(case, "mixed", |t| {
        t.iter_mut().filter(|x| !x.0.starts_with("vision_model.")).for_each(|x| x.0 = transformers5_name(&x.0))
    });
    let err = check_mllama_checkpoint(&Checkpoint::open(&dir).unwrap(), &cfg).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("missing tensor `model.vision_model.class_embedding`")
            && err.contains("unexpected tensor `vision_model.class_embedding`")
            && err.contains("are named in the Original layout while others use Transformers5"),
        "{err}"
    );
    assert_eq!(MllamaLayout::Original.tensor_name("vision_model.class_embedding"), "vision_model.class_embedding");
    assert_eq!(MllamaLayout::Transformers5.tensor_name("language_model.lm_head.weight"), "lm_head.weight");
}

fn tensor_f32(ckpt: &Checkpoint, name: &str) -> Vec<f32> {
    ckpt.get(name).unwrap_or_else(|| panic!("no `{name}`")).0.to_f32()
}

fn cat(ckpt: &Checkpoint, names: &[&str]) -> Vec<f32> {
    names.iter().flat_map(|n| tensor_f32(ckpt, n)).collect()
}

#[test]
fn weights_load_in_the_documented_layout() {
    let dir = common::golden_dir("mllama-two-images");
    let cfg = MllamaConfig::from_model_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let w = MllamaWeights::load(&ckpt, &cfg).unwrap();
    let (h, v) = (cfg.text.base.hidden_size, &cfg.vision);

    // Vision.
    assert_eq!(w.vision.patch_embedding, tensor_f32(&ckpt, "vision_model.patch_embedding.weight"));
    assert_eq!(w.vision.patch_embedding.len(), v.hidden_size * v.patch_dim());
    assert_eq!(w.vision.position_gate, tensor_f32(&ckpt, "vision_model.gated_positional_embedding.gate")[0]);
    assert_ne!(w.vision.position_gate, 0.0);
    assert_eq!(w.vision.post_tile_gate, tensor_f32(&ckpt, "vision_model.post_tile_positional_embedding.gate")[0]);
    assert_eq!(w.vision.layernorm_post.bias, tensor_f32(&ckpt, "vision_model.layernorm_post.bias"));
    assert_eq!(w.vision.layers.len(), v.num_hidden_layers);
    assert_eq!(w.vision.global_layers.len(), v.num_global_layers);
    let p = "vision_model.transformer.layers.1.self_attn";
    assert_eq!(
        w.vision.layers[1].wqkv,
        cat(&ckpt, &[&format!("{p}.q_proj.weight"), &format!("{p}.k_proj.weight"), &format!("{p}.v_proj.weight")])
    );
    assert_eq!(w.vision.layers[1].gate_attn, None);
    let g = &w.vision.global_layers[1];
    assert_eq!(g.gate_ffn, Some(tensor_f32(&ckpt, "vision_model.global_transformer.layers.1.gate_ffn")[0]));
    assert_eq!(g.fc1_bias, tensor_f32(&ckpt, "vision_model.global_transformer.layers.1.mlp.fc1.bias"));
    assert_eq!(
        g.mlp_norm.weight,
        tensor_f32(&ckpt, "vision_model.global_transformer.layers.1.post_attention_layernorm.weight")
    );

    // Projector and text.
    assert_eq!(w.projector.len(), h * v.vision_output_dim);
    assert_eq!(w.projector_bias, tensor_f32(&ckpt, "multi_modal_projector.bias"));
    assert_eq!(w.text.embed.len(), (cfg.text.base.vocab_size + 8) * h);
    assert_eq!(w.text.lm_head, tensor_f32(&ckpt, "language_model.lm_head.weight"));
    let kinds: Vec<bool> = w.text.layers.iter().map(|l| matches!(l, TextLayerWeights::CrossAttention(_))).collect();
    assert_eq!(kinds, vec![false, true, false, true]);
    let TextLayerWeights::SelfAttention(l0) = &w.text.layers[0] else { unreachable!() };
    let p = "language_model.model.layers.0";
    assert_eq!(
        l0.wqkv.dense,
        cat(
            &ckpt,
            &[
                &format!("{p}.self_attn.q_proj.weight"),
                &format!("{p}.self_attn.k_proj.weight"),
                &format!("{p}.self_attn.v_proj.weight")
            ]
        )
    );
    assert_eq!(
        l0.w_gate_up.dense,
        cat(&ckpt, &[&format!("{p}.mlp.gate_proj.weight"), &format!("{p}.mlp.up_proj.weight")])
    );
    let TextLayerWeights::CrossAttention(l3) = &w.text.layers[3] else { unreachable!() };
    let p = "language_model.model.layers.3";
    assert_eq!(l3.wq.dense, tensor_f32(&ckpt, &format!("{p}.cross_attn.q_proj.weight")));
    assert_eq!(
        l3.wkv.dense,
        cat(&ckpt, &[&format!("{p}.cross_attn.k_proj.weight"), &format!("{p}.cross_attn.v_proj.weight")])
    );
    assert_eq!(l3.k_norm, tensor_f32(&ckpt, &format!("{p}.cross_attn.k_norm.weight")));
    assert_eq!(l3.attn_gate, tensor_f32(&ckpt, &format!("{p}.cross_attn_attn_gate"))[0]);
    assert_eq!(l3.mlp_gate, tensor_f32(&ckpt, &format!("{p}.cross_attn_mlp_gate"))[0]);
    assert!(l3.attn_gate != 0.0 && l3.mlp_gate != 0.0, "the golden gates are non-zero");
    assert_eq!(l3.w_down.dense, tensor_f32(&ckpt, &format!("{p}.mlp.down_proj.weight")));
}

#[test]
fn random_weights_follow_the_config() {
    let cfg = MllamaConfig::from_model_dir(&common::golden_dir("mllama-resize")).unwrap();
    let a = MllamaWeights::random(&cfg, 3).unwrap();
    let b = MllamaWeights::random(&cfg, 3).unwrap();
    let c = MllamaWeights::random(&cfg, 4).unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_ne!(a.vision.patch_embedding, c.vision.patch_embedding);
    let v = &cfg.vision;
    assert_eq!(
        a.vision.tile_position_embedding.len(),
        (v.max_aspect_ratio_id() + 1) * v.max_num_tiles * v.num_patches() * v.hidden_size
    );
    assert_eq!(a.vision.layers[0].wqkv.len(), 3 * v.hidden_size * v.hidden_size);
    assert!(a.vision.layers[0].attn_norm.weight.iter().all(|&x| x == 1.0));
    assert!(a.vision.layers[0].attn_norm.bias.iter().all(|&x| x == 0.0));
    assert_eq!(a.vision.global_layers[0].gate_attn, Some(std::f32::consts::FRAC_PI_4));
    // Distinct tensors get distinct values (per-name streams), with the documented spread.
    assert_ne!(a.vision.pre_tile_embedding[..8], a.vision.post_tile_embedding[..8]);
    let TextLayerWeights::CrossAttention(x) = &a.text.layers[2] else { panic!("layer 2 is cross-attention") };
    assert_eq!(x.attn_gate, std::f32::consts::FRAC_PI_4);
    assert!(x.q_norm.iter().all(|&q| q == 1.0));
    let n = a.text.lm_head.len() as f32;
    let std = (a.text.lm_head.iter().map(|x| x * x).sum::<f32>() / n).sqrt();
    assert!((std - 0.02).abs() < 0.002, "{std}");
    assert_eq!(a.text.embed.len(), cfg.text.embed_rows() * cfg.text.base.hidden_size);
}
