//! Tests of the multi-node executor: a leader with followers in threads over loopback, on CPU executors.

use super::*;
use crate::exec::cpu::CpuExecutor;
use crate::exec::generate::{build_step, LogitsWanted, SeqChunk};
use crate::weights::ModelWeights;

fn tiny() -> LlamaConfig {
    let mut c = crate::config::Preset::Llama32_1B.config();
    c.tie_word_embeddings = false;
    (c.hidden_size, c.intermediate_size, c.num_hidden_layers) = (64, 128, 2);
    (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) = (4, 2, 16, 256);
    c
}

fn exec(seed: u64) -> CpuExecutor {
    let cfg = tiny();
    let w = ModelWeights::random(&cfg, seed).unwrap();
    CpuExecutor::new(cfg, w, 16, 4).unwrap()
}

/// A leader on a free port with `followers` (weight seeds) in threads; returns the leader and the threads.
fn group(
    leader_seed: u64,
    follower_seeds: &[u64],
) -> (MultiNodeExecutor<CpuExecutor>, Vec<std::thread::JoinHandle<Result<()>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let nnodes = follower_seeds.len() + 1;
    let threads = follower_seeds
        .iter()
        .enumerate()
        .map(|(i, &seed)| {
            let addr = addr.clone();
            std::thread::spawn(move || follow(&mut exec(seed), &addr, i + 1, nnodes, Duration::from_secs(10)))
        })
        .collect();
    let leader = MultiNodeExecutor::lead(exec(leader_seed), &listener, nnodes, Duration::from_secs(10)).unwrap();
    (leader, threads)
}

#[test]
fn followers_run_every_call_and_agree_with_the_leader() {
    let (mut leader, threads) = group(5, &[5, 5]);
    assert_eq!((leader.nnodes(), leader.num_blocks(), leader.block_size()), (3, 16, 4));
    let mut plain = exec(5);
    let table: Vec<u32> = (0..4).collect();
    let prompt = [1u32, 7, 42, 9, 100];
    let chunk = SeqChunk { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], 4).unwrap();
    assert_eq!(leader.step(&step).unwrap(), plain.step(&step).unwrap());
    let next = [3u32];
    let chunk = SeqChunk { tokens: &next, start_pos: 5, block_table: &table, logits: LogitsWanted::Last };
    let step = build_step(&[chunk], 4).unwrap();
    assert_eq!(leader.step_greedy(&step).unwrap(), plain.step_greedy(&step).unwrap());
    // Text models refuse images on every node: the leader reports its own error.
    let im = EncodedImages { states: vec![0.0; 4], num_tiles: vec![1] };
    assert!(leader.add_images(1, &im).unwrap_err().to_string().contains("takes no images"));
    assert!(!leader.remove_images(1));
    assert!(!leader.trim_images(1).unwrap());
    drop(leader);
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

