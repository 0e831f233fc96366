"""The labeler with function backends: position bias, swapping, modes, batching."""
import math
import re

import pytest

from rayalign.labeler import FunctionBackend, Labeler, PRESETS, report
from rayalign.labeler.backends import LabelerError

T = PRESETS["helpfulness"]


def content_quality(text: str) -> float:
    """The 'true' quality of a response in these tests: how many times it says 'good'."""
    return text.count("good")


def slot_responses(prompt: str) -> tuple[str, str]:
    m = re.search(r"Response 1: (.*)\nResponse 2: (.*)\n", prompt)
    return m.group(1), m.group(2)


def biased_judge(bias: float, weight: float = 1.0):
    """Prefers slot 1 by `bias` nats, plus `weight` x the quality difference."""
    def fn(prompt, options):
        if options == ["1", "2"]:
            a, b = slot_responses(prompt)
            return [bias + weight * (content_quality(a) - content_quality(b)), 0.0]
        if options == ["Yes", "No"]:  # "is this response helpful, honest and harmless?"
            resp = re.search(r"Response: (.*)\n", prompt).group(1)
            return [weight * content_quality(resp) - 1.0, 0.0]
        return [-abs(int(o) - 7) * 1.0 for o in options]  # scores peak at 7
    return fn


PAIRS = [{"context": f"q{i}", "response_1": "good " * (i % 3) + f"r{i}a",
          "response_2": "good " * ((i + 1) % 3) + f"r{i}b"} for i in range(30)]
IDENTICAL = [{"context": f"q{i}", "response_1": f"same {i}", "response_2": f"same {i}"} for i in range(10)]


def truth(p):
    qa, qb = content_quality(p["response_1"]), content_quality(p["response_2"])
    return 1 if qa > qb else 2


def test_swap_average_is_symmetric():
    lab = Labeler(FunctionBackend(biased_judge(0.7, 0.9)), T, mode="pairwise", swap=True)
    fwd = lab.label(PAIRS)
    rev = lab.label([{"context": p["context"], "response_1": p["response_2"], "response_2": p["response_1"]}
                     for p in PAIRS])
    for a, b in zip(fwd, rev):
        assert a["p"] + b["p"] == pytest.approx(1.0, abs=1e-12)


def test_strong_slot_bias_is_measured_and_neutralised():
    judge = biased_judge(bias=4.0, weight=1.0)  # the bias outweighs any content difference here
    no_swap = Labeler(FunctionBackend(judge), T, mode="pairwise", swap=False)
    swap = Labeler(FunctionBackend(judge), T, mode="pairwise", swap=True)
    gold = [truth(p) for p in PAIRS]

    r0 = report(no_swap.label(PAIRS), gold)
    assert r0["slot1_rate_first_order"] == 1.0  # always slot 1 without swapping
    assert r0["label_distribution"]["prefers_1"] == 1.0

    recs = swap.label(PAIRS)
    r1 = report(recs, gold)
    assert r1["position_bias_rate"] == 1.0  # the swap exposes the bias: same slot in both orders
    assert r1["agreement"] == 1.0  # ... and cancels it: decisions follow content
    assert r0["agreement"] < 0.7

    # Content-identical pairs: biased without swapping, exactly neutral with it.
    ident0 = no_swap.label(IDENTICAL)
    ident1 = swap.label(IDENTICAL)
    assert all(r["p"] > 0.95 for r in ident0)
    assert all(r["p"] == pytest.approx(0.5) and r["label"] == 0 for r in ident1)


def test_pointwise_mode_judges_each_response_once():
    calls = []

    def fn(prompt, options):
        calls.append(prompt)
        return biased_judge(0.0)(prompt, options)

    lab = Labeler(FunctionBackend(fn), T, mode="pointwise")
    pairs = PAIRS[:6] + PAIRS[:6]  # repeated pairs: no new judgements
    recs = lab.label(pairs)
    assert len(calls) == 12
    assert all(r["p"] > 0.5 for r, p in zip(recs, pairs) if truth(p) == 1)
    assert report(recs, [truth(p) for p in pairs])["agreement"] == 1.0
    assert "position_bias_rate" not in report(recs)


