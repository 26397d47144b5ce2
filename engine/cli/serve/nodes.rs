//! Multi-node runs (`--nnodes M > 1`): the flags, this node's GPUs, and node 0 leading or node K > 0 following
//! the others.

use std::time::Duration;

use super::ranks::{
    check_tensor_parallel, check_vision_tensor_parallel, rank_devices, tp_cuda_node_executor, tp_quantization,
    usable_cuda_devices, CudaRanks,
};
use super::vision::vision_cuda_options;
use super::EngineArgs;
use crate::cli::{load, parse_devices, ModelArgs};
use crate::{Error, Result};

/// A multi-node run (`--nnodes M > 1`) as the command line describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MultiNode {
    /// `--tensor-parallel N`: the ranks over all nodes.
    pub tp: usize,
    /// `--nnodes M`.
    pub nnodes: usize,
    /// `--node-rank K`.
    pub node_rank: usize,
    /// `--master-addr`.
    pub master_addr: String,
    /// `--master-port P`: NCCL's id rendezvous; the control connection is on P + 1.
    pub master_port: u16,
    /// `--node-timeout`.
    pub timeout: Duration,
}

impl MultiNode {
    /// Ranks on each node (N / M).
    pub fn local_ranks(&self) -> usize {
        self.tp / self.nnodes
    }

    /// This node's global ranks: `K * N/M .. (K + 1) * N/M`.
    pub fn ranks(&self) -> std::ops::Range<usize> {
        let n = self.local_ranks();
        self.node_rank * n..(self.node_rank + 1) * n
    }

    /// Where this node's ranks join the NCCL group (`spec.rank`: the first of them).
    pub fn group_spec(&self) -> crate::tp::nccl::GroupSpec {
        crate::tp::nccl::GroupSpec {
            rank: self.ranks().start,
            world: self.tp,
            master_addr: self.master_addr.clone(),
            port: self.master_port,
            timeout: self.timeout,
        }
    }

    /// Node 0's control port (P + 1).
    pub fn control_port(&self) -> u16 {
        self.master_port.saturating_add(1)
    }

    /// Node 0's control address as the followers reach it (`master_addr:P+1`).
    pub fn control_addr(&self) -> String {
        crate::tp::nccl::host_port(&self.master_addr, self.control_port())
    }

    /// Node 0's side: listens for the followers' control connections (on every interface unless --master-addr is
    /// a loopback address, see [`crate::tp::nccl::listen_addr`]).
    fn listen(&self) -> Result<std::net::TcpListener> {
        let addr = crate::tp::nccl::listen_addr(&self.master_addr, self.control_port());
        std::net::TcpListener::bind(&addr).map_err(|e| {
            Error::Backend(format!(
                "--master-port {}: node 0 cannot listen on {addr} for the control connection (port P + 1): {e}",
                self.master_port
            ))
        })
    }

    /// "ranks a..b of N on node K of M", for logs.
    pub(super) fn describe(&self) -> String {
        let r = self.ranks();
        format!("ranks {}..{} of {} on node {} of {}", r.start, r.end, self.tp, self.node_rank, self.nnodes)
    }
}

