//! The OpenAPI 3.1 document of every route, served at `GET /openapi.json` and shown as the
//! dashboard's API page (`/admin/api`).
//!
//! Request bodies and query strings are the handlers' own wire types, which derive
//! `utoipa::ToSchema` next to their routes; answers, which handlers build as JSON values, are
//! described in [`schemas`]. [`routes`] lists every route of the router once with who may call
//! it ([`Access`]); the security requirement and the refusals each kind of caller can get follow
//! from that, so no row repeats them and the controllers carry no documentation attributes.
//! `tests/openapi.rs` fails when the router serves a route this document lacks.

mod routes;
pub mod schemas;

use std::{collections::BTreeMap, sync::OnceLock};

use utoipa::{
    openapi::{
        extensions::ExtensionsBuilder,
        header::HeaderBuilder,
        path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, Paths},
        request_body::RequestBodyBuilder,
        response::ResponseBuilder,
        schema::{ArrayBuilder, SchemaType},
        security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        },
        tag::TagBuilder,
        ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder,
        Ref, RefOr, Required, Response, Schema, Type,
    },
    IntoParams, PartialSchema, ToSchema,
};

/// The extension naming an operation's [`Access`] (`x-tollgate-access`): the API page shows
/// it, and the fuzz test reads which operations spend a call from it.
pub const ACCESS_EXTENSION: &str = "x-tollgate-access";

/// Who may call a route. Decides its security requirement and the refusals it documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, key or not (health checks, metrics, the login route).
    Public,
    /// Any key in good standing; nothing is spent.
    Keyed,
    /// A key in good standing that may spend a call: a generation or an embedding.
    Metered,
    /// A key in good standing with the `admin` scope.
    Admin,
    /// A dashboard page or form behind an admin's browser session.
    Session,
    /// A dashboard page reached before signing in.
    SessionPublic,
}

impl Access {
    /// The name the document gives it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Keyed => "keyed",
            Self::Metered => "metered",
            Self::Admin => "admin",
            Self::Session => "session",
            Self::SessionPublic => "session_public",
        }
    }

    const fn keyed(self) -> bool {
        matches!(self, Self::Keyed | Self::Metered | Self::Admin)
    }

    const fn dashboard(self) -> bool {
        matches!(self, Self::Session | Self::SessionPublic)
    }
}

/// The security scheme of API keys (`Authorization: Bearer tg_…`).
const BEARER: &str = "api_key";
/// The security scheme of dashboard sessions (the `tg_admin` cookie).
const SESSION: &str = "admin_session";

/// One documented operation, as a row of the route table builds it.
pub(crate) struct Op {
    method: HttpMethod,
    path: &'static str,
    access: Access,
    operation: OperationBuilder,
    /// Status (or `default`) → response, in the order rows add them.
    responses: Vec<(String, RefOr<Response>)>,
    /// The schemas the row refers to, for the document's components.
    schemas: Vec<(String, RefOr<Schema>)>,
}

impl Op {
    fn new(method: HttpMethod, path: &'static str, access: Access, summary: &str) -> Self {
        Self {
            method,
            path,
            access,
            operation: OperationBuilder::new().summary(Some(summary)),
            responses: Vec::new(),
            schemas: Vec::new(),
        }
    }

    pub(crate) fn get(path: &'static str, access: Access, summary: &str) -> Self {
        Self::new(HttpMethod::Get, path, access, summary)
    }

    pub(crate) fn post(path: &'static str, access: Access, summary: &str) -> Self {
        Self::new(HttpMethod::Post, path, access, summary)
    }

    pub(crate) fn patch(path: &'static str, access: Access, summary: &str) -> Self {
        Self::new(HttpMethod::Patch, path, access, summary)
    }

    pub(crate) fn delete(path: &'static str, access: Access, summary: &str) -> Self {
        Self::new(HttpMethod::Delete, path, access, summary)
    }

    /// A longer description (Markdown).
    pub(crate) fn describe(mut self, text: &str) -> Self {
        self.operation = self.operation.description(Some(text));
        self
    }

