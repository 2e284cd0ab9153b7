"""Drives Tollgate's Ollama routes with the official `ollama` Python client, as a user of a local
Ollama would, with the key in the client's headers.

Usage: ollama_client.py BASE_URL KEY
Exits non-zero (with the reason) when any check fails.
"""
import json
import sys

import httpx
import ollama
import openai

base, key = sys.argv[1], sys.argv[2]
client = ollama.Client(host=base, headers={"Authorization": f"Bearer {key}"})
oai = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
question = "What is 2 + 2?"  # greedy, SmolLM2 answers it in 11 tokens and stops
greedy = {"temperature": 0, "num_predict": 48}

# The same greedy turn through Chat Completions, to compare with.
chat = oai.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
)
expected = chat.choices[0].message.content

# No key needed for the probes Open WebUI and the ollama CLI make first.
version = httpx.get(f"{base}/api/version")
assert version.status_code == 200 and all(p.isdigit() for p in version.json()["version"].split(".")), version.text
root = httpx.get(f"{base}/")
assert root.status_code == 200 and root.text == "Ollama is running", root.text

# A load request (no prompt: what `ollama run` and Open WebUI send to load or unload a model)
# generates nothing and spends nothing; the model stays resident either way.
preload = client.generate(model="smollm2")
assert preload.done and preload.done_reason == "load" and preload.response == "", preload
unload = httpx.post(f"{base}/api/chat", headers={"Authorization": f"Bearer {key}"},
                    json={"model": "smollm2:latest", "messages": [], "keep_alive": 0})
assert unload.status_code == 200 and unload.json()["done"] is True, unload.text
missing = httpx.post(f"{base}/api/generate", headers={"Authorization": f"Bearer {key}"}, json={"model": "nope"})
assert missing.status_code == 404 and isinstance(missing.json()["error"], str), missing.text

tags = client.list()
assert [m.model for m in tags.models] == ["smollm2:latest"], tags
ps = client.ps()
assert [m.model for m in ps.models] == ["smollm2:latest"], ps
shown = client.show("smollm2")
context = [v for k, v in shown.modelinfo.items() if k.endswith(".context_length")]
assert context and context[0] > 0 and f"num_ctx {context[0]}" == shown.parameters, shown
# The model's own template; no `.Suffix` (Continue would take that for fill-in-the-middle).
assert "completion" in shown.capabilities and shown.template and ".Suffix" not in shown.template, shown

r = client.chat(model="smollm2", messages=[{"role": "user", "content": question}], options=greedy)
assert r.done and r.done_reason == "stop", r
assert r.message.role == "assistant" and r.message.content == expected, (r.message, expected)
assert r.eval_count == chat.usage.completion_tokens and r.prompt_eval_count == chat.usage.prompt_tokens, r
# As Open WebUI names it (`:latest`), with the `num_ctx` LlamaIndex and Continue always send
# (room asked for; the served context is what it is): the same answer.
latest = client.chat(model="smollm2:latest", messages=[{"role": "user", "content": question}],
                     options={**greedy, "num_ctx": 32768})
assert latest.message.content == expected, latest

# Streamed (the client asks with stream=True): pieces with done=False, then the closing object.
parts = list(client.chat(model="smollm2", messages=[{"role": "user", "content": question}], options=greedy, stream=True))
assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done, parts
assert "".join(p.message.content for p in parts) == expected, parts
assert parts[-1].eval_count == r.eval_count, parts[-1]

# /api/generate reads the prompt as a user turn of the chat template, or raw.
g = client.generate(model="smollm2", prompt=question, options=greedy)
assert g.response == expected and g.done, g
completion = oai.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=6, temperature=0)
raw = client.generate(model="smollm2", prompt="One, two, three,", raw=True, options={"temperature": 0, "num_predict": 6})
assert raw.response == completion.choices[0].text and raw.done_reason == "length", (raw, completion)

# format: a JSON Schema constrains the answer.
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
person = client.chat(model="smollm2", messages=[{"role": "user", "content": "Invent a person, as JSON."}],
                     format=schema, options={"temperature": 0.7, "seed": 3, "num_predict": 40})