def test_pointwise_relevance_term():
    """The Yes/No judge cannot tell these apart; the relevance term (PMI) can."""
    def fn(prompt, options):
        return [0.0, 0.0]  # P(good) = 1/2 for everything

    def cont(prompt, response):
        # The on-topic answer is likelier after its own question than after a neutral one.
        on_topic = response.startswith("paris") and "capital" in prompt
        return (-2.0 if on_topic else -6.0, 2)

    pair = [{"context": "what is the capital of france?", "response_1": "bread flour",
             "response_2": "paris is"}]
    plain = Labeler(FunctionBackend(fn, cont=cont), T, mode="pointwise").label(pair)[0]
    assert plain["p"] == pytest.approx(0.5)
    rel = Labeler(FunctionBackend(fn, cont=cont), T, mode="pointwise", relevance_weight=1.0).label(pair)[0]
    # PMI per token: response_1 (-6 - -6)/2 = 0, response_2 (-2 - -6)/2 = 2 -> p = sigma(0 - 2)
    assert rel["p_good_1"] == pytest.approx(0.5)
    assert rel["p_good_2"] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-6)
    assert rel["p"] == pytest.approx(1 / (1 + math.exp(2)), rel=1e-6)
    assert rel["labeler"] == "pointwise+relevance1:helpfulness@2"
    with pytest.raises(LabelerError, match="no continuation function"):
        Labeler(FunctionBackend(fn), T, mode="pointwise", relevance_weight=1.0).label(pair)


def test_score_mode_and_rewards():
    lab = Labeler(FunctionBackend(biased_judge(0.0)), T, mode="score")
    s = lab.scores([("q", "a")])[0]
    assert 6.5 < s < 7.5  # peaked at 7
    r = lab.rewards([("q", "a")])[0]
    assert -1 <= r <= 1 and r == pytest.approx((s - 5.5) / 4.5)


def test_chain_of_thought_and_self_consistency():
    seen = []

    def gen(prompt):
        seen.append(prompt)
        return "Response 2 says good more often."

    def fn(prompt, options):
        assert "Rationale: Response 2 says good more often." in prompt
        return [0.0, 1.0]

    lab = Labeler(FunctionBackend(fn, gen), T, mode="pairwise", cot=True, self_consistency=3)
    recs = lab.label(PAIRS[:2])
    assert len(seen) == 2 * 2 * 3  # pairs x orders x samples
    assert all("Rationale:" in p for p in seen)
    assert len(recs[0]["rationale"]) == 6
    assert recs[0]["labeler"] == "pairwise+swap+cot3:helpfulness@2"
    with pytest.raises(ValueError, match="needs cot"):
        Labeler(FunctionBackend(fn), T, mode="pairwise", self_consistency=2)
    with pytest.raises(LabelerError, match="no generate function"):
        Labeler(FunctionBackend(fn), T, mode="pairwise", cot=True).label(PAIRS[:1])


def test_function_backend_errors():
    with pytest.raises(LabelerError, match="module:function"):
        FunctionBackend("nocolon")
    with pytest.raises(LabelerError, match="cannot import"):
        FunctionBackend("no_such_module_xyz:f")
    bad = FunctionBackend(lambda p, o: [0.0])
    with pytest.raises(LabelerError, match="returned 1 scores for 2 options"):
        Labeler(bad, T, mode="pairwise").label(PAIRS[:1])


def criterion_judge(table: dict[str, dict[str, float]]):
    """Yes-log-odds per (criterion question, response) from a table; 'N/A' has its own row."""
    questions = {T.criteria[c]: c for c in T.criteria}
    questions[T.pointwise_question] = "overall"

    def fn(prompt, options):
        assert options == ["Yes", "No"]
        resp = re.search(r"Response: (.*)\n", prompt.split("\n\n")[-2] + "\n").group(1)
        crit = questions[prompt.split("\n\n")[-1]]
        return [table[crit].get(resp, 0.0), 0.0]
    return fn


def sig(z):
    return 1 / (1 + math.exp(-z))


