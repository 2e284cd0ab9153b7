//! The dashboard in real headless Chromium (tests/browser/dashboard.mjs, Playwright driving
//! Debian's Chromium; scripts/test.sh installs both). Screenshots land in artifacts/screenshots.

mod common;

use common::TestApp;
use tollgate::services::Services;

#[tokio::test]
async fn an_admin_goes_from_empty_database_to_working_key_in_chromium() {
    assert!(
        std::path::Path::new("tests/browser/node_modules/playwright-core").exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "missing Chromium or playwright-core: run ./scripts/test.sh (it installs them)"
    );
    let app = TestApp::spawn().await;
    let token = Services::from_ctx(&app.ctx)
        .expect("services")
        .setup
        .issue();
    let args = [
        "tests/browser/dashboard.mjs",
        &app.base,
        &token,
        "artifacts/screenshots",
    ];
    common::run_checks("node", &args, "browser checks", "browser checks passed").await;
    for shot in [
        "keys.png",
        "key-created.png",
        "key-detail.png",
        "keys-narrow.png",
        "users.png",
        "models.png",
    ] {
        let path = std::path::Path::new("artifacts/screenshots").join(shot);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 1000),
            "no screenshot {}",
            path.display()
        );
    }
}
