//! The official `openai` Python SDK against a real server: Chat Completions, Completions and
//! Embeddings (tests/python/openai_sdk.py), and the Responses API with LangChain and the OpenAI
//! Agents SDK on it too (tests/python/responses_api.py).

mod common;

use common::TestApp;

#[tokio::test]
async fn the_official_openai_python_sdk_works_against_tollgate() {
    let python = common::python();
    let app = TestApp::spawn().await;
    let good = app.key_with_calls(Some(16)).await;
    let exhausted = app.key_with_calls(Some(0)).await;
    let script = "tests/python/openai_sdk.py";
    let args = [script, &app.base, &good.secret, &exhausted.secret];
    common::run_checks(python, &args, "SDK checks", "openai sdk checks passed").await;
    // chat + streamed chat + structured chat + two seeded chats + a chat with logprobs + a chat
    // with n = 2 + a tool call, streamed again, the turn after its result and tools beside a
    // response format + completion + two embedding requests spent fourteen calls; the rejected
    // ones spent nothing.
    assert_eq!(app.calls_used(&good).await, 14);
    assert_eq!(app.calls_used(&exhausted).await, 0);
}

#[tokio::test]
async fn the_responses_api_works_for_the_openai_sdk_and_langchain() {
    let python = common::python();
    let app = TestApp::spawn().await;
    let good = app.key_with_calls(Some(32)).await;
    let exhausted = app.key_with_calls(Some(0)).await;
    let script = "tests/python/responses_api.py";
    let args = [script, &app.base, &good.secret, &exhausted.secret];
    common::run_checks(
        python,
        &args,
        "Responses API checks",
        "responses api checks passed",
    )
    .await;
    // Two chats to compare with, a response, the next turn with the earlier output as an item
    // and by reference, two turns by `previous_response_id` and the third spelled out, one with
    // instructions, its next turn with new ones and that turn spelled out, two with
    // log-probabilities (one streamed), one with instructions, a streamed one, two structured
    // ones, a call, the turn after its result and that turn by `previous_response_id`, the call
    // streamed, one in the background, one read back, listed and deleted, two LangChain turns,
    // three Agents SDK runs of one model call each: twenty-eight calls; the refused ones, the
    // reads, the lists, the delete and the one cancelled in the background (refunded) spent
    // nothing.
    assert_eq!(app.calls_used(&good).await, 28);
    assert_eq!(app.calls_used(&exhausted).await, 0);
}
