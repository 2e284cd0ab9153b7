//! Embedding vectors from the real model: seed 000's `/generate-embedding` and OpenAI's
//! `/v1/embeddings`, through the same charge and job queue as generations.

mod common;

use base64::Engine as _;
use common::{code, TestApp, TestKey};
use serde_json::{json, Value};

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

async fn embed_one(app: &TestApp, key: &TestKey, text: &str) -> Vec<f32> {
    let (status, body) = app
        .post(Some(key), "/generate-embedding", &json!({ "text": text }))
        .await;
    assert_eq!(status, 200, "{body}");
    let v = vector(&body["embedding"]);
    assert_eq!(body["dimensions"].as_u64(), Some(v.len() as u64), "{body}");
    assert_eq!(body["model"], "smollm2");
    v
}

#[tokio::test]
async fn the_seed_route_gives_stable_unit_vectors_and_charges_one_call_each() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let a = embed_one(&app, &key, "The quick brown fox jumps over the lazy dog.").await;
    let b = embed_one(&app, &key, "The quick brown fox jumps over the lazy dog.").await;
    let c = embed_one(&app, &key, "Hi").await;
    assert_eq!(a.len(), 576, "SmolLM2-135M has 576-wide hidden states");
    assert_eq!(c.len(), a.len(), "the dimension depends on the model only");
    assert_eq!(a, b, "same text, same vector");
    let norm = dot(&a, &a).sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "not L2-normalised: {norm}");

    // `input` and `content` are accepted for `text`.
    for field in ["input", "content"] {
        let (status, body) = app
            .post(Some(&key), "/generate-embedding", &json!({ field: "Hi" }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(vector(&body["embedding"]), c);
    }
    assert_eq!(app.calls_used(&key).await, 5);
    assert_eq!(
        app.job_count().await,
        5,
        "embeddings go through the job queue"
    );
}

#[tokio::test]
async fn similar_sentences_are_closer_than_unrelated_ones() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let triples = [
        (
            "The cat sat on the mat.",
            "A cat was sitting on the mat.",
            "Quarterly revenue grew by twelve percent.",
        ),
        (
            "How do I bake bread at home?",
            "What is a good recipe for homemade bread?",
            "The spacecraft entered orbit around Mars.",
        ),
        (
            "The stock market fell sharply today.",
            "Share prices dropped steeply this afternoon.",
            "My grandmother grows tomatoes in her garden.",
        ),
    ];
    for (anchor, similar, unrelated) in triples {
        let a = embed_one(&app, &key, anchor).await;
        let s = embed_one(&app, &key, similar).await;
        let u = embed_one(&app, &key, unrelated).await;
        let (close, far) = (dot(&a, &s), dot(&a, &u));
        assert!(
            close > far,
            "cos({anchor:?}, {similar:?}) = {close} is not above cos({anchor:?}, {unrelated:?}) = {far}"
        );
    }
}

#[tokio::test]
async fn openai_lists_return_one_vector_per_input_in_order() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(10)).await;
    let texts = ["Paris is in France.", "Bananas are yellow.", "Hi"];
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": texts}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "smollm2");
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len());
    assert!(body["usage"]["prompt_tokens"]
        .as_i64()
        .is_some_and(|n| n > 0));
    for (i, (item, text)) in data.iter().zip(texts).enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
        let alone = embed_one(&app, &key, text).await;
        let v = vector(&item["embedding"]);
        assert!(
            v.iter().zip(&alone).all(|(x, y)| (x - y).abs() < 1e-5),
            "input {i} is not the vector of {text:?}"
        );
    }

    // base64: little-endian f32s, as the openai SDKs ask for by default.
    let (status, b64) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"input": "Hi", "encoding_format": "base64", "dimensions": 576}),
        )
        .await;
    assert_eq!(status, 200, "{b64}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(
            b64["data"][0]["embedding"]
                .as_str()
                .expect("a base64 string"),
        )
        .expect("base64");
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded, embed_one(&app, &key, "Hi").await);
    // 1 list + 3 single + 1 base64 + 1 single.
    assert_eq!(app.calls_used(&key).await, 6);
}

#[tokio::test]
async fn empty_or_invalid_input_is_422_and_charges_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    for (path, body) in [
        ("/generate-embedding", json!({"text": ""})),
        ("/generate-embedding", json!({"text": "   "})),
        ("/generate-embedding", json!({})),
        ("/v1/embeddings", json!({"input": ""})),
        ("/v1/embeddings", json!({"input": []})),
        ("/v1/embeddings", json!({"input": ["ok", ""]})),
        ("/v1/embeddings", json!({"input": [[1, 2, 3]]})),
        (
            "/v1/embeddings",
            json!({"input": "ok", "encoding_format": "hex"}),
        ),
        ("/v1/embeddings", json!({"input": "ok", "dimensions": 8})),
    ] {
        let (status, out) = app.post(Some(&key), path, &body).await;
        assert_eq!(status, 422, "{path} {body} -> {out}");
    }
    let (status, out) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"model": "no-such-model", "input": "ok"}),
        )
        .await;
    assert_eq!((status, code(&out)), (404, "model_not_found"), "{out}");
    let (status, out) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"input": "word ".repeat(600)}),
        )
        .await;
    assert_eq!(
        (status, code(&out)),
        (400, "context_length_exceeded"),
        "{out}"
    );
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn disabled_embeddings_are_refused_before_any_charge() {
    let app = TestApp::spawn_with(|s| s["engine"]["embeddings"]["enabled"] = json!(false)).await;
    let key = app.key_with_calls(Some(3)).await;
    let (status, out) = app
        .post(Some(&key), "/v1/embeddings", &json!({"input": "Hi"}))
        .await;
    assert_eq!((status, code(&out)), (404, "embeddings_disabled"), "{out}");
    assert_eq!(app.calls_used(&key).await, 0);
}

#[tokio::test]
async fn one_call_holds_at_most_the_configured_tokens_and_a_bigger_one_costs_nothing() {
    let app =
        TestApp::spawn_scripted(|s| s["engine"]["embeddings"]["max_tokens_per_call"] = json!(40))
            .await;
    let key = app.key_with_calls(Some(3)).await;
    let many: Vec<String> = (0..20)
        .map(|i| format!("sentence number {i} about cats"))
        .collect();
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            json!({"model": "smollm2", "input": many}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(common::code(&body), "context_length_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 40"),
        "{body}"
    );
    assert_eq!(app.calls_used(&key).await, 0);
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/embeddings",
            json!({"model": "smollm2", "input": ["a cat", "a dog"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