    /// A reference to `T`'s schema, collecting it (and what it refers to) for the components.
    fn schema_of<T: ToSchema>(&mut self) -> RefOr<Schema> {
        let name = T::name().to_string();
        self.schemas.push((name.clone(), T::schema()));
        T::schemas(&mut self.schemas);
        Ref::from_schema_name(name).into()
    }

    fn request_body(mut self, media_types: &[&str], schema: &RefOr<Schema>) -> Self {
        let mut body = RequestBodyBuilder::new().required(Some(Required::True));
        for media_type in media_types {
            body = body.content(
                *media_type,
                ContentBuilder::new().schema(Some(schema.clone())).build(),
            );
        }
        self.operation = self.operation.request_body(Some(body.build()));
        self
    }

    /// A JSON body of type `T` (the handler's own wire type).
    pub(crate) fn body<T: ToSchema>(mut self) -> Self {
        let schema = self.schema_of::<T>();
        self.request_body(&["application/json"], &schema)
    }

    /// `T` as JSON or as an HTML form (OAuth2 password-flow clients send forms).
    pub(crate) fn json_or_form<T: ToSchema>(mut self) -> Self {
        let schema = self.schema_of::<T>();
        self.request_body(
            &["application/json", "application/x-www-form-urlencoded"],
            &schema,
        )
    }

    /// An HTML form with the fields of `T` (dashboard forms).
    pub(crate) fn form<T: ToSchema>(mut self) -> Self {
        let schema = self.schema_of::<T>();
        self.request_body(&["application/x-www-form-urlencoded"], &schema)
    }

    /// Query parameters of type `P` (the handler's own query type).
    pub(crate) fn query<P: IntoParams>(mut self) -> Self {
        self.operation = self
            .operation
            .parameters(Some(P::into_params(|| Some(ParameterIn::Query))));
        self
    }

