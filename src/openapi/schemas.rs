//! What the API answers, as the OpenAPI document describes it.
//!
//! Handlers build their answers as JSON values (next to their routes); these types only
//! describe those shapes and are never constructed. The fuzz run checks every answer it gets
//! against them (`response_schema_conformance`), so a handler that changes its shape without
//! changing the type here fails it. The enums derive `Serialize` only so that
//! `#[serde(untagged)]` tells utoipa an answer is one of their variants' shapes, untagged.

use serde::Serialize;
use utoipa::{
    openapi::{schema::SchemaType, ObjectBuilder, RefOr, Schema, Type},
    ToSchema,
};

use crate::errors::ErrorCode;

/// Every refusal: `{"error": {"message", "type", "param", "code"}, "detail"}` (OpenAI's shape,
/// and the message as `detail`, where FastAPI and Django REST framework put it); on Ollama's
/// routes Ollama's `{"error": "<message>", "code"}`.
#[derive(ToSchema)]
pub struct ErrorBody {
    pub error: ErrorOrMessage,
    /// The message again.
    pub detail: Option<String>,
    /// Ollama's routes: the stable code beside the message.
    #[schema(schema_with = error_codes)]
    pub code: Option<String>,
}

/// The refusal itself, or (Ollama's routes) its message.
#[derive(ToSchema, Serialize)]
#[serde(untagged)]
pub enum ErrorOrMessage {
    Detail(ErrorDetail),
    Message(String),
}

/// One refusal: a message for people and a stable code for programs.
#[derive(ToSchema, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `insufficient_quota`, `rate_limit_error`,
    /// `server_error`.
    #[schema(rename = "type")]
    #[serde(rename = "type")]
    pub kind: String,
    /// The field at fault where one is (null otherwise), as OpenAI's SDKs read it.
    pub param: Option<String>,
    /// The stable code; its HTTP status is fixed (README, Errors).
    #[schema(schema_with = error_codes)]
    pub code: String,
}

/// Every code of [`ErrorCode`], so the document lists exactly what the server can answer.
fn error_codes() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
}

/// A chat message's `role`: the one closed set every route accepts.
#[must_use]
pub fn chat_role() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .enum_values(Some(crate::admission::input::ROLES))
}

/// Tokens of one job, in OpenAI's names.
#[derive(ToSchema)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// What became of the prompt's tokens.
#[derive(ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens found already in the engine's KV cache (prefix reuse: the start of an
    /// earlier prompt and its answer, such as a conversation's history) and not read again;
    /// counted in `prompt_tokens` all the same.
    pub cached_tokens: i64,
}

/// Tokens an embedding job read.
#[derive(ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: i64,
    pub total_tokens: i64,
}

/// 202: the job is queued or running; poll `poll_url` (also in `Location`).
#[derive(ToSchema)]
pub struct JobAccepted {
    pub job_id: String,
    /// `queued`, `running` (or already `done`/`failed` for a fast job).
    pub status: String,
    pub poll_url: String,
}

/// `GET /api/`'s answer (seed 003 answers a GET this way).
#[derive(ToSchema)]
pub struct UsePost {
    pub message: String,
}

/// One server-sent event: its name (absent: `message`) and its data, a line of JSON (or
/// `[DONE]`, the last event of an OpenAI stream).
#[derive(ToSchema)]
pub struct ServerSentEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<i64>,
}

/// `POST /api/` and `/analyze/`: the generated text and what it cost.
#[derive(ToSchema)]
pub struct ApiAnswer {
    pub message: String,
    pub job_id: String,
    pub model: String,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
    pub usage: Usage,
}

/// A job as `GET /api/jobs/{id}` shows it (and the `done` event of its stream).
#[derive(ToSchema)]
pub struct Job {
    pub job_id: String,
    /// `queued`, `running`, `done` or `failed`.
    pub status: String,
    pub model: String,
    /// The generated text (an embedding job: the vectors as JSON).
    pub message: Option<String>,
    pub error: Option<String>,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    pub attempts: i32,
    #[schema(format = DateTime)]
    pub queued_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    pub timings: JobTimings,
}

