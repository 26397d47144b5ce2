//! The batched Llama 3.2 Vision CPU executor over paged steps: chunked prefill, decode, and a vision sequence
//! beside a text-only one in the same step, against transformers' logits and greedy ids and the dense reference.

mod common;
use common::max_rel;

use llama32::exec::generate::{build_step, LogitsWanted, SeqChunk};
use llama32::exec::Executor;
use llama32::kv::BlockAllocator;
use llama32::sampling::argmax;
use llama32::vision::exec::{MllamaCpuExecutor, SeqImages};
use llama32::vision::pipeline::{EncodedImages, MllamaModel};
use llama32::vision::text::text_forward;

struct Case {
    model: MllamaModel,
    ids: Vec<u32>,
    images: EncodedImages,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn case(name: &str) -> Case {
    let g = common::mllama_golden(name);
    let model = MllamaModel::load(&g.dir).unwrap();
    let images = model.encode(&g.images).unwrap();
    let logits = llama32::npy::read_f32(&g.dir.join("logits.npy")).unwrap().data;
    Case { ids: g.input_ids, greedy: g.greedy_ids, model, images, logits }
}

fn executor(c: &Case, block_size: usize) -> MllamaCpuExecutor {
    let w = MllamaModel::load(&c.model.dir).unwrap().weights;
    MllamaCpuExecutor::new(c.model.cfg.clone(), w, 512, block_size).unwrap()
}

#[test]
fn chunked_prefill_and_decode_match_transformers() {
    for name in ["mllama-noresize", "mllama-resize", "mllama-two-images"] {
        let c = case(name);
        let mut ex = executor(&c, 4);
        ex.add_images(7, &c.images).unwrap();
        let mask = c.model.mask(&c.ids, &c.images).unwrap();
        let row = mask.row_len();
        let vocab = c.model.cfg.text.base.vocab_size;
        let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
        let mut table = Vec::new();
        alloc.ensure(&mut table, c.ids.len() + c.greedy.len()).unwrap();
        // Prefill in chunks of 5 tokens with every row's logits.
        let logits = common::chunked_prefill_with_images(&mut ex, &c.ids, &table, (7, mask.data(), row), 5);
        let e = max_rel(&logits, &c.logits);
        assert!(e <= 1e-4, "{name}: chunked prefill logits differ by {e:.2e}");
        // Greedy decode, one token per step, with the prompt's last mask row.
        let last = mask.row(c.ids.len() - 1).to_vec();
        let mut next = argmax(&logits[logits.len() - vocab..]);
        let mut got = vec![next];
        for pos in c.ids.len()..c.ids.len() + c.greedy.len() - 1 {
            let chunk = SeqChunk { tokens: &[next], start_pos: pos, block_table: &table, logits: LogitsWanted::Last };
            let step = build_step(&[chunk], ex.block_size()).unwrap();
            let out = ex.step_with_images(&step, &[Some(SeqImages { key: 7, mask: &last })]).unwrap();
            next = argmax(&out.logits);
            got.push(next);
        }
        assert_eq!(got, c.greedy, "{name}: greedy ids");
    }
}

#[test]
fn a_vision_and_a_text_only_sequence_share_a_step() {
    let c = case("mllama-two-images");
    let mut ex = executor(&c, 8);
    ex.add_images(1, &c.images).unwrap();
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let text: Vec<u32> = c.ids.iter().copied().filter(|&t| t != c.model.cfg.image_token_index).collect();
    let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    alloc.ensure(&mut ta, c.ids.len()).unwrap();
    alloc.ensure(&mut tb, text.len()).unwrap();
    let chunks = [
        SeqChunk { tokens: &text, start_pos: 0, block_table: &tb, logits: LogitsWanted::All },
        SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &ta, logits: LogitsWanted::All },
    ];
    let step = build_step(&chunks, ex.block_size()).unwrap();
    let out = ex.step_with_images(&step, &[None, Some(SeqImages { key: 1, mask: mask.data() })]).unwrap();
    let vocab = c.model.cfg.text.base.vocab_size;
    let (text_logits, vision_logits) = out.logits.split_at(text.len() * vocab);
    let e = max_rel(vision_logits, &c.logits);
    assert!(e <= 1e-4, "vision sequence differs by {e:.2e}");
    let want = text_forward(&c.model.weights.text, &c.model.cfg, &text, None, None).unwrap();
    assert_eq!(text_logits, &want[..], "the text-only sequence must not see the other's images");
    // The text model's Executor::step runs text-only steps.
    let mut tc = Vec::new();
    alloc.ensure(&mut tc, text.len()).unwrap();
    let step = build_step(
        &[SeqChunk { tokens: &text, start_pos: 0, block_table: &tc, logits: LogitsWanted::All }],
        ex.block_size(),
    )
    .unwrap();
    assert_eq!(ex.step(&step).unwrap().logits, want);
}

