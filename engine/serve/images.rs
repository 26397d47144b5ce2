//! The serving engine's image sets: which requests hold each set registered with the executor, and when its
//! padding tiles can be freed.
//!
//! A set's cross-attention K/V cover every tile of its images, padding tiles included, because the prompt rows
//! before the first `<|image|>` see no image and attend over every tile (as transformers does). Once every
//! sequence holding the set has run those rows, [`ImageSets::after_step`] asks the executor to free the padding
//! tiles ([`Executor::trim_images`]), so the set stays sized by its real tile count for the rest of the
//! generation. A sequence that must run such rows again (it was preempted and recomputes its prompt, or a later
//! request with the same images arrives) gets the full set back before its step ([`ImageSets::before_step`]),
//! registered again from the encoded images kept here.
//!
//! A device keeps cross-attention K/V in a pool of bounded size. A request whose images do not fit yet waits here
//! ([`ImageSets::park`]), in arrival order, until sets are trimmed or removed, instead of being refused.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc as tmpsc;

use super::{Event, GenerateRequest};
use crate::exec::Executor;
use crate::kv::prefix::SeqId;
use crate::sched::StepPlan;
use crate::vision::pipeline::EncodedImages;
use crate::{Error, Result};

/// One set registered with the executor.
struct ImageSet {
    /// Requests holding it.
    refs: usize,
    /// The encoded images, to register the full set again after a trim.
    encoded: Arc<EncodedImages>,
    /// Whether the executor has freed its padding tiles.
    trimmed: bool,
}

/// A request waiting for room in the executor's cross-attention pool.
pub struct Parked {
    /// The engine's request id.
    pub id: u64,
    /// The request (with its images).
    pub req: GenerateRequest,
    /// Where its events go.
    pub events: tmpsc::UnboundedSender<Event>,
}

/// Image sets registered with the executor, with their holders and trim state, and the requests waiting for room.
#[derive(Default)]
pub struct ImageSets {
    sets: HashMap<u64, ImageSet>,
    parked: VecDeque<Parked>,
    /// Sequences (with their set) that still have prompt rows seeing no image to run.
    pending: HashMap<SeqId, u64>,
    /// Sets trimmed so far, and sets registered again after a trim.
    trims: u64,
    readds: u64,
}

impl ImageSets {
    /// Takes a request's reference to set `key`, registering the images with `exec` on first use.
    pub fn retain(&mut self, exec: &mut dyn Executor, key: u64, encoded: &Arc<EncodedImages>) -> Result<()> {
        match self.sets.get_mut(&key) {
            Some(set) => set.refs += 1,
            None => {
                exec.add_images(key, encoded)?;
                self.sets.insert(key, ImageSet { refs: 1, encoded: encoded.clone(), trimmed: false });
            }
        }
        Ok(())
    }

    /// Records that sequence `seq` of a request holding set `key` has not run its prompt yet.
    pub fn add_seq(&mut self, seq: SeqId, key: u64) {
        self.pending.insert(seq, key);
    }

    /// Forgets a finished or aborted sequence.
    pub fn seq_done(&mut self, seq: SeqId) {
        self.pending.remove(&seq);
    }

    /// Drops a request's reference to set `key`; the last one removes the set from `exec`.
    pub fn release(&mut self, exec: &mut dyn Executor, key: Option<u64>) {
        let Some(key) = key else { return };
        if let Some(set) = self.sets.get_mut(&key) {
            set.refs -= 1;
            if set.refs == 0 {
                self.sets.remove(&key);
                exec.remove_images(key);
            }
        }
    }

    /// Before `plan` runs: a chunk whose first row sees no image needs its set's padding tiles, so a trimmed set
    /// is registered again in full, and the chunk's sequence counts as pending until a step ends on a row that
    /// sees an image. Returns the sequences whose set could not be registered again (the pool filled up after
    /// their request was admitted, or they recompute after a preemption): the caller fails their requests alone
    /// and plans again, instead of failing the step and every request with it. The set stays as it was.
    pub fn before_step(&mut self, exec: &mut dyn Executor, plan: &StepPlan) -> Vec<(SeqId, Error)> {
        let mut refused = Vec::new();
        for (chunk, im) in plan.chunks.iter().zip(&plan.images) {
            let Some(im) = im else { continue };
            let row_len = im.mask.len() / chunk.len.max(1);
            let first_sees = im.mask.get(..row_len).is_some_and(|r| r.contains(&1));
            if first_sees || row_len == 0 {
                continue;
            }
            if let Some(set) = self.sets.get_mut(&im.key) {
                if set.trimmed {
                    if let Err(e) = exec.add_images(im.key, &set.encoded) {
                        refused.push((chunk.seq, e));
                        continue;
                    }
                    set.trimmed = false;
                    self.readds += 1;
                }
            }
            self.pending.insert(chunk.seq, im.key);
        }
        refused
    }

