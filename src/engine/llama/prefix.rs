//! Prefix reuse: which sequence of the generation context a new job goes to, and how much of its
//! prompt that sequence's KV cache already holds (llama.cpp server's `cache_prompt`).
//!
//! A sequence keeps its cache when its job ends: the prompt and every token fed while generating
//! (not the last one sampled, which was never decoded), and the LoRA head they were computed
//! under. A new job goes to the free sequence whose cache shares the longest start with its
//! prompt; the rest of the cache is cut off and only the rest of the prompt is read. The
//! sequences are separate streams of the KV cache (the context is not created unified), so a
//! stale cache never takes room from another sequence and needs no eviction; a new epoch starts
//! with empty caches (fresh contexts).
//!
//! Only base-model caches are reused. Reuse reads a prompt's last tokens in a smaller batch than
//! a full read would, and llama.cpp does not promise bit-identical logits across batch sizes.
//! With the quantized base weights the answers come out the same (greedy and seeded, tested);
//! under the test LoRA adapter (F32 matrices) a reused prompt's greedy answer drifted after ~17
//! tokens. Jobs under a head therefore read their whole prompt, so a seeded request still
//! repeats exactly under any head, and no cache computed under a head serves the base model.
//!
//! Pure bookkeeping, so it is tested without a model; `batch` and `thread` do the cache edits.

use llama_cpp_2::token::LlamaToken;

/// The head a cache was computed under (adapter name, scale bits); `None` = the base model.
pub(super) type Head = Option<(String, u32)>;

/// What one sequence's KV cache holds.
#[derive(Debug, Default)]
struct Cached {
    /// Tokens at positions `0..len`, in order.
    tokens: Vec<LlamaToken>,
    head: Head,
    /// When its last job was placed (a tick of [`Sequences::clock`]), for least-recently-used.
    used: u64,
    /// A job runs on it.
    busy: bool,
}

/// The sequences of one epoch's generation context and their caches.
#[derive(Debug)]
pub(super) struct Sequences {
    seqs: Vec<Cached>,
    /// `settings.engine.prefix_reuse`: off, every cache is forgotten when its job ends.
    reuse: bool,
    clock: u64,
}

/// Where a job runs: its sequence, and how many of its prompt's first tokens the sequence's
/// cache already holds (they are not read again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placement {
    pub(super) seq: i32,
    pub(super) keep: usize,
}

impl Sequences {
    pub(super) fn new(parallel: usize, reuse: bool) -> Self {
        Self {
            seqs: (0..parallel.max(1)).map(|_| Cached::default()).collect(),
            reuse,
            clock: 0,
        }
    }

    pub(super) fn has_free(&self) -> bool {
        self.seqs.iter().any(|c| !c.busy)
    }

    /// Takes a free sequence for a job with this (non-empty) prompt and head: the one whose
    /// cache shares the longest start with the prompt, when it keeps enough of that cache to be
    /// worth taking over (a fifth of it: a conversation's next turn keeps nearly all, another
    /// conversation sharing only a system prompt keeps little and would destroy a long cache);
    /// else an empty sequence, else the least recently used. At least the prompt's last token
    /// is always read again, for its logits. `None` when every sequence is busy.
    pub(super) fn place(&mut self, prompt: &[LlamaToken], head: &Head) -> Option<Placement> {
        let shared = |c: &Cached| {
            if self.reuse && head.is_none() && c.head.is_none() {
                common_prefix(&c.tokens, prompt)
            } else {
                0
            }
        };
        let free = || self.seqs.iter().enumerate().filter(|(_, c)| !c.busy);
        let worth = free()
            .map(|(i, c)| (i, shared(c), c))
            .filter(|(_, n, c)| *n > 0 && 4 * n >= c.tokens.len() - n)
            .max_by_key(|(i, n, c)| {
                (
                    *n,
                    std::cmp::Reverse(c.tokens.len()),
                    std::cmp::Reverse(c.used),
                    std::cmp::Reverse(*i),
                )
            })
            .map(|(i, _, _)| i);
        let index = worth
            .or_else(|| free().find(|(_, c)| c.tokens.is_empty()).map(|(i, _)| i))
            .or_else(|| free().min_by_key(|(_, c)| c.used).map(|(i, _)| i))?;
        let keep = shared(&self.seqs[index]).min(prompt.len().saturating_sub(1));
        self.clock += 1;
        let cached = &mut self.seqs[index];
        cached.busy = true;
        cached.used = self.clock;
        cached.tokens.truncate(keep);
        cached.head.clone_from(head);
        Some(Placement {
            seq: i32::try_from(index).ok()?,
            keep,
        })
    }

    /// The job on `seq` ended; its cache holds `tokens`, computed under `head` (forgotten when
    /// prefix reuse is off: the caller clears the cache then).
    pub(super) fn release(&mut self, seq: i32, tokens: Vec<LlamaToken>, head: Head) {
        let reuse = self.reuse;
        if let Some(c) = self.cached_mut(seq) {
            c.busy = false;
            if reuse {
                c.tokens = tokens;
                c.head = head;
            } else {
                c.tokens.clear();
            }
        }
    }