    /// One optional text query parameter (the dashboard's filters, read as a map).
    pub(crate) fn query_text(mut self, name: &str, description: &str) -> Self {
        self.operation = self.operation.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(description))
                .schema(Some(string())),
        );
        self
    }

    /// Adds an answer; a second one for the same status adds its media types to the first.
    fn respond(mut self, status: &str, response: Response) -> Self {
        let same = self.responses.iter_mut().find(|(s, _)| s == status);
        if let Some((_, RefOr::T(existing))) = same {
            existing.content.extend(response.content);
        } else {
            self.responses.push((status.to_string(), response.into()));
        }
        self
    }

    /// `status` with a JSON body of type `T`.
    pub(crate) fn answer<T: ToSchema>(mut self, status: u16, description: &str) -> Self {
        let schema = self.schema_of::<T>();
        self.respond(&status.to_string(), json_response(description, schema))
    }

    /// 200 with a JSON body of type `T`.
    pub(crate) fn ok<T: ToSchema>(self, description: &str) -> Self {
        self.answer::<T>(200, description)
    }

    /// 200 with a JSON list of `T`.
    pub(crate) fn ok_list<T: ToSchema>(mut self, description: &str) -> Self {
        let item = self.schema_of::<T>();
        let list = ArrayBuilder::new().items(item).build();
        self.respond(
            "200",
            json_response(description, Schema::Array(list).into()),
        )
    }

    /// 202: a job still pending when the request's wait ended; where to poll is in `Location`.
    pub(crate) fn accepted(mut self) -> Self {
        let schema = self.schema_of::<schemas::JobAccepted>();
        let response = ResponseBuilder::new()
            .description("The job is queued or running: poll `poll_url` (also in `Location`).")
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(schema)).build(),
            )
            .header(
                "Location",
                HeaderBuilder::new().schema(Some(string())).build(),
            )
            .build();
        self.respond("202", response)
    }

    /// 200 with server-sent events (also: besides a JSON 200, for `stream: true`).
    pub(crate) fn events(mut self, description: &str) -> Self {
        let event = self.schema_of::<schemas::ServerSentEvent>();
        let response = ResponseBuilder::new()
            .description(description)
            .content(
                "text/event-stream",
                ContentBuilder::new().schema(Some(event)).build(),
            )
            .build();
        self.respond("200", response)
    }

    /// `status` with a text body of `media_type`.
    pub(crate) fn text(self, status: u16, media_type: &str, description: &str) -> Self {
        let response = ResponseBuilder::new()
            .description(description)
            .content(
                media_type,
                ContentBuilder::new().schema(Some(string())).build(),
            )
            .build();
        self.respond(&status.to_string(), response)
    }

    /// `status` with an HTML page.
    pub(crate) fn html(self, status: u16, description: &str) -> Self {
        self.text(status, "text/html; charset=utf-8", description)
    }

    /// 303 to another page (`Location`).
    pub(crate) fn redirect(self, description: &str) -> Self {
        let response = ResponseBuilder::new()
            .description(description)
            .header(
                "Location",
                HeaderBuilder::new().schema(Some(string())).build(),
            )
            .build();
        self.respond("303", response)
    }

    /// The finished operation: its path in the document, method, and the schemas it uses. The
    /// refusals its [`Access`] implies are added after the row's own answers.
    fn finish(
        self,
        tag: &str,
    ) -> (
        String,
        HttpMethod,
        utoipa::openapi::path::Operation,
        Vec<(String, RefOr<Schema>)>,
    ) {
        let Self {
            method,
            path,
            access,
            mut operation,
            mut responses,
            schemas,
        } = self;
        let doc_path = document_path(path);
        for name in path_params(path) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(string())),
            );
        }
        for (status, response) in implied_responses(access, &method) {
            if !responses.iter().any(|(s, _)| *s == status) {
                responses.push((status, response.into()));
            }
        }
        operation = match access {
            a if a.keyed() => {
                operation.security(SecurityRequirement::new(BEARER, Vec::<String>::new()))
            }
            Access::Session => {
                operation.security(SecurityRequirement::new(SESSION, Vec::<String>::new()))
            }
            _ => operation,
        };
        let method_name = method_name(&method);
        let operation = operation
            .tag(tag)
            .operation_id(Some(operation_id(method_name, &doc_path)))
            .responses(
                utoipa::openapi::ResponsesBuilder::new()
                    .responses_from_iter(responses)
                    .build(),
            )
            .extensions(Some(
                ExtensionsBuilder::new()
                    .add(ACCESS_EXTENSION, access.as_str())
                    .build(),
            ))
            .build();
        (doc_path, method, operation, schemas)
    }
}

fn method_name(method: &HttpMethod) -> &'static str {
    match method {
        HttpMethod::Get => "get",
        HttpMethod::Post => "post",
        HttpMethod::Put => "put",
        HttpMethod::Delete => "delete",
        HttpMethod::Options => "options",
        HttpMethod::Head => "head",
        HttpMethod::Patch => "patch",
        HttpMethod::Trace => "trace",
    }
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .build()
        .into()
}

fn json_response(description: &str, schema: RefOr<Schema>) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(schema)).build(),
        )
        .build()
}

fn error(description: &str) -> Response {
    json_response(
        description,
        Ref::from_schema_name(schemas::ErrorBody::name()).into(),
    )
}

