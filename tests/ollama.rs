//! Ollama's own routes (`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`,
//! `/api/tags`, `/api/ps`, `/api/show`, `/api/version`, `/`) driven by the official `ollama`
//! Python client (pinned in tests/python/requirements.txt) against the real model: the same
//! greedy text and vectors as the OpenAI routes, streamed and not, raw prompts, `:latest`
//! names, `num_ctx`, a JSON Schema `format`, tools, truncation, Ollama's error bodies, refusals
//! by name (tests/python/ollama_client.py).

mod common;

use common::TestApp;

#[tokio::test]
async fn the_ollama_python_client_works_against_tollgate() {
    let python = common::python();
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(30)).await;
    let args = ["tests/python/ollama_client.py", &app.base, &key.secret];
    common::run_checks(
        python,
        &args,
        "Ollama checks",
        "ollama client checks passed",
    )
    .await;
    // A chat and a completion to compare with, two chats (one named `:latest`), a streamed
    // one, two generations, one with a schema, a chat with tools to compare with and three
    // with tools (whole, streamed, the next turn), embeddings to compare with and three
    // embedding calls (a list, the older route, a cut input): sixteen calls; the refused ones
    // (an unknown model, an input too long with truncate=false, …) spent nothing.
    assert_eq!(app.calls_used(&key).await, 16);
}