    /// After `plan` ran: sequences whose last row saw an image have no rows seeing none left (the processor's
    /// mask sees an image from the first `<|image|>` on), and every set no pending sequence holds is trimmed.
    pub fn after_step(&mut self, exec: &mut dyn Executor, plan: &StepPlan) -> Result<()> {
        for (chunk, im) in plan.chunks.iter().zip(&plan.images) {
            let Some(im) = im else { continue };
            let row_len = im.mask.len() / chunk.len.max(1);
            if row_len > 0 && im.mask[im.mask.len() - row_len..].contains(&1) {
                self.pending.remove(&chunk.seq);
            }
        }
        let busy: HashSet<u64> = self.pending.values().copied().collect();
        for (&key, set) in &mut self.sets {
            if !set.trimmed && !busy.contains(&key) {
                exec.trim_images(key)?;
                set.trimmed = true;
                self.trims += 1;
            }
        }
        Ok(())
    }

    /// Whether a request with image set `key` (images of `num_tiles` tiles) can be admitted now: its set is
    /// registered whole already, or the executor has room for the whole set (a trimmed set may have to be
    /// registered again in full for the request's rows before its first image). `Ok(false)`: not until other sets
    /// go; an error: never.
    pub fn admits(&self, exec: &dyn Executor, key: u64, num_tiles: &[usize]) -> Result<bool> {
        if self.sets.get(&key).is_some_and(|s| !s.trimmed) {
            return Ok(true);
        }
        exec.images_fit(num_tiles)
    }

    /// Queues a request until its images fit (after the requests queued before it).
    pub fn park(&mut self, p: Parked) {
        self.parked.push_back(p);
    }

    /// Sequences of the parked requests.
    pub fn parked_seqs(&self) -> usize {
        self.parked.iter().map(|p| p.req.best_of.max(p.req.n)).sum()
    }

    /// Removes parked request `id`; returns whether it was parked.
    pub fn unpark_id(&mut self, id: u64) -> bool {
        let before = self.parked.len();
        self.parked.retain(|p| p.id != id);
        self.parked.len() != before
    }

    /// The oldest parked request, if its images fit now (or can never fit: registering it then reports why).
    pub fn pop_fitting(&mut self, exec: &dyn Executor) -> Option<Parked> {
        let p = self.parked.front()?;
        let im = p.req.images.as_ref()?;
        match self.admits(exec, im.hash, &im.encoded.num_tiles) {
            Ok(false) => None,
            Ok(true) | Err(_) => self.parked.pop_front(),
        }
    }

    /// Takes every parked request (shutdown, failures).
    pub fn take_parked(&mut self) -> Vec<Parked> {
        self.parked.drain(..).collect()
    }

    /// Registered sets.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// Whether no set is registered.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// (sets trimmed, sets registered again after a trim) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.trims, self.readds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::exec::{StepInput, StepOutput};
    use crate::sched::{PlanImages, PlannedChunk};

    /// Records the image calls it gets; refuses every `add_images` while `full` (a pool with no room).
    struct Recorder {
        cfg: LlamaConfig,
        log: Vec<String>,
        full: bool,
    }

    impl Default for Recorder {
        fn default() -> Self {
            Recorder { cfg: crate::config::Preset::Llama32_1B.config(), log: Vec::new(), full: false }
        }
    }

    impl Executor for Recorder {
        fn config(&self) -> &LlamaConfig {
            &self.cfg
        }
        fn block_size(&self) -> usize {
            16
        }
        fn num_blocks(&self) -> usize {
            1
        }
        fn step(&mut self, _: &StepInput) -> Result<StepOutput> {
            Ok(StepOutput::default())
        }
        fn add_images(&mut self, key: u64, _: &EncodedImages) -> Result<()> {
            if self.full {
                return Err(Error::request("4 tiles do not fit"));
            }
            self.log.push(format!("add {key}"));
            Ok(())
        }
        fn remove_images(&mut self, key: u64) -> bool {
            self.log.push(format!("remove {key}"));
            true
        }
        fn trim_images(&mut self, key: u64) -> Result<bool> {
            self.log.push(format!("trim {key}"));
            Ok(true)
        }
    }

    /// A plan of chunks `(seq, key, mask rows)`, each row 2 tiles wide (one image of 2 tiles).
    fn plan(chunks: &[(SeqId, u64, &[[u8; 2]])]) -> StepPlan {
        StepPlan {
            input: StepInput::default(),
            chunks: chunks
                .iter()
                .map(|&(seq, _, rows)| PlannedChunk { seq, start: 0, len: rows.len(), sample: true })
                .collect(),
            images: chunks
                .iter()
                .map(|&(_, key, rows)| Some(PlanImages { key, mask: rows.iter().flatten().copied().collect() }))
                .collect(),
            logits_seqs: Vec::new(),
            sample_rows: Vec::new(),
            prompt_rows: Vec::new(),
        }
    }

