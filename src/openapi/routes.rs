//! Every route of the router, once, by family: method, path as the router has it, who may call
//! it, the handler's wire types and what it answers. `tests/openapi.rs` compares this list with
//! the router's own.

use super::{
    schemas::{
        ActiveModel, Adapter, AdapterDeleted, AdapterForm, AdapterList, ApiAnswer, ChatCompletion,
        ConfigCreated, CsrfForm, Deleted, Detokenized, EmbeddingList, EngineStarted, ErrorBody,
        HealthStatus, InferenceAnswer, InputItemList, Job, KeyForm, LlamaCompletion, LlamaProps,
        LlmAnswer, LocoHealth, LoginForm, LoginToken, Message, ModelConfig, ModelEntry, ModelIds,
        ModelList, ModelLoaded, OllamaChat, OllamaEmbed, OllamaEmbedding, OllamaGenerate,
        OllamaShow, OllamaTags, OllamaVersion, Ping, ResponseDeleted, ResponseObject,
        Seed000Embedding, Seed001Answer, SetupForm, StatusMessage, Templated, Terminated,
        TextCompletion, Tokens, UsageReport, UsePost, User, UserDeleted, UserForm, UserList,
        WordsPerDay, WorkerList,
    },
    Access::{Admin, Keyed, Metered, Public, Session, SessionPublic},
    Op,
};
use crate::controllers::{admin, compat, native, openai};

/// A family of routes: its tag, what it is, its operations.
pub(super) type Family = (&'static str, &'static str, Vec<Op>);

pub(super) fn families() -> Vec<Family> {
    vec![
        health(),
        native(),
        openai(),
        seed000(),
        seed001(),
        seed002(),
        seed004(),
        llama_server(),
        ollama(),
        admin(),
        dashboard(),
    ]
}

fn health() -> Family {
    (
        "health",
        "Liveness, readiness, metrics and this document.",
        vec![
            Op::get("/ping", Public, "Status, readiness and the models served")
                .describe("Seed 000's health check. An admin key adds the engine, the worker processes and the queue depth.")
                .ok::<Ping>("Status and readiness."),
            Op::get("/health", Public, "Whether the default model can serve (llama.cpp server's, vLLM's and TGI's probe)")
                .ok::<HealthStatus>("It can.")
                .answer::<ErrorBody>(503, "It cannot yet (`model_unavailable` with the reason, or `starting`)."),
            Op::get("/_ping", Public, "Loco's liveness check").ok::<LocoHealth>("Alive."),
            Op::get("/_health", Public, "Loco's health check").ok::<LocoHealth>("Healthy."),
            Op::get("/_readiness", Public, "Loco's readiness check (database)")
                .ok::<LocoHealth>("Ready."),
            Op::get("/metrics", Public, "Prometheus metrics")
                .describe("Needs `Authorization: Bearer <settings.api.metrics_token>` when one is configured.")
                .text(200, "text/plain; version=0.0.4; charset=utf-8", "Prometheus text format."),
            Op::get("/openapi.json", Public, "This document (OpenAPI 3.1)")
                .text(200, "application/json", "The OpenAPI document."),
        ],
    )
}

fn native() -> Family {
    (
        "native",
        "Tollgate's own API, which is seed 003's (djangollmapi): generate, queue jobs, follow them, read usage.",
        vec![
            Op::get("/api", Keyed, "Seed 003's answer to a GET").ok::<UsePost>("`Use a post request.`"),
            Op::post("/api", Metered, "Generate from a text (seed 003)")
                .describe("`text` is one user turn of the model's chat template. Waits for the job up to `wait_timeout_ms`.")
                .body::<native::ApiRequest>()
                .ok::<ApiAnswer>("The generated text.")
                .accepted(),
            Op::post("/analyze", Metered, "Alias of `POST /api/`")
                .body::<native::ApiRequest>()
                .ok::<ApiAnswer>("The generated text.")
                .accepted(),
            Op::post("/api/jobs", Metered, "Queue a job and answer at once")
                .body::<native::ApiRequest>()
                .accepted(),
            Op::get("/api/jobs/{id}", Keyed, "A job of this key")
                .ok::<Job>("The job: status, result, token counts, timings."),
            Op::get("/api/jobs/{id}/events", Keyed, "A job's progress as server-sent events")
                .events("`token` events (`{\"text\"}`) as the worker generates, then one `done` or `failed` event with the job."),
            Op::get("/usage", Keyed, "Words sent per day (seed 003)")
                .query::<native::UsageQuery>()
                .ok_list::<WordsPerDay>("One entry per day with requests, oldest first."),
            Op::get("/api/usage", Keyed, "Usage per day, counters and budgets")
                .query::<native::UsageQuery>()
                .ok::<UsageReport>("The key's usage."),
        ],
    )
}

