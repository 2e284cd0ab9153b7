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
//! A new job's prompt may share more with another sequence's cache than with any free
//! sequence's own: a system prompt or a document many concurrent requests start with, or the
//! same prompt sent by several clients at once. That sequence's cache (busy or free) is then
//! copied into the job's sequence first and only the rest is read (vLLM's automatic prefix
//! caching does the same across requests; llama-server's slots reuse only their own). A busy
//! sequence offers what its cache holds of its prompt so far (prompts are read a chunk per
//! decode step, see `batch::decode_step`); a job that would copy more from a sequence still
//! reading waits until it has ([`Sequences::awaits_donor`]). The sequences are separate streams,
//! and llama.cpp copies a stream whole (every cell of a sequence's context, at the next decode,
//! before anything else is computed), so a copy is taken only when it saves at least
//! [`Sequences::min_copy`] tokens.
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
    /// How many of `tokens` the cache holds now: all of them, but for a busy sequence whose
    /// prompt is still being read.
    read: usize,
}

/// The sequences of one epoch's generation context and their caches.
#[derive(Debug)]
pub(super) struct Sequences {
    seqs: Vec<Cached>,
    /// `settings.engine.prefix_reuse`: off, every cache is forgotten when its job ends.
    reuse: bool,
    clock: u64,
    /// The fewest tokens a copy from another sequence must save (see the module doc).
    min_copy: usize,
}

/// Where a job runs: its sequence, and how many of its prompt's first tokens the sequence's
/// cache holds (they are not read again), once sequence `from`'s cache, when named, has been
/// copied into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placement {
    pub(super) seq: i32,
    pub(super) keep: usize,
    pub(super) from: Option<i32>,
}

impl Sequences {
    /// `parallel` sequences of `n_ctx_seq` cells each.
    pub(super) fn new(parallel: usize, reuse: bool, n_ctx_seq: usize) -> Self {
        Self {
            seqs: (0..parallel.max(1)).map(|_| Cached::default()).collect(),
            reuse,
            clock: 0,
            // Copying a stream moves `n_ctx_seq` cells; reading one prompt token computes the
            // whole model for it, far more than moving 128 cells of its cache.
            min_copy: (n_ctx_seq / 128).max(16),
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
        let shared = |c: &Cached| self.shared(c, prompt, head).min(c.read);
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
        let most = prompt.len().saturating_sub(1);
        let own = shared(&self.seqs[index]).min(most);
        // Another sequence, busy or free, holding more of the prompt: copied in when worth it.
        let donor = self
            .seqs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(i, c)| (i, shared(c).min(most)))
            .filter(|(_, n)| *n >= own + self.min_copy)
            .max_by_key(|(i, n)| (*n, std::cmp::Reverse(*i)));
        let (keep, from) = match donor {
            Some((d, n)) => (n, Some(i32::try_from(d).ok()?)),
            None => (own, None),
        };
        self.clock += 1;
        let cached = &mut self.seqs[index];
        cached.busy = true;
        cached.used = self.clock;
        // What the sequence will hold once its prompt is read; it holds `keep` of it now
        // ([`Self::mark_read`] follows the read), and another job may copy what it holds.
        prompt.clone_into(&mut cached.tokens);
        cached.read = keep;
        cached.head.clone_from(head);
        Some(Placement {
            seq: i32::try_from(index).ok()?,
            keep,
            from,
        })
    }

    /// How many tokens of `c`'s cache (once read) `prompt` starts with, when it may be reused.
    fn shared(&self, c: &Cached, prompt: &[LlamaToken], head: &Head) -> usize {
        if self.reuse && head.is_none() && c.head.is_none() {
            common_prefix(&c.tokens, prompt)
        } else {
            0
        }
    }

    /// Whether a job with this prompt should wait: a busy sequence still reading its prompt will
    /// hold enough more of it (a shared system prompt or document sent by several requests at
    /// once) to be worth copying once read, than any sequence holds now.
    pub(super) fn awaits_donor(&self, prompt: &[LlamaToken], head: &Head) -> bool {
        let most = prompt.len().saturating_sub(1);
        let now = self
            .seqs
            .iter()
            .map(|c| self.shared(c, prompt, head).min(c.read).min(most))
            .max()
            .unwrap_or(0);
        self.seqs.iter().any(|c| {
            c.busy
                && c.read < c.tokens.len()
                && self.shared(c, prompt, head).min(most) >= now + self.min_copy
        })
    }

