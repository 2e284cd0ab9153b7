//! Seed 000's (the UNCC LoRA-head API's) own routes: `POST /generate-embedding`
//! (`{"text": …}` → `{"embedding", "dimensions", "model"}`) and `POST /attach-head`, the same
//! operation as the admin API's `POST /api/adapters`. Its `POST /generate` with a LoRA head is
//! seed 001's route ([`super::seed001`]); its `GET /ping` is [`crate::controllers::ping`].
//! Spec: ../shared/seeds/000.
//!
//! Like a generation, an embedding request is one charged call and one durable job: the worker
//! holds the model (the API process may not), so the vectors come back through the job record.

use axum::{extract::State, response::Response};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::json;

use crate::{
    admission::{EmbeddingInput, Ticket},
    controllers::{
        admin::adapters::attach,
        openai::{embedding_usage, vectors},
        respond::{admit, try_answer},
    },
    errors::{ApiError, ApiResult},
    extractors::{JsonBody, MeteredCaller},
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct EmbeddingRequest {
    /// Also accepted as `input` or `content`.
    #[serde(alias = "input", alias = "content")]
    text: String,
    model: Option<String>,
}

impl TryFrom<EmbeddingRequest> for EmbeddingInput {
    type Error = ApiError;

    fn try_from(body: EmbeddingRequest) -> Result<Self, ApiError> {
        Self::new(vec![("text".into(), body.text)], body.model)
    }
}

/// One text, one vector.
#[tracing::instrument(skip_all, fields(api_key))]
async fn generate_embedding(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<EmbeddingRequest>, ApiError>,
) -> ApiResult<Response> {
    let ticket = Ticket::wait("/generate-embedding");
    let admitted = admit::<_, EmbeddingInput>(&ctx, &key, body, ticket).await?;
    try_answer(admitted, |job| {
        let embedding = vectors(job)?.pop().unwrap_or_default();
        Ok(json!({
            "dimensions": embedding.len(),
            "embedding": embedding,
            "model": job.model,
            "job_id": job.id,
            "usage": embedding_usage(job),
        }))
    })
}

pub fn routes() -> Routes {
    Routes::new()
        .add(
            "/generate-embedding",
            axum::routing::post(generate_embedding),
        )
        .add("/attach-head", axum::routing::post(attach))
}
