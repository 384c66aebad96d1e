"""Serving benchmark: N concurrent streaming clients drive a running tpserve (or any
OpenAI-compatible) server through a fixed number of completions, like `vllm bench serve`.

    tpserve launch --tp 2 &
    python bench/serve.py --url http://127.0.0.1:8000 --num-requests 64 --concurrency 8 \\
        --prompt-len 128 --output-len 64 [--json]

Prompts are random token ids of exactly --prompt-len tokens and every request generates exactly
--output-len tokens (ignore_eos), so runs compare. Reports request and token throughput, time to
first token (TTFT), inter-token latency (ITL: the gap between streamed chunks) and end-to-end
latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import httpx


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps:
        return {"error": "the stream held no choices"}
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "e2e": end - t0, "tokens": tokens, "prompt_tokens": len(body["prompt"])}


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)

    def pct(p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
    return {"mean_ms": 1e3 * statistics.fmean(xs), "p50_ms": 1e3 * pct(50),
            "p90_ms": 1e3 * pct(90), "p99_ms": 1e3 * pct(99)}


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, headers=headers) as c:
        model = args.model or (await c.get("/v1/models")).json()["data"][0]["id"]
        vocab = args.vocab
        bodies = [{"model": model, "prompt": [rng.randrange(vocab) for _ in range(args.prompt_len)],
                   "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
                  for _ in range(args.num_requests)]
        todo, results = list(reversed(bodies)), []

        async def client():  # one of N clients: the next request as soon as its last one ends
            while todo:
                results.append(await one_request(c, todo.pop()))
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r["tokens"] or 0 for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    return {"model": model, "url": args.url, "num_requests": args.num_requests,
            "concurrency": args.concurrency, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5],
            "duration_s": wall, "request_throughput": len(ok) / wall,
            "output_token_throughput": out_tokens / wall,
            "total_token_throughput": (in_tokens + out_tokens) / wall,
            "output_tokens": out_tokens, "ttft": percentiles([r["ttft"] for r in ok]),
            "itl": percentiles([x for r in ok for x in r["itl"]]),
            "e2e": percentiles([r["e2e"] for r in ok])}


def report(res: dict) -> str:
    lines = [f"{res['completed']}/{res['num_requests']} requests in {res['duration_s']:.2f}s "
             f"({res['concurrency']} clients, {res['prompt_len']} prompt + {res['output_len']} "
             f"output tokens each; {res['failed']} failed)",
             f"throughput: {res['request_throughput']:.2f} req/s, "
             f"{res['output_token_throughput']:.1f} output tok/s, "
             f"{res['total_token_throughput']:.1f} total tok/s"]
    for name in ("ttft", "itl", "e2e"):
        p = res[name]
        if p:
            lines.append(f"{name.upper():>4} ms: mean {p['mean_ms']:.1f}  p50 {p['p50_ms']:.1f}  "
                         f"p90 {p['p90_ms']:.1f}  p99 {p['p99_ms']:.1f}")
    return "\n".join(lines + [f"error: {e}" for e in res["errors"]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-requests", type=int, default=64, help="requests in all")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    p.add_argument("--vocab", type=int, default=256, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    res = asyncio.run(run(args))
    print(json.dumps(res) if args.json else report(res))
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
