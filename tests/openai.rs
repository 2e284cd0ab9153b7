//! OpenAI-compatible routes (plain and streamed) against the real model.

mod common;

use common::{code, post_stream, sse_data, TestApp};
use serde_json::{json, Value};

#[tokio::test]
async fn chat_completions_answer_in_openai_shape_and_count_one_call() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let request = json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}
        ],
        "max_tokens": 12,
        "temperature": 0
    });
    let (status, body) = app.post(Some(&key), "/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(!content.trim().is_empty());
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_i64(),
        Some(
            usage["prompt_tokens"].as_i64().unwrap_or(0)
                + usage["completion_tokens"].as_i64().unwrap_or(0)
        )
    );
    assert_eq!(app.calls_used(&key).await, 1);
}

#[tokio::test]
async fn completions_continue_raw_text() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let request = json!({"model": "smollm2", "prompt": "One, two, three,", "max_tokens": 6, "temperature": 0});
    let (status, body) = app.post(Some(&key), "/v1/completions", request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn models_lists_the_served_model_and_unknown_models_are_404() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(2)).await;
    let (status, body) = app.get(Some(&key), "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "smollm2");
    let (status, _) = app.get(None, "/v1/models").await;
    assert_eq!(status, 401);

    let (status, body) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(code(&body), "model_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("smollm2"));
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn what_clients_commonly_send_is_accepted_and_large_max_tokens_are_cut_to_fit() {
    let app = TestApp::spawn_scripted(|s| s["engine"]["context_size"] = json!(256)).await;
    let key = app.key_with_calls(None).await;
    // Advisory fields and fields at their do-nothing values, as SDKs and frameworks send them.
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 4096, "user": "u-1", "metadata": {"a": "b"}, "store": false,
        "n": 1, "logprobs": false, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logit_bias": {}, "response_format": {"type": "text"}, "stream": false,
        "parallel_tool_calls": true, "tool_choice": "none", "tools": []
    });
    let (status, resp) = app.post(Some(&key), "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = app
        .post(
            Some(&key),
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 100_000, "logprobs": 0,
                    "echo": false, "best_of": 1}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    // `null` is OpenAI's "not set", `stream: null` included (typed clients and proxies send
    // every field); a list of one prompt is the prompt (LangChain's `OpenAI` sends a list).
    let (status, resp) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            &json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 2, "stream": null, "reasoning_effort": null,
                    "modalities": null, "web_search_options": null}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let (status, resp) = app
        .post(
            Some(&key),
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": ["Hi"], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let before = app.calls_used(&key).await;
    let (status, resp) = app
        .post(
            Some(&key),
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": ["Hi", "Ho"], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(resp["error"]["code"], "unsupported_parameter", "{resp}");
    assert!(
        resp["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("prompt")),
        "{resp}"
    );
    assert_eq!(
        app.calls_used(&key).await,
        before,
        "a refused batch spends nothing"
    );
    let job = &app.jobs_of(&key).await[0];
    let request: serde_json::Value = serde_json::from_str(&job.request).expect("request");
    let max_tokens = request["params"]["max_tokens"]
        .as_i64()
        .expect("max_tokens");
    assert!(
        max_tokens < 256,
        "cut to the room in a 256-token context, got {max_tokens}"
    );
}

#[tokio::test]
async fn invalid_openai_requests_spend_nothing() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(2)).await;
    let cases = [
        (json!({"messages": []}), 422, "invalid_messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            422,
            "invalid_role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            422,
            "unsupported_content",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 5}),
            400,
            "invalid_n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
            422,
            "invalid_temperature",
        ),
        (json!({"model": "smollm2"}), 422, "invalid_body"),
        // What would be silently ignored is refused by name.
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "functions": [{"name": "f", "parameters": {}}]}),
            400,
            "unsupported_parameter",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "json_schema": {
                       "name": "mail", "schema": {"type": "string", "format": "email"}}}}),
            400,
            "unsupported_schema",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            422,
            "invalid_sampling",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            422,
            "invalid_sampling",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 5}),
            422,
            "invalid_sampling",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "mirostat": 2}),
            400,
            "unsupported_parameter",
        ),
    ];
    for (body, status, expected) in cases {
        let (got, resp) = app.post(Some(&key), "/v1/chat/completions", &body).await;
        assert_eq!(got, status, "{body}: {resp}");
        assert_eq!(code(&resp), expected, "{resp}");
        if expected == "unsupported_parameter" {
            let field = body
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "messages"))
                .expect("the field");
            let message = resp["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(field.as_str()), "names {field}: {message}");
        }
    }
    assert_eq!(app.calls_used(&key).await, 0);
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn logprobs_come_per_generated_token_finite_in_openai_shape_streamed_or_not() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let request = json!({
        "messages": [{"role": "user", "content": "Name three colors."}],
        "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3
    });
    let (status, plain) = app
        .post(Some(&key), "/v1/chat/completions", request.clone())
        .await;
    assert_eq!(status, 200, "{plain}");
    let content = plain["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("logprobs.content: {plain}"));
    assert_eq!(
        content.len() as i64,
        plain["usage"]["completion_tokens"].as_i64().unwrap_or(-1),
        "one entry per generated token: {plain}"
    );
    let mut bytes = Vec::new();
    for entry in content {
        let logprob = entry["logprob"].as_f64().expect("logprob");
        assert!(logprob.is_finite() && logprob <= 0.0, "{entry}");
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3, "{entry}");
        let values: Vec<f64> = top.iter().filter_map(|t| t["logprob"].as_f64()).collect();
        assert!(
            values.windows(2).all(|w| w[0] >= w[1]),
            "most likely first: {entry}"
        );
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"], "{entry}");
        assert!((values[0] - logprob).abs() < 1e-6, "{entry}");
        bytes.extend(
            entry["bytes"]
                .as_array()
                .expect("bytes")
                .iter()
                .filter_map(Value::as_u64)
                .map(|b| b as u8),
        );
    }
    assert_eq!(
        String::from_utf8(bytes).expect("utf-8"),
        plain["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default(),
        "the tokens spell the answer"
    );

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (status, _, body) = post_stream(&app, &key, "/v1/chat/completions", streamed).await;
    assert_eq!(status, 200, "{body}");
    let streamed_content: Vec<Value> = sse_data(&body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(
        &streamed_content, content,
        "the stream carries the same entries"
    );

    let (status, text) = app
        .post(
            Some(&key),
            "/v1/completions",
            json!({"prompt": "One, two, three,", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let logprobs = &text["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 4, "{text}");
    assert_eq!(logprobs["token_logprobs"].as_array().map(Vec::len), Some(4));
    assert!(logprobs["token_logprobs"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|v| v.as_f64().is_some_and(|x| x.is_finite() && x <= 0.0)));
    assert!(logprobs["top_logprobs"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|m| m.as_object().is_some_and(|m| (1..=2).contains(&m.len()))));
    assert_eq!(logprobs["text_offset"][0], 0);
    // Not asked: null, as OpenAI answers.
    let (_, plain) = app
        .post(
            Some(&key),
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test]
async fn n_choices_come_from_one_call_and_one_job_and_a_seed_repeats_them() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let request = json!({
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2
    });
    let (status, first) = app
        .post(Some(&key), "/v1/chat/completions", request.clone())
        .await;
    assert_eq!(status, 200, "{first}");
    let choices = first["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{first}");
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(choices[1]["index"], 1);
    assert_ne!(
        texts[0], texts[1],
        "each choice draws from its own seed: {first}"
    );
    let completion = first["usage"]["completion_tokens"].as_i64().unwrap_or(0);
    assert!(
        (2..=16).contains(&completion),
        "both choices counted: {first}"
    );
    assert_eq!(app.calls_used(&key).await, 1, "one call");
    assert_eq!(app.job_count().await, 1, "one job");

    let (_, again) = app
        .post(Some(&key), "/v1/chat/completions", request.clone())
        .await;
    assert_eq!(
        again["choices"], first["choices"],
        "same seed, same choices"
    );

    // Streamed: each choice under its own index, adding up to the same texts.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, _, body) = post_stream(&app, &key, "/v1/chat/completions", streamed).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut got = [String::new(), String::new()];
    let mut finished = [false, false];
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).expect("JSON");
        for c in chunk["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().expect("index") as usize;
            got[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            finished[i] |= c["finish_reason"].is_string();
        }
    }
    assert_eq!(finished, [true, true], "{events:?}");
    assert_eq!(
        [got[0].as_str(), got[1].as_str()],
        [texts[0], texts[1]],
        "{events:?}"
    );

    let (status, text) = app
        .post(
            Some(&key),
            "/v1/completions",
            json!({"prompt": "One, two,", "max_tokens": 3, "temperature": 0, "n": 3}),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let texts: Vec<&Value> = text["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| &c["text"])
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        texts.iter().all(|t| *t == texts[0]),
        "greedy choices agree: {text}"
    );
}

#[tokio::test]
async fn streamed_chat_adds_up_to_the_plain_answer_and_ends_with_done() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(5)).await;
    let request = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Name three colors."}],
        "max_tokens": 16,
        "temperature": 0
    });
    let (status, plain) = app
        .post(Some(&key), "/v1/chat/completions", request.clone())
        .await;
    assert_eq!(status, 200, "{plain}");

    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, content_type, body) =
        post_stream(&app, &key, "/v1/chat/completions", streamed).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: std::collections::HashSet<&str> =
        chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id for the whole stream");
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(
        pieces.len() > 1,
        "tokens arrive as several chunks: {pieces:?}"
    );
    assert_eq!(
        pieces.concat(),
        plain["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .expect("a finish_reason chunk");
    assert_eq!(finish, plain["choices"][0]["finish_reason"]);
    // include_usage: the last chunk has usage and no choices, and it alone carries usage
    // (LangChain adds up every chunk's usage).
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        chunks.iter().filter(|c| !c["usage"].is_null()).count(),
        1,
        "usage comes once: {body}"
    );
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][field], plain["usage"][field], "{field}");
    }
    // The same prompt again: its sequence's KV cache held it (prefix reuse), and the usage
    // chunk says so as OpenAI does.
    assert_eq!(plain["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{last}"
    );
    assert_eq!(app.calls_used(&key).await, 2);
}

