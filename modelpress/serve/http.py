"""OpenAI-compatible HTTP API over the engine (FastAPI on uvicorn).

    /v1/completions, /v1/chat/completions (JSON, or server-sent events with "stream": true),
    /v1/models, /health, /metrics (Prometheus text)

The engine runs on its own thread (EngineLoop): requests reach it through a queue, outputs come
back to each request's asyncio queue. A client that disconnects mid-stream has its request
aborted, which frees its KV blocks. Bad requests get a 4xx with OpenAI's error body
{"error": {"message", "type", "param", "code"}}.

One request cannot harm another: it is validated whole before the engine sees it (serve/engine.py
`check_request`), a failure inside an engine step ends only the requests it concerns (their streams
get an error event, then [DONE]), the body is read up to `max_body_bytes` (413 past it), a prompt
that cannot fit the context is refused by its length before it is tokenized, and tokenizing and
chat templating run on worker threads (the template with a time limit), never on the event loop.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time

import asyncio
import ctypes
import dataclasses
import json
import math
import queue
import threading
import time
import uuid
from typing import Any, AsyncIterator

from .. import kernels
from ..config import option
from ..errors import ModelpressError
from .engine import Engine, RequestOutput
from .sampler import SamplingParams


class EngineLoop:
    """The engine's thread: takes submissions and aborts, steps while there is work, hands every
    output to the asyncio queue of its request."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()
        self.started = time.time()
        self.recent: list[tuple[float, int]] = []  # (time, tokens generated) samples for tokens/s
        self.error: BaseException | None = None
        # this thread (the server's) made the model and warmed it up: its OpenMP pool would make
        # libgomp put the engine thread's workers to sleep between parallel regions (~20 % slower)
        kernels.release_threads()
        self.thread = threading.Thread(target=self._run, name="modelpress-engine", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], params: SamplingParams, stream: bool = True,
               adapter: str | None = None) -> tuple[str, asyncio.Queue]:
        self.engine.check_request(ids, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.streams[rid] = (asyncio.get_running_loop(), q)
        self.commands.put(("add", rid, ids, params, stream, adapter))
        return rid, q

    def abort(self, rid: str) -> None:
        with self.lock:
            self.streams.pop(rid, None)
        self.commands.put(("abort", rid))

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, stream, adapter = cmd
            with self.lock:
                live = rid in self.streams
            if live:
                try:
                    self.engine.add_request(ids, params, rid, stream=stream, adapter=adapter)
                except Exception as err:  # noqa: BLE001 - this request's fault or failure alone, on its stream
                    self._deliver(rid, err)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])

    def _deliver(self, rid: str, item: Any) -> None:
        with self.lock:
            target = self.streams.get(rid)
            if isinstance(item, RequestOutput) and item.finished or isinstance(item, BaseException):
                self.streams.pop(rid, None)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def stop(self) -> None:
        """End the engine's thread (the server is shutting down); requests in flight are dropped."""
        self.commands.put(("stop",))
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                block = not self.engine.has_work
                while True:
                    try:
                        cmd = self.commands.get(block=block, timeout=None if block else 0)
                    except queue.Empty:
                        break
                    if cmd[0] == "stop":
                        kernels.release_threads()  # its OpenMP pool goes with it
                        return
                    self._handle(cmd)
                    block = not self.engine.has_work
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                self.error = None
                now = time.time()
                self.recent.append((now, self.engine.tokens_generated))
                self.recent = [r for r in self.recent if r[0] > now - 10]
            except Exception as err:  # noqa: BLE001 - a failed step must not kill the server silently
                # not one request's fault (those end alone inside the step): end what is in flight,
                # report it on /health until a step succeeds again
                self.error = err
                with self.lock:
                    rids = list(self.streams)
                for rid in rids:
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {err}"))

    def tokens_per_s(self) -> float:
        r = self.recent
        if len(r) < 2 or r[-1][0] - r[0][0] <= 0:
            return 0.0
        return (r[-1][1] - r[0][1]) / (r[-1][0] - r[0][0])


# -- work off the event loop ---------------------------------------------------------------------------
class _TimeUp(BaseException):
    """Raised inside a worker thread whose time limit has passed (a BaseException, so that the
    work's own `except Exception` cannot swallow it)."""


def _interrupt(thread: threading.Thread) -> None:
    """Raise _TimeUp in `thread` at its next Python instruction (CPython's PyThreadState_SetAsyncExc;
    Python code such as a Jinja template's loops stops there, a C call when it returns)."""
    if thread.is_alive() and thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_TimeUp))


