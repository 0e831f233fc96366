"""Serving load: the Aligner on Ray Serve against a plain one-request-at-a-time server.

Every arm serves the same Aligner checkpoint with the same prompts (its recorded
template), greedy decoding and the same ``max_new_tokens``, with the same torch thread
count, on this machine, in one run. The baseline is what a person writes without a
serving framework: a single-process ``http.server`` calling ``transformers`` ``generate``
for each request in turn. The served arms are ``rayalign serve`` with each engine
(native, vllm), every request streamed. Closed-loop clients (1, 4, 16, 64) each send
requests back to back; the arms take turns, ``--repeats`` times. We report requests/s,
p50/p99 latency, time to first token, and the ratios to the baseline with their range.

    rayalign aligner train configs/aligner.yaml            # a SmolLM2-based Aligner
    python benchmarks/serve_load.py --checkpoint RUN_DIR [--engines native,vllm] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BASELINE = r'''
import json, sys, torch
from http.server import BaseHTTPRequestHandler, HTTPServer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, port, threads, max_new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
from rayalign.aligner import read_meta
template, _ = read_meta(model_dir)  # the checkpoint's recorded template, rendered as the server renders it
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

def render(q, a):
    return tok.apply_chat_template([{"role": "user", "content": template.render(q, a)}], add_generation_prompt=True,
                                   tokenize=False)

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        enc = tok(render(body["question"], body["answer"]), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        gen = out[0, enc["input_ids"].shape[1]:]
        res = json.dumps({"correction": tok.decode(gen, skip_special_tokens=True).strip(), "new_tokens": int(gen.shape[0])}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(res))); self.end_headers(); self.wfile.write(res)
    def log_message(self, *a): pass

HTTPServer.request_queue_size = 128  # queue waiting clients (the default 5 resets them)
HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, body: dict, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.post(url, json=body, timeout=120).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def _stream_one(url: str, item: dict) -> tuple[float, int]:
    """One streamed request: (seconds to its first text, new tokens)."""
    t = time.perf_counter()
    first, tokens = None, 0
    with requests.post(url, json=item | {"stream": True}, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise requests.RequestException(str(ev["error"]))
            ch = ev["choices"][0]
            if first is None and ch["delta"].get("content"):
                first = time.perf_counter() - t
            if ch["finish_reason"]:
                tokens = ev["rayalign"]["new_tokens"]
    return (first if first is not None else time.perf_counter() - t), tokens


def _q(xs: list[float], p: int) -> float:
    xs = sorted(xs)
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def load(url: str, items: list[dict], clients: int, total: int, max_new: int | None, stream: bool) -> dict:
    """Closed loop: each client sends its share of ``total`` requests back to back
    (streamed: time to first text measured too)."""
    lat: list[float] = []
    ttft: list[float] = []
    errors = 0
    tokens = 0
    lock = threading.Lock()
    per_client = -(-total // clients)

    def client(c: int):
        nonlocal errors, tokens
        for k in range(per_client):
            item = dict(items[(c * per_client + k) % len(items)])
            if max_new:
                item["max_new_tokens"] = max_new
            t = time.perf_counter()
            try:
                if stream:
                    first, n = _stream_one(url, item)
                else:
                    r = requests.post(url, json=item, timeout=600)
                    r.raise_for_status()
                    n = int(r.json().get("new_tokens", 0))
                    first = None
            except requests.RequestException:
                with lock:
                    errors += 1
                continue
            dt = time.perf_counter() - t
            with lock:
                lat.append(dt)
                ttft.append(dt if first is None else first)
                tokens += n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 3), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(_q(lat, 99), 3), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p99_s": round(_q(ttft, 99), 3), "new_tokens_per_s": round(tokens / wall, 1)}


def _arm(results: list, name: str, url: str, items, levels, args, stream: bool, health: str | None):
    for c in levels:
        total = min(args.max_requests, max(args.min_requests, args.per_client * c))
        before = requests.get(health, timeout=30).json() if health else None
        r = load(url, items, c, total, args.max_new_tokens if health else None, stream)
        if health:
            after = requests.get(health, timeout=30).json()
            # the share of the wall the replica spent inside the engine; the rest is serving
            r["engine_busy"] = round((after["engine_s"] - before["engine_s"]) / r["wall_s"], 3)
            r["mean_batch"] = round((after["step_rows"] - before["step_rows"]) /
                                    max(1, after["steps"] - before["steps"]), 2)
        print(f"{name:<8}", r, flush=True)
        results.append(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Aligner run, checkpoint or export directory")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--engines", default="native,vllm", help="serve.engine values to measure")
    ap.add_argument("--per-client", type=int, default=4, help="requests per client at each level ...")
    ap.add_argument("--min-requests", type=int, default=8, help="... and at least this many in all ...")
    ap.add_argument("--max-requests", type=int, default=128, help="... and at most this many")
    ap.add_argument("--repeats", type=int, default=2, help="each arm's levels run this many times, interleaved")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every arm's weights")
    ap.add_argument("--no-stream", action="store_true", help="served arms without streaming (no TTFT then)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-s", type=float, default=0.05)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    engines = [e for e in args.engines.split(",") if e]

    from rayalign import aligner as al
    from rayalign import data

    model_dir = al.find_model_dir(args.checkpoint).resolve()
    gold = data.read_rows("packaged:hhh-pairs")[0]
    items = [{"question": r["prompt"], "answer": r["response_2"] if r["gold"] == 1 else r["response_1"]}
             for r in gold[:64]]
    runs: dict[str, list] = {"baseline": []} | {e: [] for e in engines}

    import ray
    from ray import serve

    from rayalign.config import ServeConfig
    from rayalign.serve.app import deploy, serve_config

    from provenance import write

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="error",
             configure_logging=True)
    try:
        for rep in range(args.repeats):
            # ---- baseline: one process, one request at a time
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(model_dir), str(port), str(args.threads),
                                     str(args.max_new_tokens), args.dtype], stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}/"
                wait_ready(url, items[0])
                _arm(runs["baseline"], "baseline", url, items, levels, args, False, None)
            finally:
                proc.terminate()
                proc.wait()
            # ---- rayalign serve, each engine: dynamic batching, every request streamed
            for eng in engines:
                port = free_port()
                s = ServeConfig(port=port, cpus_per_replica=args.threads, threads_per_replica=args.threads,
                                engine=eng, dtype=args.dtype, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s,
                                max_new_tokens=args.max_new_tokens,
                                max_ongoing_requests=128, max_queued_requests=256, request_timeout_s=600,
                                auth_token_env=None, log_level="WARNING", access_log=False)
                try:
                    deploy(serve_config(s, str(model_dir)))
                    url = f"http://127.0.0.1:{port}/v1/correct"
                    wait_ready(url, items[0])
                    _arm(runs[eng], eng, url, items, levels, args, not args.no_stream,
                         url.replace("/v1/correct", "/healthz"))
                finally:
                    serve.shutdown()
    finally:
        ray.shutdown()

    summary = []
    for c in levels:
        base = [r for r in runs["baseline"] if r["clients"] == c]
        row: dict = {"clients": c, "baseline_req_per_s": statistics.median(r["req_per_s"] for r in base)}
        for eng in engines:
            mine = [r for r in runs[eng] if r["clients"] == c]
            ratios = [m["req_per_s"] / b["req_per_s"] for m, b in zip(mine, base)]
            row[eng] = {"req_per_s": statistics.median(r["req_per_s"] for r in mine),
                        "throughput_ratio": round(statistics.median(ratios), 2),
                        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
                        "p99_over_p50": round(statistics.median(r["p99_s"] / r["p50_s"] for r in mine), 2),
                        "ttft_p50_s": round(statistics.median(r["ttft_p50_s"] for r in mine), 3),
                        "ttft_p99_s": round(statistics.median(r["ttft_p99_s"] for r in mine), 3),
                        "errors": sum(r["errors"] for r in mine)}
            print(f"clients {c:>2} {eng:<7}: {row[eng]['throughput_ratio']:.2f}x the baseline "
                  f"({row[eng]['ratio_range'][0]:.2f}-{row[eng]['ratio_range'][1]:.2f}), p99/p50 "
                  f"{row[eng]['p99_over_p50']:.2f}, TTFT p50 {row[eng]['ttft_p50_s']:.2f} s", flush=True)
        summary.append(row)
    write(args.out, {"summary": summary, "runs": runs, "settings": {
        "checkpoint": str(model_dir), "base_model": json.loads((model_dir / al.META_FILE).read_text()).get("base_model"),
        "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "greedy": True, "threads": args.threads,
        "per_client": args.per_client, "min_requests": args.min_requests, "max_requests": args.max_requests, "repeats": args.repeats,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s, "replicas": 1, "serve_access_log": False, "serve_streamed": not args.no_stream}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
