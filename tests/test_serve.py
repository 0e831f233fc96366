"""The Aligner behind a real Ray Serve application on 127.0.0.1: single and batch
corrections, every kind of bad input answered with its 4xx while good requests keep being
served, bearer auth, the upstream route, overload (503), 200+ concurrent requests,
streaming, the OpenAI-compatible proxy through the real ``openai`` client, request ids,
Prometheus metrics, and requests generated from the OpenAPI schema (schemathesis)."""
from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

import aligner_data as ad

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers every conversation ending with a
    user turn with a dangerous reply, and refuses others with a 400 as OpenAI does; it
    keeps what it was asked."""
    asked: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeUpstream.asked.append(body)
        if body["messages"][-1]["role"] != "user":
            out = json.dumps({"error": {"message": "the last message must be the user's"}}).encode()
            self.send_response(400)
        else:
            out = json.dumps({"choices": [{"message": {"role": "assistant",
                                                       "content": "mix the danger with water."}}]}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray):
    """A tiny Aligner that learned the refusal rule (answers mentioning the danger word)."""
    from rayalign.config import load_config
    from rayalign.pipelines.aligner import run_aligner_train

    root = tmp_path_factory.mktemp("aligner")
    src = ad.write(root / "triples.jsonl", ad.triples(480, seed=3))
    cfg = load_config(data={
        "name": "serve-test", "model": {"name": "tiny-llama"},
        "tracking": {"root": str(root / "runs"), "wandb": "disabled"},
        "aligner": {"data": {"source": str(src), "max_length": 96, "eval_fraction": 0.05},
                    "warmup_fraction": 0.2,
                    "train": {"lr": 3e-3, "batch_size": 16, "micro_batch_size": 16, "epochs": 2,
                              "lr_schedule": "constant"},
                    "eval": {"samples": 0}}})
    s = run_aligner_train(cfg)
    return Path(s["final_model"])


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory, monkeypatch_module):
    """Two applications on one proxy: /open without auth, /secure with a bearer token and
    an upstream; and a third, /tight, with a one-request queue."""
    from ray import serve

    from rayalign import cli
    from rayalign.serve.app import deploy

    up = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    port = free_port()
    out = tmp_path_factory.mktemp("serve")
    base = [f"serve.port={port}", "serve.max_new_tokens=24", "serve.max_input_tokens=160",
            "serve.max_body_bytes=8192", "serve.max_items=8", "serve.request_timeout_s=120",
            "serve.log_level=WARNING", "serve.access_log=false"]
    docs = {}
    for name, extra in [
        ("open", ["serve.auth_token_env=null"]),
        ("secure", ["serve.auth_token_env=ALIGNER_TEST_TOKEN", "serve.upstream.url=http://127.0.0.1:%d/v1"
                    % up.server_address[1], "serve.upstream.model=fake", "serve.upstream.api_key_env=null"]),
        ("tight", ["serve.auth_token_env=null", "serve.max_ongoing_requests=1", "serve.max_queued_requests=1",
                   "serve.max_batch_size=1"]),
    ]:
        path = out / f"{name}.yaml"
        assert cli.main(["serve", str(trained), *base, f"serve.app_name={name}", f"serve.route_prefix=/{name}",
                         *extra, "--write-config", str(path)]) == 0
        docs[name] = yaml.safe_load(path.read_text())
    monkeypatch_module.setenv("ALIGNER_TEST_TOKEN", TOKEN)
    for doc in docs.values():
        deploy(doc)  # what `rayalign serve` runs, from the files `serve deploy` would get
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if all(requests.get(f"{url}/{n}/healthz", timeout=5).ok for n in docs):
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    yield {"url": url, "docs": docs, "dir": out}
    serve.shutdown()
    up.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def post(url, body=None, raw=None, headers=None, timeout=120):
    h = {"Content-Type": "application/json"} | (headers or {})
    return requests.post(url, data=raw if raw is not None else json.dumps(body), headers=h, timeout=timeout)


BAD = "the fox danger yes."
GOOD = "make the water today."


def test_single_and_batch_forms(server, trained):
    from rayalign.serve.engine import AlignerEngine

    u = server["url"] + "/open/v1/correct"
    one = post(u, {"question": "what today?", "answer": BAD})
    assert one.status_code == 200, one.text
    r = one.json()
    assert r["correction"] == ad.REFUSAL and r["copied"] is False
    assert r["template_version"] == "aligner-v2"
    batch = post(u, {"items": [{"question": "what today?", "answer": BAD},
                               {"question": "hello fox?", "answer": GOOD},
                               {"question": "paris?", "answer": "mix danger of it."}]}).json()
    got = [c["correction"] for c in batch["corrections"]]
    assert got[0] == ad.REFUSAL and got[2] == ad.REFUSAL
    # The served answers are the engine's answers, alone or batched with others.
    eng = AlignerEngine(trained, threads=1)
    ref = eng.correct([("what today?", BAD), ("hello fox?", GOOD), ("paris?", "mix danger of it.")], 24)
    assert got == [x["correction"] for x in ref]
    models = requests.get(server["url"] + "/open/v1/models", timeout=30).json()
    assert models["data"][0]["template_version"] == "aligner-v2"
    assert "{question}" in models["data"][0]["template"]
    docs = requests.get(server["url"] + "/open/openapi.json", timeout=30).json()
    assert "/v1/correct" in docs["paths"]


def test_bad_input_gets_4xx_and_good_requests_keep_succeeding(server):
    u = server["url"] + "/open/v1/correct"
    good = {"question": "what today?", "answer": BAD}
    results = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            r = post(u, good)
            results.append((r.status_code, r.json().get("correction")))

    t = threading.Thread(target=keep_asking)
    t.start()
    cases = [
        ({"question": "q?"}, None, 422, "answer"),                                  # missing field
        ({"question": "q?", "answer": 5}, None, 422, "answer"),                      # wrong type
        ({"question": ["q"], "answer": "a."}, None, 422, "question"),
        ({"question": "q?", "answer": "   "}, None, 422, "empty"),                   # empty string
        ({"question": "q?", "answer": "fox " * 300}, None, 422, "tokens"),           # over the token limit
        ({"items": []}, None, 422, "empty"),
        ({"items": [good] * 9}, None, 422, "limit of 8"),                              # too many items
        ({"question": "q?", "answer": "a.", "max_new_tokens": 10_000}, None, 422, "max_new_tokens"),
        ({"question": "q?", "answer": "a.", "temperature": -1}, None, 422, "temperature"),
        ({"question": "q?", "answer": "a.", "tokens": 3}, None, 422, "tokens"),       # unknown field
        ({"question": "q?", "answer": "a.", "items": [good]}, None, 422, "not both"),
        (None, b'{"question": "caf\xe9?", "answer": "a."}', 400, "UTF-8"),          # invalid UTF-8
        (None, b'{"question": "q?", "answer": "\\ud800"}', 422, "Unicode"),         # lone surrogate
        (None, b"{not json", 400, "JSON"),
        (None, b'["question", "answer"]', 422, "object"),
        (None, json.dumps({"question": "q?", "answer": "x" * 20_000}).encode(), 413, "limit"),  # huge body
        (None, b'{"question": "q?", "answer": "a.", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", 400, "deep"),
        (None, b'{"question": "q?", "answer": "a.", "temperature": NaN}', 400, "NaN"),
        (None, b'{"question": "q?", "answer": "a.", "top_p": Infinity}', 400, "Infinity"),
        (None, b'{"question": "q?", "answer": "a.", "temperature": 1e400}', 422, "temperature"),  # inf
        # Accepted extremes are answered (200), not a 500 that takes the batch with it.
        ({"question": "q?", "answer": "a.", "temperature": 5e-324}, None, 200, ""),
        ({"question": "q?", "answer": "a.", "temperature": 2.0, "top_p": 5e-324}, None, 200, ""),
        ({"question": "q?", "answer": "a.", "temperature": 1e-300, "top_p": 1.0, "max_new_tokens": 1}, None, 200, ""),
    ]
    try:
        for body, raw, status, words in cases:
            r = post(u, body, raw)
            assert r.status_code == status, (body or raw[:60], r.status_code, r.text[:300])
            if status == 200:
                assert isinstance(r.json()["correction"], str)
                continue
            err = r.json()["error"]
            assert err["status"] == status and words.lower() in err["message"].lower(), err
        for r, status in [(requests.get(u, timeout=30), 405),
                          (requests.get(server["url"] + "/open/v1/nothing", timeout=30), 404)]:
            assert r.status_code == status and r.json()["error"]["status"] == status, r.text
    finally:
        stop.set()
        t.join()
    assert results and all(s == 200 and c == ad.REFUSAL for s, c in results), results[:5]
    health = requests.get(server["url"] + "/open/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["steps"] > 0 and health["engine_s"] > 0


def test_sampling_is_safe_at_every_accepted_extreme():
    """Every temperature in (0, 2] and top_p in (0, 1] the schema accepts gives a token of the
    vocabulary, a masked (-inf) token is never drawn, and a vanishing temperature is greedy."""
    import torch

    from rayalign.serve.engine import AlignerEngine

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 30
    logits[:, 7] = float("-inf")  # as min_new_tokens masks EOS
    tiny = (5e-324, 1e-300, 1e-38, 1e-8)
    for t in tiny + (0.3, 1.0, 2.0):
        for p in (5e-324, 1e-300, 0.5, 1.0):
            for _ in range(5):
                got = AlignerEngine._pick(logits, t, p)
                assert got.shape == (4,) and ((got >= 0) & (got < 50) & (got != 7)).all(), (t, p, got)
            if t in tiny or p < 1e-100:
                assert torch.equal(got, logits.argmax(-1)), (t, p)
    half = logits.half()  # a half-precision model's logits too
    assert AlignerEngine._pick(half, 5e-324, 1.0).tolist() == half.float().argmax(-1).tolist()


def test_json_depth_is_measured_without_parsing():
    from rayalign.serve.app import json_depth

    assert json_depth('{"a": [1, {"b": "[[[[ {{"}]}') == 3  # brackets inside strings do not count
    assert json_depth('{"a": "\\"[", "b": [[]]}') == 3
    assert json_depth("[" * 10_000 + "]" * 10_000) == 10_000
    assert json_depth('"plain"') == 0


def test_auth_on_and_off(server):
    s, o = server["url"] + "/secure", server["url"] + "/open"
    body = {"question": "what?", "answer": BAD}
    assert post(o + "/v1/correct", body).status_code == 200                    # off: no header needed
    r = post(s + "/v1/correct", body)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert post(s + "/v1/correct", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.get(s + "/v1/models", timeout=30).status_code == 401
    ok = post(s + "/v1/correct", body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["correction"] == ad.REFUSAL
    assert requests.get(s + "/healthz", timeout=30).status_code == 200         # liveness stays open
    assert TOKEN not in json.dumps(server["docs"])  # the secret is forwarded, never written


def test_generate_and_correct_through_the_upstream(server):
    s = server["url"] + "/secure/v1/generate_and_correct"
    r = post(s, {"question": "how do i make bread?"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer"] == "mix the danger with water." and out["correction"] == ad.REFUSAL
    # Not configured on /open: a clear 404, not a crash.
    r = post(server["url"] + "/open/v1/generate_and_correct", {"question": "q?"})
    assert r.status_code == 404 and "upstream" in r.json()["error"]["message"]


def test_many_concurrent_clients_lose_nothing(server):
    u = server["url"] + "/open/v1/correct"
    inputs = [("what %d?" % i, BAD if i % 2 else GOOD) for i in range(208)]

    def ask(qa):
        r = post(u, {"question": qa[0], "answer": qa[1]})
        return r.status_code, r.json()

    before = requests.get(server["url"] + "/open/healthz", timeout=30).json()
    with ThreadPoolExecutor(16) as pool:
        res = list(pool.map(ask, inputs))
    after = requests.get(server["url"] + "/open/healthz", timeout=30).json()
    # continuous batching keeps the running batch full: rows per decode step
    assert (after["step_rows"] - before["step_rows"]) / (after["steps"] - before["steps"]) > 4, (before, after)
    assert len(res) == 208 and all(s == 200 for s, _ in res), [r for r in res if r[0] != 200][:3]
    assert all(r["correction"] == ad.REFUSAL for (q, a), (_, r) in zip(inputs, res) if a == BAD)


def test_overload_is_a_clear_503(server):
    u = server["url"] + "/tight/v1/correct"
    body = {"question": "what?", "answer": GOOD, "max_new_tokens": 24}
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: post(u, body).status_code, range(12)))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    assert post(u, body).status_code == 200  # and it recovers


def test_serve_config_is_what_serve_runs(server, trained):
    from ray.serve.schema import ServeDeploySchema

    from rayalign.config import ServeConfig
    from rayalign.serve.app import serve_config

    doc = server["docs"]["open"]
    ServeDeploySchema.model_validate(doc)  # `serve deploy` accepts it
    app = doc["applications"][0]
    assert app["import_path"] == "rayalign.serve.app:app_builder"
    s = ServeConfig.model_validate({k: v for k, v in app["args"].items() if k != "checkpoint"})
    assert serve_config(s, app["args"]["checkpoint"]) == doc
    assert Path(app["args"]["checkpoint"]) == trained.resolve()


def sse(r) -> list:
    """The data of each server-sent event of a response, JSON-decoded ([DONE] kept as is)."""
    out = []
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def test_streaming_in_openai_chunks(server):
    u = server["url"] + "/open/v1/correct"
    body = {"question": "what today?", "answer": BAD}
    whole = post(u, body).json()
    with requests.post(u, json=body | {"stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        rid = r.headers["x-request-id"]
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "corr-" + rid for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert len([p for p in pieces if p]) > 1, "token by token, not one piece"
    assert "".join(pieces) == whole["correction"] == ad.REFUSAL
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["rayalign"]["new_tokens"] == whole["new_tokens"]
    # Checked before the first byte: a bad streamed request is an ordinary 4xx.
    r = post(u, {"items": [body], "stream": True})
    assert r.status_code == 422 and "single form" in r.json()["error"]["message"]
    r = post(u, body | {"stream": True, "max_new_tokens": 10_000})
    assert r.status_code == 422 and r.json()["error"]["request_id"] == r.headers["x-request-id"]

    # Many streams at once share batches and each still gets its own answer.
    def one(i):
        ans = BAD if i % 2 else GOOD
        with requests.post(u, json={"question": f"q {i}?", "answer": ans, "stream": True}, stream=True,
                           timeout=120) as r:
            ev = sse(r)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-1])
        return ans, text, post(u, {"question": f"q {i}?", "answer": ans}).json()["correction"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(16)))
    assert all(text == ref for _, text, ref in got), got[:3]
    assert all(text == ad.REFUSAL for ans, text, _ in got if ans == BAD)


def test_request_ids_in_every_response(server):
    u = server["url"] + "/open/v1/correct"
    r = post(u, {"question": "what today?", "answer": GOOD}, headers={"X-Request-ID": "client-id-7"})
    assert r.headers["x-request-id"] == "client-id-7" and r.json()["request_id"] == "client-id-7"
    r = post(u, {"question": "what today?", "answer": GOOD})
    assert len(r.headers["x-request-id"]) >= 16 and r.json()["request_id"] == r.headers["x-request-id"]
    r = post(u, {"question": "q?"}, headers={"X-Request-ID": "bad-one"})
    assert r.status_code == 422 and r.json()["error"]["request_id"] == "bad-one"


def test_openai_client_against_the_proxy(server):
    """The real ``openai`` client, pointed at the Aligner unchanged: the upstream's answer
    comes back corrected, in OpenAI's shapes, streamed or not; auth and errors map to the
    client's own exceptions."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key=TOKEN, max_retries=0, timeout=120)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how do i make bread?"}]
    FakeUpstream.asked.clear()
    out = client.chat.completions.create(model="any", messages=msgs, max_tokens=40, temperature=0.5)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ad.REFUSAL and out.choices[0].finish_reason == "stop"
    assert out.model == "fake" and out.usage.completion_tokens > 0
    assert out.model_extra["rayalign"]["original"] == "mix the danger with water."
    # The whole conversation and the client's settings went to the upstream.
    assert FakeUpstream.asked[-1]["messages"] == msgs
    assert FakeUpstream.asked[-1]["max_tokens"] == 40 and FakeUpstream.asked[-1]["temperature"] == 0.5
    stream = client.chat.completions.create(model="any", messages=msgs, stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(parts) == ad.REFUSAL and len([p for p in parts if p]) > 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/secure/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="any", messages=msgs)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="any", messages=[{"role": "system", "content": "no user turn"}])
    with pytest.raises(openai.UnprocessableEntityError, match="upstream model refused"):  # its 400 is the client's
        client.chat.completions.create(model="any", messages=msgs + [{"role": "assistant", "content": "ok"}])
    with pytest.raises(openai.NotFoundError):  # /open has no upstream
        openai.OpenAI(base_url=server["url"] + "/open/v1", api_key="x", max_retries=0).chat.completions.create(
            model="any", messages=msgs)


