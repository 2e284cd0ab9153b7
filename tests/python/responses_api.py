"""Drives Tollgate's Responses API with the official `openai` Python SDK (`client.responses`),
LangChain's `ChatOpenAI(use_responses_api=True)` and the OpenAI Agents SDK, as they call it.

Usage: responses_api.py BASE_URL GOOD_KEY EXHAUSTED_KEY
Exits non-zero (with the reason) when any check fails.
"""
import asyncio
import json
import sys
import time

import agents
import jsonschema
import openai
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base, good, exhausted = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=good, max_retries=0)
question = "What is 2 + 2?"  # greedy, SmolLM2 answers it in 11 tokens and stops

# The same greedy turn through Chat Completions: a response to it reads the same prompt.
chat = client.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
)
expected = chat.choices[0].message.content
assert expected and expected.strip(), chat

r = client.responses.create(model="smollm2", input=question, max_output_tokens=48, temperature=0)
assert r.object == "response" and r.id.startswith("resp_"), r
assert r.status in ("completed", "incomplete"), r
assert r.output_text == expected, (r.output_text, expected)
assert r.output[0].type == "message" and r.output[0].role == "assistant", r.output
assert r.usage.output_tokens == chat.usage.completion_tokens, r.usage
assert r.usage.input_tokens == chat.usage.prompt_tokens, r.usage
assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length"), (r.status, chat)
if r.status == "incomplete":
    assert r.incomplete_details.reason == "max_output_tokens", r.incomplete_details

# An earlier turn sent by reference (`item_reference`, what Vercel's AI SDK sends for earlier
# output with `store`, its default) reads as the item itself; one naming nothing of this key's
# is refused (nothing spent).
follow_up = "And 3 + 3?"
by_item = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0, input=[
    {"role": "user", "content": question}, r.output[0].model_dump(exclude_none=True),
    {"role": "user", "content": follow_up}])
by_reference = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0, input=[
    {"role": "user", "content": question}, {"type": "item_reference", "id": r.output[0].id},
    {"role": "user", "content": follow_up}])
assert by_reference.usage.input_tokens == by_item.usage.input_tokens > r.usage.input_tokens, (by_reference.usage, by_item.usage)
assert by_reference.output_text == by_item.output_text, (by_reference.output_text, by_item.output_text)
try:
    client.responses.create(model="smollm2", input=[{"type": "item_reference", "id": "msg_" + "0" * 32}])
    raise SystemExit("a reference to nothing was accepted")
except openai.UnprocessableEntityError as e:
    assert e.code == "invalid_input" and "item_reference" in str(e), e

# `previous_response_id` continues a response: its conversation and output come before the new
# input, so the turn reads exactly as sending the whole conversation (same prompt, same answer),
# and a tool's result can answer the earlier response's call by its id alone. One naming nothing
# of this key's is refused, nothing spent.
continued = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0,
                                    previous_response_id=r.id, input=follow_up)
assert continued.previous_response_id == r.id, continued
assert continued.usage.input_tokens == by_item.usage.input_tokens, (continued.usage, by_item.usage)
assert continued.output_text == by_item.output_text, (continued.output_text, by_item.output_text)
third = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0,
                                previous_response_id=continued.id, input="And 4 + 4?")
spelled_out = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0, input=[
    {"role": "user", "content": question}, r.output[0].model_dump(exclude_none=True),
    {"role": "user", "content": follow_up}, continued.output[0].model_dump(exclude_none=True),
    {"role": "user", "content": "And 4 + 4?"}])
assert third.usage.input_tokens == spelled_out.usage.input_tokens > continued.usage.input_tokens, (third.usage, spelled_out.usage)
assert third.output_text == spelled_out.output_text, (third.output_text, spelled_out.output_text)
# New instructions replace the earlier response's (not carried over, as OpenAI has it).
instructed = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0,
                                     instructions="Answer in one word.", input=question)
