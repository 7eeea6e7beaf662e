"""The serving engine beside llama.cpp and transformers, in one run.

    .venv/bin/python benchmarks/serve.py --out benchmarks/results/serve.json \
        [--llama-server /path/to/llama-server]     # llama.cpp's own server (../shared/PEERS.md)

1. decode: batch-1 decode tokens/s on the default model's Q4_K_M and Q8_0 GGUF files (written by
   modelpress, the same files for both): modelpress' Engine on the blocks (its fused batch-1
   path), llama.cpp (llama-cpp-python, 2 threads) on the file. --decode-tokens greedy tokens after
   a short prompt; the tools alternate --repeats times and each reports its median.
2. throughput: --clients concurrent requests (prompts of ~128 tokens from eval.txt, 128 new
   tokens each, greedy, no stop at eos) through `modelpress serve`'s HTTP API, through
   llama-server with as many slots (if given), and transformers' batched generate (fp32).
3. load: --load-clients streaming clients against a KV cache too small for all of them, a quarter
   disconnecting after their first tokens, and one malformed request a second mixed in (issue 19's
   list, in turn) while /health is polled 4 times a second; every other output must equal the same
   request run alone, /metrics must show 0 KV blocks in use at the end, and the server's resident
   memory is read at the start and the end.
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import emitter, scratch  # noqa: E402
from modelpress.data import read_text  # noqa: E402
from modelpress.serve.engine import Engine  # noqa: E402
from modelpress.serve.sampler import SamplingParams  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPT = "The history of data compression begins with"


def gguf_files(work: Path, mixes: list[str]) -> dict[str, Path]:
    from modelpress.formats.gguf_writer import write_gguf
    from modelpress.model.load import default_model_path

    model, tok = modelpress.load()
    out = {}
    for mix in mixes:
        out[mix] = work / f"smollm2-{mix}.gguf"
        write_gguf(out[mix], model, mix, default_model_path(), tokenizer=tok)
    return out


def decode_ours(path: Path, n: int) -> float:
    model, tok = modelpress.load(path, keep_blocks=True)
    eng = Engine(model, tok, max_num_seqs=1, kv_blocks=64)
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    eng.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm up (kernels, caches)
    rid = eng.add_request(PROMPT, p)
    eng.step()  # prefill and the first token: not decode
    start, made = time.perf_counter(), 1
    while eng.has_work:
        for o in eng.step():
            made = len(o.outputs[0].token_ids)
            if o.request_id == rid and o.finished:
                break
    return (made - 1) / (time.perf_counter() - start)


def decode_llamacpp(path: Path, n: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=2, n_ctx=512, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids)
    tok = llm.sample(temp=0)
    start = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([tok])
        tok = llm.sample(temp=0)
    return (n - 1) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


class Server:
    """A server process, up and answering /health inside the block, stopped after."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv, self.url = argv, f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(self.url, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def eval_prompts(k: int, length: int = 128) -> list[list[int]]:
    model_tok = modelpress.load()[1]
    ids = model_tok(read_text(SHARED / "eval.txt"), add_special_tokens=False)["input_ids"]
    return [ids[i * 300:i * 300 + length] for i in range(k)]


async def _fire(url: str, model: str, prompts: list[list[int]], new: int, stream: bool = False,
                leave_after: set[int] | None = None) -> list[dict]:
    import httpx

    leave_after = leave_after or set()
    async with httpx.AsyncClient(timeout=3600) as client:
        async def one(i: int, p: list[int]) -> dict:
            body = {"model": model, "prompt": p, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                    "stream": stream}
            t0 = time.perf_counter()
            if not stream:
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                j = r.json()
                return {"text": j["choices"][0]["text"], "tokens": j["usage"]["completion_tokens"],
                        "seconds": time.perf_counter() - t0}
            text = ""
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i in leave_after and text:
                        return {"left": True}
            return {"text": text, "seconds": time.perf_counter() - t0}

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def throughput(url: str, model: str, prompts: list[list[int]], new: int) -> dict:
    start = time.perf_counter()
    res = asyncio.run(_fire(url, model, prompts, new))
    wall = time.perf_counter() - start
    toks = sum(r["tokens"] for r in res)
    return {"requests": len(prompts), "new_tokens": toks, "seconds": wall, "tokens_per_s": toks / wall}


def ours(model: str, port: int, extra: list[str]) -> Server:
    return Server([sys.executable, "-m", "modelpress.cli", "serve", model, "--port", str(port),
                   "--served-model-name", "m", *extra], port)


def transformers_throughput(prompts: list[list[int]], new: int) -> dict:
    model, tok = modelpress.load()
    batch = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    wall = time.perf_counter() - start
    toks = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return {"requests": len(prompts), "new_tokens": toks, "seconds": wall, "tokens_per_s": toks / wall}


