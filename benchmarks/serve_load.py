"""Serving load: the Aligner on Ray Serve against a plain one-request-at-a-time server.

Both arms serve the same Aligner checkpoint with the same prompts (its recorded
template), greedy decoding and the same ``max_new_tokens``, with the same torch thread
count, on this machine, in one run. The baseline is what a person writes without a
serving framework: a single-process ``http.server`` calling ``transformers`` ``generate``
for each request in turn. Closed-loop clients (1, 4, 16) each send requests back to back;
we report requests/s, p50/p99 latency and the ratios.

    rayalign aligner train configs/aligner.yaml            # a SmolLM2-based Aligner
    python benchmarks/serve_load.py --checkpoint RUN_DIR [--requests 4] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

BASELINE = r'''
import json, sys, torch
from http.server import BaseHTTPRequestHandler, HTTPServer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, port, threads, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
meta = json.load(open(f"{model_dir}/aligner.json"))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

def render(q, a):
    text = meta["template"].replace("{question}", "\0Q").replace("{answer}", "\0A")
    text = text.replace("\0Q", q).replace("\0A", a)  # (questions here hold no slot text)
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)

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


def load(url: str, items: list[dict], clients: int, per_client: int, max_new: int | None) -> dict:
    """Closed loop: each client sends its requests back to back."""
    lat: list[float] = []
    errors = 0
    tokens = 0
    lock = threading.Lock()

    def client(c: int):
        nonlocal errors, tokens
        for k in range(per_client):
            item = dict(items[(c * per_client + k) % len(items)])
            if max_new:
                item["max_new_tokens"] = max_new
            t = time.perf_counter()
            try:
                r = requests.post(url, json=item, timeout=600)
            except requests.RequestException:
                r = None
            dt = time.perf_counter() - t
            with lock:
                if r is not None and r.ok:
                    lat.append(dt)
                    tokens += int(r.json().get("new_tokens", 0))
                else:
                    errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 3), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(q[98], 3), "new_tokens_per_s": round(tokens / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Aligner run, checkpoint or export directory")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-s", type=float, default=0.05)
    ap.add_argument("--rejoin-wait-s", type=float, default=0.25)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from rayalign import aligner as al
    from rayalign import data

    model_dir = al.find_model_dir(args.checkpoint).resolve()
    gold = data.read_rows("packaged:hhh-pairs")[0]
    items = [{"question": r["prompt"], "answer": r["response_2"] if r["gold"] == 1 else r["response_1"]}
             for r in gold[:64]]
    results: dict = {"baseline": [], "rayalign_serve": []}

    # ---- baseline: one process, one request at a time
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(model_dir), str(port), str(args.threads),
                             str(args.max_new_tokens)], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url, items[0])
        for c in levels:
            r = load(url, items, c, args.requests, None)
            print("baseline      ", r, flush=True)
            results["baseline"].append(r)
    finally:
        proc.terminate()
        proc.wait()

    # ---- rayalign serve: the same checkpoint behind Ray Serve with dynamic batching
    import ray
    from ray import serve

    from rayalign.config import ServeConfig
    from rayalign.serve.app import deploy, serve_config

    port = free_port()
    s = ServeConfig(port=port, cpus_per_replica=args.threads, threads_per_replica=args.threads,
                    max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s,
                    rejoin_wait_s=args.rejoin_wait_s,
                    max_new_tokens=args.max_new_tokens, max_ongoing_requests=64, max_queued_requests=256,
                    request_timeout_s=600, auth_token_env=None, log_level="WARNING", access_log=False)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="error", configure_logging=True)
    try:
        deploy(serve_config(s, str(model_dir)))
        url = f"http://127.0.0.1:{port}/v1/correct"
        wait_ready(url, items[0])
        health = url.replace("/v1/correct", "/healthz")
        for c in levels:
            before = requests.get(health, timeout=30).json()
            r = load(url, items, c, args.requests, args.max_new_tokens)
            after = requests.get(health, timeout=30).json()
            # the share of the wall the replica spent inside the engine; the rest is serving
            r["engine_busy"] = round((after["engine_s"] - before["engine_s"]) / r["wall_s"], 3)
            r["mean_batch"] = round((after["served_items"] - before["served_items"]) /
                                    max(1, after["batches"] - before["batches"]), 2)
            print("rayalign serve", r, flush=True)
            results["rayalign_serve"].append(r)
    finally:
        serve.shutdown()
        ray.shutdown()

    ratios = []
    for b, r in zip(results["baseline"], results["rayalign_serve"]):
        ratios.append({"clients": b["clients"], "throughput_ratio": round(r["req_per_s"] / b["req_per_s"], 2),
                       "p99_over_p50_serve": round(r["p99_s"] / r["p50_s"], 2)})
    for x in ratios:
        print(f"clients {x['clients']:>2}: rayalign serve / baseline requests/s = {x['throughput_ratio']:.2f}x; "
              f"serve p99/p50 = {x['p99_over_p50_serve']:.2f}")
    import torch
    import transformers

    results.update(ratios=ratios, settings={
        "checkpoint": str(model_dir), "base_model": json.loads((model_dir / al.META_FILE).read_text()).get("base_model"),
        "max_new_tokens": args.max_new_tokens, "greedy": True, "threads": args.threads,
        "requests_per_client": args.requests, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_s, "rejoin_wait_s": args.rejoin_wait_s, "replicas": 1, "serve_access_log": False},
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__},
        command=" ".join([Path(sys.executable).name] + sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