async def off_loop(fn: Any, *args: Any, timeout: float | None = None) -> Any:
    """fn(*args) on a worker thread of its own, so the event loop keeps answering (/health, other
    streams). Past `timeout` seconds, or when the request is cancelled (the client went away), the
    thread is interrupted and TimeoutError (or the cancellation) is raised here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: tuple[bool, Any]) -> None:
        if not done.done():
            done.set_result(result)

    def work() -> None:
        try:
            result = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
            result = (False, e)
        try:
            loop.call_soon_threadsafe(settle, result)
        except RuntimeError:  # the loop has closed: nobody waits
            pass

    thread = threading.Thread(target=work, name="modelpress-request", daemon=True)
    thread.start()
    try:
        ok, value = await asyncio.wait_for(asyncio.shield(done), timeout)
    except asyncio.TimeoutError:
        _interrupt(thread)
        raise TimeoutError from None
    except asyncio.CancelledError:
        _interrupt(thread)
        raise
    if not ok:
        raise value
    return value


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of the vocabulary spells (its stored form: byte-level BPE
    writes one character per byte, so no text of N characters is fewer than N / this tokens)."""
    try:
        return max(8, max(map(len, tokenizer.get_vocab()), default=8))
    except (AttributeError, TypeError):
        return 64


# -- request parsing ---------------------------------------------------------------------------------
class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


_TYPES = {"max_tokens": int, "max_completion_tokens": int, "temperature": (int, float), "top_p": (int, float),
          "top_k": int, "min_p": (int, float), "repetition_penalty": (int, float), "n": int, "seed": int,
          "stream": bool, "logprobs": (bool, int), "top_logprobs": int, "stop": (str, list), "ignore_eos": bool,
          "stop_token_ids": list, "model": str, "echo": bool, "user": str, "stream_options": dict,
          "presence_penalty": (int, float), "frequency_penalty": (int, float)}


