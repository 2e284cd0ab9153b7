//! Prefix reuse with the real model: a conversation's next turn finds its history in the KV
//! cache of the sequence that answered it and reads only the new part, reports that in `usage`
//! and `/metrics`, and answers exactly as a server that reads every prompt in full.

mod common;

use common::{metric, streamed_chat_text, TestApp, TestKey};
use serde_json::{json, Value};

async fn app(reuse: bool, parallel: u32) -> TestApp {
    TestApp::spawn_with(|s| {
        s["engine"]["prefix_reuse"] = json!(reuse);
        s["engine"]["parallel"] = json!(parallel);
        s["api"]["rate_limit"]["per_minute"] = json!(0);
    })
    .await
}

/// A greedy chat completion; returns the answer (asserting 200).
async fn chat(app: &TestApp, key: &TestKey, messages: &Value) -> Value {
    let body =
        json!({"model": "smollm2", "messages": messages, "max_tokens": 32, "temperature": 0});
    let (status, answer) = app.post(Some(key), "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// A greedy text completion of a raw prompt; returns the answer (asserting 200).
async fn complete(app: &TestApp, key: &TestKey, prompt: &str) -> Value {
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let (status, answer) = app.post(Some(key), "/v1/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

fn usage(answer: &Value, field: &str) -> u64 {
    answer["usage"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("usage.{field} in {answer}"))
}

fn cached(answer: &Value) -> u64 {
    answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage.prompt_tokens_details.cached_tokens in {answer}"))
}

/// The model's tokens for a raw prompt, as the engine reads it (`/tokenize`).
async fn tokens(app: &TestApp, key: &TestKey, text: &str) -> Vec<u64> {
    let body = json!({"content": text, "add_special": true, "parse_special": true});
    let (status, answer) = app.post(Some(key), "/tokenize", body).await;
    assert_eq!(status, 200, "{answer}");
    answer["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("tokens in {answer}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

fn shared(a: &[u64], b: &[u64]) -> u64 {
    a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
}

#[tokio::test]
async fn a_second_turn_reuses_its_history_and_answers_as_without_reuse() {
    let first = json!([{"role": "user", "content": "Tell me about the moon in two sentences."}]);
    let reusing = app(true, 4).await;
    let key = reusing.key_with_calls(None).await;
    let one = chat(&reusing, &key, &first).await;
    assert_eq!(cached(&one), 0, "nothing was cached yet: {one}");
    let mut second = first.clone();
    if let Some(turns) = second.as_array_mut() {
        turns.push(json!({"role": "assistant", "content": content(&one)}));
        turns.push(json!({"role": "user", "content": "And about the sun?"}));
    }
    let two = chat(&reusing, &key, &second).await;

    // The first turn's prompt and answer stay in its sequence's cache: the whole first prompt
    // and (nearly) all of the answer are not read again. (The last answer token sampled is
    // never decoded, and the answer is tokenized anew inside the second prompt.)
    let (prompt, answer) = (
        usage(&one, "prompt_tokens"),
        usage(&one, "completion_tokens"),
    );
    let reused = cached(&two);
    assert!(
        reused >= prompt + answer / 2 && reused <= prompt + answer,
        "second turn reused {reused} of a first turn of {prompt} + {answer} tokens: {two}"
    );
    assert!(
        reused < usage(&two, "prompt_tokens"),
        "the new turn is read"
    );
    let before = metric(&reusing, "tollgate_cached_prompt_tokens_total").await;
    assert_eq!(before, reused, "/metrics counts the reused tokens");

    // A server reading every prompt in full gives the same greedy answers and reuses nothing.
    let full = app(false, 4).await;
    let full_key = full.key_with_calls(None).await;
    let one_full = chat(&full, &full_key, &first).await;
    let two_full = chat(&full, &full_key, &second).await;
    assert_eq!(content(&one_full), content(&one));
    assert_eq!(content(&two_full), content(&two), "reuse changes no token");
    assert_eq!(
        two_full["usage"]["prompt_tokens"],
        two["usage"]["prompt_tokens"]
    );
    assert_eq!((cached(&one_full), cached(&two_full)), (0, 0));
    assert_eq!(
        metric(&full, "tollgate_cached_prompt_tokens_total").await,
        0
    );

    // An unrelated conversation reuses at most the template's opening it shares (the default
    // system prompt), never the other conversation's history; the counter grows by it.
    let other = json!([{"role": "user", "content": "List three prime numbers."}]);
    let three = chat(&reusing, &key, &other).await;
    assert!(
        cached(&three) < prompt && cached(&three) + 4 <= usage(&three, "prompt_tokens"),
        "only the opening before the user's words: {three}"
    );
    let after = metric(&reusing, "tollgate_cached_prompt_tokens_total").await;
    assert_eq!(after, before + cached(&three));
    // Each job keeps its count.
    let stored: i64 = reusing
        .jobs_of(&key)
        .await
        .iter()
        .map(|j| i64::from(j.cached_tokens))
        .sum();
    assert_eq!(u64::try_from(stored).ok(), Some(after));
}

#[tokio::test]
async fn a_prompt_reuses_exactly_the_tokens_it_shares_with_the_cache() {
    // One sequence: every job goes to it, so what it reuses is its common start with the last.
    let app = app(true, 1).await;
    let key = app.key_with_calls(None).await;
    let a = "The lighthouse keeper climbed the stairs every evening to light the lamp, \
             and the ships passed safely along the rocky coast.";
    let b = "The lighthouse keeper climbed the stairs every evening to watch the storm.";
    let c = "Seven green bottles stood on the kitchen table.";
    let (ta, tb, tc) = (
        tokens(&app, &key, a).await,
        tokens(&app, &key, b).await,
        tokens(&app, &key, c).await,
    );

    let first = complete(&app, &key, a).await;
    assert_eq!(cached(&first), 0);
    let again = complete(&app, &key, a).await;
    assert_eq!(
        cached(&again),
        ta.len() as u64 - 1,
        "all but the last token, read again for its logits"
    );
    assert_eq!(
        again["choices"][0]["text"], first["choices"][0]["text"],
        "the same greedy text"
    );
    let partly = complete(&app, &key, b).await;
    assert_eq!(cached(&partly), shared(&ta, &tb), "{partly}");
    assert!(cached(&partly) > 5, "b shares a sentence's start with a");
    let unrelated = complete(&app, &key, c).await;
    assert_eq!(cached(&unrelated), shared(&tb, &tc), "{unrelated}");
    assert!(cached(&unrelated) <= 1, "at most a start-of-text token");
    let total = cached(&again) + cached(&partly) + cached(&unrelated);
    assert_eq!(
        metric(&app, "tollgate_cached_prompt_tokens_total").await,
        total
    );
}

#[tokio::test]
async fn each_of_several_choices_reuses_its_own_sequence_and_a_seed_still_repeats() {
    let app = app(true, 4).await;
    let key = app.key_with_calls(None).await;
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Write a line about autumn leaves."}],
        "max_tokens": 12, "temperature": 0.9, "seed": 42, "n": 2
    });
    let ask = || async {
        let (status, answer) = app
            .post(Some(&key), "/v1/chat/completions", body.clone())
            .await;
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let first = ask().await;
    assert_eq!(cached(&first), 0);
    let again = ask().await;
    // Each choice found the prompt in the sequence its earlier twin left (all but the last
    // token); the usage reports what every choice reused.
    assert_eq!(
        cached(&again),
        usage(&again, "prompt_tokens") - 1,
        "{again}"
    );
    for i in 0..2 {
        assert_eq!(
            again["choices"][i]["message"]["content"], first["choices"][i]["message"]["content"],
            "choice {i}: the seed decides the draws, with or without the cache"
        );
    }
}

/// `/ping`'s engine counters (admin key).
async fn engine_status(app: &TestApp) -> Value {
    let admin = app.admin_key().await;
    let (status, ping) = app.get(Some(&admin), "/ping").await;
    assert_eq!(status, 200, "{ping}");
    ping["worker"]["engine"].clone()
}

#[tokio::test]
async fn a_prompt_another_running_request_holds_is_copied_from_its_sequence() {
    let app = app(true, 4).await;
    let key = app.key_with_calls(None).await;
    let messages = json!([{"role": "user", "content": "Write a long story about a brave knight and a dragon."}]);
    assert_eq!(engine_status(&app).await["prefix_copies"], 0);
    // A long answer, streamed: once its first piece arrives it runs, holding the prompt.
    let long = app
        .request(reqwest::Method::POST, Some(&key), "/v1/chat/completions")
        .json(
            &json!({"model": "smollm2", "messages": messages, "max_tokens": 160,
                      "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(long.status(), 200);
    let mut long = long;
    let first = long.chunk().await.expect("a chunk").expect("not ended");
    let mut streamed = String::from_utf8_lossy(&first).to_string();
    // The same prompt meanwhile: another sequence, started from a copy of the running one's.
    let short = chat(&app, &key, &messages).await;
    let copies = engine_status(&app).await["prefix_copies"].as_u64();
    while let Some(chunk) = long.chunk().await.expect("the rest") {
        streamed.push_str(&String::from_utf8_lossy(&chunk));
    }
    let prompt = usage(&short, "prompt_tokens");
    assert_eq!(
        cached(&short),
        prompt - 1,
        "all but its last token copied: {short}"
    );
    assert_eq!(
        copies,
        Some(1),
        "copied from the running sequence, not its own cache"
    );
    // Both answer as the model does: the copy is the same cache, and the running one's own
    // sequence was left as it was.
    let pieces = streamed_chat_text(&streamed);
    assert!(
        pieces.len() > content(&short).len() && pieces.starts_with(content(&short)),
        "the long answer begins with the short one: {pieces:?} vs {:?}",
        content(&short)
    );
    let alone = crate::app(false, 1).await;
    let alone_key = alone.key_with_calls(None).await;
    let reference = chat(&alone, &alone_key, &messages).await;
    assert_eq!(
        content(&short),
        content(&reference),
        "as read in full, alone"
    );
}