fn openai() -> Family {
    (
        "openai",
        "OpenAI-compatible routes; `stream: true` answers with server-sent chunks ending in `data: [DONE]`.",
        vec![
            Op::get("/v1/models", Keyed, "Models this key may use").ok::<ModelList>("The list."),
            Op::get("/v1/models/{*id}", Keyed, "One model")
                .ok::<ModelEntry>("The model; an unknown id is 404 `model_not_found`."),
            Op::post("/v1/chat/completions", Metered, "Chat completion")
                .body::<openai::ChatRequest>()
                .ok::<ChatCompletion>("The completion.")
                .events("With `stream: true`: `chat.completion.chunk` events, then `data: [DONE]`.")
                .accepted(),
            Op::post("/v1/completions", Metered, "Text completion")
                .body::<openai::CompletionRequest>()
                .ok::<TextCompletion>("The completion.")
                .events("With `stream: true`: `text_completion` events, then `data: [DONE]`.")
                .accepted(),
            Op::post("/v1/embeddings", Metered, "Embeddings (one call per request)")
                .body::<openai::EmbeddingsRequest>()
                .ok::<EmbeddingList>("One vector per input, in input order.")
                .accepted(),
            Op::post("/v1/responses", Metered, "Response (OpenAI's Responses API)")
                .describe("Send the whole conversation in `input`, or continue one of this key's responses with `previous_response_id` (its conversation and output come first; `conversation` objects are refused). `background: true` answers 202 at once; read the response at `GET /v1/responses/{id}`.")
                .body::<openai::ResponsesRequest>()
                .ok::<ResponseObject>("The response, `completed`, or `incomplete` when cut at `max_output_tokens`.")
                .events("With `stream: true`: typed events (`response.created`, `response.output_text.delta`, …) ending in `response.completed`, `response.incomplete` or `response.failed`.")
                .answer::<ResponseObject>(202, "Queued or still running (`background: true`, or the wait ended): the response as it stands; `Location` says where to read it."),
            Op::get("/v1/responses/{id}", Keyed, "One response this key made")
                .ok::<ResponseObject>("The response as it stands, with the `instructions`, `metadata` and `previous_response_id` it was created with; an unknown or deleted id is 404 `job_not_found`."),
            Op::delete("/v1/responses/{id}", Keyed, "Delete a stored response")
                .describe("Erases the response's input, output and what it echoed now, as the retention purge would later; its usage stays counted. It can no longer be read, listed, referenced or continued.")
                .ok::<ResponseDeleted>("Deleted; a response still queued or running is 409 `job_not_finished` (cancel it first), an unknown or already deleted one 404 `job_not_found`."),
            Op::post("/v1/responses/{id}/cancel", Keyed, "Cancel a response")
                .describe("Stops a response that has not finished (queued, or being generated: its worker stops it within a second) and refunds its call.")
                .ok::<ResponseObject>("The response, `cancelled` (again for one already cancelled); one that finished first is 409 `job_finished`, an unknown id 404 `job_not_found`."),
            Op::get("/v1/responses/{id}/input_items", Keyed, "A response's input items")
                .describe("The items of the response's own `input` (not its `instructions`, nor the conversation it continued), newest first unless `order=asc`; `limit` 1–100 (default 20), `after` an item id. Each item's `id` can be sent back as an `item_reference`.")
                .ok::<InputItemList>("One page of items."),
        ],
    )
}

