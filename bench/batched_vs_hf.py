#!/usr/bin/env python3
"""Summary of bench/batched_vs_hf.sh's rounds: a Markdown table (aggregate tok/s with prefill,
rudder / HF of the same round), then per batch the median and smallest ratio and how many
rounds reached 2x, and the CPU they ran on.

usage: batched_vs_hf.py ROUNDS.jsonl
"""
import json, os, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["round"], r["batch"]), {})[r["tool"]] = r["aggregate_tok_s"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
if isa == "AVX-512" and os.environ.get("RUDDER_NO_AVX512"):
    isa += " CPU, rudder on its AVX2 kernels (RUDDER_NO_AVX512)"
print(f"CPU: {cpu} ({isa}), {os.cpu_count()} logical CPUs")
print("\n| round | rows | HF tok/s | rudder tok/s | ratio |\n|---|---|---|---|---|")
ratios = {}
for (rnd, b), t in sorted(by.items()):
    if "hf" in t and "rudder" in t:
        q = t["rudder"] / t["hf"]
        ratios.setdefault(b, []).append(q)
        print(f"| {rnd} | {b} | {t['hf']:.1f} | {t['rudder']:.1f} | {q:.2f}x |")
print()
for b, qs in sorted(ratios.items()):
    print(f"{b} rows: median {statistics.median(qs):.2f}x, smallest {min(qs):.2f}x, "
          f"{sum(q >= 2 for q in qs)} of {len(qs)} rounds >= 2x")
if not ratios:
    sys.exit(f"{sys.argv[1]}: no round has both tools")