#[test]
fn bad_image_references_are_errors() {
    let c = case("mllama-resize");
    let mut ex = executor(&c, 16);
    let mask = c.model.mask(&c.ids, &c.images).unwrap();
    let mut alloc = BlockAllocator::new(ex.num_blocks(), ex.block_size());
    let mut table = Vec::new();
    alloc.ensure(&mut table, c.ids.len()).unwrap();
    let step = build_step(
        &[SeqChunk { tokens: &c.ids, start_pos: 0, block_table: &table, logits: LogitsWanted::Last }],
        ex.block_size(),
    )
    .unwrap();
    let err = ex.step_with_images(&step, &[Some(SeqImages { key: 3, mask: mask.data() })]).unwrap_err().to_string();
    assert!(err.contains("not registered"), "{err}");
    ex.add_images(3, &c.images).unwrap();
    let err =
        ex.step_with_images(&step, &[Some(SeqImages { key: 3, mask: &mask.data()[1..] })]).unwrap_err().to_string();
    assert!(err.contains("mask values"), "{err}");
    let err = ex.step_with_images(&step, &[None, None]).unwrap_err().to_string();
    assert!(err.contains("image entries"), "{err}");
    assert!(ex.remove_images(3));
    assert_eq!(ex.num_image_sets(), 0);
}

#[test]
fn trimming_padding_tiles_keeps_decode_exact_and_sizes_sets_by_real_tiles() {
    let mut padded = 0;
    for name in ["mllama-noresize", "mllama-resize", "mllama-two-images"] {
        let c = case(name);
        let (mut full, mut trimmed) = (executor(&c, 4), executor(&c, 4));
        full.add_images(5, &c.images).unwrap();
        trimmed.add_images(5, &c.images).unwrap();
        let max_tiles = c.model.cfg.vision.max_num_tiles;
        let real: usize = c.images.num_tiles.iter().sum();
        assert_eq!(trimmed.held_cross_tiles(), c.images.len() * max_tiles, "{name}");
        let mask = c.model.mask(&c.ids, &c.images).unwrap();
        let row = mask.row_len();
        let mut alloc = BlockAllocator::new(full.num_blocks(), full.block_size());
        let mut table = Vec::new();
        alloc.ensure(&mut table, c.ids.len() + c.greedy.len()).unwrap();
        let a = common::chunked_prefill_with_images(&mut full, &c.ids, &table, (5, mask.data(), row), 6);
        let b = common::chunked_prefill_with_images(&mut trimmed, &c.ids, &table, (5, mask.data(), row), 6);
        assert_eq!(a, b, "{name}: prefill");
        // Every prompt row before the first image has run: the padding tiles can go.
        assert!(trimmed.trim_images(5).unwrap());
        assert!(!trimmed.trim_images(6).unwrap());
        assert_eq!(trimmed.held_cross_tiles(), real, "{name}");
        padded += c.images.len() * max_tiles - real;
        let last = mask.row(c.ids.len() - 1).to_vec();
        let vocab = c.model.cfg.text.base.vocab_size;
        let mut next = argmax(&a[a.len() - vocab..]);
        for pos in c.ids.len()..c.ids.len() + c.greedy.len() - 1 {
            let chunk = SeqChunk { tokens: &[next], start_pos: pos, block_table: &table, logits: LogitsWanted::Last };
            let step = build_step(&[chunk], full.block_size()).unwrap();
            let im = [Some(SeqImages { key: 5, mask: &last })];
            let want = full.step_with_images(&step, &im).unwrap().logits;
            let got = trimmed.step_with_images(&step, &im).unwrap().logits;
            assert_eq!(got, want, "{name}: decode at position {pos} after trimming");
            next = argmax(&got);
        }
        // A row that sees no image needs the padding tiles: refused on the trimmed set, fine once registered again.
        let sees_none = vec![0u8; row];
        let chunk = SeqChunk { tokens: &c.ids[..1], start_pos: 0, block_table: &table, logits: LogitsWanted::Last };
        let step = build_step(&[chunk], full.block_size()).unwrap();
        let im = [Some(SeqImages { key: 5, mask: &sees_none })];
        let err = trimmed.step_with_images(&step, &im).unwrap_err().to_string();
        assert!(err.contains("sequence 0 token 0") && err.contains("trimmed"), "{name}: {err}");
        trimmed.add_images(5, &c.images).unwrap();
        assert_eq!(trimmed.held_cross_tiles(), c.images.len() * max_tiles, "{name}");
        assert_eq!(trimmed.step_with_images(&step, &im).unwrap(), full.step_with_images(&step, &im).unwrap());
    }
    assert!(padded > 0, "no golden image has padding tiles: the test checks nothing");
}
