//! The official `openai` Python SDK against a real server (tests/python/openai_sdk.py).

mod common;

use common::TestApp;

#[tokio::test]
async fn the_official_openai_python_sdk_works_against_tollgate() {
    let python = std::path::Path::new(".venv/bin/python");
    assert!(
        python.exists(),
        "missing .venv with the openai SDK: run ./scripts/test.sh (it creates it)"
    );
    let app = TestApp::spawn().await;
    let good = app.key_with_calls(Some(10)).await;
    let exhausted = app.key_with_calls(Some(0)).await;
    let out = tokio::process::Command::new(python)
        .args([
            "tests/python/openai_sdk.py",
            &app.base,
            &good.secret,
            &exhausted.secret,
        ])
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai sdk checks passed"), "{stdout}");
    // chat + streamed chat + completion + two embedding requests spent five calls; the
    // rejected ones spent nothing.
    assert_eq!(app.calls_used(&good).await, 5);
    assert_eq!(app.calls_used(&exhausted).await, 0);
}