re_instructed = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0,
                                        instructions="Be brief.", previous_response_id=instructed.id, input=follow_up)
fresh = client.responses.create(model="smollm2", max_output_tokens=8, temperature=0,
                                instructions="Be brief.", input=[
    {"role": "user", "content": question}, instructed.output[0].model_dump(exclude_none=True),
    {"role": "user", "content": follow_up}])
assert re_instructed.usage.input_tokens == fresh.usage.input_tokens, (re_instructed.usage, fresh.usage)
assert re_instructed.output_text == fresh.output_text, (re_instructed.output_text, fresh.output_text)
assert re_instructed.instructions == "Be brief.", re_instructed
try:
    client.responses.create(model="smollm2", input=follow_up, previous_response_id="resp_" + "0" * 32)
    raise SystemExit("a previous response that does not exist was accepted")
except openai.NotFoundError as e:
    assert e.code == "job_not_found" and "previous_response_id" in str(e), e

# Log-probabilities, asked for with `include`: one finite entry per output token, with the
# alternatives asked for; the same on the streamed answer's final response.
scored = client.responses.create(model="smollm2", input=question, max_output_tokens=48, temperature=0,
                                 include=["message.output_text.logprobs"], top_logprobs=2)
entries = scored.output[0].content[0].logprobs
assert scored.output_text == expected and len(entries) == scored.usage.output_tokens, scored
assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries), entries
assert "".join(e.token for e in entries) == expected, entries
with client.responses.stream(model="smollm2", input=question, max_output_tokens=48, temperature=0,
                             include=["message.output_text.logprobs"], top_logprobs=2) as s:
    done_logprobs = [e.logprobs for e in s if e.type == "response.output_text.done"]
    streamed_scores = s.get_final_response().output[0].content[0].logprobs
assert [e.token for e in streamed_scores] == [e.token for e in entries], (streamed_scores, entries)
assert [e.token for e in done_logprobs[0]] == [e.token for e in entries], done_logprobs

# `instructions` is a system turn: the same as sending one in `input`.
with_instructions = client.responses.create(
    model="smollm2", instructions="Answer in one word.", input=question, max_output_tokens=8, temperature=0
)
as_items = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}],
    max_tokens=8,
    temperature=0,
)
assert with_instructions.output_text == as_items.choices[0].message.content, with_instructions
assert with_instructions.instructions == "Answer in one word.", with_instructions

# Streamed with the SDK's own stream helper, which checks the events' order and items: the
# deltas add up to the whole answer, numbered from 0. (The helper's final response needs
# `response.completed`: an answer cut at `max_output_tokens` ends `response.incomplete`, as
# OpenAI's do, so this one has room to finish.)
assert r.status == "completed", r
deltas, numbers = [], []
with client.responses.stream(model="smollm2", input=question, max_output_tokens=48, temperature=0) as s:
    for event in s:
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = s.get_final_response()
assert numbers == list(range(len(numbers))), numbers
assert len(deltas) > 1 and "".join(deltas) == expected, (deltas, expected)
assert final.output_text == expected and final.status == r.status, final
assert final.usage.output_tokens == r.usage.output_tokens, final.usage

# Structured output: a json_schema `text.format`, and the SDK's `parse` with a pydantic model.
person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
structured = client.responses.create(
    model="smollm2",
    input="Invent a person with a name and an age, as JSON.",
    max_output_tokens=40,
    temperature=0.7,
    text={"format": {"type": "json_schema", "name": "person", "schema": person, "strict": True}},
)
assert structured.status == "completed", structured
jsonschema.validate(json.loads(structured.output_text), person)
assert structured.text.format.type == "json_schema", structured.text


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=12)
    age: int = Field(ge=0, le=120)


parsed = client.responses.parse(
    model="smollm2", input="Invent a person.", max_output_tokens=40, temperature=0.7, text_format=Person
)
assert isinstance(parsed.output_parsed, Person), parsed

