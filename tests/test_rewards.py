"""Reward sources without Ray: HTTP endpoint (answers, errors, retries), functions, weights."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rayalign.rewards import HTTPReward, RewardError, RewardMix, import_callable


class Handler(BaseHTTPRequestHandler):
    calls = []
    plan = []  # per call: (status, body) or None for the real answer

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.calls.append((body, self.headers.get("Authorization")))
        step = Handler.plan.pop(0) if Handler.plan else None
        if step is None:
            status, out = 200, {"rewards": [float(len(r)) for r in body["responses"]]}
        else:
            status, out = step
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    Handler.calls, Handler.plan = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/reward"
    srv.shutdown()


def test_http_reward_batches_and_auth(server, monkeypatch):
    monkeypatch.setenv("RM_KEY", "s3cret")
    r = HTTPReward(server, api_key_env="RM_KEY", batch_size=2)
    assert r(["q"] * 3, ["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]
    assert [len(c[0]["responses"]) for c in Handler.calls] == [2, 1]
    assert all(c[1] == "Bearer s3cret" for c in Handler.calls)


def test_http_reward_retries_server_errors(server):
    Handler.plan = [(503, {"error": "busy"}), (500, {"error": "oops"})]
    assert HTTPReward(server, retries=2)(["q"], ["abcd"]) == [4.0]
    assert len(Handler.calls) == 3


def test_http_reward_errors_are_clear(server, monkeypatch):
    Handler.plan = [(400, {"error": "bad prompt"})]
    with pytest.raises(RewardError, match="HTTP 400.*bad prompt"):
        HTTPReward(server)(["q"], ["a"])
    Handler.plan = [(200, {"rewards": [1.0, 2.0]})]
    with pytest.raises(RewardError, match="expected 1 scores, got 2"):
        HTTPReward(server)(["q"], ["a"])
    Handler.plan = [(200, {"scores": [1.0]})]
    with pytest.raises(RewardError, match="no 'rewards' list"):
        HTTPReward(server)(["q"], ["a"])
    Handler.plan = [(200, {"rewards": ["NaN"]})]
    with pytest.raises(RewardError, match="score 0 is nan"):
        HTTPReward(server)(["q"], ["a"])
    with pytest.raises(RewardError, match="no answer after 1 tries"):
        HTTPReward("http://127.0.0.1:9/none", retries=0, timeout_s=2)(["q"], ["a"])
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(Exception, match="NO_SUCH_KEY is not set"):
        HTTPReward(server, api_key_env="NO_SUCH_KEY")


def test_mix_weights_terms_and_checks_each(tmp_path):
    mix = RewardMix([("len", 0.5, lambda p, r: [len(x) for x in r]),
                     ("one", 2.0, lambda p, r: [1.0] * len(r))])
    assert mix(["q", "q"], [{"response": "ab"}, "abcd"]) == [3.0, 4.0]
    assert mix.last_terms == {"reward_len": 3.0, "reward_one": 1.0}
    bad = RewardMix([("short", 1.0, lambda p, r: [0.0])])
    with pytest.raises(RewardError, match="reward source short: expected 2 scores, got 1"):
        bad(["q", "q"], ["a", "b"])
    with pytest.raises(Exception, match="cannot import reward function 'nowhere.mod:fn'"):
        import_callable("nowhere.mod:fn")


def test_refusal_reward_term_reads_the_labeler(tmp_path):
    """ppo.rewards type refusal: (2s - 1) x (+1 refused / -1 answered), s from the labeler."""
    import contextlib

    from rayalign.config import RewardSourceConfig
    from rayalign.rewards import _open_source

    class Lab:
        def refusal_rewards(self, items):
            from rayalign.algos.preference import refusal_reward
            from rayalign.refusal import is_refusal

            s = {"harm": 0.9, "fine": 0.2}
            return [refusal_reward(s[c], is_refusal(r)) for c, r in items]

    src = RewardSourceConfig(type="refusal")
    with contextlib.ExitStack() as stack:
        fn = _open_source(src, 0, stack, None, Lab(), None, None)
        mix = RewardMix([("refusal", 1.0, fn)])
        got = mix(["harm", "harm", "fine", "fine"], ["I'm sorry, I can't help with that.", "Sure, here it is.",
                                                     "I'm sorry, I can't help with that.", "Sure, here it is."])
        assert got == pytest.approx([0.8, -0.8, -0.6, 0.6])
        with pytest.raises(Exception, match="a refusal term needs the labeler"):
            _open_source(src, 0, stack, None, None, None, None)


def test_gated_refusal_term_alone_decides_requests_that_should_be_refused():
    import contextlib

    from rayalign.config import ConfigError, RewardSourceConfig
    from rayalign.rewards import _open_source

    s = {"harm": 0.9, "fine": 0.2}

    class Lab:
        def should_refuse(self, contexts):
            return [s[c] for c in contexts]

        def refusal_rewards(self, items):
            from rayalign.algos.preference import refusal_reward
            from rayalign.refusal import is_refusal

            return [refusal_reward(s[c], is_refusal(r)) for c, r in items]

    with contextlib.ExitStack() as stack:
        fn = _open_source(RewardSourceConfig(type="refusal", gate=True), 0, stack, None, Lab(), None, None)
        length = lambda p, r: [len(x) / 10 for x in r]  # noqa: E731  a "helpfulness" that likes length
        mix = RewardMix([("len", 1.0, length), ("refusal", 1.0, fn)])
        refuse, answer = "I'm sorry, I can't help with that.", "Sure, here it is, at great length."
        got = mix(["harm", "harm", "fine", "fine"], [refuse, answer, refuse, answer])
        # harm (gated): refusal term only, +0.8 / -0.8; fine: length + refusal term.
        assert got == pytest.approx([0.8, -0.8, len(refuse) / 10 - 0.6, len(answer) / 10 + 0.6])
        assert mix.last_terms["gated_share"] == 0.5
        with pytest.raises(ConfigError, match="at most one term may gate"):
            RewardMix([("a", 1.0, fn), ("b", 1.0, fn)])
    with pytest.raises(ValueError, match="gate is an option of the refusal term"):
        RewardSourceConfig(type="rm", gate=True)
