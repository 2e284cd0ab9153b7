//! Seed 001's `/generate` and `/chat_completion`, including `job_id` idempotency.

mod common;

use common::{code, TestApp};
use serde_json::json;

#[tokio::test]
async fn the_seeds_documented_examples_get_content() {
    // A small server maximum keeps the seed's large token limits quick to serve.
    let app = TestApp::spawn_with(|s| s["api"]["max_tokens_limit"] = json!(32)).await;
    let key = app.key_with_calls(None).await;
    // Verbatim from seed 001 (its placeholder model name included).
    let generate = json!({
      "job_id": "12345",
      "meta": {"temperature": 0.5, "tokens_limit": 1000, "stop_words": ["stop"], "model": "gpt-model"},
      "content": "What is AI?"
    });
    let (status, body) = app.post(Some(&key), "/generate", &generate).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["content"]
            .as_str()
            .is_some_and(|c| !c.trim().is_empty()),
        "{body}"
    );

    // The seed's second example reuses job_id "12345" for another request: a new job.
    let chat = json!({
      "job_id": "12345",
      "meta": {"temperature": 0.5, "tokens_limit": 1000, "stop_words": ["stop"], "model": "gpt-model"},
      "messages": [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Artificial Intelligence is..."}
      ]
    });
    let (status, body) = app.post(Some(&key), "/chat_completion", &chat).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["content"].is_string(), "{body}");
    assert_eq!(body["job_id"], "12345", "the client's id is echoed");
    assert_eq!(
        app.calls_used(&key).await,
        2,
        "the chat example is its own job"
    );
    assert_eq!(app.job_count().await, 2);

    // The seed's default tokens_limit (8096), given or left out, is cut to the room the
    // context leaves, not refused.
    for body in [
        json!({"meta": {"tokens_limit": 8096}, "content": "Hi"}),
        json!({"content": "Hi"}),
    ] {
        let (status, answer) = app.post(Some(&key), "/generate", &body).await;
        assert_eq!(status, 200, "{body}: {answer}");
    }
    // Seed 000 names no fields for `/generate`: `text` is the prompt too, and the usual names
    // at the top level mean what they mean in `meta` (honoured, not ignored).
    let before: Vec<String> = app.jobs_of(&key).await.into_iter().map(|j| j.id).collect();
    let (status, answer) = app
        .post(
            Some(&key),
            "/generate",
            &json!({"text": "Hi", "max_tokens": 3, "temperature": 0.0}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let jobs = app.jobs_of(&key).await;
    let new: Vec<_> = jobs.iter().filter(|j| !before.contains(&j.id)).collect();
    assert_eq!(new.len(), 1);
    let request: serde_json::Value = serde_json::from_str(&new[0].request).expect("request json");
    assert_eq!(request["params"]["max_tokens"], 3, "{request}");
    assert_eq!(request["params"]["temperature"], 0.0, "{request}");
}

#[tokio::test]
async fn a_missing_tokens_limit_is_the_seeds_8096_cut_to_the_contexts_room() {
    let app = TestApp::spawn_scripted(|s| {
        s["engine"]["context_size"] = json!(256);
        s["api"]["max_tokens_limit"] = json!(100_000);
    })
    .await;
    let key = app.key_with_calls(None).await;
    let (status, body) = app
        .post(Some(&key), "/generate", &json!({"content": "What is AI?"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let job = &app.jobs_of(&key).await[0];
    let request: serde_json::Value = serde_json::from_str(&job.request).expect("request json");
    let max_tokens = request["params"]["max_tokens"]
        .as_i64()
        .expect("max_tokens recorded");
    // The prompt as the API counted it: the model's tokenizer on the chat-templated turn.
    let settings = tollgate::settings::EngineSettings {
        context_size: 256,
        ..Default::default()
    };
    let tokenizer =
        tollgate::engine::tokenizer::PromptTokenizer::load(&settings).expect("tokenizer");
    let prompt: tollgate::engine::Prompt =
        serde_json::from_value(request["prompt"].clone()).expect("prompt");
    let counted = i64::try_from(tokenizer.count(&prompt).expect("count")).expect("count");
    assert_eq!(
        max_tokens,
        256 - counted,
        "the room the prompt leaves in a 256-token context: {request}"
    );
}

#[tokio::test]
async fn the_same_job_id_with_another_body_or_route_is_a_new_job() {
    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(None).await;
    let first = json!({"job_id": "7", "content": "first question"});
    let (s1, a1) = app.post(Some(&key), "/generate", &first).await;
    let (s2, a2) = app.post(Some(&key), "/generate", &first).await;
    assert_eq!((s1, s2), (200, 200), "{a1} {a2}");
    assert_eq!(
        app.job_count().await,
        1,
        "an identical retry replays the job"
    );
    let other = json!({"job_id": "7", "content": "another question"});
    let (s3, a3) = app.post(Some(&key), "/generate", &other).await;
    assert_eq!(s3, 200, "{a3}");
    assert_ne!(a3["content"], a1["content"]);
    let chat = json!({"job_id": "7", "messages": [{"role": "user", "content": "first question"}]});
    let (s4, a4) = app.post(Some(&key), "/chat_completion", &chat).await;
    assert_eq!(s4, 200, "{a4}");
    assert_eq!(
        app.job_count().await,
        3,
        "another body or route is another job"
    );
    assert_eq!(app.calls_used(&key).await, 3);
}

#[tokio::test]
async fn a_repeated_job_id_returns_the_first_result_without_a_second_charge() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let body = json!({"job_id": "order-42", "meta": {"temperature": 0.9, "tokens_limit": 24}, "content": "Write a haiku."});
    let (s1, first) = app.post(Some(&key), "/generate", &body).await;
    let (s2, second) = app.post(Some(&key), "/generate", &body).await;
    assert_eq!((s1, s2), (200, 200), "{first} {second}");
    assert_eq!(
        first["content"], second["content"],
        "a repeat generated again"
    );
    assert_eq!(first["job_id"], "order-42");
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.job_count().await, 1);

    // The same id from another key is that key's own job.
    let other = app.key_with_calls(Some(10)).await;
    let (status, _) = app.post(Some(&other), "/generate", &body).await;
    assert_eq!(status, 200);
    assert_eq!(app.calls_used(&other).await, 1);
    assert_eq!(app.job_count().await, 2);
}

#[tokio::test]
async fn concurrent_repeats_of_one_job_id_generate_and_charge_once() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let body = json!({"job_id": "burst", "meta": {"temperature": 1.0, "tokens_limit": 16}, "content": "Tell a joke."});
    let repeats = (0..6).map(|_| (&key, "/generate", body.clone()));
    let mut contents = Vec::new();
    for (status, body) in app.post_at_once(repeats).await {
        assert_eq!(status, 200, "{body}");
        contents.push(body["content"].clone());
    }
    assert!(contents.windows(2).all(|w| w[0] == w[1]), "{contents:?}");
    assert_eq!(app.calls_used(&key).await, 1);
    assert_eq!(app.job_count().await, 1);
}

#[tokio::test]
async fn invalid_seed001_requests_spend_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let cases = [
        ("/generate", json!({"meta": {}}), 422, "invalid_body"),
        ("/generate", json!({"content": ""}), 422, "empty_prompt"),
        (
            "/generate",
            json!({"job_id": "", "content": "hi"}),
            422,
            "invalid_job_id",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"tokens_limit": 0}}),
            422,
            "invalid_tokens_limit",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"temperature": 7}}),
            422,
            "invalid_temperature",
        ),
        (
            "/chat_completion",
            json!({"messages": []}),
            422,
            "invalid_messages",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"top_p": 0}}),
            422,
            "invalid_top_p",
        ),
        (
            "/generate",
            json!({"content": "hi", "meta": {"mirostat": 2}}),
            400,
            "unsupported_parameter",
        ),
        // A top-level field the route does not know is refused, not ignored; one said twice
        // differently is refused.
        (
            "/generate",
            json!({"content": "hi", "stream_mode": "fast"}),
            400,
            "unsupported_parameter",
        ),
        (
            "/generate",
            json!({"content": "hi", "max_tokens": 3, "meta": {"tokens_limit": 4}}),
            422,
            "invalid_body",
        ),
    ];
    for (path, body, status, expected) in cases {
        let (got, resp) = app.post(Some(&key), path, &body).await;
        assert_eq!(got, status, "{path}: {resp}");
        assert_eq!(code(&resp), expected, "{path}: {resp}");
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn meta_carries_the_sampling_controls_and_a_seed_repeats_a_sampled_answer() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let ask = |seed: i64| {
        json!({"content": "Write one sentence about the sea.",
               "meta": {"temperature": 1.0, "tokens_limit": 16, "seed": seed, "top_k": 50,
                        "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1,
                        "presence_penalty": 0.5, "frequency_penalty": 0.5}})
    };
    let mut texts = Vec::new();
    for seed in [7, 7, 8] {
        let (status, body) = app.post(Some(&key), "/generate", &ask(seed)).await;
        assert_eq!(status, 200, "{body}");
        texts.push(body["content"].as_str().unwrap_or_default().to_string());
    }
    assert!(!texts[0].is_empty());
    assert_eq!(texts[0], texts[1], "the same seed gives the same text");
    assert_ne!(texts[0], texts[2], "another seed, another draw");
    // A bias that forbids the first answer's tokens changes the answer.
    let (status, tokens) = app
        .post(
            Some(&key),
            "/tokenize",
            &json!({"content": texts[0], "add_special": false}),
        )
        .await;
    assert_eq!(status, 200, "{tokens}");
    let forbidden: serde_json::Map<String, serde_json::Value> = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| (t.to_string(), json!(-100)))
        .collect();
    assert!(!forbidden.is_empty(), "{tokens}");
    let mut biased = ask(7);
    biased["meta"]["logit_bias"] = serde_json::Value::Object(forbidden);
    let (status, body) = app.post(Some(&key), "/generate", &biased).await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["content"].as_str(), Some(texts[0].as_str()), "{body}");
    // `top_k` reaches the sampler: 1 makes a sampled draw the greedy answer, whichever seed.
    let plain = |meta: serde_json::Value| json!({"content": "Write one sentence about the sea.", "meta": meta});
    let (status, greedy) = app
        .post(
            Some(&key),
            "/generate",
            &plain(json!({"temperature": 0, "tokens_limit": 16})),
        )
        .await;
    assert_eq!(status, 200, "{greedy}");
    let mut drew = Vec::new();
    for seed in [7, 8] {
        let meta = json!({"temperature": 1.0, "tokens_limit": 16, "seed": seed});
        let (status, free) = app
            .post(Some(&key), "/generate", &plain(meta.clone()))
            .await;
        assert_eq!(status, 200, "{free}");
        drew.push(free["content"].clone());
        let mut top1 = meta;
        top1["top_k"] = json!(1);
        let (status, body) = app.post(Some(&key), "/generate", &plain(top1)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["content"], greedy["content"], "seed {seed}, top_k 1");
    }
    assert!(
        drew.iter().any(|d| *d != greedy["content"]),
        "temperature 1 samples away from greedy under seed 7 or 8: {drew:?}"
    );
}