fn seed000() -> Family {
    (
        "seed000",
        "The UNCC LoRA-head API's routes (its `POST /generate` is seed 001's).",
        vec![
            Op::post("/generate-embedding", Metered, "One text, one vector")
                .body::<compat::seed000::EmbeddingRequest>()
                .ok::<Seed000Embedding>("The vector.")
                .accepted(),
            Op::post("/attach-head", Admin, "Register a LoRA head")
                .body::<admin::adapters::AttachRequest>()
                .answer::<Adapter>(201, "Registered; 409 for a taken name, 422 for a bad file."),
        ],
    )
}

fn seed001() -> Family {
    (
        "seed001",
        "The queue-based API: a client `job_id` makes retries idempotent per route and body.",
        vec![
            Op::post(
                "/generate",
                Metered,
                "Generate from `content` (or `prompt`)",
            )
            .body::<compat::seed001::GenerateRequest>()
            .ok::<Seed001Answer>("The generated text.")
            .accepted(),
            Op::post("/chat_completion", Metered, "Generate from `messages`")
                .body::<compat::seed001::ChatRequest>()
                .ok::<Seed001Answer>("The generated text.")
                .accepted(),
        ],
    )
}

fn seed002() -> Family {
    (
        "seed002",
        "The vLLM engine manager's routes: logins, users, requests with memory, engines.",
        vec![
            Op::post(
                "/token",
                Public,
                "Log in: username and password to a bearer token",
            )
            .json_or_form::<compat::seed002::Credentials>()
            .ok::<LoginToken>("A token (an API key of the user)."),
            Op::post("/db_request/add_user", Admin, "Add a user")
                .body::<compat::seed002::AddUser>()
                .ok::<StatusMessage>("Added; 409 `user_exists` for a taken name."),
            Op::post(
                "/llm_request",
                Metered,
                "Generate, optionally with server-side memory",
            )
            .body::<compat::seed002::LlmRequest>()
            .ok::<LlmAnswer>("The generated text.")
            .accepted(),
            Op::get("/active_models", Keyed, "The engines loaded now")
                .ok_list::<ActiveModel>("One entry per ready engine this key may use."),
            Op::post("/vllm_request/start", Keyed, "Start an engine (any key: one already running; admin: load a GGUF)")
                .body::<compat::seed002::StartRequest>()
                .ok::<EngineStarted>("Loaded (or already running).")
                .answer::<ErrorBody>(403, "`admin_scope_required`: the model is not running and loading it needs an admin key."),
            Op::post("/vllm_request/terminate", Admin, "Unload an engine")
                .body::<compat::seed002::TerminateRequest>()
                .ok::<Terminated>("Unloaded."),
        ],
    )
}

fn seed004() -> Family {
    (
        "seed004",
        "The model-configuration manager under `/llm/`.",
        vec![
            Op::post("/llm/configure_model", Admin, "Store a model configuration")
                .body::<compat::seed004::ConfigureRequest>()
                .ok::<ConfigCreated>("Stored."),
            Op::post(
                "/llm/load_model/{config_id}",
                Admin,
                "Load a stored configuration",
            )
            .ok::<ModelLoaded>("Loaded (or already loaded)."),
            Op::post("/llm/unload_model/{model_id}", Admin, "Unload a model")
                .ok::<Message>("Unloaded; the default model is 409 `model_pinned`."),
            Op::post("/llm/inference", Metered, "Generate on a loaded model")
                .body::<compat::seed004::InferenceRequest>()
                .ok::<InferenceAnswer>("The generated text.")
                .accepted(),
            Op::get("/llm/configurations", Keyed, "Stored configurations")
                .ok_list::<ModelConfig>("Those this key may see."),
            Op::get("/llm/configuration/{config_id}", Keyed, "One configuration")
                .ok::<ModelConfig>("The configuration."),
            Op::delete(
                "/llm/configuration/{config_id}",
                Admin,
                "Delete a configuration",
            )
            .ok::<Deleted>("Deleted; a loaded one is 409 `config_in_use`."),
            Op::get("/llm/loaded_models", Keyed, "Models loaded now")
                .ok::<ModelIds>("Their ids, default model first."),
        ],
    )
}

