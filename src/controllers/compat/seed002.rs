//! Seed 002's (the vLLM engine manager's) routes: `POST /token` (username + password → bearer
//! token), `POST /db_request/add_user/` (admin), `POST /llm_request` (with optional server-side
//! conversation memory), `GET /active_models/`, and `POST /vllm_request/start|terminate`
//! (admin; load and unload a GGUF like seed 004's `load_model`). Spec: ../shared/seeds/002.
//!
//! A token is an ordinary API key linked to the user, so every other route accepts it too, and
//! every generation made with it is charged to the key and reserved against the user's token
//! budget (see `models::budgets`).

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap},
    response::{IntoResponse, Response},
    Json,
};
use loco_rs::{app::AppContext, controller::Routes};
use serde::Deserialize;
use serde_json::{json, Map};

use super::seed004::create_config;
use crate::serving::model_id_for_file;
use crate::{
    admission::{GenerationInput, Memory, ModelChoice, SamplingInput, Ticket},
    controllers::respond::{answer, usage_json},
    errors::{ApiError, ApiResult, ErrorCode},
    extractors::{AdminCaller, Caller, ClientAddress, JsonBody, MeteredCaller},
    models::{
        api_keys,
        conversations::Owner,
        model_configs::{self, NewConfig},
        model_placements,
        users::{self, Login, NewUser, Role},
        ModelError,
    },
    services::Services,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct Credentials {
    username: Option<String>,
    password: Option<String>,
    /// OAuth2 password-flow clients (FastAPI's `OAuth2PasswordRequestForm`) send
    /// `grant_type=password`; other fields they send (`scope`, `client_id`) are ignored.
    grant_type: Option<String>,
}

/// The login body: JSON (the seed's documented request) or a form (OAuth2 clients).
async fn read_credentials(req: Request<Body>, limit: usize) -> ApiResult<Credentials> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let is_form = content_type == "application/x-www-form-urlencoded";
    if !(is_form || content_type.is_empty() || content_type.ends_with("json")) {
        return Err(ApiError::new(ErrorCode::UnsupportedContentType,
            format!(
                "send the credentials as JSON or application/x-www-form-urlencoded, got {content_type}"
            ),
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::new(ErrorCode::InvalidEncoding, "the body is not UTF-8"))?
        .trim();
    if text.is_empty() {
        return Err(ApiError::new(
            ErrorCode::EmptyBody,
            "send {\"username\": …, \"password\": …}",
        ));
    }
    // `curl -d '{…}'` labels JSON as a form: a body that opens like JSON is read as JSON.
    if text.starts_with('{') || !is_form {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        return serde_json::from_value(value)
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("invalid request: {e}")));
    }
    serde_urlencoded::from_str(text)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("invalid form: {e}")))
}

