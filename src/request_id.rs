//! The request id of the HTTP request being served, for the jobs it queues.
//!
//! Loco's request-id middleware names every request (`x-request-id`) and its log span carries
//! it. A job runs later, in a worker that may be another process, so the id travels inside the
//! job and the worker logs it next to the job id: one grep follows a request end to end.

use std::sync::OnceLock;

const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Middleware: makes the request's id readable by [`current`] while it is served.
///
/// It runs before Loco's request-id middleware (route layers wrap Loco's), so it settles the id
/// itself, the way Loco does (the client's `x-request-id` with anything but word characters,
/// `-` and `@` removed, at most 255 characters, or a new UUID), and puts it back in the header:
/// Loco then keeps that very id for its log span and the response header.
pub async fn scope(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    static CLEANUP: OnceLock<Option<regex::Regex>> = OnceLock::new();
    let cleanup = CLEANUP.get_or_init(|| regex::Regex::new(r"[^\w\-@]").ok());
    let asked = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .zip(cleanup.as_ref())
        .map(|(v, re)| re.replace_all(v, "").chars().take(255).collect::<String>())
        .filter(|v| !v.is_empty());
    let id = asked.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        req.headers_mut().insert(HEADER, value);
    }
    REQUEST_ID.scope(id, next.run(req)).await
}

/// The id of the request being served by this task, if any.
#[must_use]
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}
