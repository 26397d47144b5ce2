//! NCCL through cudarc (`nccl` feature), and the TCP rendezvous that hands NCCL's unique id from rank 0 to the
//! other ranks of a multi-process or multi-node group.
//!
//! Rendezvous protocol (one TCP connection per non-zero rank, to `master_addr:port` where rank 0 listens):
//! the peer sends `b"L32TP\x01"`, its rank and the world size as little-endian u32; rank 0 checks them (right
//! world size, rank in `1..world`, no rank twice) and answers with the id's length (u32) and bytes. Rank 0 returns
//! once every peer has its id, so by then every rank can call `ncclCommInitRank`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::comm::Communicator;
use super::cuda::DeviceComm;
use crate::{Error, Result};

const MAGIC: &[u8; 6] = b"L32TP\x01";
/// Largest id the rendezvous accepts (NCCL's is 128 bytes).
const MAX_ID_BYTES: usize = 4096;

fn net_err(what: &str, e: std::io::Error) -> Error {
    Error::Backend(format!("tensor-parallel rendezvous: {what}: {e}"))
}

/// Rank 0's side: binds `addr` (`host:port`; port 0 picks a free one, see [`RendezvousServer::port`]).
pub struct RendezvousServer {
    listener: TcpListener,
}

impl RendezvousServer {
    /// Listens on `addr`.
    pub fn bind(addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| net_err(&format!("cannot listen on {addr}"), e))?;
        Ok(RendezvousServer { listener })
    }

    /// The port actually bound.
    pub fn port(&self) -> Result<u16> {
        self.listener.local_addr().map(|a| a.port()).map_err(|e| net_err("local address", e))
    }

    /// Hands `id` to ranks `1..world`, each exactly once, waiting at most `timeout` in all.
    pub fn serve(&self, world: usize, id: &[u8], timeout: Duration) -> Result<()> {
        if id.len() > MAX_ID_BYTES {
            return Err(Error::Backend(format!("rendezvous: id of {} bytes is too long", id.len())));
        }
        let deadline = Instant::now() + timeout;
        self.listener.set_nonblocking(true).map_err(|e| net_err("set_nonblocking", e))?;
        let mut served = vec![false; world];
        served[0] = true;
        while served.iter().any(|s| !s) {
            let (mut conn, peer) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                        return Err(Error::Backend(format!(
                            "tensor-parallel rendezvous: timed out after {timeout:?} waiting for ranks {missing:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(net_err("accept", e)),
            };
            conn.set_nonblocking(false).map_err(|e| net_err("set_blocking", e))?;
            // A hello gets 10 s at most (and never past the deadline): an idle stray connection (a port scan, a
            // health check) must not take the real ranks' whole wait.
            let until =
                (Instant::now() + Duration::from_secs(10)).min(deadline).max(Instant::now() + Duration::from_millis(1));
            let mut hello = [0u8; 14];
            if let Err(e) = (crate::tp::multinode::Until { conn: &conn, until }).read_exact(&mut hello) {
                eprintln!("tensor-parallel rendezvous: ignoring {peer}: {e}");
                continue;
            }
            let rank = u32::from_le_bytes([hello[6], hello[7], hello[8], hello[9]]) as usize;
            let their_world = u32::from_le_bytes([hello[10], hello[11], hello[12], hello[13]]) as usize;
            if &hello[..6] != MAGIC {
                eprintln!("tensor-parallel rendezvous: ignoring {peer}: not a llama32 rank");
                continue;
            }
            if their_world != world {
                return Err(Error::Backend(format!(
                    "tensor-parallel rendezvous: rank {rank} at {peer} expects a world of {their_world}, this one is {world}"
                )));
            }
            if rank == 0 || rank >= world || served[rank] {
                return Err(Error::Backend(format!(
                    "tensor-parallel rendezvous: {peer} claims rank {rank}, which is invalid or already joined"
                )));
            }
            let mut reply = (id.len() as u32).to_le_bytes().to_vec();
            reply.extend_from_slice(id);
            conn.write_all(&reply).map_err(|e| net_err(&format!("sending the id to rank {rank}"), e))?;
            served[rank] = true;
        }
        Ok(())
    }
}

/// A non-zero rank's side: connects to rank 0 at `master` (`host:port`), retrying until `timeout` (rank 0 may start
/// later), and returns the id it hands out.
pub fn fetch_id(master: &str, rank: usize, world: usize, timeout: Duration) -> Result<Vec<u8>> {
    if rank == 0 || rank >= world {
        return Err(Error::request(format!("rendezvous: rank {rank} must be in 1..{world} to fetch the id")));
    }
    let deadline = Instant::now() + timeout;
    let mut conn = loop {
        let addrs: Vec<_> = master
            .to_socket_addrs()
            .map_err(|e| net_err(&format!("cannot resolve master address {master}"), e))?
            .collect();
        let attempt = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok());
        if let Some(c) = attempt {
            break c;
        }
        if Instant::now() >= deadline {
            return Err(Error::Backend(format!(
                "tensor-parallel rendezvous: rank {rank} could not reach rank 0 at {master} within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    conn.set_read_timeout(Some(left)).map_err(|e| net_err("set_read_timeout", e))?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    conn.write_all(&hello).map_err(|e| net_err("sending hello", e))?;
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).map_err(|e| net_err("reading the id length (did rank 0 refuse this rank?)", e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_ID_BYTES {
        return Err(Error::Backend(format!("tensor-parallel rendezvous: rank 0 sent an id of {len} bytes")));
    }
    let mut id = vec![0u8; len];
    conn.read_exact(&mut id).map_err(|e| net_err("reading the id", e))?;
    Ok(id)
}

/// Where and how a multi-process group meets: `master_addr:port` is where rank 0 listens.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// Port of rank 0's rendezvous.
    pub port: u16,
    /// How long to wait for the others.
    pub timeout: Duration,
}

#[cfg(test)]
impl GroupSpec {
    /// Rank `rank` of a group of `world` that meets at 127.0.0.1:1, where nothing listens, with the default
    /// 600 s wait: for tests that must fail before or at the rendezvous without waiting.
    pub(crate) fn unreachable(rank: usize, world: usize) -> GroupSpec {
        GroupSpec { rank, world, master_addr: "127.0.0.1".into(), port: 1, timeout: Duration::from_secs(600) }
    }
}

/// `host:port`, with an IPv6 literal host in brackets (`[::1]:29500`).
pub fn host_port(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The address a server of a group whose rank 0 is reached at `master_addr` listens on, at `port`: `master_addr`
/// itself when it is a loopback address (every rank runs on this machine), else every interface (`0.0.0.0`, or
/// `[::]` for an IPv6 `master_addr`), so that the other nodes reach it however `master_addr` resolves on this one
/// (a host name that resolves to 127.0.1.1 locally, an address behind NAT).
pub fn listen_addr(master_addr: &str, port: u16) -> String {
    let loopback = (master_addr, port)
        .to_socket_addrs()
        .map(|mut addrs| {
            let mut any = false;
            addrs.all(|a| {
                any = true;
                a.ip().is_loopback()
            }) && any
        })
        .unwrap_or(false);
    if loopback {
        host_port(master_addr, port)
    } else if master_addr.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[::]:{port}")
    } else {
        format!("0.0.0.0:{port}")
    }
}

/// Runs the rendezvous: rank 0 creates the id with `make_id`, serves it (on [`listen_addr`]) and returns it; other
/// ranks fetch it from `master_addr:port`.
pub fn rendezvous(spec: &GroupSpec, make_id: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    if spec.world == 0 || spec.rank >= spec.world {
        return Err(Error::request(format!("rank {} is outside a world of {}", spec.rank, spec.world)));
    }
    let addr = host_port(&spec.master_addr, spec.port);
    if spec.rank == 0 {
        let id = make_id()?;
        if spec.world > 1 {
            RendezvousServer::bind(&listen_addr(&spec.master_addr, spec.port))?.serve(spec.world, &id, spec.timeout)?;
        }
        Ok(id)
    } else {
        fetch_id(&addr, spec.rank, spec.world, spec.timeout)
    }
}

/// A rank of an NCCL group on one CUDA device.
///
/// Its [`Communicator`] methods take host buffers and stage them through the device (for tests and the CPU-side
/// control path); as a [`DeviceComm`] it runs the collectives on the CUDA executor's bf16 buffers. Its collectives
/// are enqueued on the stream it was created with; built on the executor's own stream (the `*_on` constructors)
/// they need no cross-stream ordering.
///
/// NCCL takes one rank per GPU: a group with two ranks on one device is refused by NCCL ("Duplicate GPU
/// detected"), which [`NcclComm::local_group`] reports as an error. Ranks sharing a GPU use
/// [`HostStagedComm`](super::cuda::HostStagedComm).
pub struct NcclComm {
    comm: cudarc::nccl::Comm,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use it at once; `NcclComm` is
// not `Sync`, so moving it to the rank's thread (which then owns it) keeps every call on one thread at a time. The
// CUDA stream and context handles it holds are `Send` already.
unsafe impl Send for NcclComm {}

/// Checks that CUDA works and that cudarc can load NCCL, before any NCCL call (cudarc would panic otherwise).
pub(crate) fn nccl_available() -> Result<()> {
    crate::ops::cuda::probe()?;
    // SAFETY: only tries to dlopen libnccl by cudarc's names; nothing is called through it.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(Error::Backend(
            "NCCL is not available: cudarc loads `libnccl.so` (or `libnccl.so.<major>`), which was not found on the \
             library path; install the NCCL runtime and development package (libnccl2 + libnccl-dev), or put a \
             symlink libnccl.so -> libnccl.so.2 in a directory on LD_LIBRARY_PATH (scripts/gpu-suite.sh does this \
             for the NCCL that ships with PyTorch)"
                .into(),
        ));
    }
    Ok(())
}

fn nccl_err(what: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> Error + '_ {
    move |e| Error::Backend(format!("NCCL {what}: {e:?}"))
}

fn drv_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("CUDA {what}: {e}"))
}

fn new_stream(device: usize) -> Result<std::sync::Arc<cudarc::driver::CudaStream>> {
    let ctx = cudarc::driver::CudaContext::new(device).map_err(drv_err("open device"))?;
    ctx.new_stream().map_err(drv_err("new stream"))
}

/// An NCCL id from its bytes as the rendezvous carries them.
fn id_from_bytes(id_bytes: &[u8]) -> Result<cudarc::nccl::Id> {
    let mut internal = [0 as std::ffi::c_char; 128];
    if id_bytes.len() != internal.len() {
        return Err(Error::Backend(format!("NCCL unique id has {} bytes, expected 128", id_bytes.len())));
    }
    for (d, s) in internal.iter_mut().zip(id_bytes) {
        *d = *s as std::ffi::c_char;
    }
    Ok(cudarc::nccl::Id::uninit(internal))
}

impl NcclComm {
    /// Joins the group described by `spec` on CUDA device `device` (on a stream of its own): the TCP rendezvous
    /// hands rank 0's NCCL unique id to every rank, then each calls `ncclCommInitRank`. Errors (not panics)
    /// without CUDA or NCCL.
    pub fn join(device: usize, spec: &GroupSpec) -> Result<Self> {
        nccl_available()?;
        Self::join_on(new_stream(device)?, spec)
    }

    /// [`join`](Self::join) with the collectives enqueued on `stream` (the executor's), on `stream`'s device.
    pub fn join_on(stream: std::sync::Arc<cudarc::driver::CudaStream>, spec: &GroupSpec) -> Result<Self> {
        nccl_available()?;
        let id_bytes = rendezvous(spec, || {
            let id = cudarc::nccl::Id::new().map_err(nccl_err("get unique id"))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })?;
        let id = id_from_bytes(&id_bytes)?;
        stream.context().bind_to_thread().map_err(drv_err("bind device"))?;
        let comm =
            cudarc::nccl::Comm::from_rank(stream.clone(), spec.rank, spec.world, id).map_err(nccl_err("init rank"))?;
        Ok(NcclComm { comm, stream })
    }

    /// This process's ranks `spec.rank .. spec.rank + streams.len()` of the group `spec` describes (one process per
    /// node driving several GPUs): rank `spec.rank + i` enqueues on `streams[i]`. Each rank joins with
    /// [`join_on`](Self::join_on) on a thread of its own, all at once (`ncclCommInitRank` blocks until every rank of
    /// the world has joined): global rank 0's thread serves the id, the other local ranks fetch it over TCP like
    /// the remote ones. Returns at the first rank's error, or when the group has not formed within `spec.timeout`
    /// (the rendezvous) plus two minutes (NCCL's own initialization); a rank stuck in NCCL is then left behind.
    pub fn join_ranks(streams: Vec<std::sync::Arc<cudarc::driver::CudaStream>>, spec: &GroupSpec) -> Result<Vec<Self>> {
        nccl_available()?;
        let n = streams.len();
        if n == 0 || spec.rank + n > spec.world {
            return Err(Error::request(format!(
                "ranks {}..{} are not a non-empty part of a world of {}",
                spec.rank,
                spec.rank + n,
                spec.world
            )));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, stream) in streams.into_iter().enumerate() {
            let tx = tx.clone();
            let spec = GroupSpec { rank: spec.rank + i, ..spec.clone() };
            // Detached: a rank stuck in NCCL must not keep the caller waiting past the deadline.
            std::thread::spawn(move || {
                let made = Self::join_on(stream, &spec)
                    .map_err(|e| Error::Backend(format!("rank {} of {}: {e}", spec.rank, spec.world)));
                let _ = tx.send((i, made));
            });
        }
        drop(tx);
        let timeout = spec.timeout + Duration::from_secs(120);
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<NcclComm>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((i, Ok(c))) => got[i] = Some(c),
                Ok((_, Err(e))) => return Err(e),
                Err(_) => {
                    let missing: Vec<usize> = (0..n).filter(|&i| got[i].is_none()).map(|i| spec.rank + i).collect();
                    return Err(Error::Backend(format!(
                        "NCCL: ranks {missing:?} of {} did not join the group within {timeout:?} (is every node \
                         started, with the same --tensor-parallel, --nnodes, --master-addr and --master-port?)",
                        spec.world
                    )));
                }
            }
        }
        got.into_iter().map(|c| c.ok_or_else(|| Error::Backend("NCCL returned no communicator".into()))).collect()
    }

    /// A one-rank group on `device` (no rendezvous): the world-size-1 NCCL path.
    pub fn single(device: usize) -> Result<Self> {
        nccl_available()?;
        Self::single_on(new_stream(device)?)
    }

    /// A one-rank group whose collectives are enqueued on `stream`.
    pub fn single_on(stream: std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Self> {
        Ok(Self::local_group(vec![stream], Duration::from_secs(120))?.remove(0))
    }

    /// A group of `streams.len()` ranks in this process, rank `r` enqueueing on `streams[r]` (on that stream's
    /// device): one NCCL id, and each rank's `ncclCommInitRank` on a thread of its own (the calls block until every
    /// rank has joined). NCCL refuses two ranks on one device; that, or a group not formed within `timeout`, is an
    /// error.
    pub fn local_group(
        streams: Vec<std::sync::Arc<cudarc::driver::CudaStream>>,
        timeout: Duration,
    ) -> Result<Vec<Self>> {
        nccl_available()?;
        let world = streams.len();
        if world == 0 {
            return Err(Error::request("an NCCL group needs at least one rank"));
        }
        let id = cudarc::nccl::Id::new().map_err(nccl_err("get unique id"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        for (rank, stream) in streams.into_iter().enumerate() {
            let tx = tx.clone();
            // Detached: if NCCL hangs, the caller gets an error after `timeout` and the thread is left behind.
            std::thread::spawn(move || {
                let made = stream
                    .context()
                    .bind_to_thread()
                    .map_err(drv_err("bind device"))
                    .and_then(|()| {
                        cudarc::nccl::Comm::from_rank(stream.clone(), rank, world, id)
                            .map_err(nccl_err(&format!("init rank {rank} of {world}")))
                    })
                    .map(|comm| NcclComm { comm, stream });
                let _ = tx.send((rank, made));
            });
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<NcclComm>> = (0..world).map(|_| None).collect();
        let mut first_err = None;
        for _ in 0..world {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((rank, Ok(c))) => got[rank] = Some(c),
                Ok((_, Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    return Err(Error::Backend(format!(
                        "NCCL: a group of {world} ranks in one process did not form within {timeout:?}"
                    )))
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        got.into_iter().map(|c| c.ok_or_else(|| Error::Backend("NCCL returned no communicator".into()))).collect()
    }

    /// The underlying cudarc communicator, for collectives on device buffers.
    pub fn comm(&self) -> &cudarc::nccl::Comm {
        &self.comm
    }

    /// Runs `op` on the communicator's stream, ordered after the work already on `stream` and before the work
    /// enqueued on `stream` afterwards (nothing to do when they are the same stream).
    fn ordered(
        &self,
        stream: &cudarc::driver::CudaStream,
        op: impl FnOnce(&cudarc::nccl::Comm) -> Result<()>,
    ) -> Result<()> {
        let same = stream.cu_stream() == self.stream.cu_stream();
        if !same {
            self.stream.join(stream).map_err(drv_err("order the collective after the step"))?;
        }
        op(&self.comm)?;
        if !same {
            stream.join(&self.stream).map_err(drv_err("order the step after the collective"))?;
        }
        Ok(())
    }
}

impl DeviceComm for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_bf16(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.ordered(stream, |c| {
            c.all_reduce_in_place(buf, &cudarc::nccl::ReduceOp::Sum).map(drop).map_err(nccl_err("all_reduce bf16"))
        })
    }

    fn all_gather_bf16(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        send: &cudarc::driver::CudaView<'_, half::bf16>,
        recv: &mut cudarc::driver::CudaViewMut<'_, half::bf16>,
    ) -> Result<()> {
        if recv.len() != send.len() * self.comm.world_size() {
            return Err(Error::Backend(format!(
                "all_gather: receive buffer holds {} values, expected {} x {}",
                recv.len(),
                self.comm.world_size(),
                send.len()
            )));
        }
        if send.is_empty() {
            return Ok(());
        }
        self.ordered(stream, |c| c.all_gather(send, recv).map(drop).map_err(nccl_err("all_gather bf16")))
    }

    fn name(&self) -> &'static str {
        "nccl"
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(buf).map_err(drv_err("upload"))?;
        self.comm.all_reduce_in_place(&mut dev, &cudarc::nccl::ReduceOp::Sum).map_err(nccl_err("all_reduce"))?;
        self.stream.memcpy_dtoh(&dev, buf).map_err(drv_err("download"))?;
        self.stream.synchronize().map_err(drv_err("synchronize"))
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() * self.comm.world_size() {
            return Err(Error::Backend(format!(
                "all_gather: receive buffer holds {} values, expected {} x {}",
                recv.len(),
                self.comm.world_size(),
                send.len()
            )));
        }
        if send.is_empty() {
            return Ok(());
        }
        let src = self.stream.clone_htod(send).map_err(drv_err("upload"))?;
        let mut dst = self.stream.alloc_zeros::<f32>(recv.len()).map_err(drv_err("alloc"))?;
        self.comm.all_gather(&src, &mut dst).map_err(nccl_err("all_gather"))?;
        self.stream.memcpy_dtoh(&dst, recv).map_err(drv_err("download"))?;
        self.stream.synchronize().map_err(drv_err("synchronize"))
    }

    fn barrier(&self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce_sum_f32(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_hands_rank_zeros_id_to_every_rank() {
        let server = RendezvousServer::bind("127.0.0.1:0").unwrap();
        let port = server.port().unwrap();
        let id: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        let world = 4;
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let peers: Vec<_> = (1..world)
                .map(|r| {
                    s.spawn(move || fetch_id(&format!("127.0.0.1:{port}"), r, world, Duration::from_secs(20)).unwrap())
                })
                .collect();
            server.serve(world, &id, Duration::from_secs(20)).unwrap();
            peers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|g| g == &id));
    }

    #[test]
    fn rendezvous_refuses_a_wrong_world_and_times_out() {
        let server = RendezvousServer::bind("127.0.0.1:0").unwrap();
        let port = server.port().unwrap();
        let err = std::thread::scope(|s| {
            let peer = s.spawn(move || fetch_id(&format!("127.0.0.1:{port}"), 1, 3, Duration::from_secs(10)));
            let e = server.serve(2, &[1, 2, 3], Duration::from_secs(10)).unwrap_err().to_string();
            assert!(peer.join().unwrap().is_err());
            e
        });
        assert!(err.contains("world of 3"), "{err}");
        let server = RendezvousServer::bind("127.0.0.1:0").unwrap();
        let e = server.serve(2, &[0; 128], Duration::from_millis(100)).unwrap_err().to_string();
        assert!(e.contains("timed out") && e.contains("[1]"), "{e}");
        // The full rendezvous over a spec: rank 0 makes the id, rank 1 fetches it.
        let port = RendezvousServer::bind("127.0.0.1:0").unwrap().port().unwrap();
        let spec = |rank| GroupSpec {
            rank,
            world: 2,
            master_addr: "127.0.0.1".into(),
            port,
            timeout: Duration::from_secs(20),
        };
        let (a, b) = std::thread::scope(|s| {
            let r1 = s.spawn(|| rendezvous(&spec(1), || unreachable!("only rank 0 makes the id")).unwrap());
            let r0 = rendezvous(&spec(0), || Ok(vec![9; 128])).unwrap();
            (r0, r1.join().unwrap())
        });
        assert_eq!(a, b);
    }

    #[test]
    fn addresses_bracket_ipv6_and_listen_on_every_interface_unless_loopback() {
        assert_eq!(host_port("node0", 29500), "node0:29500");
        assert_eq!(host_port("10.0.0.1", 1), "10.0.0.1:1");
        assert_eq!(host_port("fe80::1", 7), "[fe80::1]:7");
        assert_eq!(listen_addr("127.0.0.1", 29500), "127.0.0.1:29500");
        assert_eq!(listen_addr("::1", 29500), "[::1]:29500");
        assert_eq!(listen_addr("10.1.2.3", 29501), "0.0.0.0:29501");
        assert_eq!(listen_addr("fd00::5", 29501), "[::]:29501");
        // A name that does not resolve here is another node's: listen everywhere.
        assert_eq!(listen_addr("no-such-host.invalid", 9), "0.0.0.0:9");
    }

    #[test]
    fn nccl_without_a_device_is_an_error_not_a_panic() {
        if crate::ops::cuda::is_available() {
            return; // A machine with a GPU runs the real path in tests/gpu.
        }
        let e = NcclComm::single(0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!e.is_empty());
        let spec = GroupSpec::unreachable(0, 2);
        let t0 = Instant::now();
        assert!(NcclComm::join_ranks(Vec::new(), &spec).is_err());
        assert!(t0.elapsed() < Duration::from_secs(60), "refused without waiting for the other ranks");
    }
}