/// A scored step (masks, sampled and prompt scores) on the leader gives what one node gives, and the followers
/// stay in step; a mismatched one is refused before they are told to run it.
#[test]
fn scored_steps_pick_on_the_leader() {
    use crate::sampling::{Sampler, SamplingParams, TokenMask};
    use scored::ScoreRow;
    let (mut leader, threads) = group(5, &[5]);
    let mut plain = exec(5);
    let table: Vec<u32> = (0..4).collect();
    let prompt = [1u32, 7, 42, 9, 100];
    let chunk = SeqChunk { tokens: &prompt, start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], 4).unwrap();
    let params = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
    let scores = [ScoreRow { row: 1, id: Some(42), top: 2 }, ScoreRow { row: 4, id: None, top: 3 }];
    let run = |e: &mut dyn Executor| {
        let mut sampler = Sampler::new(&params, &prompt);
        let mut seqs = [SampleSeq { params: &params, sampler: &mut sampler, prompt: &prompt, output: &[] }];
        let mut masks = || {
            let mut m = TokenMask::new(256);
            (10..20).for_each(|id| m.allow(id));
            vec![Some(m)]
        };
        e.step_scored(&step, &[], &mut seqs, &[4], &mut masks, &scores).unwrap()
    };
    let (picks, scored) = run(&mut leader);
    assert_eq!((picks.clone(), scored.clone()), run(&mut plain));
    assert!((10..20).contains(&picks[0]) && scored.len() == 2 && scored[1].top.len() == 3, "{picks:?} {scored:?}");
    // One sampled row for no sequence: refused by the leader alone, and the group goes on.
    let mut none: [SampleSeq<'_>; 0] = [];
    assert!(leader.step_scored(&step, &[], &mut none, &[4], &mut Vec::new, &[]).is_err());
    let next = [3u32];
    let chunk = SeqChunk { tokens: &next, start_pos: 5, block_table: &table, logits: LogitsWanted::Last };
    let step = build_step(&[chunk], 4).unwrap();
    assert_eq!(leader.step_greedy(&step).unwrap(), plain.step_greedy(&step).unwrap());
    drop(leader);
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

#[test]
fn a_diverged_or_dead_node_is_reported() {
    let (mut leader, threads) = group(5, &[5, 6]);
    let table: Vec<u32> = (0..2).collect();
    let chunk = SeqChunk { tokens: &[1, 2, 3], start_pos: 0, block_table: &table, logits: LogitsWanted::All };
    let step = build_step(&[chunk], 4).unwrap();
    // Other logits bits are reported (once) but node 0's are used; other greedy picks are an error.
    assert_eq!(leader.step(&step).unwrap(), exec(5).step(&step).unwrap());
    assert!(leader.warned);
    let e = leader.step_greedy(&step).unwrap_err().to_string();
    assert!(e.contains("node 2") && e.contains("diverged"), "{e}");
    // A bad step fails on every node; the leader reports it (the followers stay in lockstep).
    let bad = StepInput { token_ids: vec![9999], ..step.clone() };
    assert!(leader.step(&bad).is_err());
    drop(leader);
    for t in threads {
        t.join().unwrap().unwrap();
    }
    // Node 1 never comes: the leader names it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = MultiNodeExecutor::lead(exec(1), &listener, 2, Duration::from_millis(200)).err().unwrap().to_string();
    assert!(e.contains("waiting for nodes [1]"), "{e}");
    // A follower for another run size is refused; the leader goes on waiting and times out.
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        follow(&mut exec(1), &format!("127.0.0.1:{port}"), 1, 3, Duration::from_secs(5)).unwrap_err().to_string()
    });
    let e = MultiNodeExecutor::lead(exec(1), &listener, 2, Duration::from_millis(800)).err().unwrap().to_string();
    assert!(e.contains("timed out"), "{e}");
    assert!(t.join().unwrap().contains("refused"));
    assert!(follow(&mut exec(1), "127.0.0.1:1", 0, 2, Duration::from_millis(10)).is_err());

    // A peer that trickles its hello a byte at a time cannot hold the leader past its deadline.
    let port = listener.local_addr().unwrap().port();
    let drip = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        for b in MAGIC.iter().chain(&[1u8; 16]) {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let t0 = Instant::now();
    let e = MultiNodeExecutor::lead(exec(1), &listener, 2, Duration::from_millis(1000)).err().unwrap().to_string();
    assert!(e.contains("timed out") && t0.elapsed() < Duration::from_secs(3), "{e} after {:?}", t0.elapsed());
    drip.join().unwrap();

    // Something else on node 0's port (it answers, but not with node 0's acceptance byte) is named, not read
    // as calls.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = other.accept().unwrap();
        let mut hello = [0u8; 22];
        c.read_exact(&mut hello).unwrap();
        c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let e = follow(&mut exec(1), &format!("127.0.0.1:{port}"), 1, 2, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("not a llama32 node 0"), "{e}");
    fake.join().unwrap();
}

/// A step whose block-table size overflows (max_blocks_per_seq as a raw 64-bit number from the wire) is refused,
/// not wrapped into a match with an empty table.
#[test]
fn a_wrapping_block_table_size_is_refused() {
    let s = StepInput {
        token_ids: vec![1, 2],
        positions: vec![0, 0],
        cu_seqlens: vec![0, 1, 2],
        block_tables: vec![],
        max_blocks_per_seq: 1 << 63,
        slot_mapping: vec![0, 4],
        logits_rows: vec![0, 1],
    };
    let e = s.validate(&tiny(), 16, 4).unwrap_err().to_string();
    assert!(e.contains("block_tables has 0 entries"), "{e}");
}

#[test]
fn frames_round_trip_and_truncation_is_an_error() {
    let s = StepInput {
        token_ids: vec![1, 2],
        positions: vec![0, 1],
        cu_seqlens: vec![0, 2],
        block_tables: vec![0, 1, 2],
        max_blocks_per_seq: 3,
        slot_mapping: vec![0, 1],
        logits_rows: vec![1],
    };
    let p = payload(|e| {
        e.step(&s).f32s(&[1.5, -2.0]).bytes(&[7, 8]);
    });
    let mut d = Dec(&p);
    assert_eq!(d.step().unwrap(), s);
    assert_eq!((d.f32s().unwrap(), d.bytes().unwrap()), (vec![1.5, -2.0], vec![7, 8]));
    assert!(Dec(&p[..p.len() - 1]).step().and_then(|_| Dec(&p[..20]).step()).is_err());
    let mut huge = Enc::default();
    huge.u64(u64::MAX);
    assert!(Dec(&huge.0).u32s().is_err());
}
