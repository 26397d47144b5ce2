//! Multi-node runs: node 0 (the leader) runs the scheduler, the server and its own ranks; every other node (a
//! follower) runs only its ranks, driven by the leader over one TCP control connection.
//!
//! Tensor parallelism across nodes needs every rank to enter the same NCCL collectives in the same order, so every
//! executor call the leader makes ([`Executor::step`], `step_greedy`, `step_sample`, `step_with_images`,
//! `add_images`, `remove_images`, `trim_images`) is first sent to every follower, then run on the leader's own
//! ranks ([`MultiNodeExecutor`]); each follower runs the same call on its ranks ([`follow`]) and answers with a
//! digest of its output. All ranks hold the same gathered logits, so a follower whose greedy picks differ from the
//! leader's has diverged (an error naming the node); logits whose bits differ are reported once (a collective need
//! not be bitwise identical across nodes) and node 0's are used. Sampling happens on the leader; a follower
//! runs a sampled step as a greedy one (the same forward and collectives; the picked ids are not compared).
//!
//! # Protocol
//! A follower connects to the leader's control address and sends `b"L32MN\x01"`, its node rank, the number of
//! nodes, its executor's block size and block count (little-endian u32 each). The leader accepts each node rank
//! once and answers `1u8`. Then the leader sends frames (`tag: u8`, `len: u64`, payload) and the follower answers
//! each with `0u8` and a u64 digest, or `1u8` and a u32-length-prefixed error message. Tag `0` ends the session.
//! Numbers are little-endian; arrays are a u64 count followed by the values.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::LlamaConfig;
use crate::exec::{scored, Executor, SampleSeq, StepInput, StepOutput};
use crate::sampling::TokenLogprob;
use crate::vision::exec::SeqImages;
use crate::vision::pipeline::EncodedImages;
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"L32MN\x01";
/// Largest frame a follower accepts (a step's metadata, or one request's encoded images).
const MAX_FRAME: u64 = 4 << 30;

const TAG_END: u8 = 0;
const TAG_STEP: u8 = 1;
const TAG_GREEDY: u8 = 2;
const TAG_SAMPLE: u8 = 3;
const TAG_IMAGES_STEP: u8 = 4;
const TAG_ADD_IMAGES: u8 = 5;
const TAG_REMOVE_IMAGES: u8 = 6;
const TAG_TRIM_IMAGES: u8 = 7;

fn net(what: String) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Backend(format!("multi-node control: {what}: {e}"))
}

