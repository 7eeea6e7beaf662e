"""The HTTP API with the official openai client and raw httpx, a tiny model behind a real
uvicorn server on a free port."""
import json
import time

import httpx
import pytest

from modelpress.serve.engine import Engine
from modelpress.serve.http import create_app
from tests.conftest import byte_tokenizer, tiny_llama, uvicorn_server

KEY = "test-key"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def server():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    engine = Engine(tiny_llama(), tok, max_num_seqs=8, kv_blocks=40, block_size=4)
    app = create_app(engine, "tiny", api_key=KEY)
    with uvicorn_server(app) as url:
        yield url, engine, tok


def client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def metric(url, name):
    text = httpx.get(f"{url}/metrics").text
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith(f"modelpress_{name} ")))


def test_completions_with_the_openai_client(server):
    url, engine, tok = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="the winter", max_tokens=8, temperature=0)
    ref = engine.generate(["the winter"], __import__("modelpress.serve.sampler", fromlist=["x"]).SamplingParams(
        max_tokens=8, temperature=0))[0].outputs[0]
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="the winter", max_tokens=8,
                                                                        temperature=0, stream=True))
    assert streamed == ref.text
    r = c.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=1.0, n=3, seed=1, logprobs=2)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert len(r.choices[0].logprobs.token_logprobs) == len(r.choices[0].logprobs.tokens)


def test_chat_with_the_openai_client(server):
    url, _, _ = server
    c = client(url)
    msgs = [{"role": "user", "content": "hi there"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"


@pytest.mark.parametrize("body,status,says", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "many"}, 400, "'max_tokens' must be int"),
    ({"model": "tiny", "prompt": "a", "n": 0}, 400, "n must be between"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"model": "tiny", "prompt": "a" * 300, "max_tokens": 4}, 400, "maximum context length"),
    ({"model": "tiny", "prompt": "a" * 100, "max_tokens": 100}, 400, "KV blocks"),
    ({"model": "other", "prompt": "a"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": 5}, 400, "'prompt' must be"),
    ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "'temperature' must be"),
])
def test_bad_requests_get_openai_errors(server, body, status, says):
    url, _, _ = server
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", headers=h,
                   **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"] and r.json()["error"]["type"]
    r = httpx.post(f"{url}/v1/chat/completions", headers=h, json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # still serving


def test_api_key_required(server):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_a_client_leaving_mid_stream_frees_its_blocks(server):
    url, engine, _ = server
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "the thing", "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", headers=h, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                json.loads(line[6:])
                break
    for _ in range(200):
        if metric(url, "kv_blocks_used") == 0 and metric(url, "requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(url, "kv_blocks_used") == 0
    assert metric(url, "generation_tokens_total") > 0