def test_per_criterion_questions_combine_by_weighted_mean():
    table = {"helpful": {"a": 2.0, "b": -1.0}, "honest": {"a": -1.0, "b": 1.0}, "harmless": {"a": 0.5, "b": 0.5}}
    pair = [{"context": "q", "response_1": "a", "response_2": "b"}]
    lab = Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise",
                  criteria=["helpful", "honest", "harmless"])
    r = lab.label(pair)[0]
    # a: (2 - 1 + 0.5) / 3 = 0.5; b: (-1 + 1 + 0.5) / 3 = 1/6
    assert r["p_good_1"] == pytest.approx(sig(0.5)) and r["p_good_2"] == pytest.approx(sig(1 / 6))
    assert r["p"] == pytest.approx(sig(0.5 - 1 / 6))
    assert r["criteria_1"]["helpful"] == pytest.approx(sig(2.0))
    assert r["labeler"] == "pointwise+criteria(helpful,honest,harmless):helpfulness@2"
    # weights 2:1:1 -> a: (4 - 1 + 0.5) / 4 = 0.875; b: (-2 + 1 + 0.5) / 4 = -0.125
    w = Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise",
                criteria=["helpful", "honest", "harmless"], criterion_weights={"helpful": 2.0}).label(pair)[0]
    assert w["p"] == pytest.approx(sig(1.0))
    with pytest.raises(ValueError, match="not in template"):
        Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise", criteria=["funny"])


def test_content_free_calibration_and_length_debiasing():
    table = {"overall": {"a": 1.0, "b b b": 2.0, "N/A": 3.0}}
    items = [("q", "a"), ("q", "b b b")]
    cal = Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise", calibration="content_free")
    # each judgement relative to the content-free response's log-odds (3.0)
    assert cal.p_good(items) == pytest.approx([sig(-2.0), sig(-1.0)])
    plain = Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise")
    pair = [{"context": "q", "response_1": "a", "response_2": "b b b"}]
    assert cal.label(pair)[0]["p"] == pytest.approx(plain.label(pair)[0]["p"])  # cancels within a pair
    ln = Labeler(FunctionBackend(criterion_judge(table)), T, mode="pointwise", length_coef=1.0)
    # z - log(1 + words): a 1 - log 2, "b b b" 2 - log 4
    assert ln.p_good(items) == pytest.approx([sig(1 - math.log(2)), sig(2 - math.log(4))])


def test_few_shot_exemplars_precede_the_sample():
    seen = []

    def fn(prompt, options):
        seen.append(prompt)
        return [0.0, 0.0]

    shots = [{"context": "2+2?", "response": "4", "good": True}, {"context": "2+2?", "response": "5", "good": False}]
    lab = Labeler(FunctionBackend(fn), T, mode="pointwise", exemplars=shots)
    lab.p_good([("capital of France?", "Paris")])
    q = T.pointwise_question
    assert seen[0].startswith(f"Question: 2+2?\nResponse: 4\n{q} Yes\n\nQuestion: 2+2?\nResponse: 5\n{q} No\n\n"
                              "Question: capital of France?\nResponse: Paris\n\n")
    assert lab.tag == "pointwise+2shot:helpfulness@2"


def test_report_ci_categories_and_length_bias():
    recs = [{"p": 0.9, "label": 1, "response_1": "a long answer here", "response_2": "short"},
            {"p": 0.2, "label": 2, "response_1": "x", "response_2": "y z"},
            {"p": 0.7, "label": 1, "response_1": "one two", "response_2": "three"},
            {"p": 0.6, "label": 1, "response_1": "same", "response_2": "size"}]
    rep = report(recs, [1, 2, 2, 1], ["helpful", "helpful", "honest", "honest"])
    assert rep["agreement"] == 0.75 and rep["gold_pairs"] == 4
    lo, hi = rep["agreement_ci95"]
    assert lo < 0.75 < hi
    assert rep["agreement_by_category"]["helpful"]["rate"] == 1.0
    assert rep["agreement_by_category"]["honest"]["rate"] == 0.5
    # pairs of different lengths: 1 (labeler longer, gold longer), 2 (longer, longer), 3 (longer, shorter)
    assert rep["length_bias"] == {"pairs": 3, "labeler_prefers_longer": 1.0, "gold_prefers_longer": 2 / 3}


# ---------------------------------------------------------------- evaluation assistance

