//! Temporary timing probe (not committed).
use std::time::Instant;
use tollgate::{
    admission::SamplingInput,
    engine::{grammar, Algorithm, ChatMessage, GenerationRequest, Prompt},
    settings::{ApiSettings, EngineSettings},
};

#[tokio::test]
async fn probe() {
    let settings = EngineSettings { parallel: 1, ..EngineSettings::default() };
    let engine = tokio::task::spawn_blocking(move || tollgate::engine::llama::LlamaEngine::start(settings)).await.unwrap().unwrap();
    let prompts = ["Repeat exactly: {\"ok\": true}", "Give a JSON object with one key \"city\" naming the capital of France. Nothing else.", "What is 2+2? Answer as JSON like {\"answer\": 0}."];
    for p in prompts { let fmt = Some(grammar::ResponseFormat::JsonObject);
        let mut params = SamplingInput { max_tokens: Some(48), temperature: Some(0.0), ..Default::default() }.into_params(&ApiSettings::default()).unwrap();
        params.controls.output = fmt.map(|f| Box::new(grammar::constrain(f).unwrap()));
        let req = GenerationRequest { model: "smollm2".into(), prompt: Prompt::Chat { messages: vec![ChatMessage { role: "user".into(), content: p.into() }] }, params, adapter: None };
        let t = Instant::now();
        let g = engine.run(req).await.unwrap();
        eprintln!("{:?} tokens={} {:?}", t.elapsed(), g.generated_tokens, g.text);
    }
}
