"""Drives Tollgate with the official `openai` Python SDK, as an OpenAI user would.

Usage: openai_sdk.py BASE_URL GOOD_KEY EXHAUSTED_KEY
Exits non-zero (with the reason) when any check fails.
"""
import json
import math
import sys

import jsonschema
import openai

base, good, exhausted = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=good, max_retries=0)

models = [m.id for m in client.models.list()]
assert models == ["smollm2"], models

chat = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
)
text = chat.choices[0].message.content
assert text and text.strip(), chat
assert chat.usage.completion_tokens > 0, chat.usage
assert chat.choices[0].finish_reason in ("stop", "length"), chat

# The same greedy request streamed: the pieces add up to the non-streamed answer.
stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert len(pieces) > 1, pieces
assert "".join(pieces) == text, (pieces, text)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
assert finish == chat.choices[0].finish_reason, finish

# Structured output: a json_schema answer parses and validates with `jsonschema`.
person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
structured = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Invent a person with a name and an age, as JSON."}],
    max_tokens=40,
    temperature=0.7,
    seed=11,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}},
)
assert structured.choices[0].finish_reason == "stop", structured
jsonschema.validate(json.loads(structured.choices[0].message.content), person)

try:
    client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": {"type": "string", "format": "email"}}},
    )
    raise SystemExit("a schema the grammar cannot enforce was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.code == "unsupported_schema" and "email" in str(e), e

# A seed makes a sampled answer repeatable.
seeded = [
    client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=16,
        temperature=1.0,
        seed=5,
    ).choices[0].message.content
    for _ in range(2)
]
assert seeded[0] and seeded[0] == seeded[1], seeded

# Log-probabilities: one finite entry per generated token, with the alternatives asked for.
scored = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Name a color."}],
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
entries = scored.choices[0].logprobs.content
assert len(entries) == scored.usage.completion_tokens, scored
assert all(math.isfinite(e.logprob) and e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries), entries

# n choices from one request.
several = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Name a color."}],
    max_tokens=4,
    temperature=1.0,
    seed=2,
    n=2,
)
assert [c.index for c in several.choices] == [0, 1], several
assert all(c.message.content for c in several.choices), several

# Tool calling: a named tool_choice gives a call whose arguments validate against the tool's
# parameters; streamed, the deltas reassemble to the same call; its result goes back in a
# `tool` message.
weather = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": weather}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}}},
]
ask = dict(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=64,
    temperature=0,
)
called = client.chat.completions.create(**ask)
assert called.choices[0].finish_reason == "tool_calls", called
call = called.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", call
jsonschema.validate(json.loads(call.function.arguments), weather)
streamed_calls, finish = {}, None
for chunk in client.chat.completions.create(stream=True, **ask):
    for choice in chunk.choices:
        for d in choice.delta.tool_calls or []:
            c = streamed_calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            if d.function:
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
assert finish == "tool_calls", finish
assert list(streamed_calls) == [0] and streamed_calls[0]["id"].startswith("call_"), streamed_calls
assert (streamed_calls[0]["name"], streamed_calls[0]["arguments"]) == ("get_weather", call.function.arguments), (streamed_calls, call)
after = client.chat.completions.create(
    model="smollm2",
    messages=[ask["messages"][0], called.choices[0].message,
              {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}],
    tools=tools,
    max_tokens=64,
    temperature=0,
)
assert after.choices[0].finish_reason in ("stop", "length", "tool_calls"), after
assert after.choices[0].message.content or after.choices[0].message.tool_calls, after

# Tools beside a response format (what an agent with an output type and tools sends): the
# answer is a call, or a reply that matches the schema; never free text.
both = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
    tools=tools,
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}},
    parallel_tool_calls=False,
    max_tokens=96,
    temperature=0,
)
reply = both.choices[0].message
if reply.tool_calls:
    assert both.choices[0].finish_reason == "tool_calls", both
    for c in reply.tool_calls:
        schema = weather if c.function.name == "get_weather" else tools[1]["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)
else:
    assert both.choices[0].finish_reason == "stop", both
    jsonschema.validate(json.loads(reply.content), person)

done = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0)
assert done.choices[0].text, done
assert done.usage.completion_tokens == 5, done.usage

# The SDK asks for base64 by default and decodes it; one call for the whole list.
emb = client.embeddings.create(model="smollm2", input=["The cat sat on the mat.", "Hello there"])
assert [d.index for d in emb.data] == [0, 1], emb
assert all(len(d.embedding) == 576 for d in emb.data), [len(d.embedding) for d in emb.data]
norm = sum(x * x for x in emb.data[0].embedding) ** 0.5
assert abs(norm - 1.0) < 1e-3, norm
assert emb.usage.prompt_tokens > 0, emb.usage
floats = client.embeddings.create(model="smollm2", input="Hello there", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, emb.data[1].embedding)) < 1e-5

try:
    openai.OpenAI(base_url=f"{base}/v1", api_key="tg_00000000_wrong", max_retries=0).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}]
    )
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.code == "invalid_api_key", e

try:
    openai.OpenAI(base_url=f"{base}/v1", api_key=exhausted, max_retries=0).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}]
    )
    raise SystemExit("an exhausted key was accepted")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.code == "quota_exceeded", e

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

print("openai sdk checks passed")