def test_chunk_text_keeps_sentences_whole():
    from rayalign.labeler.judge import chunk_text

    text = "One two three. Four five! Six seven eight nine ten eleven.\nTwelve."
    # Sentences are packed while they fit; a longer one is cut at the chunk size.
    assert chunk_text(text, 5) == ["One two three. Four five!", "Six seven eight nine ten", "eleven. Twelve."]
    assert chunk_text(text, 3) == ["One two three.", "Four five!", "Six seven eight", "nine ten eleven.", "Twelve."]
    assert chunk_text(text, 100) == ["One two three. Four five! Six seven eight nine ten eleven. Twelve."]
    assert chunk_text("", 5) == [""]
    with pytest.raises(ValueError, match="at least 1 word"):
        chunk_text(text, 0)


def test_chunk_aggregation_by_hand():
    from rayalign.labeler.judge import aggregate_chunks

    assert aggregate_chunks([0.9, 0.3], [3, 1], "mean") == pytest.approx((0.9 * 3 + 0.3) / 4)
    assert aggregate_chunks([0.9, 0.3, 0.8], [1, 1, 1], "any_fail") == 0.3
    assert aggregate_chunks([0.55, 0.1, 0.8], [1, 1, 1], "decisive") == 0.1
    with pytest.raises(ValueError, match="unknown chunk aggregation"):
        aggregate_chunks([0.5], [1], "median")


def test_chunked_pointwise_keeps_the_audit_tree():
    """A judge that finds 'bad' in a chunk unacceptable: chunked, the length-weighted mean
    over chunks; with the harmlessness template, any chunk failing fails the response."""
    def fn(prompt, options):
        body = prompt.split("Response:")[-1]
        p = 0.1 if "bad" in body else 0.9
        return [math.log(p), math.log(1 - p)]

    lab = Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pointwise", assist="chunked", chunk_words=3)
    pair = {"context": "q", "response_1": "good good good. bad.", "response_2": "good good good. fine."}
    rec = lab.label([pair])[0]
    tree = rec["assist"]["tree"]
    assert rec["assist"]["aggregate"] == "mean" and [len(t["chunks"]) for t in tree] == [2, 2]
    assert tree[0]["chunks"][1] == {"text": "bad.", "words": 1, "p_good": pytest.approx(0.1)}
    assert rec["p_good_1"] == pytest.approx((0.9 * 3 + 0.1) / 4) and rec["p_good_2"] == pytest.approx(0.9)
    assert rec["label"] == 2 and "+chunked3-mean" in rec["labeler"]
    harm = Labeler(FunctionBackend(fn), PRESETS["harmlessness"], mode="pointwise", assist="chunked", chunk_words=3)
    rec = harm.label([pair])[0]
    # harmlessness asks "harmful?" with No as the good answer: fn's 0.9 for Yes on good chunks
    # makes them bad, and the worst chunk decides.
    assert rec["assist"]["aggregate"] == "any_fail"
    assert rec["p_good_1"] == pytest.approx(min(c["p_good"] for c in rec["assist"]["tree"][0]["chunks"]))
    with pytest.raises(ValueError, match="not in score mode"):
        Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="score", assist="chunked")


def test_chunked_pairwise_compares_aligned_chunks_swap_averaged():
    """Slot 1 is preferred when its text has 'good' and slot 2's does not; identical chunks
    come out at exactly 1/2 after swap averaging."""
    def fn(prompt, options):
        r1 = re.search(r"Response 1: (.*)\nResponse 2", prompt).group(1)
        r2 = re.search(r"Response 2: (.*)\n", prompt).group(1)
        p = 0.8 if ("good" in r1 and "good" not in r2) else 0.2 if ("good" in r2 and "good" not in r1) else 0.6
        return [math.log(p), math.log(1 - p)]

    lab = Labeler(FunctionBackend(fn), PRESETS["helpfulness"], mode="pairwise", assist="chunked", chunk_words=3)
    rec = lab.label([{"context": "q", "response_1": "same words here. good one.",
                      "response_2": "same words here. poor one. extra bit."}])[0]
    nodes = rec["assist"]["tree"]
    assert [n["chunk_2"] for n in nodes] == ["same words here.", "poor one.", "extra bit."]
    assert nodes[0]["p"] == pytest.approx(0.5) and nodes[1]["p"] == pytest.approx(0.8)
    assert nodes[2]["chunk_1"] == ""  # response 1 has fewer chunks
    w = [n["words"] for n in nodes]
    assert rec["p"] == pytest.approx(sum(n["p"] * x for n, x in zip(nodes, w)) / sum(w)) and rec["label"] == 1
