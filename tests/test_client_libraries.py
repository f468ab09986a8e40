"""LangChain (``langchain-openai``) and ``instructor`` against a real server on the default
model: structured output through each of their methods, and a tool loop with a ToolMessage.
The constrained decoder is what makes a 135M model's answers parse; every result is also
checked with jsonschema against the schema the library sent."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("langchain_openai")
pytest.importorskip("instructor")


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country it is in")


ASK = "Paris is the capital of which country? Answer with the city name and its country."
JSON_ASK = (
    'Reply with a JSON object with the keys "name" and "country" for the city of Paris, '
    'for example {"name": "Rome", "country": "Italy"}.'
)


@pytest.fixture(scope="module")
def llm(default_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=default_server.url + "/v1",
        api_key="x",
        model="default",
        temperature=0,
        max_tokens=60,
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(llm, method):
    prompt = JSON_ASK if method == "json_mode" else ASK
    runnable = llm.with_structured_output(City, method=method, include_raw=True)
    out = runnable.invoke(prompt)
    assert out["parsing_error"] is None, out
    city = out["parsed"]
    assert isinstance(city, City) and city.name and city.country
    raw = out["raw"]
    if method == "function_calling":
        (call,) = raw.tool_calls
        jsonschema.validate(call["args"], City.model_json_schema())
    else:
        jsonschema.validate(json.loads(raw.content), City.model_json_schema())


def test_langchain_bind_tools_loop(llm):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})

    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    messages = [HumanMessage("What's the weather in Paris?")]
    ai = bound.invoke(messages)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    answer = llm.bind_tools([get_weather]).invoke(messages)
    assert answer.content or answer.tool_calls
    for c in answer.tool_calls:
        assert c["name"] == "get_weather"


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor(default_server, mode):
    import instructor
    import openai

    client = instructor.from_openai(
        openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=120),
        mode=getattr(instructor.Mode, mode),
    )
    city, completion = client.chat.completions.create_with_completion(
        model="default",
        response_model=City,
        messages=[{"role": "user", "content": ASK}],
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    assert isinstance(city, City) and city.name and city.country
    message = completion.choices[0].message
    raw = message.tool_calls[0].function.arguments if mode == "TOOLS" else message.content
    jsonschema.validate(json.loads(raw), City.model_json_schema())