/// Milliseconds spent queued, running and in all (null until known).
#[derive(ToSchema)]
pub struct JobTimings {
    pub queue_ms: Option<i64>,
    pub run_ms: Option<i64>,
    pub total_ms: Option<i64>,
}

/// One day of seed 003's `/usage/`.
#[derive(ToSchema)]
pub struct WordsPerDay {
    /// That day's midnight, UTC.
    #[schema(format = DateTime)]
    pub day: String,
    pub total_words: i64,
}

/// `GET /api/usage`: the key's usage per day, its counters and budgets (and its user's).
#[derive(ToSchema)]
pub struct UsageReport {
    pub key: KeyUsage,
    pub user: Option<UserUsage>,
    #[schema(format = Date)]
    pub from: String,
    #[schema(format = Date)]
    pub to: String,
    pub days: Vec<DailyUsage>,
    pub total: UsageTotals,
}

/// The calling key's counters, limits and window.
#[derive(ToSchema)]
pub struct KeyUsage {
    pub prefix: String,
    pub name: String,
    pub calls_used: i64,
    pub max_calls: Option<i64>,
    #[schema(format = DateTime)]
    pub valid_from: Option<String>,
    #[schema(format = DateTime)]
    pub valid_until: Option<String>,
    pub prompt_token_limit: Option<i64>,
    pub prompt_tokens_used: i64,
    pub gen_token_limit: Option<i64>,
    pub gen_tokens_used: i64,
}

/// The budgets of the seed 002 user behind a login token.
#[derive(ToSchema)]
pub struct UserUsage {
    pub username: String,
    pub role: String,
    pub prompt_token_limit: Option<i64>,
    pub prompt_tokens_used: i64,
    pub gen_token_limit: Option<i64>,
    pub gen_tokens_used: i64,
}

/// One day of `GET /api/usage`.
#[derive(ToSchema)]
pub struct DailyUsage {
    #[schema(format = Date)]
    pub day: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub generated_tokens: i64,
    pub words: i64,
}

/// The sums of `days`.
#[derive(ToSchema)]
pub struct UsageTotals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub generated_tokens: i64,
    pub words: i64,
}

/// `GET /ping`: status and readiness for anyone; an admin key adds the engine, the worker
/// processes and the queue depth.
#[derive(ToSchema)]
pub struct Ping {
    /// `ok`, or `starting` before the services are up.
    pub status: String,
    pub ready: bool,
    /// The names of the models served.
    #[schema(required = false)]
    pub models: Vec<String>,
    /// Admin key only: this process's worker and engine.
    #[schema(required = false, value_type = Object)]
    pub worker: serde_json::Value,
    /// Admin key only: worker processes elsewhere.
    #[schema(required = false, value_type = Vec<Object>)]
    pub workers: serde_json::Value,
    /// Admin key only: jobs waiting for the default model.
    #[schema(required = false)]
    pub queue: QueueDepth,
}

/// Jobs waiting in a queue (null when the queue cannot say).
#[derive(ToSchema)]
pub struct QueueDepth {
    pub depth: Option<i64>,
}

/// `GET /health` (llama.cpp's server's, vLLM's and TGI's probe) when the default model can serve.
#[derive(ToSchema)]
pub struct HealthStatus {
    /// `ok`.
    pub status: String,
}

/// Loco's own health checks (`/_ping`, `/_health`, `/_readiness`).
#[derive(ToSchema)]
pub struct LocoHealth {
    pub ok: bool,
}

/// `GET /v1/models`.
#[derive(ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    pub data: Vec<ModelEntry>,
}

/// One model the key may use: the served model, or `base:adapter` for a LoRA head.
#[derive(ToSchema)]
pub struct ModelEntry {
    pub id: String,
    /// `model`.
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    pub context_length: i64,
    /// vLLM's name for `context_length`.
    pub max_model_len: i64,
    pub capabilities: ModelCapabilities,
}

/// What a model does here.
#[derive(ToSchema)]
pub struct ModelCapabilities {
    pub chat: bool,
    pub completion: bool,
    pub embeddings: bool,
    pub tools: bool,
}

