//! Log-probabilities of generated tokens (OpenAI's `logprobs`/`top_logprobs`), from raw
//! logits: a log-softmax over the whole vocabulary, before biases, penalties, grammar,
//! temperature and truncation, as llama.cpp's server reports `n_probs` by default. So a value
//! says how likely the model found the token, whatever the sampling settings were.

use super::{TokenLogprob, TopLogprob};

/// The floor for a log-probability too small for an f32 (OpenAI uses -9999 the same way), so
/// every value is finite.
pub const FLOOR: f32 = -9999.0;

/// The chosen token's log-probability at one step, with the `top` most likely token ids and
/// theirs, most likely first. `logits` is the step's row over the vocabulary.
#[must_use]
pub fn at_step(logits: &[f32], chosen: usize, top: usize) -> (f32, Vec<(usize, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (FLOOR, Vec::new());
    }
    let sum: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| f64::from(x - max).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |i: usize| {
        let v = logits
            .get(i)
            .map_or(f64::NEG_INFINITY, |&x| f64::from(x) - log_z);
        if v.is_finite() {
            (v as f32).max(FLOOR)
        } else {
            FLOOR
        }
    };
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(best.len());
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if top > 0 {
        best.select_nth_unstable_by(top - 1, by_logit);
        best.truncate(top);
        best.sort_by(by_logit);
    } else {
        best.clear();
    }
    (
        logprob(chosen),
        best.into_iter().map(|i| (i, logprob(i))).collect(),
    )
}

/// Keeps the entries of the tokens whose text is in the answer: a stop string cuts the text,
/// and the tokens that made it up leave with it.
#[must_use]
pub fn fit_to_text(mut tokens: Vec<TokenLogprob>, text_len: usize) -> Vec<TokenLogprob> {
    let mut start = 0usize;
    let keep = tokens
        .iter()
        .take_while(|t| {
            let inside = start < text_len;
            start += t.bytes.len();
            inside
        })
        .count();
    tokens.truncate(keep);
    tokens
}

/// An entry for a token that is certain (the scripted engine's words): log-probability 0, and
/// itself as the only alternative.
#[must_use]
pub fn certain(bytes: &[u8], top: u8) -> TokenLogprob {
    TokenLogprob {
        bytes: bytes.to_vec(),
        logprob: 0.0,
        top: if top > 0 {
            vec![TopLogprob {
                bytes: bytes.to_vec(),
                logprob: 0.0,
            }]
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_the_raw_row_with_the_best_alternatives_first() {
        let logits = [0.0, 2.0, 1.0, f32::NEG_INFINITY, 2.0_f32.ln()];
        let (chosen, top) = at_step(&logits, 2, 3);
        let z: f64 = [0.0f64, 2.0, 1.0, 2.0_f64.ln()]
            .iter()
            .map(|x| x.exp())
            .sum();
        assert!((f64::from(chosen) - (1.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2, 4]);
        assert!(top.iter().all(|(_, lp)| lp.is_finite() && *lp <= 0.0));
        assert_eq!(
            at_step(&logits, 3, 0),
            (FLOOR, Vec::new()),
            "-inf is floored"
        );
    }

    #[test]
    fn entries_past_the_text_are_dropped() {
        let tokens: Vec<TokenLogprob> = ["He", "llo", " wor", "ld"]
            .iter()
            .map(|p| certain(p.as_bytes(), 0))
            .collect();
        assert_eq!(fit_to_text(tokens.clone(), 5).len(), 2);
        assert_eq!(fit_to_text(tokens.clone(), 6).len(), 3);
        assert_eq!(fit_to_text(tokens, 0).len(), 0);
    }
}