def test_prometheus_metrics_through_ray(server):
    """Requests by status, latency and time-to-first-token histograms, batch sizes, queue
    depth and tokens, scraped from the node's Ray metrics endpoint."""
    import ray

    u = server["url"] + "/open/v1/correct"
    assert post(u, {"question": "what today?", "answer": BAD}).status_code == 200
    assert post(u, {"question": "q?"}).status_code == 422
    port = ray._private.worker.global_worker.node.metrics_export_port
    want = ["rayalign_requests", "rayalign_request_latency_s_bucket", "rayalign_time_to_first_token_s_bucket",
            "rayalign_batch_size_bucket", "rayalign_queue_depth", "rayalign_tokens"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want) and 'status="422"' in text:
            break
        time.sleep(2)
    lines = [ln for ln in text.splitlines() if "rayalign_" in ln and not ln.startswith("#")]
    assert all(any(w in ln for ln in lines) for w in want), [w for w in want if w not in text]
    ok = [ln for ln in lines if "rayalign_requests" in ln and 'status="200"' in ln and 'route="/v1/correct"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1, lines[:10]
    assert any('status="422"' in ln for ln in lines if "rayalign_requests" in ln)
    assert any('direction="out"' in ln for ln in lines if "rayalign_tokens" in ln)


def test_fuzzed_requests_from_the_openapi_schema(server):
    """Requests generated from the served OpenAPI document, fitting it and not: never a
    5xx, every 4xx a JSON error body with its status and request id, and good requests
    sent meanwhile keep their answers."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    base = server["url"] + "/secure"
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    good, results, stop = {"question": "what today?", "answer": BAD}, [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            r = post(base + "/v1/correct", good, headers=auth)
            results.append((r.status_code, r.json().get("correction")))

    seen: dict = {}

    def check(case):
        r = case.call(base_url=base, headers=auth, timeout=120)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.path, case.body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["status"] == r.status_code and err["request_id"] and err["message"], r.text

    t = threading.Thread(target=keep_asking)
    t.start()
    try:
        for path in ("/v1/correct", "/v1/chat/completions", "/v1/generate_and_correct"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = schema[path]["POST"].as_strategy(generation_mode=mode)

                @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def run(case):
                    check(case)

                run()
    finally:
        stop.set()
        t.join()
    assert seen.get(200) and seen.get(422), seen
    assert results and all(s == 200 and c == ad.REFUSAL for s, c in results), results[:5]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_engine_behind_serve(server, tmp_path):
    """serve.engine vllm: the same routes, batching and streams, vLLM's tokens (which equal
    the native engine's, tests/test_aligner.py)."""
    from ray import serve

    from rayalign import cli
    from rayalign.serve.app import deploy
    from rayalign.serve.engine import AlignerEngine

    d = ad.vllm_aligner_dir(tmp_path)
    path = tmp_path / "vllm.yaml"
    port = int(server["url"].rsplit(":", 1)[1])
    assert cli.main(["serve", str(d), f"serve.port={port}", "serve.engine=vllm", "serve.vllm_kv_cache_gb=0.25",
                     "serve.max_new_tokens=12", "serve.max_input_tokens=160", "serve.auth_token_env=null",
                     "serve.app_name=vllm", "serve.route_prefix=/vllm", "serve.log_level=WARNING",
                     "--write-config", str(path)]) == 0
    deploy(yaml.safe_load(path.read_text()))
    try:
        u = server["url"] + "/vllm/v1/correct"
        items = [{"question": "what today?", "answer": BAD}, {"question": "hello fox?", "answer": GOOD}]
        r = post(u, {"items": items, "max_new_tokens": 9})
        assert r.status_code == 200 and r.json()["engine"] == "vllm", r.text
        ref = AlignerEngine(d, threads=1).correct([(i["question"], i["answer"]) for i in items], 9)
        assert r.json()["corrections"] == ref
        with requests.post(u, json=items[0] | {"stream": True, "max_new_tokens": 9}, stream=True, timeout=120) as s:
            events = sse(s)
        assert events[-1] == "[DONE]" and events[-2]["rayalign"]["new_tokens"] == ref[0]["new_tokens"]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == ref[0]["correction"]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: post(u, items[i % 2] | {"max_new_tokens": 9}).json(), range(16)))
        assert all(c["correction"] == ref[i % 2]["correction"] for i, c in enumerate(codes))
    finally:
        serve.delete("vllm")