def field(body: dict[str, Any], name: str, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None or name not in _TYPES:
        return v
    t = _TYPES[name]
    if isinstance(v, bool) and t in (int, (int, float)) or not isinstance(v, t):
        want = t.__name__ if isinstance(t, type) else " or ".join(x.__name__ for x in t)
        raise BadRequest(f"'{name}' must be {want}, got {type(v).__name__}", name)
    return v


def sampling_params(body: dict[str, Any], chat: bool) -> SamplingParams:
    max_tokens = field(body, "max_completion_tokens") if chat else None
    max_tokens = max_tokens if max_tokens is not None else field(body, "max_tokens", 16 if not chat else 512)
    logprobs = field(body, "logprobs")
    if chat:
        logprobs = field(body, "top_logprobs", 0) if logprobs else None
    elif isinstance(logprobs, bool):
        raise BadRequest("'logprobs' must be int for /v1/completions", "logprobs")
    stop = field(body, "stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    temperature = field(body, "temperature", 1.0)
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(field(body, "top_p", 1.0)),
                              top_k=field(body, "top_k", 0), min_p=float(field(body, "min_p", 0.0)),
                              repetition_penalty=float(field(body, "repetition_penalty", 1.0)),
                              seed=field(body, "seed"), stop=stop, stop_token_ids=field(body, "stop_token_ids") or [],
                              ignore_eos=field(body, "ignore_eos", False), logprobs=logprobs, n=field(body, "n", 1))
    except (ValueError, OverflowError) as e:  # OverflowError: an integer too large for a float
        raise BadRequest(str(e)) from None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- the app -----------------------------------------------------------------------------------------
MAX_BODY_BYTES = 4 << 20      # a request body past this gets 413 (serve --max-body-mb)
TEMPLATE_SECONDS = 5.0        # a chat template that renders longer is stopped (serve --template-timeout)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`modelpress serve`'s settings (each field is a flag of the command, flags.py)."""
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/ routes")
    served_model_name: str | None = option(None, "the model id clients send; none: the model file's name")
    max_num_seqs: int = option(32, "sequences running at once")
    kv_blocks: int = option(1024, "KV-cache blocks")
    block_size: int = option(16, "tokens per KV-cache block")
    kv_dtype: str = option("auto", "KV-cache type: auto (fp16 for a model whose every layer multiplies "
                           "with int8 activations: GGUF blocks, RTN / GPTQ / AWQ / LLM.int8 codes; as llama.cpp; else "
                           "the model's own)", choices=("auto", "float32", "float16"))
    max_step_tokens: int = option(512, "tokens computed per engine step, prefill chunks included")
    max_body_mb: float = option(MAX_BODY_BYTES / (1 << 20), "largest request body accepted, in MiB (413 past it)")
    template_timeout: float = option(TEMPLATE_SECONDS, "seconds a chat template may take to render a request")

    def __post_init__(self) -> None:
        for name in ("port", "max_num_seqs", "kv_blocks", "block_size", "max_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive whole number")
        if not (0 < self.max_body_mb < math.inf and 0 < self.template_timeout < math.inf):
            raise ValueError("max-body-mb and template-timeout must be positive numbers")

    def engine(self, model: Any, tokenizer: Any, adapters: dict[str, str] | None = None) -> Engine:
        """The engine these settings describe (with `adapters`, {name: LoRA folder}, served beside the
        model); a KV type the model cannot take is a ModelpressError."""
        try:
            return Engine(model, tokenizer, max_num_seqs=self.max_num_seqs, kv_blocks=self.kv_blocks,
                          block_size=self.block_size, max_tokens_per_step=self.max_step_tokens, kv_dtype=self.kv_dtype,
                          adapters=adapters)
        except ValueError as e:
            raise ModelpressError(f"--kv-dtype {self.kv_dtype}: {e}") from None


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               template_seconds: float = TEMPLATE_SECONDS) -> Any:
    # here, not at the top: only a running server needs fastapi and uvicorn, no other command loads them
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="modelpress", version="1")
    loop_holder: dict[str, EngineLoop] = {}

    def engine_loop() -> EngineLoop:
        if "loop" not in loop_holder:
            loop_holder["loop"] = EngineLoop(engine)
        return loop_holder["loop"]

    app.state.engine_loop = engine_loop

    def shutdown() -> None:
        if "loop" in loop_holder:
            loop_holder.pop("loop").stop()

    app.router.on_shutdown.append(shutdown)
    # a text longer than this cannot fit the context whatever it tokenizes to: refused untokenized
    max_prompt_chars = engine.max_model_len * longest_token_chars(engine.tokenizer)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), status_code=e.status)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid API key; send 'Authorization: Bearer <key>'",
                                               "authentication_error", code=401), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Any:
        e = engine_loop().error
        if e is not None:
            return JSONResponse({"status": "error", "error": str(e)}, status_code=500)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Any:
        created = int(engine_loop().started)
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "modelpress",
                "max_model_len": engine.max_model_len}
        # the LoRA adapters served beside the base, as vLLM lists them (parent: the base)
        return {"object": "list", "data": [base] + [{**base, "id": n, "parent": model_name, "root": model_name}
                                                     for n in engine.adapter_names]}

    @app.get("/metrics")
    async def metrics() -> Any:
        s = engine.stats()
        el = engine_loop()
        lines = []
        for name, kind, help_, value in (
                ("requests_running", "gauge", "sequences running", s["running"]),
                ("requests_waiting", "gauge", "sequences waiting", s["waiting"]),
                ("kv_blocks_used", "gauge", "KV-cache blocks in use", s["kv_blocks_used"]),
                ("kv_blocks_total", "gauge", "KV-cache blocks", s["kv_blocks_total"]),
                ("generation_tokens_total", "counter", "tokens generated", s["tokens_generated"]),
                ("generation_tokens_per_second", "gauge", "tokens generated per second, last 10 s", el.tokens_per_s()),
                ("preemptions_total", "counter", "sequences preempted (recomputed later)", s["preemptions"]),
                ("prefix_cache_hit_tokens_total", "counter", "prompt tokens found in the prefix cache",
                 s["prefix_cache_hit_tokens"]),
                ("prefix_cache_query_tokens_total", "counter", "prompt tokens looked up", s["prefix_cache_query_tokens"])):
            lines += [f"# HELP modelpress_{name} {help_}", f"# TYPE modelpress_{name} {kind}",
                      f"modelpress_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def read_body(request: Request) -> bytes:
        too_big = BadRequest(f"the request body is larger than this server takes ({max_body_bytes} bytes; "
                             "serve --max-body-mb raises it)", status=413)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await read_body(request))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        name = field(body, "model")
        if name is not None and name != model_name and name not in engine.adapter_names:
            has = ", ".join([model_name, *engine.adapter_names])
            raise BadRequest(f"the model '{name}' does not exist; this server has {has}", "model", 404,
                             "NotFoundError")
        return body

    def adapter_of(body: dict[str, Any]) -> str | None:
        """The LoRA adapter a request names in its `model` field (vLLM's way), or None: the base."""
        name = body.get("model")
        return name if name in engine.adapter_names else None

    def check_length(chars: int) -> None:
        if chars > max_prompt_chars:
            raise BadRequest(f"the prompt has {chars} characters, more than the {engine.max_model_len} tokens of "
                             "this model's context can hold", "prompt")

    async def tokenize(text: str) -> list[int]:
        check_length(len(text))
        return await off_loop(lambda: engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def prompt_ids(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return await tokenize(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")

    async def render_chat(messages: list[dict[str, Any]]) -> str:
        check_length(sum(len(m.get("content") or "") for m in messages))
        try:
            return await off_loop(lambda: engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False), timeout=template_seconds)
        except TimeoutError:
            raise BadRequest(f"the chat template took more than {template_seconds:g} s to render these messages",
                             "messages") from None
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise BadRequest(f"the chat template cannot render these messages: {e}", "messages") from None

    async def run(ids: list[int], params: SamplingParams, stream: bool, adapter: str | None
                  ) -> AsyncIterator[RequestOutput]:
        el = engine_loop()
        try:
            rid, q = el.submit(ids, params, stream, adapter)
        except ValueError as e:
            raise BadRequest(str(e), "max_tokens" if "max_tokens" in str(e) else "prompt") from None
        done = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise BadRequest(str(item), status=400 if isinstance(item, ValueError) else 500,
                                     kind="invalid_request_error" if isinstance(item, ValueError) else "server_error")
                if item.error is not None:  # this request failed inside an engine step (the others go on)
                    done = True
                    raise BadRequest(f"the request failed: {item.error}", status=500, kind="server_error")
                yield item
                if item.finished:
                    done = True
                    return
        finally:
            if not done:  # the client went away (or the stream failed): free its blocks
                el.abort(rid)

    def usage(prompt_len: int, out: RequestOutput) -> dict[str, int]:
        n = sum(len(c.token_ids) for c in out.outputs)
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    def logprobs_of(c: Any, chat: bool) -> Any:
        if c.logprobs is None:
            return None
        dec = engine.tokenizer.decode
        if chat:
            return {"content": [{"token": dec([lp["token_id"]]), "logprob": lp["logprob"],
                                 "top_logprobs": [{"token": dec([t]), "logprob": v} for t, v in lp["top"].items()]}
                                for lp in c.logprobs]}
        return {"tokens": [dec([lp["token_id"]]) for lp in c.logprobs],
                "token_logprobs": [lp["logprob"] for lp in c.logprobs],
                "top_logprobs": [{dec([t]): v for t, v in lp["top"].items()} for lp in c.logprobs]}

    async def respond(ids: list[int], params: SamplingParams, chat: bool, stream: bool, adapter: str | None) -> Any:
        created, cid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        served = adapter or model_name
        gen = run(ids, params, stream, adapter)
        if not stream:
            final = None
            async for out in gen:
                final = out
            choices = []
            for c in final.outputs:
                choice: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason,
                                          "logprobs": logprobs_of(c, chat)}
                if chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append(choice)
            return {"id": cid, "object": kind, "created": created, "model": served, "choices": choices,
                    "usage": usage(len(ids), final)}
        first = await gen.__anext__()  # errors before the first token are a plain 4xx, not a broken stream

        async def events() -> AsyncIterator[str]:
            sent = [0] * params.n
            started = [False] * params.n
            out = first
            try:
                while True:
                    for c in out.outputs:
                        # a token may end inside a UTF-8 character: hold back the trailing U+FFFD
                        # until the next token completes it (or the completion ends)
                        text = c.text if c.finish_reason is not None else c.text.rstrip("\ufffd")
                        delta = text[sent[c.index]:]
                        if not delta and c.finish_reason is None and started[c.index]:
                            continue
                        sent[c.index] = len(text)
                        if chat:
                            d: dict[str, Any] = {"content": delta}
                            if not started[c.index]:
                                d["role"] = "assistant"
                            choice = {"index": c.index, "delta": d, "finish_reason": c.finish_reason, "logprobs": None}
                        else:
                            choice = {"index": c.index, "text": delta, "finish_reason": c.finish_reason, "logprobs": None}
                        started[c.index] = True
                        chunk = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": served, "choices": [choice]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    if out.finished:
                        break
                    try:
                        out = await gen.__anext__()
                    except BadRequest as e:  # failed mid-stream: an error event, then the end as usual
                        yield f"data: {json.dumps(error_body(e.message, e.kind, e.param, e.status))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        ids = await prompt_ids(prompt)
        return await respond(ids, sampling_params(body, chat=False), False, field(body, "stream", False),
                             adapter_of(body))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if isinstance(m.get("content"), list):  # OpenAI's content parts: keep the text ones
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            if not isinstance(m.get("content", ""), str):
                raise BadRequest("a message's 'content' must be a string", "messages")
        ids = await tokenize(await render_chat(messages))
        return await respond(ids, sampling_params(body, chat=True), True, field(body, "stream", False),
                             adapter_of(body))

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          template_seconds: float = TEMPLATE_SECONDS) -> None:
    import uvicorn  # here, not at the top: see create_app

    app = create_app(engine, model_name, api_key, max_body_bytes, template_seconds)
    uvicorn.run(app, host=host, port=port, log_level="warning")
