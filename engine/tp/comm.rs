//! The [`Communicator`] trait and its in-process implementation ([`LocalComm`]) for ranks running as threads.

use std::sync::{Arc, Condvar, Mutex};

use crate::{Error, Result};

/// Collective operations over a tensor-parallel group. Every rank must call the same collectives in the same order
/// with the same lengths; a collective returns once every rank has taken part.
pub trait Communicator {
    /// This rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Replaces `buf` with the element-wise sum of every rank's `buf`.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Writes every rank's `send` into `recv` (`world() * send.len()` values), rank 0's first.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

struct State {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
    slots: Vec<Vec<f32>>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of an in-process group: ranks are threads of one process and exchange data through shared memory.
///
/// The all-reduce sums in rank order `0, 1, ..., N-1` on every rank, so all ranks hold bit-identical results.
/// If any rank calls [`abort`](LocalComm::abort) (for example because its step failed), every pending and later
/// collective of the group returns an error instead of waiting forever.
#[derive(Clone)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalComm {
    /// A group of `world` ranks; hand element `r` to the thread that runs rank `r`.
    pub fn group(world: usize) -> Result<Vec<LocalComm>> {
        if world == 0 {
            return Err(Error::request("a communicator group needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State { arrived: 0, generation: 0, aborted: None, slots: vec![Vec::new(); world] }),
            cv: Condvar::new(),
        });
        Ok((0..world).map(|rank| LocalComm { rank, shared: shared.clone() }).collect())
    }

    /// Marks the group as failed: every rank's pending and future collectives return an error naming `why`.
    pub fn abort(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {}: {why}", self.rank));
        }
        self.shared.cv.notify_all();
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.shared.state.lock().map_err(|_| Error::Backend("tensor-parallel group: a rank panicked".into()))
    }

    /// Waits until every rank has arrived (one generation of the barrier).
    fn wait<'a>(&'a self, mut st: std::sync::MutexGuard<'a, State>) -> Result<std::sync::MutexGuard<'a, State>> {
        if let Some(why) = &st.aborted {
            return Err(Error::Backend(format!("tensor-parallel group aborted ({why})")));
        }
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(st);
        }
        while st.generation == gen && st.aborted.is_none() {
            st =
                self.shared.cv.wait(st).map_err(|_| Error::Backend("tensor-parallel group: a rank panicked".into()))?;
        }
        if st.generation == gen {
            let why = st.aborted.clone().unwrap_or_default();
            return Err(Error::Backend(format!("tensor-parallel group aborted ({why})")));
        }
        Ok(st)
    }

    /// Deposits `data` in this rank's slot, waits for every rank, and checks that all slots have the same length.
    fn exchange(&self, data: &[f32], op: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut st = self.lock()?;
        st.slots[self.rank].clear();
        st.slots[self.rank].extend_from_slice(data);
        let st = self.wait(st)?;
        if let Some((r, s)) = st.slots.iter().enumerate().find(|(_, s)| s.len() != data.len()) {
            return Err(Error::Backend(format!(
                "{op}: rank {} sent {} values but rank {r} sent {}",
                self.rank,
                data.len(),
                s.len()
            )));
        }
        Ok(st)
    }

    /// The second barrier of a collective: no rank may overwrite its slot until every rank has read all slots.
    fn finish(&self, st: std::sync::MutexGuard<'_, State>) -> Result<()> {
        self.wait(st).map(drop)
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let st = self.exchange(buf, "all_reduce")?;
        buf.copy_from_slice(&st.slots[0]);
        for slot in &st.slots[1..] {
            for (b, s) in buf.iter_mut().zip(slot) {
                *b += *s;
            }
        }
        self.finish(st)
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let n = send.len();
        if recv.len() != n * self.shared.world {
            return Err(Error::Backend(format!(
                "all_gather: receive buffer holds {} values, expected {} x {n}",
                recv.len(),
                self.shared.world
            )));
        }
        if self.shared.world == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        let st = self.exchange(send, "all_gather")?;
        for (dst, slot) in recv.chunks_mut(n.max(1)).zip(&st.slots) {
            dst.copy_from_slice(slot);
        }
        self.finish(st)
    }

    fn barrier(&self) -> Result<()> {
        let st = self.lock()?;
        self.wait(st).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_and_gather_concatenates() {
        let world = 4;
        let comms = LocalComm::group(world).unwrap();
        // Values whose float sum depends on the order: rank order 0..N gives (((1e8 + 1) + -1e8) + 1) = 1 + ...
        let inputs: Vec<Vec<f32>> = vec![vec![1e8, 1.0], vec![1.0, 2.0], vec![-1e8, 3.0], vec![1.0, 4.0]];
        let expect0 = ((1e8f32 + 1.0) + -1e8) + 1.0;
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .zip(inputs.clone())
                .map(|(c, mut v)| {
                    s.spawn(move || {
                        let mine = v.clone();
                        c.all_reduce_sum_f32(&mut v).unwrap();
                        c.barrier().unwrap();
                        let mut g = vec![0.0; 2 * c.world()];
                        c.all_gather_f32(&mine, &mut g).unwrap();
                        (v, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let flat: Vec<f32> = inputs.concat();
        for (sum, gathered) in &results {
            assert_eq!(sum[0].to_bits(), expect0.to_bits());
            assert_eq!(sum[1], 10.0);
            assert_eq!(gathered, &flat);
        }
    }

    #[test]
    fn an_aborted_rank_releases_the_others_and_lengths_are_checked() {
        let comms = LocalComm::group(3).unwrap();
        let errs: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        if c.rank() == 2 {
                            c.abort("failed before the collective");
                            return true;
                        }
                        let mut v = vec![1.0; 4];
                        c.all_reduce_sum_f32(&mut v).is_err()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errs.iter().all(|&e| e));

        let comms = LocalComm::group(2).unwrap();
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut v = vec![1.0; 2 + c.rank()];
                        c.all_reduce_sum_f32(&mut v).unwrap_err().to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errs.iter().all(|e| e.contains("sent")), "{errs:?}");
    }
}