/// Checks the multi-node flags of `serve`/`batch`/`bench-serve` (after [`check_tensor_parallel`]) before anything
/// loads, each error naming its flag: None for a one-node run (`--nnodes 1`, where `--node-rank` must be 0 and
/// `--master-addr`/`--master-port` are not used). With `--nnodes M > 1`: `--device cuda[:K]`, `--tensor-parallel N`
/// divisible by M, `--node-rank` below M, `--master-addr` given, `--master-port` below 65535 (P + 1 must exist), a
/// positive `--node-timeout`, no W4A8 `--quantize`, and `--devices` (when given) naming N / M distinct GPUs, since every
/// rank joins one NCCL group, which takes one rank per GPU.
pub(crate) fn check_multi_node(a: &ModelArgs, e: &EngineArgs) -> Result<Option<MultiNode>> {
    let (m, k, tp) = (e.nnodes, e.node_rank, e.tensor_parallel);
    if m == 0 {
        return Err(Error::request("--nnodes must be at least 1"));
    }
    if k >= m {
        return Err(Error::request(format!(
            "--node-rank {k} must be less than --nnodes {m} (nodes are numbered 0..{})",
            m - 1
        )));
    }
    if m == 1 {
        return Ok(None);
    }
    if load::Device::parse(&a.device)? == load::Device::Cpu {
        return Err(Error::request(format!(
            "--nnodes {m} joins CUDA ranks over NCCL across the nodes: it needs --device cuda or cuda:K, not --device {}",
            a.device
        )));
    }
    if tp % m != 0 {
        return Err(Error::request(format!(
            "--tensor-parallel {tp} is the number of ranks over all nodes and must be divisible by --nnodes {m} (each \
             node runs N / M ranks)"
        )));
    }
    let master_addr = match e.master_addr.as_deref().map(str::trim) {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => {
            return Err(Error::request(format!(
                "--nnodes {m} needs --master-addr HOST: node 0's host name or address, as every node reaches it"
            )))
        }
    };
    if e.master_port == 0 || e.master_port == u16::MAX {
        return Err(Error::request(format!(
            "--master-port {}: must be in 1..65534 (NCCL's rendezvous uses P, node 0's control connection P + 1)",
            e.master_port
        )));
    }
    if e.node_timeout == 0 {
        return Err(Error::request("--node-timeout must be at least 1 second"));
    }
    if let Some(q) = a.quantize.as_deref() {
        let scheme = crate::quant::Scheme::parse(q)?;
        if scheme.act != crate::quant::ActQuant::None {
            // The full check (the degree against the model's shapes) follows in `node_role`.
            return Err(Error::request(format!(
                "--tensor-parallel {tp} does not support --quantize {q}: W4A8 would quantize each rank's partial \
                 activations of the row-parallel projections over its own slice of K (other numerics than tp = 1); \
                 use w4a16-g{}",
                scheme.group
            )));
        }
    }
    let node = MultiNode {
        tp,
        nnodes: m,
        node_rank: k,
        master_addr,
        master_port: e.master_port,
        timeout: Duration::from_secs(e.node_timeout),
    };
    if let Some(list) = e.devices.as_deref() {
        let listed = parse_devices(list)?;
        let placement: Vec<usize> = (0..node.local_ranks()).map(|r| listed[r % listed.len()]).collect();
        distinct_gpus(&placement, &node)?;
    }
    Ok(Some(node))
}

/// A multi-node run's ranks join one NCCL group, which takes one rank per GPU.
fn distinct_gpus(placement: &[usize], node: &MultiNode) -> Result<()> {
    if let Some((i, d)) = placement.iter().enumerate().find(|&(i, d)| placement[..i].contains(d)) {
        let first = placement.iter().position(|x| x == d).unwrap_or(0);
        return Err(Error::request(format!(
            "--devices: node {} runs {} ranks of one NCCL group, which takes one GPU per rank, but its local ranks {first} \
             and {i} would share cuda:{d}; list {} distinct GPUs",
            node.node_rank,
            placement.len(),
            placement.len()
        )));
    }
    Ok(())
}