/// `POST /v1/chat/completions` without `stream` (`chat.completion`).
#[derive(ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One choice of a chat completion (`n` of them).
#[derive(ToSchema)]
pub struct ChatChoice {
    pub index: i64,
    pub message: AssistantMessage,
    /// `stop`, `length`, or `tool_calls` when the model called tools.
    pub finish_reason: Option<String>,
    /// `{"content": [{token, logprob, bytes, top_logprobs}]}` when asked (`logprobs: true`),
    /// else null.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
}

/// The assistant's turn.
#[derive(ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    /// Null when the turn is only tool calls.
    pub content: Option<String>,
    /// The calls the model made, when the request offered `tools`.
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One call the model made.
#[derive(ToSchema)]
pub struct ToolCallOut {
    /// Send it back as the `tool` message's `tool_call_id`.
    pub id: String,
    /// `function`.
    #[schema(rename = "type")]
    pub kind: String,
    pub function: FunctionCallOut,
}

/// The function called and its arguments.
#[derive(ToSchema)]
pub struct FunctionCallOut {
    pub name: String,
    /// A JSON text that validates against the tool's `parameters`.
    pub arguments: String,
}

/// `POST /api/chat` with `stream: false` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaChat {
    pub model: String,
    pub created_at: String,
    /// `{"role": "assistant", "content"}`.
    #[schema(value_type = Object)]
    pub message: serde_json::Value,
    pub done: bool,
    /// `stop` or `length`.
    pub done_reason: String,
    pub total_duration: i64,
    pub load_duration: i64,
    pub prompt_eval_count: i64,
    pub eval_count: i64,
    pub eval_duration: i64,
}

/// `POST /api/generate` with `stream: false` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaGenerate {
    pub model: String,
    pub created_at: String,
    pub response: String,
    pub done: bool,
    pub done_reason: String,
    pub total_duration: i64,
    pub load_duration: i64,
    pub prompt_eval_count: i64,
    pub eval_count: i64,
    pub eval_duration: i64,
}

/// `GET /api/tags` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaTags {
    /// `{"name", "model", "modified_at", "size", "digest", "details"}` each.
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<serde_json::Value>,
}

/// `GET /props` (llama.cpp server's shape).
#[derive(ToSchema)]
pub struct LlamaProps {
    /// `n_ctx` (tokens per sequence) and `params.n_predict` (the default answer length).
    #[schema(value_type = Object)]
    pub default_generation_settings: serde_json::Value,
    /// Sequences decoded together.
    pub total_slots: i64,
    pub model_alias: String,
    /// The GGUF's file name.
    pub model_path: String,
    /// The model's Jinja chat template (empty when it has none).
    pub chat_template: String,
    #[schema(value_type = Object)]
    pub modalities: serde_json::Value,
    pub build_info: String,
}

/// `POST /completion` (llama.cpp server's shape): the text and its totals.
#[derive(ToSchema)]
pub struct LlamaCompletion {
    pub index: i64,
    pub content: String,
    #[schema(value_type = Vec<i64>)]
    pub tokens: Vec<i64>,
    pub id_slot: i64,
    /// Always true on the final object (and on a whole answer).
    pub stop: bool,
    pub model: String,
    pub tokens_predicted: i64,
    pub tokens_evaluated: i64,
    pub tokens_cached: i64,
    pub prompt: String,
    pub has_new_line: bool,
    pub truncated: bool,
    /// `limit` (cut at `n_predict` or the context) or `eos` (the model stopped, or a stop word).
    pub stop_type: String,
    pub stopping_word: String,
    #[schema(value_type = Option<Object>)]
    pub generation_settings: Option<serde_json::Value>,
    /// `prompt_n`, `predicted_n`, `predicted_ms`, `predicted_per_second`.
    #[schema(value_type = Object)]
    pub timings: serde_json::Value,
}