/// FNV-1a over 32-bit words: the digest a node reports for a step's output.
fn digest(words: impl Iterator<Item = u32>) -> u64 {
    words.fold(0xcbf2_9ce4_8422_2325u64, |h, w| (h ^ w as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Little-endian encoding of the call payloads.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
        self
    }
    fn step(&mut self, s: &StepInput) -> &mut Self {
        self.u32s(&s.token_ids).u32s(&s.positions).u32s(&s.cu_seqlens).u32s(&s.block_tables);
        self.u64(s.max_blocks_per_seq as u64).u32s(&s.slot_mapping).u32s(&s.logits_rows)
    }
}

/// The bytes `f` encodes (without copying them out of the encoder).
fn payload(f: impl FnOnce(&mut Enc)) -> Vec<u8> {
    let mut e = Enc::default();
    f(&mut e);
    e.0
}

/// The decoder of [`Enc`]'s payloads; every read is bounds-checked.
struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(Error::Backend("multi-node control: truncated frame".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }
    fn len(&mut self, width: usize) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(width as u64) > self.0.len() as u64 {
            return Err(Error::Backend("multi-node control: array longer than its frame".into()));
        }
        Ok(n as usize)
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.len(4)?;
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.len(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        Ok(self.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn step(&mut self) -> Result<StepInput> {
        let (token_ids, positions, cu_seqlens, block_tables) = (self.u32s()?, self.u32s()?, self.u32s()?, self.u32s()?);
        let max_blocks_per_seq = self.u64()? as usize;
        let (slot_mapping, logits_rows) = (self.u32s()?, self.u32s()?);
        Ok(StepInput { token_ids, positions, cu_seqlens, block_tables, max_blocks_per_seq, slot_mapping, logits_rows })
    }
}

fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads from a connection until a fixed instant: each read waits at most the time left, so a peer that trickles
/// bytes cannot stretch a bounded exchange.
pub(crate) struct Until<'a> {
    /// The connection.
    pub(crate) conn: &'a TcpStream,
    /// When reading stops with `TimedOut`.
    pub(crate) until: Instant,
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.conn.set_read_timeout(Some(left))?;
        let mut c = self.conn;
        c.read(buf)
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// One follower as the leader sees it.
struct Follower {
    node: usize,
    tx: BufWriter<TcpStream>,
    rx: BufReader<TcpStream>,
}

/// The leader's executor: its own ranks (`local`, e.g. a [`super::cuda::TpCudaExecutor`] holding global ranks
/// `0..N`) plus the followers, each driven with the same calls.
pub struct MultiNodeExecutor<E: Executor> {
    local: E,
    followers: Vec<Follower>,
    num_blocks: usize,
    /// Whether a logits mismatch was reported already.
    warned: bool,
}

/// What the leader compares a follower's digest with.
enum Check {
    /// Must be equal.
    Exact(u64),
    /// Reported (once) when different.
    Bits(u64),
}

impl<E: Executor> MultiNodeExecutor<E> {
    /// Waits on `listener` for the followers of a run of `nnodes` nodes (node ranks `1..nnodes`, each once) for
    /// at most `timeout`, then drives them beside `local`. The KV pool is the smallest of all nodes'.
    pub fn lead(local: E, listener: &TcpListener, nnodes: usize, timeout: Duration) -> Result<Self> {
        if nnodes == 0 {
            return Err(Error::request("--nnodes must be at least 1"));
        }
        let deadline = Instant::now() + timeout;
        listener.set_nonblocking(true).map_err(net("set_nonblocking".into()))?;
        let mut slots: Vec<Option<Follower>> = (0..nnodes).map(|_| None).collect();
        let mut num_blocks = local.num_blocks();
        while slots.iter().skip(1).any(Option::is_none) {
            let (conn, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..nnodes).filter(|&n| slots[n].is_none()).collect();
                        return Err(Error::Backend(format!(
                            "multi-node control: timed out after {timeout:?} waiting for nodes {missing:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(net("accept".into())(e)),
            };
            // A hello gets 10 s, and never past the run's deadline: a peer that trickles bytes cannot hold the
            // accept loop (read_exact would restart a per-read timeout on every byte).
            let until = (Instant::now() + Duration::from_secs(10)).min(deadline);
            match Self::greet(conn, nnodes, local.block_size(), &slots, until) {
                Ok((f, blocks)) => {
                    num_blocks = num_blocks.min(blocks);
                    let node = f.node;
                    slots[node] = Some(f);
                }
                Err(e) => eprintln!("multi-node control: refused {peer}: {e}"),
            }
        }
        let followers = slots.into_iter().flatten().collect();
        Ok(MultiNodeExecutor { local, followers, num_blocks, warned: false })
    }

    /// Reads a follower's hello and accepts it: returns it and its block count.
    fn greet(
        conn: TcpStream,
        nnodes: usize,
        block_size: usize,
        slots: &[Option<Follower>],
        until: Instant,
    ) -> Result<(Follower, usize)> {
        conn.set_nonblocking(false).map_err(net("set_blocking".into()))?;
        let mut hello_rx = Until { conn: &conn, until };
        let mut magic = [0u8; 6];
        hello_rx.read_exact(&mut magic).map_err(net("hello".into()))?;
        if &magic != MAGIC {
            return Err(Error::Backend("not a llama32 node".into()));
        }
        let hello: Vec<u32> =
            (0..4).map(|_| read_u32(&mut hello_rx)).collect::<std::io::Result<_>>().map_err(net("hello".into()))?;
        let (node, their_nodes, their_block, blocks) =
            (hello[0] as usize, hello[1] as usize, hello[2] as usize, hello[3] as usize);
        if their_nodes != nnodes {
            return Err(Error::Backend(format!("node {node} expects {their_nodes} nodes, this run has {nnodes}")));
        }
        if node == 0 || node >= nnodes || slots[node].is_some() {
            return Err(Error::Backend(format!("node rank {node} is invalid or already joined")));
        }
        if blocks == 0 {
            return Err(Error::Backend(format!("node {node} has no KV blocks (its cache would be the run's)")));
        }
        if their_block != block_size {
            return Err(Error::Backend(format!(
                "node {node} has KV blocks of {their_block} tokens, node 0 of {block_size} (use the same --block-size)"
            )));
        }
        // Steps may take long (the first one captures graphs); a dead node shows up as a closed connection.
        conn.set_read_timeout(None).map_err(net("set_read_timeout".into()))?;
        let rx = BufReader::new(conn.try_clone().map_err(net("clone".into()))?);
        let mut tx = BufWriter::new(conn);
        tx.write_all(&[1]).and_then(|()| tx.flush()).map_err(net(format!("accepting node {node}")))?;
        Ok((Follower { node, tx, rx }, blocks))
    }

    /// The leader's own executor.
    pub fn local(&self) -> &E {
        &self.local
    }

    /// Number of nodes (the leader included).
    pub fn nnodes(&self) -> usize {
        self.followers.len() + 1
    }

    fn send(&mut self, tag: u8, payload: &[u8]) -> Result<()> {
        for f in &mut self.followers {
            write_frame(&mut f.tx, tag, payload).map_err(net(format!("sending to node {}", f.node)))?;
        }
        Ok(())
    }

    /// Every follower's answer: its digest, or its error.
    fn collect(&mut self) -> Result<Vec<(usize, u64)>> {
        let mut out = Vec::with_capacity(self.followers.len());
        let mut first_err = None;
        for f in &mut self.followers {
            let node = f.node;
            let mut status = [0u8; 1];
            let r = f.rx.read_exact(&mut status).map_err(net(format!("node {node} did not answer (is it alive?)")));
            let answer = r.and_then(|()| {
                if status[0] == 0 {
                    let mut d = [0u8; 8];
                    f.rx.read_exact(&mut d).map_err(net(format!("reading node {node}'s answer")))?;
                    return Ok(u64::from_le_bytes(d));
                }
                let len = read_u32(&mut f.rx).map_err(net(format!("reading node {node}'s error")))? as usize;
                // The first MiB is kept and the rest read and dropped, so that the stream stays in step.
                let keep = len.min(1 << 20);
                let mut msg = Vec::with_capacity(keep);
                let reading = net(format!("reading node {node}'s error"));
                (&mut f.rx).take(keep as u64).read_to_end(&mut msg).map_err(&reading)?;
                let rest = std::io::copy(&mut (&mut f.rx).take((len - keep) as u64), &mut std::io::sink());
                if msg.len() != keep || rest.map_err(reading)? != (len - keep) as u64 {
                    return Err(Error::Backend(format!("node {node}: connection closed inside its error message")));
                }
                Err(Error::Backend(format!("node {node}: {}", String::from_utf8_lossy(&msg))))
            });
            match answer {
                Ok(d) => out.push((node, d)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Sends the call, runs it locally, then checks the followers' answers against `want(&local result)`:
    /// `Some(Exact(d))` must match (greedy ids: a node that picks other ids has diverged), `Some(Bits(d))` is only
    /// reported once when it differs (logits: a collective need not give every node the same low bits), `None`:
    /// nothing to compare.
    fn call<T>(
        &mut self,
        tag: u8,
        payload: &[u8],
        run: impl FnOnce(&mut E) -> Result<T>,
        want: impl Fn(&T) -> Option<Check>,
    ) -> Result<T> {
        self.send(tag, payload)?;
        let local = run(&mut self.local);
        let answers = self.collect();
        let out = local?;
        let answers = answers?;
        let (d, exact) = match want(&out) {
            None => return Ok(out),
            Some(Check::Exact(d)) => (d, true),
            Some(Check::Bits(d)) => (d, false),
        };
        if let Some((node, _)) = answers.iter().find(|(_, theirs)| *theirs != d) {
            if exact {
                return Err(Error::Backend(format!(
                    "multi-node: node {node} picked other tokens than node 0 in this step (its ranks diverged)"
                )));
            }
            if !self.warned {
                self.warned = true;
                eprintln!(
                    "multi-node: node {node}'s logits differ in their bits from node 0's (collectives need not be \
                     bitwise identical across nodes; node 0's are used); reported once"
                );
            }
        }
        Ok(out)
    }
}

fn logits_digest(out: &StepOutput) -> u64 {
    digest(out.logits.iter().map(|x| x.to_bits()))
}

fn ids_digest(ids: &[u32]) -> u64 {
    digest(ids.iter().copied())
}

fn encode_images_step(input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Vec<u8> {
    let mut e = Enc::default();
    e.step(input).u64(images.len() as u64);
    for im in images {
        match im {
            Some(im) => e.u64(1).u64(im.key).bytes(im.mask),
            None => e.u64(0),
        };
    }
    e.0
}

impl<E: Executor> Executor for MultiNodeExecutor<E> {
    fn config(&self) -> &LlamaConfig {
        self.local.config()
    }

    fn block_size(&self) -> usize {
        self.local.block_size()
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn max_logits_rows(&self) -> Option<usize> {
        self.local.max_logits_rows()
    }

    fn step(&mut self, input: &StepInput) -> Result<StepOutput> {
        let p = payload(|e| {
            e.step(input);
        });
        self.call(TAG_STEP, &p, |e| e.step(input), |o| Some(Check::Bits(logits_digest(o))))
    }

    fn step_greedy(&mut self, input: &StepInput) -> Result<Vec<u32>> {
        let p = payload(|e| {
            e.step(input);
        });
        self.call(TAG_GREEDY, &p, |e| e.step_greedy(input), |ids| Some(Check::Exact(ids_digest(ids))))
    }

    fn step_sample(&mut self, input: &StepInput, rows: &mut [SampleSeq<'_>]) -> Result<Vec<u32>> {
        // Refused before the followers are told to run the step: a leader that failed afterwards, before the
        // forward, would leave them waiting in its collectives.
        if rows.len() != input.logits_rows.len() {
            return Err(Error::request(format!(
                "step_sample: {} sequences for {} logits rows",
                rows.len(),
                input.logits_rows.len()
            )));
        }
        let p = payload(|e| {
            e.step(input);
        });
        self.call(TAG_SAMPLE, &p, |e| e.step_sample(input, rows), |_| None)
    }

    /// The leader's executor samples, masks and scores on its own first rank, as on one node. The followers run
    /// the same forward (with images as `step_with_images`, without as `step_greedy`) and their picks are unused.
    fn step_scored(
        &mut self,
        input: &StepInput,
        images: &[Option<SeqImages<'_>>],
        seqs: &mut [SampleSeq<'_>],
        sample_rows: &[usize],
        masks: scored::MaskSource<'_>,
        scores: &[scored::ScoreRow],
    ) -> Result<(Vec<u32>, Vec<TokenLogprob>)> {
        // Refused before the followers are told to run the step, as in step_sample.
        scored::check_scored(input.logits_rows.len(), seqs.len(), sample_rows, &[], scores)?;
        let (tag, p) = if images.iter().any(Option::is_some) {
            (TAG_IMAGES_STEP, encode_images_step(input, images))
        } else {
            (
                TAG_SAMPLE,
                payload(|e| {
                    e.step(input);
                }),
            )
        };
        self.call(tag, &p, |e| e.step_scored(input, images, seqs, sample_rows, masks, scores), |_| None)
    }

    fn step_with_images(&mut self, input: &StepInput, images: &[Option<SeqImages<'_>>]) -> Result<StepOutput> {
        let p = encode_images_step(input, images);
        self.call(TAG_IMAGES_STEP, &p, |e| e.step_with_images(input, images), |o| Some(Check::Bits(logits_digest(o))))
    }

    fn add_images(&mut self, key: u64, images: &EncodedImages) -> Result<()> {
        let nt: Vec<u32> = images.num_tiles.iter().map(|&n| n as u32).collect();
        let p = payload(|e| {
            e.u64(key).u32s(&nt).f32s(&images.states);
        });
        self.call(TAG_ADD_IMAGES, &p, |e| e.add_images(key, images), |_| Some(Check::Exact(0)))
    }

    fn remove_images(&mut self, key: u64) -> bool {
        let p = payload(|e| {
            e.u64(key);
        });
        // A failed follower shows at the next step; removal itself cannot fail.
        self.call(TAG_REMOVE_IMAGES, &p, |e| Ok(e.remove_images(key)), |_| None).unwrap_or(false)
    }

    fn trim_images(&mut self, key: u64) -> Result<bool> {
        let p = payload(|e| {
            e.u64(key);
        });
        self.call(TAG_TRIM_IMAGES, &p, |e| e.trim_images(key), |_| None)
    }

    fn images_fit(&self, num_tiles: &[usize]) -> Result<bool> {
        // The followers' pools are sized like the leader's (same flags), so the leader's answer stands for all.
        self.local.images_fit(num_tiles)
    }
}

impl<E: Executor> Drop for MultiNodeExecutor<E> {
    fn drop(&mut self) {
        let _ = self.send(TAG_END, &[]);
    }
}

/// A follower: connects to the leader at `master` (`host:port`, retrying until `timeout`: the leader may start
/// later), introduces itself as node `node` of `nnodes`, then runs every call the leader sends on `exec` until the
/// leader ends the session (returns `Ok`) or the connection breaks (an error).
pub fn follow<E: Executor + ?Sized>(
    exec: &mut E,
    master: &str,
    node: usize,
    nnodes: usize,
    timeout: Duration,
) -> Result<()> {
    if node == 0 || node >= nnodes {
        return Err(Error::request(format!("--node-rank {node} must be in 1..{nnodes} for a follower")));
    }
    let deadline = Instant::now() + timeout;
    let conn = loop {
        let addrs: Vec<_> =
            master.to_socket_addrs().map_err(net(format!("cannot resolve the master address {master}")))?.collect();
        if let Some(c) = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok()) {
            break c;
        }
        if Instant::now() >= deadline {
            return Err(Error::Backend(format!(
                "multi-node control: node {node} could not reach node 0 at {master} within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = conn.set_nodelay(true);
    let mut tx = BufWriter::new(conn.try_clone().map_err(net("clone".into()))?);
    let mut rx = BufReader::new(conn);
    let mut hello = MAGIC.to_vec();
    for v in [node, nnodes, exec.block_size(), exec.num_blocks()] {
        hello.extend_from_slice(&(v as u32).to_le_bytes());
    }
    tx.write_all(&hello).and_then(|()| tx.flush()).map_err(net("sending hello".into()))?;
    // Node 0's acceptance: one byte 1, within a whole --node-timeout from the connection (node 0 accepts only
    // once its own ranks have loaded, which may take longer than this node's did), so that another service on the
    // port, or a node 0 that never answers, cannot hang this node or be read as calls.
    let mut ok = [0u8; 1];
    rx.get_ref().set_read_timeout(Some(timeout)).map_err(net("set_read_timeout".into()))?;
    rx.read_exact(&mut ok).map_err(net("node 0 refused this node or did not answer (see its log)".into()))?;
    if ok[0] != 1 {
        return Err(Error::Backend(format!(
            "multi-node control: {master} answered {:#04x}, not a llama32 node 0",
            ok[0]
        )));
    }
    rx.get_ref().set_read_timeout(None).map_err(net("set_read_timeout".into()))?;
    loop {
        let mut head = [0u8; 9];
        rx.read_exact(&mut head).map_err(net("reading a call (node 0 gone?)".into()))?;
        let tag = head[0];
        let len = u64::from_le_bytes([head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8]]);
        if len > MAX_FRAME {
            return Err(Error::Backend(format!("multi-node control: frame of {len} bytes")));
        }
        // Read as it arrives: a length alone does not reserve memory.
        let mut payload = Vec::new();
        (&mut rx).take(len).read_to_end(&mut payload).map_err(net("reading a call".into()))?;
        if payload.len() as u64 != len {
            return Err(Error::Backend("multi-node control: node 0 closed the connection inside a call".into()));
        }
        if tag == TAG_END {
            return Ok(());
        }
        let answer = run_call(exec, tag, &payload);
        let mut reply = Vec::new();
        match answer {
            Ok(d) => {
                reply.push(0);
                reply.extend_from_slice(&d.to_le_bytes());
            }
            Err(e) => {
                let msg = e.to_string();
                reply.push(1);
                reply.extend_from_slice(&(msg.len() as u32).to_le_bytes());
                reply.extend_from_slice(msg.as_bytes());
            }
        }
        tx.write_all(&reply).and_then(|()| tx.flush()).map_err(net("answering node 0".into()))?;
    }
}

/// Runs one call on a follower's executor and returns the digest of its output.
fn run_call<E: Executor + ?Sized>(exec: &mut E, tag: u8, payload: &[u8]) -> Result<u64> {
    let mut d = Dec(payload);
    match tag {
        TAG_STEP => Ok(logits_digest(&exec.step(&d.step()?)?)),
        TAG_GREEDY | TAG_SAMPLE => Ok(ids_digest(&exec.step_greedy(&d.step()?)?)),
        TAG_IMAGES_STEP => {
            let input = d.step()?;
            let n = d.u64()? as usize;
            let mut owned: Vec<Option<(u64, Vec<u8>)>> = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                owned.push(match d.u64()? {
                    0 => None,
                    _ => Some((d.u64()?, d.bytes()?)),
                });
            }
            let images: Vec<Option<SeqImages<'_>>> =
                owned.iter().map(|o| o.as_ref().map(|(key, mask)| SeqImages { key: *key, mask })).collect();
            Ok(logits_digest(&exec.step_with_images(&input, &images)?))
        }
        TAG_ADD_IMAGES => {
            let key = d.u64()?;
            let num_tiles = d.u32s()?.into_iter().map(|n| n as usize).collect();
            let states = d.f32s()?;
            exec.add_images(key, &EncodedImages { states, num_tiles })?;
            Ok(0)
        }
        TAG_REMOVE_IMAGES => Ok(exec.remove_images(d.u64()?) as u64),
        TAG_TRIM_IMAGES => Ok(exec.trim_images(d.u64()?)? as u64),
        other => Err(Error::Backend(format!("multi-node control: unknown call {other}"))),
    }
}

#[cfg(test)]
mod tests;