/// The GPU of each of this node's ranks in a multi-node run, once CUDA is known to be usable: `--devices` (wrapping
/// around as for one node) or `--device cuda:K`'s GPU and the ones after it; every rank needs a GPU of its own.
/// Without a usable device the error reads `--device D: no usable CUDA device for --tensor-parallel N over
/// --nnodes M: ...`.
pub(crate) fn node_rank_placement(device: &str, devices: Option<&str>, node: &MultiNode) -> Result<Vec<usize>> {
    let first = match load::Device::parse(device)? {
        load::Device::Cuda(k) => k,
        load::Device::Cpu => return Err(Error::request("multi-node runs need --device cuda or cuda:K")),
    };
    let listed = devices.map(parse_devices).transpose()?;
    let local = node.local_ranks();
    let what = format!("--tensor-parallel {} over --nnodes {}", node.tp, node.nnodes);
    let count = usable_cuda_devices(device, &what)?;
    if listed.is_none() && first + local > count {
        return Err(Error::request(format!(
            "{what} runs {local} ranks on each node, one GPU each (cuda:{first}..cuda:{}), but {count} CUDA device{} \
             visible on node {}; pass --device cuda:K or --devices to pick this node's GPUs",
            first + local - 1,
            if count == 1 { " is" } else { "s are" },
            node.node_rank
        )));
    }
    let placement = rank_devices(local, first, listed.as_deref(), count, false)?;
    distinct_gpus(&placement, node)?;
    Ok(placement)
}

/// Node 0's part of a multi-node run: the run, this node's GPUs, and where the followers connect.
pub(super) struct Lead {
    pub(super) node: MultiNode,
    pub(super) placement: Vec<usize>,
    listener: std::net::TcpListener,
}

/// How this process takes part in a `serve`/`batch`/`bench-serve` run.
pub(super) enum Role {
    /// A one-node run.
    Alone,
    /// Node 0 of a multi-node run.
    Lead(Lead),
    /// Node K > 0 of a multi-node run.
    Follow(MultiNode),
}

/// Checks the tensor-parallel and multi-node flags before anything loads and says what this process is. For a
/// multi-node run the degree is checked against the model (and its quantization: [`tp_quantization`]) first; then node 0
/// places its ranks (failing here without a usable CUDA device) and listens for the followers.
pub(super) fn node_role(a: &ModelArgs, e: &EngineArgs) -> Result<Role> {
    check_tensor_parallel(e.tensor_parallel, &a.device, e.devices.as_deref())?;
    let Some(node) = check_multi_node(a, e)? else {
        return Ok(Role::Alone);
    };
    if let Some(dir) = crate::cli::vision::vision_dir(a, false)? {
        check_vision_tensor_parallel(node.tp, a)?;
        let cfg = crate::vision::config::MllamaConfig::from_model_dir(&dir)?;
        crate::tp::TpPlan::new(&cfg.text.base, node.tp)?;
    } else {
        let (cfg, source) = load::resolve_config(a)?;
        crate::tp::TpPlan::new(&cfg, node.tp)?;
        tp_quantization(a, &source, &cfg, node.tp)?;
    }
    if node.node_rank > 0 {
        return Ok(Role::Follow(node));
    }
    let placement = node_rank_placement(&a.device, e.devices.as_deref(), &node)?;
    let listener = node.listen()?;
    Ok(Role::Lead(Lead { node, placement, listener }))
}

/// Node 0: waits (up to `--node-timeout`) for the followers' control connections, then drives them beside `exec`,
/// its own ranks ([`crate::tp::multinode::MultiNodeExecutor`]).
pub(super) fn lead_nodes<E: crate::exec::Executor + 'static>(
    exec: E,
    lead: &Lead,
) -> Result<Box<dyn crate::exec::Executor>> {
    use crate::exec::Executor as _;
    let n = &lead.node;
    eprintln!(
        "node 0 of {}: waiting for nodes 1..{} on the control port {} (up to {} s)",
        n.nnodes,
        n.nnodes - 1,
        n.control_port(),
        n.timeout.as_secs()
    );
    let multi = crate::tp::multinode::MultiNodeExecutor::lead(exec, &lead.listener, n.nnodes, n.timeout)?;
    eprintln!(
        "node 0 of {}: every node joined; {} tensor-parallel ranks over {} nodes, KV cache {} blocks of {} tokens \
         per rank (the smallest of all nodes)",
        n.nnodes,
        n.tp,
        n.nnodes,
        multi.num_blocks(),
        multi.block_size()
    );
    Ok(Box::new(multi))
}

