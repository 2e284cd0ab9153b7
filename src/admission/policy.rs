//! What a request may contain: seed 000's disallowed-content check on every piece of client
//! text that reaches the model, and its size in tokens against the model's context, counted
//! with the model's own tokenizer before anything is charged.

use crate::{
    engine::Prompt,
    errors::{ApiError, ErrorCode},
    queue::Work,
    serving::ModelRegistry,
    settings::EngineSettings,
};

/// The compiled `settings.policy.deny` patterns.
#[derive(Debug)]
pub struct Policy {
    deny: regex::RegexSet,
}

impl Policy {
    /// # Errors
    /// When a pattern does not compile (a configuration error, reported at start-up).
    pub fn new(deny: &[String]) -> Result<Self, regex::Error> {
        Ok(Self {
            deny: regex::RegexSetBuilder::new(deny)
                .case_insensitive(true)
                .build()?,
        })
    }

    /// Seed 000's disallowed-content check (400 `content_policy_violation`).
    ///
    /// # Errors
    /// When any text matches a deny pattern.
    pub fn check<'a>(&self, mut texts: impl Iterator<Item = &'a str>) -> Result<(), ApiError> {
        if !self.deny.is_empty() && texts.any(|t| self.deny.is_match(t)) {
            return Err(ApiError::new(
                ErrorCode::ContentPolicyViolation,
                "the input contains content this server does not accept",
            ));
        }
        Ok(())
    }

    /// Applies the content policy and counts input tokens with the model's tokenizer; 400 when
    /// the input cannot fit. Returns the token count recorded with the job.
    ///
    /// # Errors
    /// 400 for disallowed content or an input too long, 422 for a prompt that cannot render.
    pub fn admit_input(
        &self,
        work: &Work,
        models: &ModelRegistry,
        engine: &EngineSettings,
    ) -> Result<usize, ApiError> {
        match work {
            Work::Generate(request) if models.is_remote(&request.model) => {
                // No local tokenizer: an upper bound is reserved, settled to the upstream's
                // usage; the upstream checks its own context.
                self.check(request.prompt.texts())?;
                Ok(crate::engine::remote::reserve_estimate(&request.prompt))
            }
            Work::Generate(request) => self.check_prompt(models, &request.model, &request.prompt),
            Work::Embed(request) if models.is_remote(&request.model) => {
                self.check(request.inputs.iter().map(String::as_str))?;
                Ok(crate::engine::remote::embedding_estimate(&request.inputs))
            }
            Work::Embed(request) => {
                self.check(request.inputs.iter().map(String::as_str))?;
                let limit = engine.embeddings.context_size as usize;
                let tokenizer = models.tokenizer_for(&request.model);
                let mut total = 0;
                for (i, text) in request.inputs.iter().enumerate() {
                    let n = tokenizer.count_embedding(text);
                    if n == 0 {
                        return Err(ApiError::new(
                            ErrorCode::EmptyInput,
                            format!("input {i} has no tokens"),
                        ));
                    }
                    if n > limit {
                        return Err(ApiError::new(ErrorCode::ContextLengthExceeded,
                            format!(
                                "input {i} is {n} tokens; embeddings take at most {limit} tokens per input"
                            ),
                        ));
                    }
                    total += n;
                }
                let cap = engine.embeddings.max_tokens_per_call as usize;
                if total > cap {
                    return Err(ApiError::new(
                        ErrorCode::ContextLengthExceeded,
                        format!(
                            "the inputs hold {total} tokens; one embedding call takes at most {cap} (split it into several calls)"
                        ),
                    ));
                }
                Ok(total)
            }
        }
    }

    /// Counts prompt tokens with the model's tokenizer; 400 when the prompt cannot fit.
    fn check_prompt(
        &self,
        models: &ModelRegistry,
        model: &str,
        prompt: &Prompt,
    ) -> Result<usize, ApiError> {
        self.check(prompt.texts())?;
        let tokenizer = models.tokenizer_for(model);
        let n = tokenizer.count(prompt).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidPrompt,
                format!("prompt cannot be rendered: {e}"),
            )
        })?;
        let limit = tokenizer.context_size() as usize;
        if n >= limit {
            return Err(ApiError::new(ErrorCode::ContextLengthExceeded,
                format!(
                    "prompt is {n} tokens; model {} accepts at most {} prompt tokens (context {limit})",
                    tokenizer.model_name(),
                    limit - 1
                ),
            ));
        }
        Ok(n)
    }
}
