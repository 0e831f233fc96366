"""The HTTP labeler backend against a small OpenAI-compatible server on 127.0.0.1,
and `rayalign label` keeping finished labels when the server fails mid-run."""
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayalign.labeler import HTTPBackend, Labeler, PRESETS
from rayalign.labeler.backends import LabelerError

STATE = {"mode": "ok", "calls": 0, "fail_after": None, "auth": []}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        STATE["calls"] += 1
        STATE["auth"].append(self.headers.get("Authorization"))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = STATE["mode"]
        if STATE["fail_after"] is not None and STATE["calls"] > STATE["fail_after"]:
            mode = "malformed"
        if mode == "slow":
            time.sleep(1.5)
        if mode == "flaky" and STATE["calls"] % 2 == 1:
            self.send_response(503)
            self.end_headers()
            return
        if mode == "malformed":
            payload = {"choices": [{"text": "1"}]}  # no logprobs
        elif body.get("max_tokens", 1) > 1:
            payload = {"choices": [{"text": " Response 1 is better."}]}
        else:
            # A judge that says Yes when the response mentions 'good', and prefers slot 1.
            prompt = body["prompt"]
            good = "good" in prompt.split("Response:")[-1] if "Response:" in prompt else False
            # Asked whether the response is helpful, honest and harmless: "Yes" for good ones.
            top = {"Yes": math.log(0.8 if good else 0.3), "No": math.log(0.2 if good else 0.7),
                   "1": math.log(0.6), "2": math.log(0.4)}
            payload = {"choices": [{"text": "Yes", "logprobs": {"top_logprobs": [top]}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.fixture(autouse=True)
def reset():
    STATE.update(mode="ok", calls=0, fail_after=None, auth=[])


def test_http_pointwise_and_pairwise(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    be = HTTPBackend(server, "judge", api_key_env="JUDGE_KEY", timeout_s=5, retries=0)
    lab = Labeler(be, PRESETS["helpfulness"], mode="pointwise")
    recs = lab.label([{"context": "q", "response_1": "a good answer", "response_2": "bad"}])
    assert recs[0]["p_good_1"] == pytest.approx(0.8) and recs[0]["p_good_2"] == pytest.approx(0.3)
    assert recs[0]["label"] == 1
    assert STATE["auth"][0] == "Bearer sekrit"
    pw = Labeler(be, PRESETS["helpfulness"], mode="pairwise").label(
        [{"context": "q", "response_1": "x", "response_2": "y"}])
    assert pw[0]["p_order_12"] == pytest.approx(0.6) and pw[0]["p"] == pytest.approx(0.5)
    assert be.generate(["why?"])[0] == " Response 1 is better."


def test_http_timeout_retry_and_malformed(server):
    STATE["mode"] = "slow"
    be = HTTPBackend(server, "judge", timeout_s=0.3, retries=1, backoff_s=0.01)
    t = time.time()
    with pytest.raises(LabelerError, match="no answer after 2 tries"):
        be.option_logprobs([("p", ["Yes", "No"])])
    assert time.time() - t < 5
    STATE.update(mode="flaky", calls=0)
    ok = HTTPBackend(server, "judge", timeout_s=5, retries=2, backoff_s=0.01)
    assert len(ok.option_logprobs([("p", ["1", "2"])])[0]) == 2  # a 503, then an answer
    STATE["mode"] = "malformed"
    with pytest.raises(LabelerError, match="malformed completion"):
        ok.option_logprobs([("p", ["1", "2"])])


def test_label_run_keeps_finished_labels_and_resumes(server, tmp_path):
    from rayalign.cli import main

    rows = [{"prompt": f"q{i}", "response_1": "a good one" if i % 2 else "meh",
             "response_2": "meh" if i % 2 else "a good one", "gold": 1 if i % 2 else 2} for i in range(10)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"""
name: http-label
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
labeler:
  mode: pointwise
  pointwise_relevance: 0        # the HTTP backend requests no prompt log-probabilities
  backend: {{type: http, url: "{server}", model_name: judge, timeout_s: 5, retries: 0}}
label: {{source: {src}, chunk_size: 3}}
""")
    run = tmp_path / "run"
    STATE["fail_after"] = 12  # 2 judgements per pair: 6 pairs (two chunks) succeed
    assert main(["label", str(cfg), "--run-dir", str(run)]) == 2
    kept = [json.loads(l) for l in (run / "labels.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == list(range(6))
    STATE.update(fail_after=None, calls=0)
    assert main(["label", str(cfg), "--resume", str(run)]) == 0
    assert STATE["calls"] == 8  # only the 4 unfinished pairs were judged
    final = [json.loads(l) for l in (run / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in final) == list(range(10))
    rep = json.loads((run / "label_report.json").read_text())
    assert rep["agreement"] == 1.0 and rep["pairs"] == 10


def test_label_rides_out_the_endpoint_stopping_and_starting_again(tmp_path):
    """The labeler endpoint goes away in the middle of `rayalign label` (connections refused
    for 1.5 s) and comes back on the same port: the requests are retried and the run
    finishes with every pair labelled once, no judgement asked twice."""
    from rayalign.cli import main

    first = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = first.server_address[1]
    threading.Thread(target=first.serve_forever, daemon=True).start()
    servers, events = [first], []

    def bounce():
        while STATE["calls"] < 7:
            time.sleep(0.005)
        first.shutdown()
        first.server_close()
        events.append(("down", STATE["calls"], time.time()))
        time.sleep(1.5)
        again = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        servers.append(again)
        threading.Thread(target=again.serve_forever, daemon=True).start()
        events.append(("up", STATE["calls"], time.time()))

    rows = [{"prompt": f"q{i}", "response_1": f"a good one {i}" if i % 2 else f"meh {i}",
             "response_2": f"meh {i}" if i % 2 else f"a good one {i}", "gold": 1 if i % 2 else 2} for i in range(10)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"""
name: http-bounce
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
labeler:
  mode: pointwise
  pointwise_relevance: 0
  backend: {{type: http, url: "http://127.0.0.1:{port}/v1", model_name: judge, timeout_s: 2, retries: 8,
             backoff_s: 0.05}}
label: {{source: {src}, chunk_size: 3}}
""")
    th = threading.Thread(target=bounce, daemon=True)
    th.start()
    run = tmp_path / "run"
    try:
        t0 = time.time()
        assert main(["label", str(cfg), "--run-dir", str(run)]) == 0
        wall = time.time() - t0
        th.join(timeout=10)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert [e[0] for e in events] == ["down", "up"], events
    assert events[0][1] < 20 and wall >= 1.5  # it went down mid-run and the run waited it out
    labels = [json.loads(l) for l in (run / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in labels) == list(range(10))  # none lost, none twice
    assert STATE["calls"] == 20  # each of the 20 distinct responses judged exactly once
    rep = json.loads((run / "label_report.json").read_text())
    assert rep["agreement"] == 1.0 and rep["pairs"] == 10
