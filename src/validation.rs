//! Wire parameters → bounded [`SamplingParams`] (parse, don't validate: past this point the
//! engine trusts them).

use serde::Deserialize;

use crate::{engine::SamplingParams, errors::ApiError, settings::ApiSettings};

/// Most stop strings a request may give, and their longest length.
pub const MAX_STOP_WORDS: usize = 8;
pub const MAX_STOP_LEN: usize = 128;

/// `stop` as clients send it: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopWords {
    One(String),
    Many(Vec<String>),
}

impl StopWords {
    #[must_use]
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The model and LoRA head fields a generation request may carry (`model` may be
/// `base:adapter`; `lora`, alias `head`, names the adapter on its own).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HeadInput {
    pub model: Option<String>,
    #[serde(alias = "head")]
    pub lora: Option<String>,
    pub scale: Option<f64>,
}

impl HeadInput {
    #[must_use]
    pub fn into_choice(self) -> crate::services::ModelChoice {
        crate::services::ModelChoice {
            model: self.model,
            adapter: self.lora,
            scale: self.scale,
            lenient_base: false,
        }
    }
}

/// Optional sampling fields shared by every generation route.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingInput {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopWords>,
}

impl SamplingInput {
    /// Applies defaults and bounds.
    ///
    /// # Errors
    /// 422 naming the field and its allowed range.
    pub fn into_params(self, api: &ApiSettings) -> Result<SamplingParams, ApiError> {
        let max_tokens = match self.max_tokens {
            None => api.default_max_tokens,
            Some(n) if n >= 1 && n <= i64::from(api.max_tokens_limit) => {
                u32::try_from(n).unwrap_or(api.max_tokens_limit)
            }
            Some(n) => {
                return Err(ApiError::unprocessable(
                    "invalid_max_tokens",
                    format!(
                        "max_tokens must be between 1 and {}, got {n}",
                        api.max_tokens_limit
                    ),
                ))
            }
        };
        let temperature = match self.temperature {
            None => api.default_temperature,
            Some(t) if (0.0..=2.0).contains(&t) => t as f32,
            Some(t) => {
                return Err(ApiError::unprocessable(
                    "invalid_temperature",
                    format!("temperature must be between 0 and 2, got {t}"),
                ))
            }
        };
        let top_p = match self.top_p {
            None => 1.0,
            Some(p) if p > 0.0 && p <= 1.0 => p as f32,
            Some(p) => {
                return Err(ApiError::unprocessable(
                    "invalid_top_p",
                    format!("top_p must be in (0, 1], got {p}"),
                ))
            }
        };
        let seed = match self.seed {
            None => None,
            Some(s) => Some(u32::try_from(s).map_err(|_| {
                ApiError::unprocessable(
                    "invalid_seed",
                    format!("seed must be between 0 and {}, got {s}", u32::MAX),
                )
            })?),
        };
        let stop = self.stop.map(StopWords::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_WORDS || stop.iter().any(|s| s.len() > MAX_STOP_LEN) {
            return Err(ApiError::unprocessable(
                "invalid_stop",
                format!(
                    "stop accepts at most {MAX_STOP_WORDS} strings of at most {MAX_STOP_LEN} bytes"
                ),
            ));
        }
        Ok(SamplingParams {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        })
    }
}

/// A prompt text field: present, a string, not blank, no NUL bytes.
///
/// # Errors
/// 422 naming the field.
pub fn prompt_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::unprocessable(
            "empty_prompt",
            format!("`{field}` must not be empty"),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::unprocessable(
            "invalid_prompt",
            format!("`{field}` must not contain NUL characters"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields_and_bounds_reject_out_of_range() {
        let api = ApiSettings::default();
        let p = SamplingInput::default()
            .into_params(&api)
            .expect("defaults");
        assert_eq!(p.max_tokens, api.default_max_tokens);
        assert!(p.stop.is_empty());
        for bad in [
            SamplingInput {
                max_tokens: Some(0),
                ..Default::default()
            },
            SamplingInput {
                max_tokens: Some(i64::from(api.max_tokens_limit) + 1),
                ..Default::default()
            },
            SamplingInput {
                temperature: Some(2.5),
                ..Default::default()
            },
            SamplingInput {
                temperature: Some(-0.1),
                ..Default::default()
            },
            SamplingInput {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingInput {
                seed: Some(-1),
                ..Default::default()
            },
        ] {
            let err = bad.into_params(&api).expect_err("out of range");
            assert_eq!(err.status.as_u16(), 422, "{err}");
        }
    }
}
