//! The OpenAPI document (`GET /openapi.json`) against the router it describes: every route the
//! router serves is documented and nothing else is; the document is OpenAPI 3.1 with its
//! security schemes and the error shape; the dashboard shows it as a page.
//!
//! Runs on the scripted engine: nothing here generates.

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use loco_rs::app::Hooks;
use reqwest::{header, Method};
use serde_json::Value;
use tollgate::{
    app::App,
    errors::ErrorCode,
    models::{admin_sessions, admins},
};

/// `{*id}` (a catch-all) and `{id}` are the same parameter; a trailing slash is trimmed before
/// routing, so `/admin/` is `/admin`.
fn normalised(path: &str) -> String {
    let mut path = path.replace("{*", "{");
    while path.len() > 1 && path.ends_with('/') {
        path.pop();
    }
    path
}

/// Every (METHOD, path) the router serves, from the router's own list.
fn router_routes(app: &TestApp) -> BTreeSet<(String, String)> {
    App::routes(&app.ctx)
        .collect()
        .into_iter()
        .flat_map(|r| {
            let path = normalised(&r.uri);
            r.actions
                .into_iter()
                .filter(|m| *m != Method::HEAD)
                .map(move |m| (m.as_str().to_string(), path.clone()))
        })
        .collect()
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Every (METHOD, path) of the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| !item[**m].is_null())
                .map(move |m| (m.to_uppercase(), normalised(path)))
        })
        .collect()
}

async fn document(app: &TestApp) -> Value {
    let resp = app
        .request(Method::GET, None, "/openapi.json")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "the document is public");
    assert_eq!(
        common::header(&resp, "content-type").as_deref(),
        Some("application/json")
    );
    resp.json().await.expect("JSON")
}

#[tokio::test]
async fn every_route_of_the_router_is_in_the_openapi_document_and_no_other() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let doc = document(&app).await;
    let served = router_routes(&app);
    let described = documented(&doc);
    let undocumented: Vec<_> = served.difference(&described).collect();
    let unknown: Vec<_> = described.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document (add them to src/openapi/routes.rs): {undocumented:#?}"
    );
    assert!(
        unknown.is_empty(),
        "documented operations the router does not serve: {unknown:#?}"
    );
    // The comparison means something only if both lists are full.
    assert!(served.len() > 60, "{} routes", served.len());
}

/// Follows a local `$ref` (`#/components/schemas/Name`).
fn resolves(doc: &Value, reference: &str) -> bool {
    reference
        .strip_prefix("#/")
        .is_some_and(|p| !p.split('/').fold(doc, |v, k| &v[k]).is_null())
}

/// Every `$ref` anywhere under `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, inner) in map {
                match (k.as_str(), inner) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(inner, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| refs(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_its_security_and_error_shape() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["api_key"]["type"], "http");
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    assert_eq!(schemes["admin_session"]["in"], "cookie");

    let mut dangling = Vec::new();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        if !resolves(&doc, r) {
            dangling.push(r.to_string());
        }
    }
    assert!(dangling.is_empty(), "references to nothing: {dangling:?}");

    // The error shape, with every code the server can answer.
    let error = &doc["components"]["schemas"]["ErrorDetail"];
    let codes: Vec<&str> = error["properties"]["code"]["enum"]
        .as_array()
        .expect("code enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for code in ErrorCode::ALL {
        assert!(codes.contains(&code.as_str()), "{code:?} undocumented");
    }

    // Who may call each operation decides its security and the refusals it lists.
    let mut wrong = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let op = &item[method];
            if op.is_null() {
                continue;
            }
            let access = op["x-tollgate-access"].as_str().unwrap_or_default();
            let security = op["security"][0]
                .as_object()
                .map(|s| s.keys().cloned().collect::<Vec<_>>());
            let ok = match access {
                "keyed" | "metered" | "admin" => {
                    security == Some(vec!["api_key".into()])
                        && !op["responses"]["401"].is_null()
                        && !op["responses"]["default"].is_null()
                }
                "session" => security == Some(vec!["admin_session".into()]),
                "public" | "session_public" => security.is_none(),
                _ => false,
            };
            if !ok || op["responses"].as_object().is_none_or(|r| r.is_empty()) {
                wrong.push(format!("{method} {path}: {access}, security {security:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn the_dashboard_shows_the_document_as_a_page_loading_nothing_from_outside() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let doc = document(&app).await;
    let person = admins::ActiveModel::create(&app.ctx.db, "root@example.com", "long password 1")
        .await
        .expect("admin");
    let (token, _) = admin_sessions::start(&app.ctx.db, person.id, chrono::Duration::hours(1))
        .await
        .expect("session");
    let resp = app
        .request(Method::GET, None, "/admin/api")
        .header(header::COOKIE, format!("tg_admin={token}"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.expect("page");
    for (method, path) in documented(&doc) {
        assert!(
            page.contains(&format!("{method} {path}")),
            "{method} {path} is not on the page"
        );
    }
    for name in doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .keys()
    {
        assert!(
            page.contains(&format!("id=\"schema-{name}\"")),
            "schema {name} is not on the page"
        );
    }
    for outside in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!page.contains(outside), "the page loads {outside}…");
    }

    // Without a session it is the sign-in page, like every dashboard page.
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(app.url("/admin/api"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 303);
}