    /// `seq` is free and its cache empty (cleared, or unknown after a failure and cleared).
    pub(super) fn clear(&mut self, seq: i32) {
        if let Some(c) = self.cached_mut(seq) {
            c.busy = false;
            c.tokens.clear();
        }
    }

    /// Whether caches outlive their jobs (`settings.engine.prefix_reuse`).
    pub(super) fn reuse(&self) -> bool {
        self.reuse
    }

    fn cached_mut(&mut self, seq: i32) -> Option<&mut Cached> {
        usize::try_from(seq).ok().and_then(|i| self.seqs.get_mut(i))
    }
}

/// How many first tokens `a` and `b` share.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().copied().map(LlamaToken).collect()
    }

    fn head(name: &str) -> Head {
        Some((name.to_string(), 1.0f32.to_bits()))
    }

    #[test]
    fn a_conversations_next_turn_goes_where_its_history_is() {
        let mut seqs = Sequences::new(3, true);
        let first = toks(&[1, 2, 3, 4]);
        let a = seqs.place(&first, &None).unwrap();
        assert_eq!(a.keep, 0, "nothing cached yet");
        let other = seqs.place(&toks(&[9, 8, 7]), &None).unwrap();
        assert_ne!(a.seq, other.seq);
        // Prompt and answer stay cached; the other job's cache too.
        seqs.release(a.seq, toks(&[1, 2, 3, 4, 5, 6]), None);
        seqs.release(other.seq, toks(&[9, 8, 7, 6]), None);
        let next = seqs.place(&toks(&[1, 2, 3, 4, 5, 6, 7, 8]), &None).unwrap();
        assert_eq!(
            next,
            Placement {
                seq: a.seq,
                keep: 6
            }
        );
    }

    #[test]
    fn a_prompt_wholly_cached_still_reads_its_last_token() {
        let mut seqs = Sequences::new(1, true);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.release(p.seq, toks(&[1, 2, 3, 4]), None);
        assert_eq!(seqs.place(&toks(&[1, 2, 3]), &None).unwrap().keep, 2);
    }

    #[test]
    fn only_base_model_caches_are_reused() {
        let mut seqs = Sequences::new(1, true);
        let p = seqs.place(&toks(&[1, 2, 3]), &head("x")).unwrap();
        seqs.release(p.seq, toks(&[1, 2, 3, 4]), head("x"));
        // Computed under a head: not for the base model, nor (see the module doc) the head.
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 5]), &None).unwrap().keep, 0);
        seqs.release(p.seq, toks(&[1, 2, 3, 5, 6]), head("x"));
        assert_eq!(
            seqs.place(&toks(&[1, 2, 3, 5]), &head("x")).unwrap().keep,
            0
        );
        seqs.release(p.seq, toks(&[1, 2, 3, 5]), None);
        assert_eq!(
            seqs.place(&toks(&[1, 2, 3, 5]), &head("x")).unwrap().keep,
            0
        );
        seqs.release(p.seq, toks(&[1, 2, 3, 5]), None);
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 5, 7]), &None).unwrap().keep, 4);
    }

    #[test]
    fn a_long_cache_sharing_little_is_spared_while_an_empty_sequence_is_free() {
        let mut seqs = Sequences::new(2, true);
        let long: Vec<i32> = (0..100).collect();
        let p = seqs.place(&toks(&long), &None).unwrap();
        seqs.release(p.seq, toks(&long), None);
        // Shares 3 tokens (a system prompt) of a 100-token cache: the empty sequence instead.
        let q = seqs.place(&toks(&[0, 1, 2, 50, 51]), &None).unwrap();
        assert_ne!(q.seq, p.seq);
        assert_eq!(q.keep, 0);
        // With no empty sequence left, the least recently used one, reusing what it shares.
        seqs.release(
            q.seq,
            toks(&[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]),
            None,
        );
        let r = seqs.place(&toks(&[0, 1, 2, 60]), &None).unwrap();
        assert_eq!(
            r,
            Placement {
                seq: p.seq,
                keep: 3
            }
        );
    }

    #[test]
    fn busy_sequences_are_not_taken_and_the_lru_one_goes_first() {
        let mut seqs = Sequences::new(2, true);
        let a = seqs.place(&toks(&[1]), &None).unwrap();
        let b = seqs.place(&toks(&[2]), &None).unwrap();
        assert!(!seqs.has_free());
        assert_eq!(seqs.place(&toks(&[3]), &None), None);
        seqs.release(b.seq, toks(&[2, 2]), None);
        seqs.release(a.seq, toks(&[1, 1]), None);
        // Neither shares anything: `a` was placed first.
        assert_eq!(seqs.place(&toks(&[3]), &None).unwrap().seq, a.seq);
    }

    #[test]
    fn off_every_job_starts_from_an_empty_cache() {
        let mut seqs = Sequences::new(1, false);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.release(p.seq, toks(&[1, 2, 3, 4]), None);
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 4, 5]), &None).unwrap().keep, 0);
        assert!(!seqs.reuse());
    }

    #[test]
    fn a_cleared_sequence_reuses_nothing() {
        let mut seqs = Sequences::new(1, true);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.clear(p.seq);
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 4]), &None).unwrap().keep, 0);
    }
}