/// `POST /token`: `{"username", "password"}` (JSON or form) → `{"username", "access_token",
/// "token_type": "bearer", "expires_in", "expires_at"}`.
#[tracing::instrument(skip_all)]
async fn token(State(ctx): State<AppContext>, req: Request<Body>) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let ClientAddress(address) = ClientAddress::of(
        req.headers(),
        req.extensions(),
        services.settings.auth.trust_forwarded_for,
    );
    let creds = read_credentials(req, services.settings.api.max_body_bytes).await?;
    if creds
        .grant_type
        .as_deref()
        .is_some_and(|g| !g.is_empty() && g != "password")
    {
        return Err(ApiError::new(
            ErrorCode::UnsupportedGrantType,
            "only grant_type=password is supported",
        ));
    }
    let (Some(username), Some(password)) =
        (creds.username.map(|u| u.trim().to_string()), creds.password)
    else {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            "`username` and `password` are required",
        ));
    };
    if username.is_empty() || password.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidBody,
            "`username` and `password` must not be empty",
        ));
    }
    if let Err(wait) = services.logins.begin(&address, &username) {
        return Err(ApiError::new(
            ErrorCode::TooManyLoginAttempts,
            format!(
                "too many failed logins for this username or from this address; try again in {} s",
                wait.as_secs().max(1)
            ),
        )
        .retry_after(wait.as_secs() + 1));
    }
    let permit = services.password_check()?;
    let login = users::authenticate(&ctx.db, &username, &password).await;
    drop(permit);
    let user = match login? {
        Login::Ok(user) => user,
        Login::Disabled(_) => {
            services.logins.succeeded(&address, &username);
            return Err(ApiError::new(
                ErrorCode::UserDisabled,
                "this user is disabled",
            ));
        }
        Login::Invalid => {
            tracing::info!("failed login");
            return Err(ApiError::new(
                ErrorCode::InvalidCredentials,
                "incorrect username or password",
            ));
        }
    };
    services.logins.succeeded(&address, &username);
    let ttl = chrono::Duration::minutes(i64::from(services.settings.auth.token_ttl_minutes));
    let issued = users::issue_token(&ctx.db, &user, ttl).await?;
    tracing::info!(user_id = user.id, key = %issued.key.prefix, "login token issued");
    Ok(Json(json!({
        "username": user.username,
        "access_token": issued.secret,
        "token_type": "bearer",
        "expires_in": ttl.num_seconds(),
        "expires_at": issued.key.valid_until.map(|t| t.to_rfc3339()),
    }))
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct AddUser {
    username: String,
    password: String,
    /// Tokens already spent (users migrated from seed 002 keep their counters).
    prompt_token_number: Option<i64>,
    gen_token_number: Option<i64>,
    gen_token_limit: Option<i64>,
    prompt_token_limit: Option<i64>,
    /// Tollgate extension: `user` (default) or `admin`.
    role: Option<String>,
    /// Tollgate extension: create the user disabled.
    enabled: Option<bool>,
}

/// `POST /db_request/add_user/` (admin scope) → `{"status": "success", "message"}`.
#[tracing::instrument(skip_all, fields(api_key))]
async fn add_user(
    State(ctx): State<AppContext>,
    AdminCaller(_admin): AdminCaller,
    body: Result<JsonBody<AddUser>, ApiError>,
) -> ApiResult<Response> {
    let JsonBody(body) = body?;
    let invalid = |e: ModelError| ApiError::new(ErrorCode::InvalidUser, e.to_string());
    let role = body
        .role
        .as_deref()
        .map(Role::parse)
        .transpose()
        .map_err(invalid)?
        .unwrap_or_default();
    let created = users::ActiveModel::create(
        &ctx.db,
        NewUser {
            username: body.username,
            password: body.password,
            role,
            enabled: body.enabled.unwrap_or(true),
            prompt_token_limit: body.prompt_token_limit,
            gen_token_limit: body.gen_token_limit,
            prompt_tokens_used: body.prompt_token_number.unwrap_or(0),
            gen_tokens_used: body.gen_token_number.unwrap_or(0),
            min_password_chars: 1,
        },
    )
    .await;
    let user = match created {
        Ok(user) => user,
        Err(e @ ModelError::Invalid(_)) => return Err(invalid(e)),
        Err(ModelError::Conflict(message)) => {
            return Err(ApiError::new(ErrorCode::UserExists, message))
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(user_id = user.id, role = %user.role, "user added");
    Ok(Json(json!({
        "status": "success",
        "message": format!("user {} added", user.username),
    }))
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct LlmRequest {
    model: String,
    // `inference_endpoint` (seed 002: the vLLM server to call) is accepted and ignored, like
    // any other unknown field: Tollgate serves the model itself.
    prompt: String,
    memory: Option<bool>,
    conversation_number: Option<i64>,
    #[serde(flatten)]
    sampling: SamplingInput,
}

/// The caller's name in seed 002's answers: the key's user, or the key's own name.
async fn caller_name(db: &sea_orm::DatabaseConnection, key: &api_keys::Model) -> ApiResult<String> {
    Ok(match key.user_id {
        Some(id) => users::Model::find(db, id)
            .await?
            .map_or_else(|| key.name.clone(), |u| u.username),
        None => key.name.clone(),
    })
}

impl LlmRequest {
    /// The request as admission takes it; `owner` keeps the conversation when `memory` is on.
    fn into_input(self, owner: Owner) -> ApiResult<GenerationInput> {
        let memory = match (self.memory.unwrap_or(false), self.conversation_number) {
            (false, _) => None,
            (true, Some(number)) => Some(Memory { owner, number }),
            (true, None) => {
                return Err(ApiError::new(
                    ErrorCode::ConversationNumberRequired,
                    "`conversation_number` is required when `memory` is true",
                ))
            }
        };
        let mut input = GenerationInput::user_turn(
            "prompt",
            self.prompt,
            self.sampling,
            ModelChoice::named(Some(self.model)),
        )?;
        input.memory = memory;
        Ok(input)
    }
}

/// `POST /llm_request` → `{"username", "data"}` (plus `job_id` and `usage`). With `memory`,
/// admission puts the stored conversation before the prompt and stores the exchange once the
/// job is done, whether or not the client still waits.
#[tracing::instrument(skip_all, fields(api_key))]
async fn llm_request(
    State(ctx): State<AppContext>,
    MeteredCaller(key): MeteredCaller,
    body: Result<JsonBody<LlmRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let input = body.into_input(Owner::of(&key))?;
    let admitted = services
        .admission
        .admit(&key, input, Ticket::wait("/llm_request"))
        .await?;
    let username = caller_name(&ctx.db, &key).await?;
    answer(admitted, |job| {
        json!({
            "username": username,
            "data": job.result.clone().unwrap_or_default(),
            "job_id": job.id,
            "usage": usage_json(job),
        })
    })
}

/// `GET /active_models/`: the models this server's worker has loaded, in seed 002's shape,
/// from what the engine reports (an engine that is not ready is not listed; with workers in
/// other processes this instance sees no engine and lists none).
#[tracing::instrument(skip_all, fields(api_key))]
async fn active_models(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let caller = caller_name(&ctx.db, &key).await?;
    let endpoint = openai_base_url(&headers);
    // `seed`: the `SEED` an engine was started with (its sampling default), else null.
    let entry =
        |container: Option<String>, status: crate::engine::EngineStatus, seed: Option<i64>| {
            json!({
                "engine_name": status.model,
                "container_id": container,
                "model_name": status.model,
                "quantized": status.quantized,
                "max_model_length": status.context_size,
                "seed": seed,
                "inference_end_point": endpoint,
                "timestamp": status.loaded_at,
                // Models are shared by every user; the seed listed the caller's own engines.
                "user_id": caller,
                "device": status.device,
            })
        };
    let models = &services.models;
    let mut list: Vec<serde_json::Value> = models
        .engine_status()
        .filter(|status| status.ready)
        .map(|status| entry(models.worker_name().map(str::to_string), status, None))
        .into_iter()
        .collect();
    // Engines started with `/vllm_request/start` or `/llm/load_model`.
    list.extend(
        models
            .loaded()
            .iter()
            .map(|m| (m.model_id.clone(), m.status(), m.defaults.sampling.seed))
            .filter(|(_, status, _)| status.ready)
            .map(|(id, status, seed)| entry(Some(id), status, seed)),
    );
    // Worker processes elsewhere (production).
    list.extend(
        models
            .remote_workers()
            .await
            .iter()
            .filter_map(|w| w.engine_status().map(|status| (w.id.clone(), status)))
            .filter(|(_, status)| status.ready)
            .map(|(id, status)| entry(Some(id), status, None)),
    );
    // A key limited to some models sees only those engines.
    list.retain(|e| {
        e["model_name"]
            .as_str()
            .is_some_and(|m| key.permits_model(m))
    });
    Ok(Json(list).into_response())
}

/// Seed 002's engine start request. The Hugging Face token is accepted for compatibility and
/// dropped at once: models come from the local models directory, never from a hub.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(non_snake_case)]
pub(crate) struct StartRequest {
    Model: String,
    MAX_MODEL_LEN: Option<u32>,
    SEED: Option<i64>,
    /// One engine runs on one GPU here: 1 is what happens anyway; more is refused by name.
    TENSOR_PARALLEL_SIZE: Option<i64>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct TerminateRequest {
    container_id: String,
}

/// This server's OpenAI base URL as the client reached it (`X-Forwarded-*` aware).
pub fn openai_base_url(headers: &HeaderMap) -> String {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let host = header("x-forwarded-host")
        .or_else(|| header("host"))
        .unwrap_or_else(|| "localhost".into());
    let scheme = header("x-forwarded-proto").unwrap_or_else(|| "http".into());
    format!("{scheme}://{host}/v1")
}

/// Any key may "start" a model that already runs (the default, or one started before): the
/// answer is that it is healthy, as seed 002's users start their engine before they call.
/// Loading new weights takes memory every user shares, so that needs an `admin` key.
#[tracing::instrument(skip_all, fields(api_key))]
async fn vllm_start(
    State(ctx): State<AppContext>,
    Caller(key): Caller,
    headers: HeaderMap,
    body: Result<JsonBody<StartRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    if let Some(n) = body.TENSOR_PARALLEL_SIZE.filter(|n| *n != 1) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedParameter,
            format!("TENSOR_PARALLEL_SIZE {n} is not supported: each engine runs on one GPU (run one worker per GPU)"),
        ));
    }
    let default = services.models.default_name().to_string();
    // Seed 002 names Hugging Face models; `settings.aliases` says what each is here.
    let asked = body.Model.trim();
    let file = services.models.alias(asked).unwrap_or(asked).to_string();
    // A GGUF file named as such starts an engine of its own (with `MAX_MODEL_LEN`, `SEED`),
    // even the default model's file; any other name of the default model is that model.
    let model_id = if file.ends_with(".gguf") {
        model_id_for_file(&file)
    } else if services.models.canonical(asked) == default || file == default {
        default.clone()
    } else {
        model_id_for_file(&file)
    };
    let mut status = "healthy";
    let message = if model_id == default {
        "the default model is always running".to_string()
    } else if services.models.get(&model_id).is_some() {
        format!("engine {model_id} was already running")
    } else if !key.is_admin() {
        return Err(ApiError::new(
            ErrorCode::AdminScopeRequired,
            format!(
                "model {asked:?} is not running; starting a new engine loads its weights and needs a key with the `admin` scope (the default model {default:?} is always running)"
            ),
        ));
    } else {
        let mut kwargs = Map::new();
        if let Some(n) = body.MAX_MODEL_LEN {
            kwargs.insert("context_size".into(), n.into());
        }
        if let Some(seed) = body.SEED {
            kwargs.insert("seed".into(), seed.into());
        }
        let config = create_config(
            &ctx.db,
            NewConfig {
                model_id: model_id.clone(),
                model_name: file.clone(),
                model_type: "vllm_request".into(),
                model_kwargs: kwargs,
            },
        )
        .await?;
        match services.models.load_or_place(&config).await {
            Ok(placed) if placed.pending => {
                status = "starting";
                format!("engine {model_id} is starting on a worker")
            }
            Ok(placed) if placed.newly => format!("engine {model_id} started"),
            Ok(_) => {
                model_configs::delete(&ctx.db, &config.config_id).await?;
                format!("engine {model_id} was already running")
            }
            Err(e) => {
                model_configs::delete(&ctx.db, &config.config_id).await?;
                return Err(e);
            }
        }
    };
    Ok(Json(json!({
        "message": message,
        "vLLM_endpoint": openai_base_url(&headers),
        "engine_name": model_id,
        "container_id": model_id,
        "user_info": {"key": key.prefix, "name": key.name},
        "status": status,
    }))
    .into_response())
}

#[tracing::instrument(skip_all, fields(api_key))]
async fn vllm_terminate(
    State(ctx): State<AppContext>,
    AdminCaller(_key): AdminCaller,
    body: Result<JsonBody<TerminateRequest>, ApiError>,
) -> ApiResult<Response> {
    let services = Services::from_ctx(&ctx)?;
    let JsonBody(body) = body?;
    let model_id = body.container_id.trim().to_string();
    let config_id = match services.models.get(&model_id) {
        Some(m) => Some(m.config_id.clone()),
        None => model_placements::find(&ctx.db, &model_id)
            .await?
            .map(|p| p.config_id),
    };
    services.models.unload_or_unplace(&model_id).await?;
    // Engines started through /vllm_request own their configuration.
    if let Some(config_id) = config_id {
        if let Some(config) = model_configs::Model::find_by_config_id(&ctx.db, &config_id).await? {
            if config.model_type == "vllm_request" {
                model_configs::delete(&ctx.db, &config_id).await?;
            }
        }
    }
    Ok(Json(json!({"status": "terminated"})).into_response())
}

pub fn routes() -> Routes {
    Routes::new()
        // Trailing-slash forms (the seed's `/active_models/`, `/db_request/add_user/`) reach
        // these through `app::into_service`, which trims the slash before routing.
        .add("/token", axum::routing::post(token))
        .add("/db_request/add_user", axum::routing::post(add_user))
        .add("/llm_request", axum::routing::post(llm_request))
        .add("/active_models", axum::routing::get(active_models))
        .add("/vllm_request/start", axum::routing::post(vllm_start))
        .add(
            "/vllm_request/terminate",
            axum::routing::post(vllm_terminate),
        )
}