/// `POST /v1/responses` and `GET /v1/responses/{id}`: a `response` object.
#[derive(ToSchema)]
pub struct ResponseObject {
    /// `resp_` and the job's id.
    pub id: String,
    /// `response`.
    pub object: String,
    pub created_at: i64,
    /// `queued`, `in_progress`, `completed`, `incomplete` (cut at `max_output_tokens`),
    /// `cancelled` or `failed`.
    pub status: String,
    /// `{code, message}` of a failed response.
    #[schema(value_type = Option<Object>)]
    pub error: Option<serde_json::Value>,
    /// `{"reason": "max_output_tokens"}` of an incomplete response.
    #[schema(value_type = Option<Object>)]
    pub incomplete_details: Option<serde_json::Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub model: String,
    /// `message` items (`output_text` parts) and `function_call` items, once done.
    #[schema(value_type = Vec<Object>)]
    pub output: Vec<serde_json::Value>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    #[schema(value_type = Object)]
    pub reasoning: serde_json::Value,
    pub store: bool,
    pub temperature: Option<f64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[schema(value_type = Object)]
    pub text: serde_json::Value,
    /// `auto`, `required`, or `{"type": "function", "name": …}`.
    pub tool_choice: serde_json::Value,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<serde_json::Value>,
    pub top_p: Option<f64>,
    /// `disabled`.
    pub truncation: String,
    /// Null until the response settles.
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// `DELETE /v1/responses/{id}`.
#[derive(ToSchema)]
pub struct ResponseDeleted {
    /// `resp_` and the job's id.
    pub id: String,
    /// `response`.
    pub object: String,
    /// `true`.
    pub deleted: bool,
}

/// `GET /v1/responses/{id}/input_items`: one page of a response's input items.
#[derive(ToSchema)]
pub struct InputItemList {
    /// `list`.
    pub object: String,
    /// `message` items (`input_text` parts; an assistant's `output_text`), `function_call`
    /// and `function_call_output` items, each with its `id` and `status`.
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<serde_json::Value>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Whether a later page follows (ask again with `after` = `last_id`).
    pub has_more: bool,
}

/// A response's tokens, in the Responses API's names.
#[derive(ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: i64,
    #[schema(value_type = Object)]
    pub input_tokens_details: serde_json::Value,
    pub output_tokens: i64,
    #[schema(value_type = Object)]
    pub output_tokens_details: serde_json::Value,
    pub total_tokens: i64,
}

/// `POST /v1/completions` without `stream` (`text_completion`).
#[derive(ToSchema)]
pub struct TextCompletion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
}

/// The one choice of a text completion.
#[derive(ToSchema)]
pub struct TextChoice {
    pub index: i64,
    pub text: String,
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
}

/// `POST /v1/embeddings`.
#[derive(ToSchema)]
pub struct EmbeddingList {
    pub object: String,
    pub data: Vec<EmbeddingItem>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// One input's vector, in input order.
#[derive(ToSchema)]
pub struct EmbeddingItem {
    pub object: String,
    pub index: i64,
    pub embedding: Vector,
}

/// A vector: numbers, or little-endian f32 bytes in base64 (`encoding_format: "base64"`).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum Vector {
    Floats(Vec<f64>),
    Base64(String),
}

/// OpenAI's embedding `input`: a string, a list of strings, one list of the model's token
/// ids, or a list of such lists (LangChain sends ids).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInputs {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<i64>),
    TokenIdLists(Vec<Vec<i64>>),
}

/// `POST /generate-embedding` (seed 000): one text, one vector.
#[derive(ToSchema)]
pub struct Seed000Embedding {
    pub dimensions: i64,
    pub embedding: Vec<f64>,
    pub model: String,
    pub job_id: String,
    pub usage: EmbeddingUsage,
}

/// Seed 001's answer: the text and the job id (the client's own when it sent one).
#[derive(ToSchema)]
pub struct Seed001Answer {
    pub content: String,
    pub job_id: String,
}

/// `POST /token`: a bearer token (an API key of the user) and when it expires.
#[derive(ToSchema)]
pub struct LoginToken {
    pub username: String,
    pub access_token: String,
    /// `bearer`.
    pub token_type: String,
    pub expires_in: i64,
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
}

/// Seed 002's acknowledgement.
#[derive(ToSchema)]
pub struct StatusMessage {
    /// `success`.
    pub status: String,
    pub message: String,
}