fn llama_server() -> Family {
    (
        "llama_server",
        "llama.cpp server's own routes: tokens and templates with the served model's tokenizer \
         and chat template (nothing is charged), and its completion route (charged).",
        vec![
            Op::post("/completion", Metered, "Completion in llama.cpp server's shape")
                .describe("`prompt`, `n_predict` (-1: as many as allowed), llama.cpp's sampler fields, `json_schema`; `stream: true` sends `data:` chunks `{\"content\", \"stop\": false}` and a last one with `\"stop\": true` and the totals.")
                .body::<compat::llama_server::CompletionRequest>()
                .ok::<LlamaCompletion>("The text and llama-server's totals.")
                .events("With `stream: true`: `{\"content\", \"stop\": false}` chunks, then the final object.")
                .accepted(),
            Op::post("/completions", Metered, "The same as `/completion` (llama-server's alias)")
                .body::<compat::llama_server::CompletionRequest>()
                .ok::<LlamaCompletion>("The text and llama-server's totals.")
                .events("With `stream: true`: `{\"content\", \"stop\": false}` chunks, then the final object.")
                .accepted(),
            Op::get("/props", Keyed, "The served model's context, slots and chat template")
                .ok::<LlamaProps>("What llama-server's clients size requests by."),
            Op::post("/tokenize", Keyed, "Text to token ids")
                .body::<compat::llama_server::TokenizeRequest>()
                .ok::<Tokens>("The ids (with `with_pieces`: ids and texts)."),
            Op::post("/detokenize", Keyed, "Token ids to text")
                .body::<compat::llama_server::DetokenizeRequest>()
                .ok::<Detokenized>("The text; ids outside the vocabulary are 422 `invalid_input`."),
            Op::post(
                "/apply-template",
                Keyed,
                "The prompt a chat would make, not generated",
            )
            .body::<openai::ChatRequest>()
            .ok::<Templated>(
                "The text the model would read: its chat template applied, tools rendered, \
                     ending in an open assistant turn. Refused as `/v1/chat/completions` would \
                     refuse it; remote models: 400 `unsupported_parameter`.",
            ),
        ],
    )
}

fn ollama() -> Family {
    let stream = "Streamed (Ollama's default, `stream` absent or true): one JSON object per line, \
                  `\"done\": false` with each piece of text, then the closing one with \
                  `\"done\": true`; a failed job ends with `{\"error\"}`.";
    (
        "ollama",
        "Ollama's own API, for the tools built on it; keys as everywhere (`Authorization: Bearer`).",
        vec![
            Op::post("/api/chat", Metered, "Chat in Ollama's shape")
                .body::<compat::ollama::ChatRequest>()
                .ok::<OllamaChat>("With `stream: false`: the answer and its counts.")
                .text(200, "application/x-ndjson", stream)
                .accepted(),
            Op::post("/api/generate", Metered, "Completion in Ollama's shape")
                .body::<compat::ollama::GenerateRequest>()
                .ok::<OllamaGenerate>("With `stream: false`: the answer and its counts.")
                .text(200, "application/x-ndjson", stream)
                .accepted(),
            Op::post("/api/embed", Metered, "Embeddings in Ollama's shape")
                .body::<compat::ollama::EmbedRequest>()
                .ok::<OllamaEmbed>("A vector per input; inputs over the embedding context cut to fit unless `truncate: false`.")
                .accepted(),
            Op::post("/api/embeddings", Metered, "One embedding in Ollama's older shape")
                .body::<compat::ollama::EmbeddingsRequest>()
                .ok::<OllamaEmbedding>("The vector.")
                .accepted(),
            Op::get("/api/tags", Keyed, "Models this key may use, as Ollama lists them")
                .ok::<OllamaTags>("The list."),
            Op::get("/api/ps", Keyed, "Models loaded now (every served model stays resident)")
                .ok::<OllamaTags>("The list, with `expires_at` and `size_vram`."),
            Op::post("/api/show", Keyed, "A model's context length, template and family")
                .body::<compat::ollama::ShowRequest>()
                .ok::<OllamaShow>("What LlamaIndex, Continue and Open WebUI read before they call."),
            Op::get("/api/version", Public, "The Ollama API version followed (Ollama's probe)")
                .ok::<OllamaVersion>("The version."),
            Op::get("/", Public, "Ollama's liveness answer")
                .text(200, "text/plain; charset=utf-8", "`Ollama is running`."),
        ],
    )
}

