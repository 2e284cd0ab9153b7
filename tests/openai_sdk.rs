//! The official `openai` Python SDK against a real server (tests/python/openai_sdk.py).

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
    // with n = 2 + a tool call, streamed again, and the turn after its result + completion + two
    // embedding requests spent thirteen calls; the rejected ones spent nothing.
    assert_eq!(app.calls_used(&good).await, 13);
    assert_eq!(app.calls_used(&exhausted).await, 0);
}