    fn encoded() -> Arc<EncodedImages> {
        Arc::new(EncodedImages { states: vec![0.0; 4], num_tiles: vec![1] })
    }

    #[test]
    fn a_set_is_trimmed_once_every_holder_ran_its_rows_before_the_image() {
        let (mut ex, mut sets) = (Recorder::default(), ImageSets::default());
        sets.retain(&mut ex, 7, &encoded()).unwrap();
        sets.add_seq(1, 7);
        sets.retain(&mut ex, 7, &encoded()).unwrap();
        sets.add_seq(2, 7);
        assert_eq!(ex.log, ["add 7"]);
        // Seq 1 runs its whole prompt (a row before the image, then rows that see it); seq 2 only a first chunk
        // of rows before the image: the set stays whole.
        let p = plan(&[(1, 7, &[[0, 0], [1, 0], [1, 0]]), (2, 7, &[[0, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 7"]);
        // Seq 2 reaches the image: now it can go.
        let p = plan(&[(1, 7, &[[1, 0]]), (2, 7, &[[0, 0], [1, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 7", "trim 7"]);
        assert_eq!(sets.counts(), (1, 0));
        // Decode steps change nothing.
        let p = plan(&[(1, 7, &[[1, 0]]), (2, 7, &[[1, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log.len(), 2);
        // Seq 2 is preempted and recomputes its prompt: the full set comes back first, then goes again.
        let p = plan(&[(2, 7, &[[0, 0], [1, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        assert_eq!(ex.log, ["add 7", "trim 7", "add 7"]);
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 7", "trim 7", "add 7", "trim 7"]);
        assert_eq!(sets.counts(), (2, 1));
        sets.release(&mut ex, Some(7));
        assert_eq!(sets.len(), 1);
        sets.release(&mut ex, Some(7));
        assert!(sets.is_empty());
        assert_eq!(ex.log.last().map(String::as_str), Some("remove 7"));
    }

    /// A trimmed set that does not fit back (the pool filled up after its request was admitted) refuses that
    /// sequence alone, and stays trimmed and registered for the sequences already past their image; once there is
    /// room it comes back.
    #[test]
    fn a_readd_that_does_not_fit_refuses_its_sequence_alone() {
        let (mut ex, mut sets) = (Recorder::default(), ImageSets::default());
        sets.retain(&mut ex, 7, &encoded()).unwrap();
        sets.add_seq(1, 7);
        let p = plan(&[(1, 7, &[[0, 0], [1, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 7", "trim 7"]);
        sets.retain(&mut ex, 7, &encoded()).unwrap();
        sets.add_seq(2, 7);
        ex.full = true;
        // Seq 1 decodes (its row sees the image) beside seq 2's first chunk, which needs the padding tiles.
        let p = plan(&[(1, 7, &[[1, 0]]), (2, 7, &[[0, 0], [1, 0]])]);
        let refused = sets.before_step(&mut ex, &p);
        assert_eq!(refused.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
        assert!(refused[0].1.to_string().contains("do not fit"), "{}", refused[0].1);
        assert_eq!((ex.log.len(), sets.counts()), (2, (1, 0)), "nothing registered, the set still trimmed");
        // The engine fails seq 2's request and plans again; with room, a later holder gets the set back.
        sets.seq_done(2);
        sets.release(&mut ex, Some(7));
        ex.full = false;
        sets.retain(&mut ex, 7, &encoded()).unwrap();
        sets.add_seq(3, 7);
        let p = plan(&[(1, 7, &[[1, 0]]), (3, 7, &[[0, 0], [1, 0]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        assert_eq!((ex.log.last().map(String::as_str), sets.counts()), (Some("add 7"), (1, 1)));
    }

    #[test]
    fn a_waiting_holder_keeps_the_set_whole_until_it_runs() {
        let (mut ex, mut sets) = (Recorder::default(), ImageSets::default());
        sets.retain(&mut ex, 3, &encoded()).unwrap();
        sets.add_seq(1, 3);
        sets.retain(&mut ex, 3, &encoded()).unwrap();
        sets.add_seq(2, 3);
        // Only seq 1 runs; seq 2 is still waiting, unscheduled.
        let p = plan(&[(1, 3, &[[0, 0], [0, 1]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 3"]);
        // Seq 2 finishes without ever running (aborted): the set is trimmed after the next step.
        sets.seq_done(2);
        let p = plan(&[(1, 3, &[[0, 1]])]);
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 3", "trim 3"]);
        // A prompt that starts with its image never needs the padding tiles.
        sets.retain(&mut ex, 4, &encoded()).unwrap();
        sets.add_seq(5, 4);
        let p = plan(&[(5, 4, &[[1, 1], [1, 1]])]);
        assert!(sets.before_step(&mut ex, &p).is_empty());
        sets.after_step(&mut ex, &p).unwrap();
        assert_eq!(ex.log, ["add 3", "trim 3", "add 4", "trim 4"]);
    }
}