fn admin() -> Family {
    (
        "admin",
        "Management with an `admin`-scope key: LoRA heads, workers, seed 002's users.",
        vec![
            Op::get("/api/adapters", Admin, "Registered LoRA heads")
                .ok::<AdapterList>("Every head and the workers holding it."),
            Op::post("/api/adapters", Admin, "Register a LoRA head")
                .body::<admin::adapters::AttachRequest>()
                .answer::<Adapter>(201, "Registered; 409 for a taken name, 422 for a bad file."),
            Op::get("/api/adapters/{name}", Admin, "One LoRA head").ok::<Adapter>("The head."),
            Op::delete(
                "/api/adapters/{name}",
                Admin,
                "Unregister a LoRA head (the file stays)",
            )
            .ok::<AdapterDeleted>("Removed."),
            Op::get("/api/workers", Admin, "Workers that have heartbeated")
                .ok::<WorkerList>("Every worker with its state."),
            Op::get("/api/users", Admin, "Seed 002's users").ok::<UserList>("Every user."),
            Op::get("/api/users/{username}", Admin, "One user").ok::<User>("The user."),
            Op::patch("/api/users/{username}", Admin, "Change a user")
                .describe("A disabled user's tokens stop at once; `null` removes a limit.")
                .body::<admin::users::ChangeRequest>()
                .ok::<User>("The user as changed."),
            Op::delete(
                "/api/users/{username}",
                Admin,
                "Delete a user (its tokens revoked)",
            )
            .ok::<UserDeleted>("Deleted."),
            Op::post(
                "/api/users/{username}/reset",
                Admin,
                "Zero a user's token counters",
            )
            .ok::<User>("The user."),
        ],
    )
}

