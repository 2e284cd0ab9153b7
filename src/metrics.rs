//! Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Request counts and latency histograms are kept in this process (each API instance is scraped
//! on its own port). Everything about jobs, tokens, workers and keys is read from the database
//! and the queue at scrape time, so every instance reports the same, true totals.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::Instant,
};

use axum::{extract::MatchedPath, extract::Request, middleware::Next, response::Response};

/// Latency bucket bounds in seconds: fast key checks up to long generations.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct HttpMetrics {
    /// (route, method, status) → requests.
    requests: BTreeMap<(String, String, u16), u64>,
    /// route → latency.
    latency: BTreeMap<String, Histogram>,
}

fn http() -> &'static Mutex<HttpMetrics> {
    static METRICS: OnceLock<Mutex<HttpMetrics>> = OnceLock::new();
    METRICS.get_or_init(Mutex::default)
}

/// Records one request: its route template (never the raw path, which may hold a key or an
/// id), method, status and latency.
pub fn observe(route: &str, method: &str, status: u16, seconds: f64) {
    let Ok(mut m) = http().lock() else {
        return;
    };
    *m.requests
        .entry((route.to_string(), method.to_string(), status))
        .or_default() += 1;
    let h = m.latency.entry(route.to_string()).or_default();
    h.count += 1;
    h.sum += seconds;
    for (i, bound) in BUCKETS.iter().enumerate() {
        if seconds <= *bound {
            h.counts[i] += 1;
        }
    }
}

/// Middleware recording every request's route, status and latency.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    observe(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Transactions that committed several admissions of one key together, and the admissions in
/// them (this process).
static SHARED_COMMITS: AtomicU64 = AtomicU64::new(0);
static ADMISSIONS_IN_SHARED_COMMITS: AtomicU64 = AtomicU64::new(0);

/// Records one transaction that committed `admissions` (several) admissions together.
pub fn committed_together(admissions: usize) {
    SHARED_COMMITS.fetch_add(1, Ordering::Relaxed);
    ADMISSIONS_IN_SHARED_COMMITS.fetch_add(admissions as u64, Ordering::Relaxed);
}

/// This process's shared admission commits, in exposition format: how often concurrent
/// admissions (of one key or of many) shared a transaction, and how many did (their ratio is the mean batch).
#[must_use]
pub fn render_commits() -> String {
    format!(
        "# HELP tollgate_admission_shared_commits_total Transactions that committed several \
         concurrent admissions together (this process).\n\
         # TYPE tollgate_admission_shared_commits_total counter\n\
         tollgate_admission_shared_commits_total {}\n\
         # HELP tollgate_admissions_in_shared_commits_total Admissions committed in those \
         transactions.\n\
         # TYPE tollgate_admissions_in_shared_commits_total counter\n\
         tollgate_admissions_in_shared_commits_total {}\n",
        SHARED_COMMITS.load(Ordering::Relaxed),
        ADMISSIONS_IN_SHARED_COMMITS.load(Ordering::Relaxed),
    )
}

/// Escapes a label value.
#[must_use]
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The request metrics of this process, in exposition format.
#[must_use]
pub fn render_http() -> String {
    let mut out = String::new();
    let Ok(m) = http().lock() else {
        return out;
    };
    out.push_str(
        "# HELP tollgate_http_requests_total HTTP requests by route template, method and status.\n",
    );
    out.push_str("# TYPE tollgate_http_requests_total counter\n");
    for ((route, method, status), n) in &m.requests {
        let _ = writeln!(
            out,
            "tollgate_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
            label(route),
            label(method)
        );
    }
    out.push_str(
        "# HELP tollgate_http_request_duration_seconds HTTP request latency by route template.\n",
    );
    out.push_str("# TYPE tollgate_http_request_duration_seconds histogram\n");
    for (route, h) in &m.latency {
        let route = label(route);
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "tollgate_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "tollgate_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "tollgate_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "tollgate_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
            h.count
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_labels_escaped() {
        observe("/t/{id}", "GET", 200, 0.003);
        observe("/t/{id}", "GET", 200, 0.2);
        observe("/t/{id}", "GET", 404, 200.0);
        let text = render_http();
        assert!(text.contains(
            "tollgate_http_requests_total{route=\"/t/{id}\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "tollgate_http_request_duration_seconds_bucket{route=\"/t/{id}\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "tollgate_http_request_duration_seconds_bucket{route=\"/t/{id}\",le=\"0.25\"} 2"
        ));
        assert!(text.contains(
            "tollgate_http_request_duration_seconds_bucket{route=\"/t/{id}\",le=\"+Inf\"} 3"
        ));
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
