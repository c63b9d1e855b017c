"""Load generator for OpenAI-compatible servers (rudder serve, llama-cpp-python's server, …).

Two modes:

  throughput: closed-loop clients at each concurrency level; every client sends chat requests
    one after another until the level's request count is reached. Reports aggregate completion
    tokens/s (from each response's `usage`), request latency p50/p99, time to first token p50
    (streaming), and errors.

      python serve_load.py throughput BASE MODEL --levels 1 8 32 --requests 64 --max-tokens 64

  burst: N streaming requests at once (one connection each). Counts requests that completed
    (a `[DONE]` after their text), designed 429s (with Retry-After), and anything else (an
    error). With --pid, reports the server's peak RSS (VmHWM) afterwards.

      python serve_load.py burst BASE MODEL --n 1000 --max-tokens 32 --pid 1234

Prints one JSON object per level (throughput) or one for the burst, and a readable table.
"""

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

TOPICS = [
    "collaborative filtering", "the ocean", "a rainy day", "graph neural networks", "coffee",
    "mountains", "recommender systems", "a city at night", "language models", "gardening",
    "jazz music", "the moon", "football", "old books", "trains", "autumn",
]


def prompt(i):
    return f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (variant {i})."


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def one(session, base, model, i, max_tokens, stream, headers):
    body = {"model": model, "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(f"{base}/chat/completions", json=body, headers=headers) as r:
        if r.status != 200:
            retry = r.headers.get("Retry-After")
            await r.read()
            return {"status": r.status, "retry_after": retry, "latency": time.perf_counter() - t0}
        if not stream:
            v = await r.json()
            tokens = v.get("usage", {}).get("completion_tokens", 0)
            return {"status": 200, "tokens": tokens, "latency": time.perf_counter() - t0, "done": True}
        done = False
        pieces = 0
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                c = json.loads(data)
                if "error" in c:
                    return {"status": "stream-error", "latency": time.perf_counter() - t0}
                if c.get("usage"):
                    tokens = c["usage"].get("completion_tokens", tokens)
                for ch in c.get("choices", []):
                    if ch.get("delta", {}).get("content"):
                        pieces += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
        if not tokens:
            tokens = pieces
        return {"status": 200, "tokens": tokens, "latency": time.perf_counter() - t0,
                "ttft": ttft, "done": done}


async def throughput(args):
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    out = []
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        # warm-up
        await one(s, args.base, args.model, 10_000, 8, False, headers)
        for level in args.levels:
            n = max(args.requests, level)
            todo = list(range(n))
            results = []

            async def worker():
                while todo:
                    i = todo.pop()
                    try:
                        results.append(await one(s, args.base, args.model, i, args.max_tokens,
                                                 args.stream, headers))
                    except Exception as e:  # noqa: BLE001  (a peer that drops a stream)
                        results.append({"status": f"{type(e).__name__}", "latency": 0})

            t0 = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(level)])
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["status"] == 200]
            toks = sum(r["tokens"] for r in ok)
            lat = [r["latency"] for r in ok]
            ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
            row = {
                "concurrency": level, "requests": n, "ok": len(ok),
                "errors": len(results) - len(ok), "completion_tokens": toks,
                "error_kinds": sorted({str(r["status"]) for r in results if r["status"] != 200}),
                "wall_s": round(wall, 3), "tokens_per_s": round(toks / wall, 2),
                "latency_p50_s": round(pct(lat, 50), 3) if lat else None,
                "latency_p99_s": round(pct(lat, 99), 3) if lat else None,
                "ttft_p50_s": round(pct(ttft, 50), 3) if ttft else None,
            }
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def rss_peak_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def burst(args):
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    rss0 = rss_peak_mb(args.pid) if args.pid else None
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        t0 = time.perf_counter()

        async def guarded(i):
            try:
                return await one(s, args.base, args.model, i, args.max_tokens, True, headers)
            except Exception as e:  # noqa: BLE001
                return {"status": f"exception {type(e).__name__}: {e}"}

        results = await asyncio.gather(*[guarded(i) for i in range(args.n)])
        wall = time.perf_counter() - t0
    completed = [r for r in results if r["status"] == 200 and r.get("done")]
    accepted_incomplete = [r for r in results if r["status"] == 200 and not r.get("done")]
    designed = [r for r in results if r["status"] == 429 and r.get("retry_after")]
    other = [r for r in results if r not in completed and r not in designed]
    row = {
        "requests": args.n, "completed": len(completed),
        "accepted_but_incomplete": len(accepted_incomplete),
        "rejected_429_with_retry_after": len(designed), "other_errors": len(other),
        "other_examples": [str(r["status"]) for r in other[:5]],
        "wall_s": round(wall, 2),
        "completion_tokens": sum(r.get("tokens", 0) for r in completed),
        "latency_p50_s": round(pct([r["latency"] for r in completed], 50), 2) if completed else None,
        "latency_p99_s": round(pct([r["latency"] for r in completed], 99), 2) if completed else None,
        "server_peak_rss_mb_before": rss0,
        "server_peak_rss_mb": rss_peak_mb(args.pid) if args.pid else None,
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["throughput", "burst"])
    p.add_argument("base")
    p.add_argument("model")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--pid", type=int)
    p.add_argument("--key")
    p.add_argument("--out")
    a = p.parse_args()
    res = asyncio.run(throughput(a) if a.mode == "throughput" else burst(a))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