/// `POST /llm_request` (seed 002).
#[derive(ToSchema)]
pub struct LlmAnswer {
    pub username: String,
    pub data: String,
    pub job_id: String,
    pub usage: Usage,
}

/// One engine of `GET /active_models/` (seed 002's shape).
#[derive(ToSchema)]
pub struct ActiveModel {
    pub engine_name: String,
    /// The worker (or loaded model) holding it.
    pub container_id: Option<String>,
    pub model_name: String,
    pub quantized: bool,
    pub max_model_length: i64,
    /// Always null.
    #[schema(value_type = Option<i64>)]
    pub seed: Option<i64>,
    pub inference_end_point: String,
    #[schema(format = DateTime)]
    pub timestamp: Option<String>,
    /// The caller.
    pub user_id: String,
    pub device: String,
}

/// `POST /vllm_request/start`.
#[derive(ToSchema)]
#[allow(non_snake_case)]
pub struct EngineStarted {
    pub message: String,
    /// This server's OpenAI base URL.
    pub vLLM_endpoint: String,
    pub engine_name: String,
    pub container_id: String,
    pub user_info: KeyInfo,
    /// `healthy`.
    pub status: String,
}

/// The key that made a change.
#[derive(ToSchema)]
pub struct KeyInfo {
    pub key: String,
    pub name: String,
}

/// `POST /vllm_request/terminate`: `{"status": "terminated"}`.
#[derive(ToSchema)]
pub struct Terminated {
    pub status: String,
}

/// `POST /llm/configure_model/`.
#[derive(ToSchema)]
pub struct ConfigCreated {
    pub config_id: String,
}

/// A stored model configuration (seed 004's shape).
#[derive(ToSchema)]
pub struct ModelConfig {
    pub config_id: String,
    pub model_id: String,
    pub model_name: String,
    pub model_type: String,
    #[schema(value_type = Object)]
    pub model_kwargs: serde_json::Value,
}

/// `POST /llm/load_model/{config_id}`.
#[derive(ToSchema)]
pub struct ModelLoaded {
    /// `Model loaded successfully` or `Model already loaded` (seed 004's body exactly).
    pub message: String,
}

/// A message and nothing else.
#[derive(ToSchema)]
pub struct Message {
    pub message: String,
}

/// `DELETE /llm/configuration/{config_id}`.
#[derive(ToSchema)]
pub struct Deleted {
    pub detail: String,
}

/// The ids of the models loaded now, default model first.
#[derive(ToSchema)]
pub struct ModelIds(pub Vec<String>);

/// `POST /llm/inference/`.
#[derive(ToSchema)]
pub struct InferenceAnswer {
    pub response: String,
}

/// `POST /tokenize`: ids, or `{"id", "piece"}` with `with_pieces`.
#[derive(ToSchema)]
pub struct Tokens {
    pub tokens: Vec<TokenItem>,
}

/// A token id, or an id with its text.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TokenItem {
    Id(i64),
    Piece(TokenPiece),
}

/// A token id and its text.
#[derive(Serialize, ToSchema)]
pub struct TokenPiece {
    pub id: i64,
    pub piece: String,
}

/// `POST /detokenize`.
#[derive(ToSchema)]
pub struct Detokenized {
    pub content: String,
}

/// `POST /apply-template`.
#[derive(ToSchema)]
pub struct Templated {
    pub prompt: String,
}