/// The refusals every operation of an access class can get, whatever its own answers.
fn implied_responses(access: Access, method: &HttpMethod) -> Vec<(String, Response)> {
    let mut implied = Vec::new();
    if access.keyed() {
        implied.push((
            "401".into(),
            error("No key, an unknown or a revoked key (`missing_api_key`, `invalid_api_key`, `key_revoked`)."),
        ));
        implied.push((
            "403".into(),
            error(match access {
                Access::Admin => "Not an `admin`-scope key, or the key is outside its window or its user is disabled.",
                _ => "The key is outside its window, its user is disabled, or its allow-lists leave out the model.",
            }),
        ));
        implied.push((
            "429".into(),
            error(match access {
                Access::Metered => "The key's calls or token budget are used up, or it is over its request rate (`Retry-After`). Nothing was spent.",
                _ => "Over the key's request rate (`Retry-After`).",
            }),
        ));
    }
    if access == Access::Metered {
        implied.push((
            "503".into(),
            error("The queue or the model cannot take the job now; nothing was spent."),
        ));
    }
    if access == Access::Session {
        implied.push(("303".into(), {
            ResponseBuilder::new()
                .description("No valid session: to the sign-in page (`Location: /admin/login`).")
                .header(
                    "Location",
                    HeaderBuilder::new().schema(Some(string())).build(),
                )
                .build()
        }));
        if *method == HttpMethod::Post {
            implied.push((
                "403".into(),
                ResponseBuilder::new()
                    .description("The form's CSRF token is missing or stale.")
                    .content(
                        "text/html; charset=utf-8",
                        ContentBuilder::new().schema(Some(string())).build(),
                    )
                    .build(),
            ));
        }
    }
    implied.push(if access.dashboard() {
        (
            "default".into(),
            ResponseBuilder::new()
                .description("Any other refusal (a body that is not a form, an unreadable query), as text.")
                .build(),
        )
    } else {
        (
            "default".into(),
            error("Any other refusal, with its stable `code` (README, Errors): 400 unreadable body, 404 unknown resource, 413 too large, 422 a field out of bounds…"),
        )
    });
    implied
}

/// The router's path as OpenAPI writes it: a catch-all `{*id}` is a plain `{id}`.
fn document_path(path: &str) -> String {
    path.replace("{*", "{")
}

/// The names of a path's parameters, in order.
fn path_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| name.trim_start_matches('*').to_string())
        .collect()
}

/// A stable id from the method and path: `post_v1_chat_completions`.
fn operation_id(method: &str, path: &str) -> String {
    let words: Vec<&str> = path
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        format!("{method}_root")
    } else {
        format!("{method}_{}", words.join("_"))
    }
}

/// The document, built once.
#[must_use]
pub fn document() -> &'static OpenApi {
    static DOCUMENT: OnceLock<OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

/// The document as JSON text, serialised once.
#[must_use]
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document().to_pretty_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialise");
            "{}".to_string()
        })
    })
}

const DESCRIPTION: &str =
    "Tollgate: a self-hosted LLM API server. Every keyed route takes the key as \
`Authorization: Bearer <key>`; clients that cannot send a header put it in the base URL instead \
(`/k/<key>/generate` is `/generate` with that key). Paths also answer with a trailing slash \
(`/api/` is `/api`). Every refusal is JSON `{\"error\": {\"message\", \"type\", \"code\"}}` with a \
stable `code` whose status is fixed, and changes nothing: no call spent, no job queued. Only \
operations marked `x-tollgate-access: metered` spend a call, and only when they answer 200 or 202.";

fn build() -> OpenApi {
    let mut paths = Paths::new();
    let mut schemas: BTreeMap<String, RefOr<Schema>> = BTreeMap::new();
    let mut error_schemas = Vec::new();
    error_schemas.push((
        schemas::ErrorBody::name().to_string(),
        schemas::ErrorBody::schema(),
    ));
    schemas::ErrorBody::schemas(&mut error_schemas);
    schemas.extend(error_schemas);
    let mut tags = Vec::new();
    for (tag, about, ops) in routes::families() {
        tags.push(TagBuilder::new().name(tag).description(Some(about)).build());
        for op in ops {
            let (path, method, operation, used) = op.finish(tag);
            paths.add_path_operation(path, vec![method], operation);
            schemas.extend(used);
        }
    }
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tg_<prefix>_<64 hex>")
                    .description(Some(
                        "An API key (`cargo loco task key:create`, the dashboard) or a seed 002 login token (`POST /token`).",
                    ))
                    .build(),
            ),
        )
        .security_scheme(
            SESSION,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "tg_admin",
                "The dashboard's session cookie, set by signing in at /admin/login.",
            ))),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Tollgate")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(DESCRIPTION))
                .build(),
        )
        .paths(paths)
        .components(Some(components))
        .tags(Some(tags))
        .build()
}