fn dashboard() -> Family {
    const PAGE: &str = "The page.";
    const FORM_ERRORS: &str = "The page again with the form's errors.";
    (
        "dashboard",
        "The admin dashboard: server-rendered HTML pages and forms behind a session cookie.",
        vec![
            Op::get("/admin", Session, "To the overview").redirect("To `/admin/overview`."),
            Op::get(
                "/admin/static/dashboard.css",
                SessionPublic,
                "The stylesheet",
            )
            .text(200, "text/css; charset=utf-8", "CSS."),
            Op::get("/admin/login", SessionPublic, "Sign-in page")
                .html(200, "The form (sets the CSRF cookie it checks)."),
            Op::post("/admin/login", SessionPublic, "Sign in")
                .form::<LoginForm>()
                .redirect("Signed in: to the key list, with the session cookie.")
                .html(401, "Wrong email or password.")
                .html(403, "The form's CSRF token is missing or stale.")
                .html(429, "Too many failed sign-ins."),
            Op::post("/admin/logout", Session, "Sign out")
                .form::<CsrfForm>()
                .redirect("To the sign-in page."),
            Op::get("/admin/setup", SessionPublic, "First-run setup page")
                .query_text("token", "The single-use token of the setup link.")
                .html(200, PAGE)
                .html(404, "The link is used up, expired or unknown."),
            Op::post("/admin/setup", SessionPublic, "Create the first admin")
                .form::<SetupForm>()
                .redirect("Created and signed in.")
                .html(404, "The link is used up, expired or unknown.")
                .html(422, FORM_ERRORS),
            Op::get(
                "/admin/overview",
                Session,
                "Jobs, latency, queues and workers",
            )
            .html(200, PAGE),
            Op::get("/admin/keys", Session, "Keys")
                .query_text("q", "Search by name, email or prefix.")
                .html(200, PAGE),
            Op::post("/admin/keys", Session, "Create a key")
                .form::<KeyForm>()
                .html(201, "The new key's secret, shown once.")
                .html(422, FORM_ERRORS),
            Op::get("/admin/keys/new", Session, "The new-key form").html(200, PAGE),
            Op::get(
                "/admin/keys/{prefix}",
                Session,
                "One key: usage charts, recent jobs, edit form",
            )
            .html(200, PAGE)
            .html(404, "No such key."),
            Op::post(
                "/admin/keys/{prefix}",
                Session,
                "Edit a key's limits and window",
            )
            .form::<KeyForm>()
            .redirect("Saved: to the key's page.")
            .html(404, "No such key.")
            .html(422, FORM_ERRORS),
            Op::post(
                "/admin/keys/{prefix}/rotate",
                Session,
                "A new secret for the key",
            )
            .form::<CsrfForm>()
            .html(200, "The new secret, shown once.")
            .html(404, "No such key."),
            Op::post("/admin/keys/{prefix}/revoke", Session, "Revoke a key")
                .form::<CsrfForm>()
                .redirect("To the key list.")
                .html(404, "No such key."),
            Op::post(
                "/admin/keys/{prefix}/reactivate",
                Session,
                "Reactivate a key",
            )
            .form::<CsrfForm>()
            .redirect("To the key list.")
            .html(404, "No such key."),
            Op::get("/admin/jobs", Session, "Recent jobs")
                .query_text("status", "queued, running, done or failed.")
                .query_text("key", "A key's prefix.")
                .query_text("model", "A model id.")
                .html(200, PAGE),
            Op::get(
                "/admin/jobs/{id}",
                Session,
                "One job: timings, worker, request, result",
            )
            .html(200, PAGE)
            .html(404, "No such job."),
            Op::get("/admin/adapters", Session, "LoRA heads").html(200, PAGE),
            Op::post("/admin/adapters", Session, "Register a LoRA head")
                .form::<AdapterForm>()
                .redirect("Registered: to the list.")
                .html(422, FORM_ERRORS),
            Op::post(
                "/admin/adapters/{name}/remove",
                Session,
                "Remove a LoRA head",
            )
            .form::<CsrfForm>()
            .redirect("Removed: to the list.")
            .html(404, "No such LoRA head."),
            Op::get(
                "/admin/users",
                Session,
                "Seed 002's users and their token budgets",
            )
            .html(200, PAGE),
            Op::post("/admin/users", Session, "Add a user")
                .form::<UserForm>()
                .redirect("Added: to the list.")
                .html(422, FORM_ERRORS),
            Op::post(
                "/admin/users/{username}/{action}",
                Session,
                "Enable, disable, reset or delete a user",
            )
            .describe(
                "`action` is `enable`, `disable`, `reset` (token counters to zero) or `delete`.",
            )
            .form::<CsrfForm>()
            .redirect("Done: to the list.")
            .html(404, "No such user or action."),
            Op::get(
                "/admin/models",
                Session,
                "Model configurations and the engines loaded",
            )
            .html(200, PAGE),
            Op::post(
                "/admin/models/{id}/load",
                Session,
                "Load a stored configuration",
            )
            .form::<CsrfForm>()
            .redirect("Loaded: to the list.")
            .html(404, "No such configuration."),
            Op::post("/admin/models/{id}/unload", Session, "Unload a model")
                .form::<CsrfForm>()
                .redirect("Unloaded: to the list."),
            Op::get("/admin/api", Session, "This API, as a page").html(200, PAGE),
        ],
    )
}
