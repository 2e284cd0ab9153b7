//! LangChain's `ChatOpenAI` and `OpenAIEmbeddings` (pinned in tests/python/requirements.txt)
//! against a real server: plain and streamed chat, structured output, embeddings
//! (tests/python/langchain_client.py).

mod common;

use common::TestApp;

#[tokio::test]
async fn langchain_openai_clients_work_against_tollgate() {
    let python = common::python();
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let args = ["tests/python/langchain_client.py", &app.base, &key.secret];
    common::run_checks(python, &args, "LangChain checks", "langchain checks passed").await;
    // chat, streamed chat, structured output, a tool call and the answer after its result,
    // two embedding requests.
    assert_eq!(app.calls_used(&key).await, 7);
}