# A function call, its result sent back with the call item as the SDK returned it (what agent
# loops do), and the same call streamed.
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
    {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": weather, "strict": True},
    {"type": "function", "name": "get_time", "description": "Current time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}},
]
ask = dict(
    model="smollm2",
    input=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=tools,
    tool_choice={"type": "function", "name": "get_weather"},
    max_output_tokens=64,
    temperature=0,
)
called = client.responses.create(**ask)
calls = [o for o in called.output if o.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather", called.output
assert calls[0].call_id.startswith("call_"), calls
jsonschema.validate(json.loads(calls[0].arguments), weather)
assert [t.name for t in called.tools] == ["get_weather", "get_time"], called.tools
after = client.responses.create(
    model="smollm2",
    input=ask["input"] + called.output + [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}],
    tools=tools,
    max_output_tokens=32,
    temperature=0,
)
assert after.status in ("completed", "incomplete") and after.output, after
# The same turn by `previous_response_id`: only the tool's result is sent (as the OpenAI Agents
# SDK does when it chains responses), and it reads exactly as the turn spelled out.
chained = client.responses.create(
    model="smollm2",
    previous_response_id=called.id,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}],
    tools=tools,
    max_output_tokens=32,
    temperature=0,
)
assert chained.usage.input_tokens == after.usage.input_tokens, (chained.usage, after.usage)
# The same greedy answer, but for its last tokens: the whole prompt is cached from `after`, and
# its last token's logits from a one-token decode can differ in the last bits from a prefill's,
# enough to flip a near-tie 30 tokens on (seen once: a run of spaces more or less at the cut).
def said(r):
    return "".join(c.text for o in r.output if o.type == "message" for c in o.content) + "".join(
        o.name + o.arguments for o in r.output if o.type == "function_call")
texts = [said(chained), said(after)]
shared = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
assert shared >= 48, texts
with client.responses.stream(**ask) as s:
    for _ in s:
        pass
    streamed = s.get_final_response()
streamed_calls = [o for o in streamed.output if o.type == "function_call"]
assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in calls], (streamed_calls, calls)
assert all(c.call_id.startswith("call_") for c in streamed_calls), streamed_calls

# In the background: 202 with the queued response at once, then read by id until done.
raw = client.responses.with_raw_response.create(
    model="smollm2", input=question, max_output_tokens=48, temperature=0, background=True
)
assert raw.status_code == 202 and raw.headers["location"].endswith(raw.parse().id), raw.headers
queued = raw.parse()
assert queued.status in ("queued", "in_progress", "completed"), queued
deadline = time.time() + 120
read = client.responses.retrieve(queued.id)
while read.status in ("queued", "in_progress") and time.time() < deadline:
    time.sleep(0.2)
    read = client.responses.retrieve(queued.id)
assert read.output_text == expected and read.status == r.status, read

# Read back with what it was made with; its input items listed a page at a time (the SDK
# follows `after`); deleted, after which it is gone.
noted = client.responses.create(
    model="smollm2", instructions="Answer in one word.", metadata={"run": "sdk"}, max_output_tokens=8, temperature=0,
    input=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": question}],
)
back = client.responses.retrieve(noted.id)
assert back.instructions == "Answer in one word." and back.metadata == {"run": "sdk"}, back
assert back.output_text == noted.output_text, (back, noted)
assert client.responses.retrieve(chained.id).previous_response_id == called.id
listed = list(client.responses.input_items.list(noted.id, limit=1, order="asc"))
assert [(i.type, i.role) for i in listed] == [("message", "user"), ("message", "assistant"), ("message", "user")], listed
assert listed[2].content[0].text == question and len({i.id for i in listed}) == 3, listed
newest = client.responses.input_items.list(noted.id)
assert [i.id for i in newest.data] == [i.id for i in reversed(listed)] and not newest.has_more, newest
client.responses.delete(noted.id)
try:
    client.responses.retrieve(noted.id)
    raise SystemExit("a deleted response was read")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