/// A registered LoRA head.
#[derive(ToSchema)]
pub struct Adapter {
    pub name: String,
    /// `base:name`, the model id requests name it by.
    pub model: String,
    /// Relative to the adapters folder.
    pub file: String,
    pub base_model: String,
    pub default_scale: f64,
    /// Workers holding it loaded now.
    pub loaded_on: Vec<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// `GET /api/adapters`.
#[derive(ToSchema)]
pub struct AdapterList {
    pub adapters: Vec<Adapter>,
}

/// `DELETE /api/adapters/{name}`: the registration removed (the file stays).
#[derive(ToSchema)]
pub struct AdapterDeleted {
    pub deleted: Adapter,
}

/// `GET /api/workers`.
#[derive(ToSchema)]
pub struct WorkerList {
    pub object: String,
    pub data: Vec<Worker>,
}

/// A worker that has heartbeated.
#[derive(ToSchema)]
pub struct Worker {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub device: String,
    pub models: Vec<String>,
    pub adapters: Vec<String>,
    pub current_job: Option<String>,
    pub jobs_served: i64,
    pub tokens_per_second: Option<f64>,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub heartbeat_at: String,
    pub heartbeat_age_seconds: f64,
    /// `live`, `gone` or `stopped`.
    pub state: String,
}

/// A seed 002 user (never its password hash).
#[derive(ToSchema)]
pub struct User {
    pub username: String,
    pub role: String,
    pub enabled: bool,
    pub prompt_token_limit: Option<i64>,
    pub prompt_token_number: i64,
    pub gen_token_limit: Option<i64>,
    pub gen_token_number: i64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// `GET /api/users`.
#[derive(ToSchema)]
pub struct UserList {
    pub object: String,
    pub data: Vec<User>,
}

/// `DELETE /api/users/{username}`: the user removed.
#[derive(ToSchema)]
pub struct UserDeleted {
    pub deleted: User,
}

/// The dashboard's sign-in form.
#[derive(ToSchema)]
pub struct LoginForm {
    pub email: String,
    pub password: String,
    /// The token the sign-in page set as a cookie (double submit).
    pub csrf: String,
}

/// The first-run setup form.
#[derive(ToSchema)]
pub struct SetupForm {
    /// The single-use token of the link the server logged.
    pub token: String,
    pub email: String,
    pub password: String,
    pub password2: String,
}

/// A form posted by a signed-in admin: the session's CSRF token, nothing else.
#[derive(ToSchema)]
pub struct CsrfForm {
    pub csrf: String,
}

/// The key form (create and edit): empty numbers mean no limit, empty dates an open window.
#[derive(ToSchema)]
pub struct KeyForm {
    pub csrf: String,
    pub name: Option<String>,
    pub email: String,
    pub organization: Option<String>,
    pub calls: Option<String>,
    pub prompt_tokens: Option<String>,
    pub gen_tokens: Option<String>,
    /// 0 to 10.
    pub priority: Option<String>,
    /// `YYYY-MM-DD` or RFC 3339.
    pub valid_from: Option<String>,
    pub valid_until: Option<String>,
}

/// The dashboard's LoRA head form.
#[derive(ToSchema)]
pub struct AdapterForm {
    pub csrf: String,
    pub name: String,
    pub path: String,
    pub scale: Option<String>,
}

/// The dashboard's add-user form (seed 002's users).
#[derive(ToSchema)]
pub struct UserForm {
    pub csrf: String,
    pub username: String,
    pub password: String,
    /// `user` (default) or `admin`.
    pub role: Option<String>,
    /// Empty: no limit.
    pub prompt_token_limit: Option<String>,
    pub gen_token_limit: Option<String>,
}

/// `POST /api/embed` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaEmbed {
    pub model: String,
    /// One L2-normalised vector per input, in order.
    pub embeddings: Vec<Vec<f32>>,
    pub total_duration: i64,
    pub load_duration: i64,
    pub prompt_eval_count: i64,
}

/// `POST /api/embeddings` (Ollama's older shape).
#[derive(ToSchema)]
pub struct OllamaEmbedding {
    pub embedding: Vec<f32>,
}

/// `POST /api/show` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaShow {
    pub license: String,
    pub modelfile: String,
    /// `num_ctx <tokens per sequence>`.
    pub parameters: String,
    /// The model's Jinja chat template.
    pub template: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// `general.architecture`, `<arch>.context_length`, `<arch>.embedding_length`.
    #[schema(value_type = Object)]
    pub model_info: serde_json::Value,
    pub capabilities: Vec<String>,
    pub modified_at: String,
}

/// `GET /api/version` (Ollama's shape).
#[derive(ToSchema)]
pub struct OllamaVersion {
    /// The Ollama API version followed.
    pub version: String,
}
