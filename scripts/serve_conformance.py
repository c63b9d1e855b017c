"""Conformance of `rudder serve` with the official `openai` Python client.

Run by scripts/serve_conformance.sh against a running server:
    python serve_conformance.py BASE_URL MODEL EMBEDDING_MODEL
Checks chat, streaming chat (with usage), legacy completions, embeddings (float and base64),
logprobs, json_schema output that parses (through the SDK's own pydantic parser too), a
rudder extension request, and the error cases the SDK turns into exceptions. Exits non-zero
with a message on the first failure.
"""

import base64
import json
import struct
import sys

import openai
from pydantic import BaseModel

base, model, emb_model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="conformance-key", max_retries=0, timeout=120)
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


models = client.models.list()
ids = [m.id for m in models.data]
check("models.list", model in ids and emb_model in ids, ids)

msgs = [{"role": "user", "content": "Name one planet of the solar system."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
text = r.choices[0].message.content
check("chat", isinstance(text, str) and len(text) > 0, r)
check("chat usage", r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
      and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
check("chat finish_reason", r.choices[0].finish_reason in ("stop", "length"), r.choices[0])

stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("streaming chat equals non-streaming", "".join(parts) == text, ("".join(parts), text))
check("streaming usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage)
check("streaming finish_reason", finish == r.choices[0].finish_reason, finish)

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=5, temperature=0,
                                   logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check("logprobs", len(lp) == r.usage.completion_tokens and all(t.logprob <= 0 for t in lp)
      and all(len(t.top_logprobs) == 3 for t in lp) and lp[0].top_logprobs[0].token == lp[0].token, lp)

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0.8,
                                   seed=7, n=2)
r2 = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0.8,
                                    seed=7, n=2)
check("n and seed", len(r.choices) == 2 and
      [c.message.content for c in r.choices] == [c.message.content for c in r2.choices], r)


class Movie(BaseModel):
    title: str
    year: int
    liked: bool


schema_msgs = [{"role": "user", "content": "Give a movie you like as JSON with title, year and liked."}]
r = client.chat.completions.create(
    model=model, messages=schema_msgs, max_tokens=80, temperature=0,
    response_format={"type": "json_schema",
                     "json_schema": {"name": "movie", "schema": Movie.model_json_schema()}})
content = r.choices[0].message.content
try:
    obj = json.loads(content)
    Movie(**obj)
    ok = True
except Exception as e:  # noqa: BLE001
    ok, obj = False, (e, content)
check("json_schema output parses and validates", ok, obj)

parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(model=model, messages=schema_msgs, max_tokens=80,
                                            temperature=0, response_format=Movie)
check("SDK parse() with a pydantic model", isinstance(parsed.choices[0].message.parsed, Movie),
      parsed)

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0,
                                   response_format={"type": "json_object"})
try:
    ok = isinstance(json.loads(r.choices[0].message.content), dict) or r.choices[0].finish_reason == "length"
except Exception:  # noqa: BLE001
    ok = r.choices[0].finish_reason == "length"
check("json_object output", ok, r.choices[0])

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                              temperature=0, logprobs=2)
check("completions", len(c.choices) == 1 and isinstance(c.choices[0].text, str)
      and len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens, c)
cs = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, stream=True))
check("streaming completions", "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text, cs)

e = client.embeddings.create(model=emb_model, input=["a space adventure", "a romantic comedy"])
v = e.data[0].embedding
check("embeddings", len(e.data) == 2 and len(v) == 384 and abs(sum(x * x for x in v) - 1) < 1e-3, len(v))
raw = client.embeddings.with_raw_response.create(model=emb_model, input="a space adventure",
                                                 encoding_format="base64")
b64 = json.loads(raw.text)["data"][0]["embedding"]
dec = struct.unpack(f"<{384}f", base64.b64decode(b64))
check("embeddings base64", max(abs(a - b) for a, b in zip(dec, v)) < 1e-5)

r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0,
                                   extra_body={"rudder": {"score_continuations": ["Mars", "Banana"],
                                                          "capture": {"sites": ["blocks.10.hook_resid_pre"]}}})
ext = r.model_extra.get("rudder") or {}
check("rudder extension through extra_body", len(ext.get("continuation_logprobs", [])) == 2
      and len(ext["capture"]["sites"]["blocks.10.hook_resid_pre"][0]) == 576, ext.keys())

try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=10 ** 6)
    check("max_tokens too large -> BadRequestError", False, "accepted")
except openai.BadRequestError as err:
    body = err.body or {}
    check("max_tokens too large -> BadRequestError", body.get("param") == "max_tokens", body)
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    check("unknown model -> NotFoundError", False, "accepted")
except openai.NotFoundError:
    check("unknown model -> NotFoundError", True)
bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
try:
    bad.models.list()
    check("wrong key -> AuthenticationError", False, "accepted")
except openai.AuthenticationError:
    check("wrong key -> AuthenticationError", True)

print(f"all {len(checks)} checks passed")