# one of these a second during the load test: issue 19's malformed requests (each must get a 4xx)
MALFORMED: list[tuple[str, object]] = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 18446744073709551616}),
    ("/v1/completions", {"prompt": [1000000000]}),
    ("/v1/completions", {"prompt": [-1, -2]}),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 30}),
    ("/v1/completions", {"prompt": "x" * (3 << 20)}),                  # long: refused before tokenizing
    ("/v1/completions", b"x" * (5 << 20)),                              # past the 4 MiB body limit
    ("/v1/completions", b"[" * 100000 + b"]" * 100000),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": ["x"]}),
]


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _hostile(url: str, stop: asyncio.Event) -> dict:
    """Until `stop`: a malformed request a second, /health every 0.25 s; the status codes seen."""
    import httpx

    bad, health = Counter(), Counter()
    async with httpx.AsyncClient(timeout=60) as client:
        async def malformed() -> None:
            i = 0
            while not stop.is_set():
                path, body = MALFORMED[i % len(MALFORMED)]
                i += 1
                kw = {"content": body} if isinstance(body, bytes) else {"json": body}
                bad[(await client.post(f"{url}{path}", **kw)).status_code] += 1
                await asyncio.sleep(1.0)

        async def poll() -> None:
            while not stop.is_set():
                health[(await client.get(f"{url}/health")).status_code] += 1
                await asyncio.sleep(0.25)

        await asyncio.gather(malformed(), poll())
    return {"malformed_sent": sum(bad.values()), "malformed_status": dict(bad), "health_polls": sum(health.values()),
            "health_status": dict(health)}


def load_test(gguf: Path, clients: int, new: int, kv_blocks: int) -> dict:
    import httpx

    prompts = eval_prompts(clients, 96)
    leave = set(range(0, clients, 4))

    async def run(url: str) -> tuple[list[dict], dict]:
        stop = asyncio.Event()
        side = asyncio.create_task(_hostile(url, stop))
        res = await _fire(url, "m", prompts, new, stream=True, leave_after=leave)
        stop.set()
        return res, await side

    server = ours(str(gguf), free_port(), ["--kv-blocks", str(kv_blocks), "--max-num-seqs", "32"])
    with server as url:
        rss_start = rss_mb(server.proc.pid)
        start = time.perf_counter()
        res, hostile = asyncio.run(run(url))
        wall = time.perf_counter() - start
        time.sleep(1.0)
        metrics = httpx.get(f"{url}/metrics").text
        rss_end = rss_mb(server.proc.pid)
    used = float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("modelpress_kv_blocks_used ")))
    pre = float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("modelpress_preemptions_total ")))
    model, tok = modelpress.load(gguf, keep_blocks=True)
    eng = Engine(model, tok, max_num_seqs=8, kv_blocks=1024)
    alone = eng.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    done = [i for i in range(clients) if i not in leave]
    same = sum(res[i].get("text") == alone[i].outputs[0].text for i in done)
    return {"clients": clients, "disconnected": len(leave), "completed": len(done), "identical_to_alone": same,
            "kv_blocks": kv_blocks, "kv_blocks_used_at_end": used, "preemptions": pre, "seconds": wall, **hostile,
            "server_rss_mb_start": rss_start, "server_rss_mb_end": rss_end}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="decode runs per tool and file (median reported)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--load-clients", type=int, default=64)
    p.add_argument("--load-kv-blocks", type=int, default=160)
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (throughput peer)")
    p.add_argument("--parts", default="decode,throughput,load")
    p.add_argument("--serve-mix", default="Q8_0", help="the GGUF the servers run in the throughput part")
    p.add_argument("--serve-model", help="what `modelpress serve` runs in the throughput part instead of that GGUF "
                                         "(a checkpoint folder: AWQ, GPTQ, ...); llama-server keeps the GGUF")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    a = p.parse_args()
    parts = a.parts.split(",")
    work = scratch("mp-serve-")
    files = gguf_files(work, sorted({"Q4_K_M", "Q8_0", a.serve_mix}))
    _, emit = emitter(a.out, "serving")

    if "decode" in parts:  # the tools alternate, --repeats times: the median of each, all runs kept
        for mix, path in files.items():
            runs: dict[str, list[float]] = {"modelpress": [], "llama.cpp": []}
            for _ in range(a.repeats):
                runs["modelpress"].append(decode_ours(path, a.decode_tokens))
                runs["llama.cpp"].append(decode_llamacpp(path, a.decode_tokens))
            for tool, tps in runs.items():
                emit({"part": "decode", "mix": mix, "tool": tool, "tokens_per_s": statistics.median(tps),
                      "runs": tps})
    if "throughput" in parts:
        prompts = eval_prompts(a.clients)
        gguf = files[a.serve_mix]
        mine = a.serve_model or str(gguf)
        servers = [("modelpress serve", ours(mine, port := free_port(),
                                             ["--max-num-seqs", str(a.clients), "--kv-blocks", "1024"]))]
        if a.llama_server:
            servers.append(("llama-server", Server([a.llama_server, "-m", str(gguf), "-np", str(a.clients), "-t", "2",
                                                    "-c", str(a.clients * (128 + a.new_tokens + 16)),
                                                    "--port", str(port := free_port()), "--alias", "m"], port)))
        for tool, server in servers:
            with server as url:
                emit({"part": "throughput", "tool": tool, "mix": a.serve_mix,
                      "model": Path(mine).name if tool == "modelpress serve" else gguf.name,
                      **throughput(url, "m", prompts, a.new_tokens)})
        emit({"part": "throughput", "tool": "transformers generate (fp32, one batch)",
              **transformers_throughput(prompts, a.new_tokens)})
    if "load" in parts:
        emit({"part": "load", "tool": "modelpress serve", "mix": "Q4_K_M",
              **load_test(files["Q4_K_M"], a.load_clients, 64, a.load_kv_blocks)})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