    /// The job on `seq` has read `read` tokens of its prompt into the cache.
    pub(super) fn mark_read(&mut self, seq: i32, read: usize) {
        if let Some(c) = self.cached_mut(seq) {
            c.read = read.min(c.tokens.len());
        }
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
            c.read = c.tokens.len();
        }
    }

    /// `seq` is free and its cache empty (cleared, or unknown after a failure and cleared).
    pub(super) fn clear(&mut self, seq: i32) {
        if let Some(c) = self.cached_mut(seq) {
            c.busy = false;
            c.tokens.clear();
            c.read = 0;
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

    /// Places a job and has it read its whole prompt.
    fn read_whole(seqs: &mut Sequences, prompt: &[i32], head: &Head) -> Placement {
        let p = seqs.place(&toks(prompt), head).unwrap();
        seqs.mark_read(p.seq, prompt.len());
        p
    }

    fn head(name: &str) -> Head {
        Some((name.to_string(), 1.0f32.to_bits()))
    }

    #[test]
    fn a_conversations_next_turn_goes_where_its_history_is() {
        let mut seqs = Sequences::new(3, true, 2048);
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
                keep: 6,
                from: None
            }
        );
    }

    #[test]
    fn a_prompt_wholly_cached_still_reads_its_last_token() {
        let mut seqs = Sequences::new(1, true, 2048);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.release(p.seq, toks(&[1, 2, 3, 4]), None);
        assert_eq!(seqs.place(&toks(&[1, 2, 3]), &None).unwrap().keep, 2);
    }

    #[test]
    fn only_base_model_caches_are_reused() {
        let mut seqs = Sequences::new(1, true, 2048);
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
        let mut seqs = Sequences::new(2, true, 2048);
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
                keep: 3,
                from: None
            }
        );
    }

    #[test]
    fn busy_sequences_are_not_taken_and_the_lru_one_goes_first() {
        let mut seqs = Sequences::new(2, true, 2048);
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
        let mut seqs = Sequences::new(1, false, 2048);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.release(p.seq, toks(&[1, 2, 3, 4]), None);
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 4, 5]), &None).unwrap().keep, 0);
        assert!(!seqs.reuse());
    }

    #[test]
    fn a_cleared_sequence_reuses_nothing() {
        let mut seqs = Sequences::new(1, true, 2048);
        let p = seqs.place(&toks(&[1, 2, 3]), &None).unwrap();
        seqs.clear(p.seq);
        assert_eq!(seqs.place(&toks(&[1, 2, 3, 4]), &None).unwrap().keep, 0);
    }

    #[test]
    fn a_prompt_another_sequence_holds_is_copied_from_it_busy_or_not() {
        let mut seqs = Sequences::new(4, true, 2048);
        let prompt: Vec<i32> = (0..40).collect();
        let a = seqs.place(&toks(&prompt), &None).unwrap();
        assert_eq!((a.keep, a.from), (0, None));
        seqs.mark_read(a.seq, 40);
        // The same prompt while `a` still runs: its cache is copied, all but the last token kept.
        let b = seqs.place(&toks(&prompt), &None).unwrap();
        assert_ne!(b.seq, a.seq);
        assert_eq!((b.keep, b.from), (39, Some(a.seq)));
        // A longer prompt starting the same way (a system prompt, a shared document).
        let longer: Vec<i32> = (0..30).chain(100..120).collect();
        let c = seqs.place(&toks(&longer), &None).unwrap();
        assert_eq!((c.keep, c.from), (30, Some(a.seq)));
        // A finished job's cache serves too, and is left whole (it is copied, not taken).
        seqs.release(a.seq, toks(&(0..200).collect::<Vec<_>>()), None);
        seqs.release(b.seq, toks(&[7; 16]), None);
        seqs.release(c.seq, toks(&[8; 16]), None);
        let d = seqs.place(&toks(&(0..20).chain(200..300).collect::<Vec<_>>()), &None);
        let d = d.unwrap();
        assert_ne!(d.seq, a.seq, "a long cache sharing little is spared");
        assert_eq!((d.keep, d.from), (20, Some(a.seq)));
    }

    #[test]
    fn a_sequence_still_reading_offers_what_it_holds_and_a_job_that_would_copy_more_waits() {
        let mut seqs = Sequences::new(4, true, 2048);
        let prompt: Vec<i32> = (0..100).collect();
        let a = seqs.place(&toks(&prompt), &None).unwrap();
        // Nothing read yet: the same prompt waits for it rather than read it a second time.
        assert!(seqs.awaits_donor(&toks(&prompt), &None));
        // A prompt that shares too little with it to be worth a copy does not wait.
        let other: Vec<i32> = (0..10).chain(500..600).collect();
        assert!(!seqs.awaits_donor(&toks(&other), &None));
        // Nor under a head (its cache is never shared).
        assert!(!seqs.awaits_donor(&toks(&prompt), &head("x")));
        // Half read: placed now, it would copy only that half; still worth waiting for the rest.
        seqs.mark_read(a.seq, 50);
        assert!(seqs.awaits_donor(&toks(&prompt), &None));
        let early = seqs.place(&toks(&prompt), &None).unwrap();
        assert_eq!((early.keep, early.from), (50, Some(a.seq)));
        // All read: nothing more to wait for; a copy takes all but the last token.
        seqs.mark_read(a.seq, 100);
        assert!(!seqs.awaits_donor(&toks(&prompt), &None));
        let b = seqs.place(&toks(&prompt), &None).unwrap();
        assert_eq!((b.keep, b.from), (99, Some(a.seq)));
    }

    #[test]
    fn a_copy_must_save_enough_and_never_crosses_heads_or_reuse_off() {
        let prompt: Vec<i32> = (0..40).collect();
        // Too little shared for a stream copy (16 tokens at least; 1/128 of a long context).
        let mut seqs = Sequences::new(2, true, 2048);
        read_whole(&mut seqs, &prompt, &None);
        let short: Vec<i32> = (0..15).chain(500..520).collect();
        assert_eq!(seqs.place(&toks(&short), &None).unwrap().from, None);
        let mut seqs = Sequences::new(2, true, 32768);
        read_whole(&mut seqs, &prompt, &None);
        assert_eq!(
            seqs.place(&toks(&prompt), &None).unwrap().from,
            None,
            "39 < 256"
        );
        // Not under a head, nor from a cache made under one.
        let mut seqs = Sequences::new(3, true, 2048);
        read_whole(&mut seqs, &prompt, &head("x"));
        assert_eq!(seqs.place(&toks(&prompt), &None).unwrap().from, None);
        assert_eq!(seqs.place(&toks(&prompt), &head("x")).unwrap().from, None);
        // Reuse off: nothing is shared.
        let mut seqs = Sequences::new(2, false, 2048);
        read_whole(&mut seqs, &prompt, &None);
        assert_eq!(
            seqs.place(&toks(&prompt), &None).unwrap(),
            Placement {
                seq: 1,
                keep: 0,
                from: None
            }
        );
    }
}
