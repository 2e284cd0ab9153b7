//! A small, safe reader of a GGUF file's metadata header (no tensors, no llama.cpp).
//!
//! The API process must refuse a file that is not a LoRA adapter *before* it stores a
//! registration, and in production it holds no model to try loading one with. Parsing the
//! header here also avoids llama.cpp's aborting assertions on malformed input: every length is
//! bounded and every read is checked.

use std::{
    collections::HashMap,
    io::{BufReader, Read, Seek},
    path::Path,
};

const MAGIC: &[u8; 4] = b"GGUF";
/// Bounds that no real header comes near; they stop a hostile file from making us allocate.
const MAX_KV: u64 = 1 << 20;
const MAX_STRING: u64 = 1 << 24;
const MAX_ARRAY: u64 = 1 << 28;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file")]
    NotGguf,
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    #[error("malformed GGUF header: {0}")]
    Malformed(&'static str),
}

/// The string-valued metadata of a GGUF file (`general.type`, `general.architecture`, …).
/// Values of other types are skipped.
#[derive(Debug, Clone, Default)]
pub struct GgufMetadata {
    pub strings: HashMap<String, String>,
}

impl GgufMetadata {
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.strings.get(key).map(String::as_str)
    }
}

/// Reads the metadata key/value section of the GGUF file at `path`.
///
/// # Errors
/// When the file cannot be read or is not a well-formed GGUF file (version 2 or 3).
pub fn read_metadata(path: &Path) -> Result<GgufMetadata, GgufError> {
    let file = std::fs::File::open(path)?;
    parse(&mut BufReader::new(file))
}

fn parse<R: Read + Seek>(r: &mut R) -> Result<GgufMetadata, GgufError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|_| GgufError::NotGguf)?;
    if &magic != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = read_u32(r)?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let _n_tensors = read_u64(r)?;
    let n_kv = read_u64(r)?;
    if n_kv > MAX_KV {
        return Err(GgufError::Malformed("too many metadata entries"));
    }
    let mut meta = GgufMetadata::default();
    for _ in 0..n_kv {
        let key = read_string(r)?;
        let kind = read_u32(r)?;
        if kind == TYPE_STRING {
            let value = read_string(r)?;
            meta.strings.insert(key, value);
        } else {
            skip_value(r, kind)?;
        }
    }
    Ok(meta)
}

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Size in bytes of a fixed-size GGUF value type.
fn fixed_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

fn skip_value<R: Read + Seek>(r: &mut R, kind: u32) -> Result<(), GgufError> {
    if let Some(n) = fixed_size(kind) {
        return skip(r, n);
    }
    match kind {
        TYPE_STRING => {
            let len = read_u64(r)?;
            if len > MAX_STRING {
                return Err(GgufError::Malformed("string too long"));
            }
            skip(r, len)
        }
        TYPE_ARRAY => {
            let elem = read_u32(r)?;
            let n = read_u64(r)?;
            if n > MAX_ARRAY {
                return Err(GgufError::Malformed("array too long"));
            }
            if let Some(size) = fixed_size(elem) {
                return skip(r, n * size);
            }
            if elem == TYPE_STRING {
                for _ in 0..n {
                    skip_value(r, TYPE_STRING)?;
                }
                return Ok(());
            }
            // Nested arrays are not part of the GGUF format.
            Err(GgufError::Malformed("unsupported array element type"))
        }
        _ => Err(GgufError::Malformed("unknown value type")),
    }
}

fn skip<R: Read + Seek>(r: &mut R, n: u64) -> Result<(), GgufError> {
    let n = i64::try_from(n).map_err(|_| GgufError::Malformed("length overflow"))?;
    r.seek_relative(n)?;
    Ok(())
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32, GgufError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)
        .map_err(|_| GgufError::Malformed("truncated"))?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64, GgufError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .map_err(|_| GgufError::Malformed("truncated"))?;
    Ok(u64::from_le_bytes(b))
}

fn read_string<R: Read>(r: &mut R) -> Result<String, GgufError> {
    let len = read_u64(r)?;
    if len > MAX_STRING {
        return Err(GgufError::Malformed("string too long"));
    }
    let mut buf = Vec::new();
    r.take(len)
        .read_to_end(&mut buf)
        .map_err(|_| GgufError::Malformed("truncated"))?;
    if buf.len() as u64 != len {
        return Err(GgufError::Malformed("truncated"));
    }
    String::from_utf8(buf).map_err(|_| GgufError::Malformed("string is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn header(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, kind, v) in kvs {
            string(&mut out, k);
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    #[test]
    fn strings_are_read_and_other_values_skipped() {
        let mut s = Vec::new();
        string(&mut s, "adapter");
        let mut arr = Vec::new();
        arr.extend_from_slice(&TYPE_STRING.to_le_bytes());
        arr.extend_from_slice(&2u64.to_le_bytes());
        string(&mut arr, "a");
        string(&mut arr, "bc");
        let bytes = header(&[
            ("adapter.lora.alpha", 6, 8f32.to_le_bytes().to_vec()),
            ("tokens", TYPE_ARRAY, arr),
            ("general.type", TYPE_STRING, s),
        ]);
        let meta = parse(&mut Cursor::new(bytes)).expect("parse");
        assert_eq!(meta.get("general.type"), Some("adapter"));
        assert_eq!(meta.get("adapter.lora.alpha"), None);
    }

    #[test]
    fn garbage_truncation_and_absurd_lengths_are_errors_not_panics() {
        assert!(matches!(
            parse(&mut Cursor::new(b"root:x:0:0".to_vec())),
            Err(GgufError::NotGguf)
        ));
        let mut bytes = header(&[("general.type", TYPE_STRING, Vec::new())]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&mut Cursor::new(bytes)).is_err());
        let full = {
            let mut s = Vec::new();
            string(&mut s, "adapter");
            header(&[("general.type", TYPE_STRING, s)])
        };
        for cut in 0..full.len() {
            assert!(
                parse(&mut Cursor::new(full[..cut].to_vec())).is_err(),
                "{cut}"
            );
        }
    }
}
