//! `GET /openapi.json`: the OpenAPI 3.1 document of every route ([`crate::openapi`]). Public:
//! it describes the API and holds nothing a stranger could not learn by calling it.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use loco_rs::controller::Routes;

async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json(),
    )
        .into_response()
}

pub fn routes() -> Routes {
    Routes::new().add("/openapi.json", axum::routing::get(document))
}
