//! Turning a stream of token bytes into text: UTF-8 boundaries and stop strings.

/// Accumulates token pieces, emits only complete UTF-8, and cuts the output at the first stop
/// string. A stop string may span several tokens, so the decoder holds back the tail that could
/// still become one.
#[derive(Debug, Default)]
pub struct OutputDecoder {
    pending: Vec<u8>,
    text: String,
    stops: Vec<String>,
    /// Bytes of `text` already handed out as deltas.
    emitted: usize,
    /// No stop string starts before this byte of `text` (keeps the search linear).
    checked: usize,
    stopped: bool,
}

impl OutputDecoder {
    #[must_use]
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds one token's bytes; returns true once a stop string has been seen.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.stopped {
            return true;
        }
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes that no continuation can fix: replace them.
            Err(_) => {
                let lossy = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.text.push_str(&lossy);
                return self.check_stops();
            }
        };
        let rest = self.pending.split_off(valid);
        let done = std::mem::replace(&mut self.pending, rest);
        // `done` is valid UTF-8 by construction.
        self.text.push_str(&String::from_utf8_lossy(&done));
        self.check_stops()
    }

    fn check_stops(&mut self) -> bool {
        let from = self.checked;
        let cut = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| i + from))
            .min();
        if let Some(cut) = cut {
            self.text.truncate(cut);
            self.stopped = true;
        } else {
            let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
            let mut next = self.text.len().saturating_sub(longest);
            while !self.text.is_char_boundary(next) {
                next -= 1;
            }
            self.checked = next;
        }
        self.stopped
    }

    /// Text that is safe to hand out now (for streaming): everything except a tail that is a
    /// prefix of some stop string.
    pub fn take_delta(&mut self) -> String {
        let hold = if self.stopped {
            0
        } else {
            self.stops
                .iter()
                .map(|s| longest_suffix_prefix(&self.text[self.emitted..], s))
                .max()
                .unwrap_or(0)
        };
        let end = self.text.len() - hold;
        let delta = self.text[self.emitted..end].to_string();
        self.emitted = end;
        delta
    }

    /// Everything not yet handed out, held-back tail included: the last delta of a stream.
    pub fn take_rest(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    /// The whole output so far (stop string excluded).
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    #[must_use]
    pub fn into_text(mut self) -> String {
        if !self.pending.is_empty() {
            let lossy = String::from_utf8_lossy(&self.pending).into_owned();
            self.text.push_str(&lossy);
        }
        self.text
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

/// Words in a text, as seed 003's usage report counted them (whitespace-separated).
#[must_use]
pub fn count_words(text: &str) -> usize {
    text.split_whitespace().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multibyte_char_split_across_tokens_is_joined() {
        let mut d = OutputDecoder::new(&[]);
        let bytes = "é".as_bytes();
        assert!(!d.push(&bytes[..1]));
        assert_eq!(d.text(), "");
        assert!(!d.push(&bytes[1..]));
        assert_eq!(d.text(), "é");
    }

    #[test]
    fn output_is_cut_before_a_stop_string_spanning_tokens() {
        let mut d = OutputDecoder::new(&["STOP".to_string()]);
        assert!(!d.push(b"hello S"));
        assert_eq!(d.take_delta(), "hello ");
        assert!(!d.push(b"T"));
        assert!(d.push(b"OP and more"));
        assert_eq!(d.text(), "hello ");
        assert_eq!(d.take_delta(), "");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_become_a_stop() {
        let mut d = OutputDecoder::new(&["STOP".to_string()]);
        d.push(b"a ST");
        assert_eq!(d.take_delta(), "a ");
        d.push(b"ORM");
        assert_eq!(d.take_delta(), "STORM");
    }

    #[test]
    fn words_are_whitespace_separated() {
        assert_eq!(count_words("  one two\nthree "), 3);
        assert_eq!(count_words(""), 0);
    }
}