/// Node K > 0 of a multi-node run: loads this node's ranks (joining the global NCCL group), then runs every call
/// node 0 sends until node 0 ends the session ([`crate::tp::multinode::follow`]). No server, no batch file.
pub(super) fn follow_node(a: &ModelArgs, e: &EngineArgs, node: &MultiNode) -> Result<()> {
    let (k, m) = (node.node_rank, node.nnodes);
    let placement = node_rank_placement(&a.device, e.devices.as_deref(), node)?;
    let control = node.control_addr();
    let t0 = std::time::Instant::now();
    let run = if let Some(dir) = crate::cli::vision::vision_dir(a, false)? {
        let cfg = crate::vision::config::MllamaConfig::from_model_dir(&dir)?;
        let opts = vision_cuda_options(a, e, placement[0]);
        let ckpt = crate::weights::Checkpoint::open(&dir)?;
        let at_load = crate::cli::load::at_load(a)?;
        let spec = node.group_spec();
        let mut exec =
            crate::tp::cuda_vision::TpMllamaCudaExecutor::join_node(cfg, (&ckpt, at_load), &placement, &spec, &opts)?;
        use crate::exec::Executor as _;
        eprintln!(
            "loaded the Llama 3.2 Vision text decoder of {} as {} on {:?} in {:.1} s: KV cache {} blocks of {} tokens \
             per rank",
            dir.display(),
            node.describe(),
            placement,
            t0.elapsed().as_secs_f64(),
            exec.num_blocks(),
            exec.block_size()
        );
        eprintln!("node {k} of {m}: following node 0 at {control}");
        crate::tp::multinode::follow(&mut exec, &control, k, m, node.timeout)
    } else {
        let ranks =
            CudaRanks { devices: None, comm: "auto", share_when_short: false, kv_tokens: a.kv_tokens, min_tokens: 1 };
        let mut model = tp_cuda_node_executor(a, node, &placement, &ranks)?;
        use crate::exec::Executor as _;
        eprintln!(
            "loaded {} on {} in {:.1} s: KV cache {} blocks of {} tokens per rank",
            model.source_desc,
            model.device_name,
            model.load_secs,
            model.exec.num_blocks(),
            model.exec.block_size()
        );
        eprintln!("node {k} of {m}: following node 0 at {control}");
        crate::tp::multinode::follow(&mut model.exec, &control, k, m, node.timeout)
    };
    run.map_err(|err| match err {
        Error::Backend(msg) => Error::Backend(format!("node {k} of {m}: {msg}")),
        other => other,
    })?;
    eprintln!("node {k} of {m}: node 0 ended the session");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check_multi_node` on `llama32 serve ARGS`'s flags.
    fn multi_node(args: &[&str]) -> Result<Option<MultiNode>> {
        use clap::Parser as _;
        let cli = crate::cli::Cli::try_parse_from(["llama32", "serve"].iter().chain(args))
            .map_err(|e| Error::request(e.to_string()))?;
        match cli.command {
            crate::cli::Command::Serve(a) => check_multi_node(&a.model, &a.engine),
            _ => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn multi_node_flags_are_checked_before_loading() {
        // A valid 2-node command (node 0, or with --node-rank) with `extra` flags replacing or adding to it.
        let two = |extra: &[&str]| {
            let mut flags =
                vec![("--device", "cuda"), ("--tensor-parallel", "16"), ("--nnodes", "2"), ("--master-addr", "node0")];
            for kv in extra.chunks(2) {
                match flags.iter_mut().find(|(k, _)| *k == kv[0]) {
                    Some(f) => f.1 = kv[1],
                    None => flags.push((kv[0], kv[1])),
                }
            }
            multi_node(&flags.iter().flat_map(|(k, v)| [*k, *v]).collect::<Vec<_>>())
        };
        let e = |r: Result<Option<MultiNode>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let n = two(&["--node-rank", "1", "--master-port", "4000"]).unwrap().unwrap();
        assert_eq!((n.tp, n.nnodes, n.node_rank, n.local_ranks(), n.ranks()), (16, 2, 1, 8, 8..16));
        assert_eq!((n.master_addr.as_str(), n.master_port, n.control_port()), ("node0", 4000, 4001));
        assert_eq!((n.control_addr(), n.timeout), ("node0:4001".to_string(), Duration::from_secs(600)));
        let spec = n.group_spec();
        assert_eq!((spec.rank, spec.world, spec.port, spec.master_addr.as_str()), (8, 16, 4000, "node0"));
        let n = two(&["--node-timeout", "5", "--master-addr", "::1", "--device", "cuda:3"]).unwrap().unwrap();
        assert_eq!((n.node_rank, n.ranks(), n.master_port, n.timeout), (0, 0..8, 29500, Duration::from_secs(5)));
        assert_eq!(n.control_addr(), "[::1]:29501");
        let n = two(&["--tensor-parallel", "8", "--nnodes", "4", "--node-rank", "3"]).unwrap().unwrap();
        assert_eq!((n.local_ranks(), n.ranks(), n.group_spec().rank), (2, 6..8, 6));
        // One node: nothing to do, whatever --master-addr says; --node-rank must be 0.
        assert_eq!(multi_node(&["--device", "cpu", "--master-addr", "x"]).unwrap(), None);
        assert!(e(multi_node(&["--node-rank", "1"])).contains("--node-rank 1 must be less than --nnodes 1"));
        assert!(e(multi_node(&["--nnodes", "0"])).contains("--nnodes must be at least 1"));
        // Each refusal names its flag.
        let m = e(two(&["--device", "cpu"]));
        assert!(m.contains("--nnodes 2") && m.contains("--device cuda") && m.contains("--device cpu"), "{m}");
        let m = e(two(&["--tensor-parallel", "6", "--nnodes", "4"]));
        assert!(m.contains("--tensor-parallel 6") && m.contains("divisible by --nnodes 4"), "{m}");
        let m = e(two(&["--tensor-parallel", "1"]));
        assert!(m.contains("--tensor-parallel 1") && m.contains("--nnodes 2"), "{m}");
        let m = e(two(&["--node-rank", "2"]));
        assert!(m.contains("--node-rank 2 must be less than --nnodes 2"), "{m}");
        let m = e(multi_node(&["--device", "cuda", "--tensor-parallel", "4", "--nnodes", "2"]));
        assert!(m.contains("--master-addr HOST"), "{m}");
        assert!(e(two(&["--master-addr", " "])).contains("--master-addr HOST"));
        assert!(e(two(&["--master-port", "65535"])).contains("--master-port 65535"));
        assert!(e(two(&["--master-port", "0"])).contains("--master-port 0"));
        assert!(e(two(&["--node-timeout", "0"])).contains("--node-timeout"));
        // W4A16 ranks run across nodes as on one; W4A8 is refused naming the scheme.
        assert!(two(&["--quantize", "w4a16-g32"]).is_ok());
        let m = e(two(&["--quantize", "w4a8-g32"]));
        assert!(m.contains("--quantize w4a8-g32") && m.contains("--tensor-parallel 16"), "{m}");
        // --devices: this node's 8 ranks need 8 distinct GPUs (one NCCL group takes one rank per GPU).
        assert!(two(&["--devices", "7,6,5,4,3,2,1,0"]).is_ok());
        let m = e(two(&["--devices", "0,1,2,3"]));
        assert!(m.contains("--devices") && m.contains("local ranks 0 and 4 would share cuda:0"), "{m}");
        assert!(e(two(&["--devices", "0,x"])).contains("--devices: `x`"));
    }
}