#[tokio::test]
async fn streamed_completion_honours_max_tokens_and_stop() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let (status, _, body) = post_stream(
        &app,
        &key,
        "/v1/completions",
        json!({"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 6);

    // A stop string cuts the streamed text exactly where it first occurs in the full answer.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).expect("stop occurs in text")];
    let (_, _, body) = post_stream(
        &app,
        &key,
        "/v1/completions",
        json!({"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0, "stream": true, "stop": [stop]}),
    )
    .await;
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, expected, "stop {stop:?} in {text:?}");
}

#[tokio::test]
async fn a_refused_stream_is_a_plain_json_error_and_spends_nothing() {
    let app = TestApp::spawn().await;
    let exhausted = app.key_with_calls(Some(0)).await;
    let (status, content_type, body) = post_stream(
        &app,
        &exhausted,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = serde_json::from_str(&body).expect("json error");
    assert_eq!(code(&body), "quota_exceeded");
    assert_eq!(app.job_count().await, 0);
}

#[tokio::test]
async fn models_tokens_and_token_embeddings_as_llama_server_and_vllm_clients_read_them() {
    let app = TestApp::spawn_scripted(|s| s["engine"]["context_size"] = json!(1024)).await;
    let key = app.key_with_calls(Some(5)).await;
    let (status, list) = app.get(Some(&key), "/v1/models").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["data"][0]["context_length"], 1024, "{list}");
    assert_eq!(list["data"][0]["max_model_len"], 1024, "{list}");
    let (status, one) = app.get(Some(&key), "/v1/models/smollm2").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        (one["id"].clone(), one["capabilities"]["embeddings"].clone()),
        (json!("smollm2"), json!(true))
    );
    let (status, none) = app.get(Some(&key), "/v1/models/meta-llama/Nope").await;
    assert_eq!((status, code(&none)), (404, "model_not_found"));

    // /tokenize and /detokenize round-trip with the model's own tokenizer.
    let (status, t) = app
        .post(
            Some(&key),
            "/tokenize",
            &json!({"content": "The cat sat on the mat."}),
        )
        .await;
    assert_eq!(status, 200, "{t}");
    let ids: Vec<i64> = t["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    assert!(!ids.is_empty());
    let (status, d) = app
        .post(Some(&key), "/detokenize", &json!({"tokens": ids}))
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["content"], "The cat sat on the mat.");
    let (status, p) = app
        .post(
            Some(&key),
            "/tokenize",
            &json!({"content": "cat", "with_pieces": true}),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    assert!(p["tokens"][0]["piece"].is_string(), "{p}");
    let (status, bad) = app
        .post(Some(&key), "/detokenize", &json!({"tokens": [1, -4]}))
        .await;
    assert_eq!((status, code(&bad)), (422, "invalid_input"), "{bad}");
    let (status, bad) = app
        .post(Some(&key), "/detokenize", &json!({"tokens": [999_999_999]}))
        .await;
    assert_eq!((status, code(&bad)), (422, "invalid_input"), "{bad}");

    // /apply-template: the text the model reads for a chat, refused as the chat route refuses.
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"}]});
    let (status, t) = app.post(Some(&key), "/apply-template", &chat).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        t["prompt"],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    for wrong in [
        json!({"messages": []}),
        json!({"messages": [{"role": "narrator", "content": "x"}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "temperature": 9}),
    ] {
        let (status, bad) = app.post(Some(&key), "/apply-template", &wrong).await;
        let (chat_status, chat_bad) = app.post(Some(&key), "/v1/chat/completions", &wrong).await;
        assert!((400..500).contains(&status), "{wrong}: {bad}");
        assert_eq!(
            (status, code(&bad)),
            (chat_status, code(&chat_bad)),
            "{wrong}"
        );
    }
    let (status, _) = app.post(None, "/apply-template", &chat).await;
    assert_eq!(status, 401);

    // Embeddings from token ids (one list, or a list of lists) equal those of the text.
    let by_text = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": "The cat sat on the mat."}),
        )
        .await;
    let by_ids = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": [ids.clone()]}),
        )
        .await;
    let flat = app
        .post(
            Some(&key),
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": ids}),
        )
        .await;
    assert_eq!(
        (by_text.0, by_ids.0, flat.0),
        (200, 200, 200),
        "{} {}",
        by_ids.1,
        flat.1
    );
    assert_eq!(
        by_text.1["data"][0]["embedding"],
        by_ids.1["data"][0]["embedding"]
    );
    assert_eq!(
        by_ids.1["data"][0]["embedding"],
        flat.1["data"][0]["embedding"]
    );
    assert_eq!(
        app.calls_used(&key).await,
        3,
        "only the embeddings spent calls"
    );
}

#[tokio::test]
async fn sampling_controls_reach_the_sampler_and_bad_values_are_refused() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(None).await;
    let ask = |extra: Value| {
        let mut body = json!({"model": "smollm2", "max_tokens": 6, "temperature": 0,
                              "messages": [{"role": "user", "content": "What is the capital of France?"}]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    let (status, plain) = app
        .post(Some(&key), "/v1/chat/completions", &ask(json!({})))
        .await;
    assert_eq!(status, 200, "{plain}");
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    let (_, t) = app
        .post(Some(&key), "/tokenize", &json!({"content": text}))
        .await;
    let first = t["tokens"][0].as_i64().expect("first token");
    // Banning the greedy answer's first token changes the answer.
    let (status, banned) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            &ask(json!({"logit_bias": {first.to_string(): -100}})),
        )
        .await;
    assert_eq!(status, 200, "{banned}");
    assert_ne!(
        banned["choices"][0]["message"]["content"],
        plain["choices"][0]["message"]["content"]
    );
    // Penalties and llama.cpp's own fields are accepted and run.
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            &ask(
                json!({"temperature": 0.8, "seed": 7, "top_k": 20, "min_p": 0.05, "typical_p": 0.9,
                        "presence_penalty": 0.5, "frequency_penalty": 0.5, "repeat_penalty": 1.1}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (extra, field) in [
        (json!({"top_k": -1}), "top_k"),
        (json!({"min_p": 2}), "min_p"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
    ] {
        let (status, err) = app
            .post(Some(&key), "/v1/chat/completions", &ask(extra))
            .await;
        assert_eq!((status, code(&err)), (422, "invalid_sampling"), "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_response_is_read_back_only_by_its_key_and_only_as_a_response() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(3)).await;
    let other = app.key_with_calls(Some(3)).await;
    let (status, made) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"model": "smollm2", "input": "Hi!", "max_output_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["object"], "response");
    let id = made["id"].as_str().expect("an id");
    let (status, read) = app.get(Some(&key), &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["output"], made["output"]);
    assert_eq!(read["usage"], made["usage"]);
    // Another key's response, and a chat completion's job, are not this key's responses.
    let (status, body) = app.get(Some(&other), &format!("/v1/responses/{id}")).await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    let (_, chat) = app
        .post(
            Some(&key),
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 2}),
        )
        .await;
    let job = chat["id"]
        .as_str()
        .and_then(|i| i.strip_prefix("chatcmpl-"))
        .expect("a chat id");
    let (status, body) = app
        .get(Some(&key), &format!("/v1/responses/resp_{job}"))
        .await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    // Reading spends nothing; a refused request neither.
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"input": "Hi!", "stream": true, "background": true}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (400, "unsupported_parameter"),
        "{body}"
    );
    assert_eq!(app.calls_used(&key).await, 2);
    assert_eq!(app.calls_used(&other).await, 0);
}

#[tokio::test]
async fn llama_servers_completion_route_answers_as_llama_server_does() {
    let app = TestApp::spawn().await;
    let key = app.key_with_calls(Some(6)).await;
    let prompt = "One, two, three,";
    // The same greedy continuation as /v1/completions, with llama-server's totals.
    let (_, openai) = app
        .post(
            Some(&key),
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}),
        )
        .await;
    let expected = openai["choices"][0]["text"].as_str().expect("text");
    let (status, body) = app
        .post(
            Some(&key),
            "/completion",
            json!({"prompt": prompt, "n_predict": 8, "temperature": 0, "cache_prompt": true, "top_k": 40}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], expected, "{body}");
    assert_eq!(body["stop"], true);
    assert_eq!(body["tokens_predicted"], 8);
    assert_eq!(body["stop_type"], "limit");
    assert_eq!(
        body["tokens_evaluated"], openai["usage"]["prompt_tokens"],
        "{body}"
    );
    assert_eq!(body["prompt"], prompt);
    // Streamed: content chunks with `stop: false`, then the final object; they add up.
    let (status, content_type, text) = post_stream(
        &app,
        &key,
        "/completions",
        json!({"prompt": prompt, "n_predict": 8, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let chunks: Vec<Value> = sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).expect("JSON chunks, no [DONE]"))
        .collect();
    let last = chunks.last().expect("a final object");
    assert_eq!(last["stop"], true, "{text}");
    assert_eq!(last["tokens_predicted"], 8, "{text}");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["stop"] == false));
    assert!(chunks.len() > 2, "{text}");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    assert_eq!(joined, expected);
    // n_predict -1 runs to the model's own end (cut at the server's limit), json_schema holds.
    let (status, body) = app
        .post(
            Some(&key),
            "/completion",
            json!({"prompt": "A JSON object with a name:", "n_predict": -1, "temperature": 0,
                   "json_schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
                                   "required": ["name"], "additionalProperties": false}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let parsed: Value =
        serde_json::from_str(body["content"].as_str().unwrap_or_default()).expect("JSON content");
    assert!(parsed["name"].is_string(), "{parsed}");
    assert_eq!(body["stop_type"], "eos", "{body}");
    // What it cannot honour is refused by name, and spends nothing.
    let (status, body) = app
        .post(
            Some(&key),
            "/completion",
            json!({"prompt": prompt, "grammar": "root ::= \"a\"", "n_probs": 2}),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (400, "unsupported_parameter"),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("grammar") && message.contains("n_probs"),
        "{body}"
    );
    assert_eq!(app.calls_used(&key).await, 4);
    // What its clients size requests by, free.
    let (status, props) = app.get(Some(&key), "/props").await;
    assert_eq!(status, 200, "{props}");
    assert_eq!(
        props["default_generation_settings"]["n_ctx"],
        openai_context(&app, &key).await
    );
    assert!(
        props["total_slots"].as_i64().is_some_and(|n| n >= 1),
        "{props}"
    );
    assert_eq!(props["model_alias"], "smollm2");
    assert!(
        props["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("im_start")),
        "{props}"
    );
    assert_eq!(app.calls_used(&key).await, 4);
}

/// The served model's context length as `/v1/models` reports it.
async fn openai_context(app: &TestApp, key: &common::TestKey) -> Value {
    let (_, models) = app.get(Some(key), "/v1/models").await;
    models["data"][0]["context_length"].clone()
}

/// What OpenAI's SDKs call on a stored response besides reading it: `input_items.list` and
/// `delete`; and the fields it was created with, read back. Scripted engine: what is checked is
/// the record and the routes, not the text.
#[tokio::test]
async fn a_stored_response_lists_its_input_says_what_it_was_made_with_cancels_and_deletes() {
    use tollgate::models::{budgets::Reservation, jobs};

    let app = TestApp::spawn_scripted(|_| {}).await;
    let key = app.key_with_calls(Some(10)).await;
    let other = app.key_with_calls(Some(10)).await;
    let (status, first) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({
                "model": "smollm2",
                "instructions": "Be brief.",
                "metadata": {"topic": "names"},
                "input": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": [{"type": "input_text", "text": "Name?"}]}
                ],
                "max_output_tokens": 4
            }),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().expect("an id").to_string();
    let (status, read) = app.get(Some(&key), &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["instructions"], "Be brief.");
    assert_eq!(read["metadata"], json!({"topic": "names"}));
    assert_eq!(read["previous_response_id"], Value::Null);
    assert_eq!(read["output"], first["output"]);

    // Newest first by default; the instructions are not an input item.
    let items = |query: String| {
        let app = &app;
        let key = &key;
        let id = id.clone();
        async move {
            app.get(Some(key), &format!("/v1/responses/{id}/input_items{query}"))
                .await
        }
    };
    let (status, all) = items(String::new()).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["object"], "list");
    let texts = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|i| i["content"][0]["text"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(texts(&all), ["Name?", "Hello", "Hi"], "{all}");
    assert_eq!(all["data"][0]["content"][0]["type"], "input_text");
    assert_eq!(all["data"][1]["content"][0]["type"], "output_text");
    assert_eq!(all["data"][1]["role"], "assistant");
    assert_eq!(all["has_more"], false);
    assert_eq!(all["first_id"], all["data"][0]["id"]);
    assert_eq!(all["last_id"], all["data"][2]["id"]);
    // Pages, oldest first.
    let (_, page) = items("?order=asc&limit=2".into()).await;
    assert_eq!(texts(&page), ["Hi", "Hello"], "{page}");
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().expect("last id").to_string();
    let (_, rest) = items(format!("?order=asc&limit=2&after={after}")).await;
    assert_eq!(texts(&rest), ["Name?"], "{rest}");
    assert_eq!(rest["has_more"], false);
    for (query, expected) in [
        ("?limit=0", (422, "invalid_query")),
        ("?limit=101", (422, "invalid_query")),
        ("?order=sideways", (422, "invalid_query")),
        ("?after=msg_nothing", (422, "invalid_query")),
        (
            "?include=message.output_text.logprobs",
            (400, "unsupported_parameter"),
        ),
    ] {
        let (status, body) = items(query.into()).await;
        assert_eq!((status, code(&body)), expected, "{query}: {body}");
    }

    // A continuation lists only its own input and says what it continued.
    let (status, second) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"previous_response_id": id, "input": "And yours?", "max_output_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let second_id = second["id"].as_str().expect("an id");
    let (_, read) = app
        .get(Some(&key), &format!("/v1/responses/{second_id}"))
        .await;
    assert_eq!(read["previous_response_id"], id.as_str());
    assert_eq!(read["instructions"], Value::Null);
    let (_, listed) = app
        .get(
            Some(&key),
            &format!("/v1/responses/{second_id}/input_items"),
        )
        .await;
    assert_eq!(texts(&listed), ["And yours?"], "{listed}");

    // An input item's id is an item_reference to it.
    let hi = all["data"][2]["id"]
        .as_str()
        .expect("an item id")
        .to_string();
    let (status, third) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"input": [{"type": "item_reference", "id": hi}, {"role": "user", "content": "Again"}], "max_output_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200, "{third}");
    let third_id = third["id"].as_str().expect("an id");
    let (_, listed) = app
        .get(
            Some(&key),
            &format!("/v1/responses/{third_id}/input_items?order=asc"),
        )
        .await;
    assert_eq!(texts(&listed), ["Hi", "Again"], "{listed}");

    // Deleting: only the key's own, once; afterwards it cannot be read, listed or continued.
    let (status, body) = app
        .delete(Some(&other), &format!("/v1/responses/{id}"))
        .await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    let (status, body) = app.delete(Some(&key), &format!("/v1/responses/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": id, "object": "response", "deleted": true})
    );
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        let (status, body) = app.get(Some(&key), &path).await;
        assert_eq!(
            (status, code(&body)),
            (404, "job_not_found"),
            "{path}: {body}"
        );
    }
    let (status, body) = app.delete(Some(&key), &format!("/v1/responses/{id}")).await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"previous_response_id": id, "input": "More?"}),
        )
        .await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    let (status, body) = app
        .post(
            Some(&key),
            "/v1/responses",
            json!({"input": [{"type": "item_reference", "id": hi}]}),
        )
        .await;
    assert_eq!((status, code(&body)), (422, "invalid_input"), "{body}");
    let erased = jobs::Model::find_any(&app.ctx.db, id.trim_start_matches("resp_"))
        .await
        .expect("read")
        .expect("the row stays, for usage");
    assert!(erased.is_purged() && erased.result.is_none() && erased.echo.is_none());
    assert!(erased.generated_tokens > 0, "its counts stay");

    // One still queued cannot be deleted until it is cancelled; cancelling refunds its call.
    tollgate::models::api_keys::charge(
        &app.ctx.db,
        key.id,
        &tollgate::models::api_keys::hash_secret(&key.secret),
    )
    .await
    .expect("db")
    .expect("charged, as admission charges");
    let queued = uuid::Uuid::new_v4().to_string();
    jobs::ActiveModel::create_queued(
        &app.ctx.db,
        jobs::NewJob {
            id: queued.clone(),
            api_key_id: key.id,
            endpoint: "/v1/responses".into(),
            model: "smollm2".into(),
            request_json: "{}".into(),
            prompt_tokens: 3,
            client_ref: None,
            reservation: Reservation::default(),
            echo: None,
        },
    )
    .await
    .expect("a queued response");
    let (status, body) = app
        .delete(Some(&key), &format!("/v1/responses/resp_{queued}"))
        .await;
    assert_eq!((status, code(&body)), (409, "job_not_finished"), "{body}");
    let (status, body) = app
        .get(Some(&key), &format!("/v1/responses/resp_{queued}"))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("queued")),
        "{body}"
    );
    assert_eq!(app.calls_used(&key).await, 4);
    let cancel = format!("/v1/responses/resp_{queued}/cancel");
    let (status, body) = app.post_empty(Some(&other), &cancel).await;
    assert_eq!((status, code(&body)), (404, "job_not_found"), "{body}");
    for _ in 0..2 {
        let (status, body) = app.post_empty(Some(&key), &cancel).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("cancelled")),
            "{body}"
        );
        assert_eq!(body["error"], Value::Null);
    }
    assert_eq!(app.calls_used(&key).await, 3, "refunded once");
    let (_, body) = app
        .get(Some(&key), &format!("/v1/responses/resp_{queued}"))
        .await;
    assert_eq!(body["status"], "cancelled", "{body}");
    let (status, body) = app
        .delete(Some(&key), &format!("/v1/responses/resp_{queued}"))
        .await;
    assert_eq!(status, 200, "{body}");
    // A response that finished first is not cancelled.
    let (status, body) = app
        .post_empty(Some(&key), &format!("/v1/responses/{second_id}/cancel"))
        .await;
    assert_eq!((status, code(&body)), (409, "job_finished"), "{body}");

    // Three responses made; reading, listing, deleting, cancelling and refusals spent nothing.
    assert_eq!(app.calls_used(&key).await, 3);
    assert_eq!(app.calls_used(&other).await, 0);
}