parsed = json.loads(person.message.content)
assert set(parsed) == {"name", "age"} and isinstance(parsed["age"], int), parsed

# Tools (OpenAI's shape, as Ollama takes them; the model decides): the same answer as the chat
# route gives with `tool_choice: "auto"`, calls with their arguments as objects; streamed, the
# closing object carries them; the next turn takes the calls and the tool's result back.
weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}}}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
tools_options = {"temperature": 0, "num_predict": 64}
offered = oai.chat.completions.create(model="smollm2", messages=ask, tools=[weather], max_tokens=64, temperature=0)
c = offered.choices[0].message
o = client.chat(model="smollm2", messages=ask, tools=[weather], options=tools_options)
# The tools were offered, whether or not the model then calls one: the prompt holds their
# schema (the ollama client's own Tool model drops `maxLength`, so a few tokens fewer than the
# chat route's).
assert offered.usage.prompt_tokens - 20 < o.prompt_eval_count <= offered.usage.prompt_tokens, (o, offered.usage)
assert o.prompt_eval_count > r.prompt_eval_count + 100, (o, r)
want = [(t.function.name, json.loads(t.function.arguments)) for t in c.tool_calls or []]
got = [(t.function.name, dict(t.function.arguments)) for t in o.message.tool_calls or []]
assert got == want and (o.message.content or None) == (c.content or None), (o.message, c)
last = list(client.chat(model="smollm2", messages=ask, tools=[weather], options=tools_options, stream=True))[-1]
assert last.done and [(t.function.name, dict(t.function.arguments)) for t in last.message.tool_calls or []] == want, last
follow_up = ({"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"} if want
             else {"role": "user", "content": "Thanks."})
after = client.chat(model="smollm2", messages=ask + [o.message, follow_up], tools=[weather], options=tools_options)
assert after.done and (after.message.content or after.message.tool_calls), after

# Embeddings: /api/embed (a list, or one string) and the older /api/embeddings give the
# vectors /v1/embeddings gives.
words = ["The cat sat on the mat.", "Paris is in France."]
want_vectors = [d.embedding for d in oai.embeddings.create(model="smollm2", input=words).data]
embedded = client.embed(model="smollm2", input=words)
close = lambda a, b: len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
assert len(embedded.embeddings) == 2 and all(close(a, b) for a, b in zip(embedded.embeddings, want_vectors)), embedded
assert embedded.prompt_eval_count > 0, embedded
one = client.embeddings(model="smollm2", prompt=words[1])
assert close(list(one.embedding), want_vectors[1]), one
# Longer than the embedding context: cut to fit by default (as Ollama does), refused with
# truncate=False, Ollama's error body being the message itself.
long_text = "word " * 2000
cut = client.embed(model="smollm2", input=long_text)
assert len(cut.embeddings) == 1 and len(cut.embeddings[0]) == len(want_vectors[0]), cut
try:
    client.embed(model="smollm2", input=long_text, truncate=False)
    raise SystemExit("an input over the embedding context was embedded whole")
except ollama.ResponseError as e:
    assert e.status_code == 400 and isinstance(e.error, str) and "tokens" in e.error, e
try:
    client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was served")
except ollama.ResponseError as e:
    assert e.status_code == 404 and isinstance(e.error, str) and "nope" in e.error, e

# What it cannot honour is refused by name (nothing spent).
for kwargs, name in [
    (dict(tools=[{"type": "web_search"}]), "tools[0]"),
    (dict(options={"mirostat": 2}), "options.mirostat"),
]:
    try:
        client.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}], **kwargs)
        raise SystemExit(f"accepted: {kwargs}")
    except ollama.ResponseError as e:
        assert e.status_code == 400 and name in str(e), e
try:
    ollama.Client(host=base).chat(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("a request without a key was accepted")
except ollama.ResponseError as e:
    assert e.status_code == 401, e

print("ollama client checks passed")
