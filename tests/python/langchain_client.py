"""Drives Tollgate with LangChain's OpenAI clients (`ChatOpenAI`, `OpenAIEmbeddings`), as a
LangChain user pointing `base_url` at an OpenAI-compatible server would.

Usage: langchain_client.py BASE_URL KEY
Exits non-zero (with the reason) when any check fails.
"""
import math
import sys

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

base, key = sys.argv[1], sys.argv[2]
llm = ChatOpenAI(base_url=f"{base}/v1", api_key=key, model="smollm2", temperature=0,
                 max_tokens=12, max_retries=0)

reply = llm.invoke("What is the capital of France?")
assert reply.content.strip(), reply
assert reply.usage_metadata and reply.usage_metadata["output_tokens"] > 0, reply.usage_metadata

pieces = [chunk.content for chunk in llm.stream("What is the capital of France?")]
assert "".join(pieces) == reply.content, (pieces, reply.content)


class Person(BaseModel):
    """A person."""

    name: str = Field(min_length=1, max_length=12)
    age: int = Field(ge=0, le=120)


structured = ChatOpenAI(base_url=f"{base}/v1", api_key=key, model="smollm2", temperature=0.7,
                        seed=5, max_tokens=40, max_retries=0)
person = structured.with_structured_output(Person, method="json_schema", strict=True).invoke(
    "Invent a person with a name and an age."
)
assert isinstance(person, Person), person



@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"18 degrees in {city}"


caller = ChatOpenAI(base_url=f"{base}/v1", api_key=key, model="smollm2", temperature=0,
                    max_tokens=64, max_retries=0).bind_tools([get_weather], tool_choice="get_weather")
asked = caller.invoke("What is the weather in Paris?")
assert asked.tool_calls and asked.tool_calls[0]["name"] == "get_weather", asked
assert isinstance(asked.tool_calls[0]["args"].get("city"), str), asked.tool_calls
answer = get_weather.invoke(asked.tool_calls[0])
assert isinstance(answer, ToolMessage) and answer.tool_call_id == asked.tool_calls[0]["id"], answer
final = llm.invoke([HumanMessage("What is the weather in Paris?"), asked, answer])
assert final.content.strip(), final

# LangChain counts tokens with tiktoken (OpenAI's vocabulary) unless told not to; for servers
# with their own models its docs say to turn that off, and then plain strings are sent.
embeddings = OpenAIEmbeddings(base_url=f"{base}/v1", api_key=key, model="smollm2",
                              check_embedding_ctx_length=False, max_retries=0)
vectors = embeddings.embed_documents(["Paris is in France.", "Berlin is in Germany."])
assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0, [len(v) for v in vectors]
assert all(math.isfinite(x) for v in vectors for x in v)
query = embeddings.embed_query("Where is Paris?")
assert len(query) == len(vectors[0])

print("langchain checks passed")