# A long one in the background, cancelled at once: stopped, and its call refunded (the Rust
# side counts the calls).
long = client.responses.create(model="smollm2", input="Write a long story about a dragon.",
                               max_output_tokens=1500, temperature=0, background=True)
stopped = client.responses.cancel(long.id)
assert stopped.status == "cancelled" and stopped.output == [], stopped
assert client.responses.retrieve(long.id).status == "cancelled"

# LangChain's ChatOpenAI on the Responses API: a turn, and a streamed one.
llm = ChatOpenAI(base_url=f"{base}/v1", api_key=good, model="smollm2", temperature=0, max_tokens=48,
                 max_retries=0, use_responses_api=True)
reply = llm.invoke([HumanMessage(question)])
assert reply.text == expected, (reply, expected)
streamed_reply = "".join(chunk.text for chunk in llm.stream(question))
assert streamed_reply == expected, (streamed_reply, expected)

# The OpenAI Agents SDK (its default model type is the Responses API): a forced tool call that
# ends the run with the tool's result, a plain turn, and a streamed one.
agents.set_tracing_disabled(True)
agents_client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=good, max_retries=0)
looked_up = []


@agents.function_tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    looked_up.append(city)
    return f"18 degrees and sunny in {city}"


model = agents.OpenAIResponsesModel(model="smollm2", openai_client=agents_client)
forecaster = agents.Agent(
    name="forecaster", instructions="You report the weather.", model=model, tools=[get_weather],
    tool_use_behavior="stop_on_first_tool",
    model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=64),
)
run = agents.Runner.run_sync(forecaster, "What is the weather in Paris?", max_turns=2)
assert len(looked_up) == 1 and looked_up[0], looked_up
assert run.final_output == f"18 degrees and sunny in {looked_up[0]}", run.final_output
plain = agents.Agent(name="plain", model=model, model_settings=agents.ModelSettings(temperature=0, max_tokens=48))
run = agents.Runner.run_sync(plain, question, max_turns=1)
assert run.final_output == expected, (run.final_output, expected)


async def streamed_run():
    # A client of this event loop (the one above belongs to run_sync's).
    streaming_model = agents.OpenAIResponsesModel(
        model="smollm2", openai_client=openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=good, max_retries=0)
    )
    result = agents.Runner.run_streamed(plain.clone(model=streaming_model), question, max_turns=1)
    pieces = [e.data.delta async for e in result.stream_events()
              if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"]
    return pieces, result.final_output


pieces, final_output = asyncio.run(streamed_run())
assert "".join(pieces) == expected and final_output == expected, (pieces, final_output)

# Refusals: each with its code, and none of them spends a call.
for kwargs, error, code in [
    (dict(conversation="conv_1"), openai.BadRequestError, "unsupported_parameter"),
    (dict(include=["file_search_call.results"]), openai.BadRequestError, "unsupported_parameter"),
    (dict(include=["message.output_text.logprobs"], top_logprobs=21), openai.UnprocessableEntityError, "invalid_sampling"),
    (dict(tools=[{"type": "web_search"}]), openai.BadRequestError, "invalid_tools"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]),
     openai.UnprocessableEntityError, "unsupported_content"),
]:
    try:
        client.responses.create(**{"model": "smollm2", "input": question, **kwargs})
        raise SystemExit(f"accepted: {kwargs}")
    except error as e:
        assert e.code == code, (kwargs, e)
try:
    openai.OpenAI(base_url=f"{base}/v1", api_key=exhausted, max_retries=0).responses.create(model="smollm2", input=question)
    raise SystemExit("an exhausted key was accepted")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.code == "quota_exceeded", e
try:
    client.responses.retrieve("resp_00000000-0000-0000-0000-000000000000")
    raise SystemExit("an unknown response was found")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

print("responses api checks passed")
