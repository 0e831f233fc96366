"""SteerLM: attribute strings, the verbosity rule, the labeler's 0-4 ratings, the attribute
predictor, and `rayalign steerlm annotate` + `train` end to end on tiny models."""
import json
import math

import pytest

from rayalign import steerlm
from rayalign.algos import stats
from rayalign.cli import main
from rayalign.config import SteerLMConfig
from rayalign.data import dedupe, load_rows, split_by_prompt


def test_attribute_strings():
    levels = {"helpfulness": 3.6, "correctness": 4, "coherence": 0.2, "complexity": 2.5, "verbosity": -1}
    # Rounded (half to even, as Python does) and clipped to 0-4, in the fixed order.
    assert steerlm.format_attributes(levels) == "helpfulness:4,correctness:4,coherence:0,complexity:2,verbosity:0"
    assert steerlm.parse_attributes("verbosity:4, helpfulness:1", defaults={a: 2 for a in steerlm.ATTRIBUTES}) == {
        "helpfulness": 1, "correctness": 2, "coherence": 2, "complexity": 2, "verbosity": 4}
    for bad, why in [("verbosity=4", "NAME:LEVEL"), ("verbosity:5", "outside 0-4"), ("verbosity:x", "not an integer"),
                     ("speed:2", "NAME:LEVEL"), ("verbosity:1", "no level for helpfulness")]:
        with pytest.raises(steerlm.SteerError, match=why):
            steerlm.parse_attributes(bad)
    p = steerlm.steer_prompt("What is Ray?", {a: 2 for a in steerlm.ATTRIBUTES})
    assert p == ("What is Ray?\n\n<attributes>helpfulness:2,correctness:2,coherence:2,complexity:2,verbosity:2"
                 "</attributes>")


def test_verbosity_by_word_count_quintiles():
    responses = [" ".join(["w"] * n) for n in range(1, 11)]  # 1..10 words
    lv, cuts = steerlm.word_levels(responses)
    # cut points: the 2nd, 4th, 6th, 8th smallest counts = 3, 5, 7, 9
    assert cuts == [3, 5, 7, 9]
    assert lv == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert steerlm.word_levels(["a b c d e f g h i j k l"], cuts)[0] == [4]


def test_spearman_and_mean_interval_by_hand():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their average rank: x ranks 1.5 1.5 3 4, y ranks 1 2 3 4.
    rx = [1.5, 1.5, 3, 4]
    mx = sum(rx) / 4
    want = sum((a - mx) * (b - 2.5) for a, b in zip(rx, [1, 2, 3, 4])) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * 5.0)
    assert stats.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(want)
    assert stats.spearman([1, 1, 1], [1, 2, 3]) == 0.0
    m = stats.mean_interval([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci95"] == pytest.approx([2 - stats.Z95 / math.sqrt(3), 2 + stats.Z95 / math.sqrt(3)])


def test_labeler_rates_an_attribute_as_an_expected_level():
    from rayalign.labeler.backends import FunctionBackend
    from rayalign.labeler.judge import Labeler
    from rayalign.labeler.templates import PRESETS

    seen = []

    def fn(prompt, options):
        seen.append((prompt, options))
        return [math.log(w) for w in (0.1, 0.1, 0.2, 0.2, 0.4)]  # P over "0".."4"

    lab = Labeler(FunctionBackend(fn), PRESETS["helpfulness"])
    assert lab.attribute_scores([("q", "an answer")], "verbosity") == [pytest.approx(1 * 0.1 + 2 * 0.2 + 3 * 0.2 + 4 * 0.4)]
    prompt, options = seen[0]
    assert options == ["0", "1", "2", "3", "4"]
    assert "Rate the response's verbosity (how much detail" in prompt and "Response: an answer" in prompt
    with pytest.raises(ValueError, match="no attribute 'speed'"):
        lab.attribute_scores([("q", "a")], "speed")


@pytest.mark.timeout(300)
def test_attribute_predictor_learns_verbosity(tiny_dir):
    from rayalign import data, models
    from rayalign.cluster.group import LocalGroup
    from rayalign.config import TrainConfig, ZeroConfig
    from rayalign.pipelines.steerlm import predictor_quality
    from rayalign.workers.reward import AttributeWorker

    texts = [" ".join(["word"] * (1 + (i * 7) % 40)) for i in range(120)]
    lv, _ = steerlm.word_levels(texts)
    tok = models.load_tokenizer(models.resolve("tiny-bert"))
    items = [{"ids": data.encode_rm(tok, "say something", t, 64), "y": [float(v), None]} for t, v in zip(texts, lv)]
    train, held = items[24:], items[:24]
    g = LocalGroup("attributes", AttributeWorker, threads=1)
    g.set_attributes(["verbosity", "helpfulness"])
    tr = TrainConfig(lr=3e-3, batch_size=8, micro_batch_size=8, lr_schedule="constant")
    g.init_model({"name": "tiny-bert"}, ZeroConfig().model_dump(), tr.model_dump(), 200)
    for step in range(60):
        batch = train[(step * 8) % 96:][:8]
        r = g.attribute_step(batch, 8)  # one labelled value per row: helpfulness is unlabelled
    assert sum(r["labels"]) == 8
    q = predictor_quality(g.predict([h["ids"] for h in held]), held, train, ["verbosity", "helpfulness"])
    print(q)
    assert "helpfulness" not in q  # no held-out labels to score it on
    assert q["verbosity"]["beats_the_mean"] and q["verbosity"]["spearman"] > 0.8, q


def steer_yaml(tmp_path):
    cfg = tmp_path / "steer.yaml"
    cfg.write_text(f"""
name: tiny-steer
model: {{name: tiny-llama}}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
labeler:
  backend: {{type: hf, group: {{workers: 1, cpus_per_worker: 0.5}}}}
steerlm:
  data: {{source: packaged:chatterbot, max_samples: 80, max_length: 192, eval_fraction: 0.25}}
  labels: {{max_samples: 40, control: {{helpfulness: verbosity}}}}
  samples: {{per_prompt: 1, max_new_tokens: 8, keep_unfinished: true, instructed: {{helpfulness: [0, 4]}},
             group: {{workers: 1, cpus_per_worker: 1}}}}
  predictor:
    model: {{name: tiny-bert}}
    group: {{workers: 1, cpus_per_worker: 1}}
    train: {{lr: 1.0e-3, batch_size: 8, micro_batch_size: 8, epochs: 2, lr_schedule: constant}}
  policy:
    group: {{workers: 2, cpus_per_worker: 0.5, zero: {{stage: 2}}}}
    train: {{lr: 3.0e-3, batch_size: 8, micro_batch_size: 2, max_steps: 4}}
  eval: {{prompts: 4, max_new_tokens: 8}}
""")
    return cfg


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_steerlm_annotate_train_generate(tmp_path, capsys):
    cfg = steer_yaml(tmp_path)
    run = tmp_path / "run"
    assert main(["steerlm", "annotate", str(cfg), "--run-dir", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())["steerlm_annotate"]
    assert s["label_origin"]["verbosity"] == "rule:words"
    assert s["label_origin"]["helpfulness"].startswith("labeler:") and s["label_origin"]["helpfulness"].endswith(
        "|less:verbosity")
    assert s["label_control"]["helpfulness"]["by"] == "verbosity"
    assert set(s["predicted_spearman"]["helpfulness"]) == {"correctness", "coherence", "complexity", "verbosity"}
    # 80 data rows less the repeats, plus one sampled answer per distinct prompt (the tiny
    # model's are cut at 8 tokens; kept here so the count is known)
    data_rows = {(r["prompt"], r["response"]) for r in load_rows("packaged:chatterbot", ["prompt", "response"], 80)}
    prompts = {p for p, _ in data_rows}
    assert s["repeated_rows_dropped"] == 80 - len(data_rows)
    assert s["sampled_answers"]["drawn"] == len(prompts)
    assert s["labelled_rows"] == 40 and s["annotated_rows"] == len(data_rows) + s["sampled_answers"]["kept"]
    assert set(s["predictor_heldout"]) == set(steerlm.ATTRIBUTES)
    rows = [json.loads(x) for x in (run / "attributes.jsonl").read_text().splitlines()]
    assert len(rows) == s["annotated_rows"] and all(set(r["attributes"]) == set(steerlm.ATTRIBUTES) for r in rows)
    assert {(r["prompt"], r["response"]) for r in rows if r["origin"] == "data"} == data_rows
    assert {r["prompt"] for r in rows if r["origin"] == "sampled"} <= prompts
    assert all(v in range(5) for r in rows for v in r["attributes"].values())
    # one sample per prompt, its helpfulness instruction alternating 0, 4 across the prompts
    # (in their order); data rows carry none
    asked = {r["prompt"]: r["instructed"]["helpfulness"] for r in rows if r["origin"] == "sampled"}
    order = list(dict.fromkeys(r["prompt"] for r in rows))
    assert asked and all(v == [0, 4][order.index(p) % 2] for p, v in asked.items())
    assert not any("instructed" in r for r in rows if r["origin"] == "data")
    bi = s["by_instruction"]["annotated"]["helpfulness"]
    assert set(bi) == {"0", "4"} and sum(bi[v]["verbosity"]["n"] for v in bi) == len(asked)
    lev0 = [r["attributes"]["verbosity"] for r in rows if r.get("instructed", {}).get("helpfulness") == 0]
    assert bi["0"]["verbosity"]["mean"] == pytest.approx(sum(lev0) / len(lev0))
    assert (run / "final" / "attributes" / "config.json").is_file()

    assert main(["steerlm", "train", str(cfg), "--run-dir", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())["steerlm"]
    held = list(dict.fromkeys(r["prompt"] for r in rows))[:round(len(prompts) * 0.25)]
    assert s["trained_rows"] == sum(r["prompt"] not in held for r in rows) and s["trained_sampled_rows"] > 0
    assert set(s["verbosity_length"]) == {"0", "1", "2", "3", "4"}
    assert -1 <= s["verbosity_spearman"] <= 1 and isinstance(s["verbosity_monotonic"], bool)
    assert s["helpfulness_judged"]["levels"] == [0, 4]
    cond = [json.loads(x) for x in (run / "steerlm_sft.jsonl").read_text().splitlines()]
    assert len(cond) == s["trained_rows"]
    assert all(any(r["prompt"].endswith(f"{v}</attributes>") for v in steerlm.PHRASES["verbosity"]) for r in cond)
    # the starting policy measured on the same prompts
    assert set(s["before_sft"]["verbosity_length"]) == {"0", "1", "2", "3", "4"}
    assert "before SFT" in (run / "steerability.md").read_text()
    # every answer kept for audit, and the summary's figures are theirs
    ans = json.loads((run / "steerability_answers.json").read_text())
    assert ans["prompts"] == held[:4] and [m["model"] for m in ans["models"]][1] == "tiny-llama"
    for m, x in zip(ans["models"], [s, s["before_sft"]]):
        assert all(len(m["verbosity"][str(v)]) == 4 for v in range(5))
        lengths = [len(a.split()) for a in m["verbosity"]["3"]]
        assert x["verbosity_length"]["3"]["mean"] == pytest.approx(sum(lengths) / 4)
        hi = [a["p_good"] for a in m["helpfulness"]["4"]]
        assert x["helpfulness_judged"]["p_good_high"] == pytest.approx(sum(hi) / 4)
    # no answer to a held-out prompt is trained on
    assert not {r["prompt"].split("\n\n<attributes>")[0] for r in cond} & set(held)
    assert "Steerability" in (run / "steerability.md").read_text()

    # the evaluation again, on another source's prompts: the trained policy is kept
    sft_dir = run / "final" / "sft" / "model.safetensors"
    mtime = sft_dir.stat().st_mtime
    assert main(["steerlm", "train", str(cfg), "--run-dir", str(run), "steerlm.eval.source=packaged:mixed-prompts",
                 "steerlm.eval.prompts=3"]) == 0
    s2 = json.loads((run / "summary.json").read_text())["steerlm"]
    other = list(dict.fromkeys(r["prompt"] for r in load_rows("packaged:mixed-prompts", ["prompt"])))[:3]
    assert s2["heldout_source"] == "packaged:mixed-prompts" and sft_dir.stat().st_mtime == mtime
    assert json.loads((run / "steerability_answers.json").read_text())["prompts"] == other
    assert "(packaged:mixed-prompts)" in (run / "steerability.md").read_text()

    capsys.readouterr()
    assert main(["steerlm", "generate", str(cfg), "--run-dir", str(run), "--prompt", "hello?",
                 "--attributes", "verbosity:4", "--max-new-tokens", "4"]) == 0
    assert "> hello?" in capsys.readouterr().out
    assert main(["steerlm", "generate", str(cfg), "--run-dir", str(run), "--prompt", "hello?",
                 "--attributes", "verbosity:9"]) == 2
    assert "verbosity's level 9 is outside 0-4" in capsys.readouterr().err


def test_labeler_ratings_become_quantile_levels():
    from rayalign.pipelines.steerlm import scaled

    values = {"helpfulness": [1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09, 1.10],
              "verbosity": [0.0, 4.0] * 5}
    origin = {"helpfulness": "labeler:x", "verbosity": "rule:words"}
    out = scaled(values, origin, "quantiles")
    # Ratings bunched within 0.1 spread over all five levels; a rule's levels stay as measured.
    assert out["helpfulness"] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4] and out["verbosity"] == values["verbosity"]
    assert scaled(values, origin, "absolute") == values


def test_repeats_dropped_and_held_out_prompts_never_trained_on():
    rows = [{"prompt": "a", "response": "x"}, {"prompt": "b", "response": "y"}, {"prompt": "a", "response": "x"},
            {"prompt": "a", "response": "z"}, {"prompt": "c", "response": "y"}, {"prompt": "d", "response": "w"}]
    u = dedupe(rows, ["prompt", "response"])
    assert u == [rows[0], rows[1], rows[3], rows[4], rows[5]]
    train, held = split_by_prompt(u, 0.25)
    # 4 distinct prompts, a quarter held out: "a" with both its answers
    assert held == ["a"] and train == [rows[1], rows[4], rows[5]]
    assert split_by_prompt(u, 0.0) == (u, [])


def test_sampled_answers_join_the_rows_after_their_prompt():
    from rayalign.pipelines.steerlm import with_samples

    rows = [{"prompt": "p", "response": "one", "origin": "data"}, {"prompt": "q", "response": "two", "origin": "data"},
            {"prompt": "p", "response": "three", "origin": "data"}]
    answers = {"p": [{"response": " long answer ", "ended": True}, {"response": "cut", "ended": False}],
               "q": [{"response": "two", "ended": True}, {"response": "  ", "ended": True}]}
    out, counts = with_samples(rows, answers)
    assert [(r["response"], r["origin"]) for r in out] == [("one", "data"), ("long answer", "sampled"),
                                                           ("two", "data"), ("three", "data")]
    # q's sample repeats its data answer (dropped as a repeat), one is blank, one was cut
    assert counts == {"drawn": 4, "unfinished": 1, "empty": 1, "kept": 1}
    out, counts = with_samples(rows, answers, keep_unfinished=True)
    assert [r["response"] for r in out] == ["one", "long answer", "cut", "two", "three"] and counts["kept"] == 2


def test_instructed_samples_cycle_levels_and_are_summarised_by_instruction():
    from rayalign.pipelines.steerlm import by_instruction, with_samples

    ins = {"helpfulness": [0, 4], "verbosity": [1, 2, 3]}
    assert steerlm.instructed_levels(ins, 0, 0) == {"helpfulness": 0, "verbosity": 1}
    assert steerlm.instructed_levels(ins, 0, 1) == {"helpfulness": 4, "verbosity": 2}
    assert steerlm.instructed_levels(ins, 3, 1) == {"helpfulness": 0, "verbosity": 2}
    assert steerlm.instructed_levels({}, 5, 2) == {}
    with pytest.raises(steerlm.SteerError, match="levels 0-4"):
        steerlm.instructed_levels({"helpfulness": [5]}, 0, 0)
    # the instruction travels with its answer; the data's rows have none
    rows = [{"prompt": "p", "response": "d", "origin": "data"}]
    answers = {"p": [{"response": "no", "ended": True, "instructed": {"helpfulness": 0}},
                     {"response": "yes, here", "ended": True, "instructed": {"helpfulness": 4}},
                     {"response": "sure", "ended": True, "instructed": {"helpfulness": 4}}]}
    out, _ = with_samples(rows, answers)
    assert [r.get("instructed") for r in out] == [None, {"helpfulness": 0}, {"helpfulness": 4}, {"helpfulness": 4}]
    got = by_instruction(out, {"helpfulness": [9.0, 1.0, 3.0, 2.0]})["helpfulness"]
    assert set(got) == {"0", "4"}
    assert got["0"]["helpfulness"]["mean"] == 1.0 and got["0"]["helpfulness"]["n"] == 1
    assert got["4"]["helpfulness"]["mean"] == 2.5 and got["4"]["helpfulness"]["n"] == 2


def test_labels_controlled_for_a_measured_attribute():
    # means at control 0: 2, at 1: 4; overall 3
    out, means = steerlm.controlled([1.0, 3.0, 2.0, 6.0], [0, 0, 1, 1])
    assert out == [2.0, 4.0, 1.0, 5.0] and means == {0: 2.0, 1: 4.0}
    # what the control explained is gone: a label that only tracks it becomes constant
    assert steerlm.controlled([1.0, 1.0, 3.0], [0, 0, 4])[0] == [5 / 3] * 3
    with pytest.raises(steerlm.SteerError, match="3 values for 2 control levels"):
        steerlm.controlled([1.0, 2.0, 3.0], [0, 1])
    base = {"data": {"source": "packaged:chatterbot"}}
    SteerLMConfig(**base, labels={"control": {"helpfulness": "verbosity"}})
    for bad in ({"helpfulness": "correctness"}, {"verbosity": "verbosity"}, {"humour": "verbosity"}):
        with pytest.raises(ValueError, match="labels.control"):
            SteerLMConfig(**base, labels={"control": bad})


def test_instructed_samples_config_checked():
    base = {"data": {"source": "packaged:chatterbot"}}
    SteerLMConfig(**base, samples={"per_prompt": 2, "instructed": {"helpfulness": [0, 4]}})
    for bad, msg in [({"per_prompt": 2, "instructed": {"humour": [0]}}, "must name an attribute"),
                     ({"per_prompt": 2, "instructed": {"helpfulness": []}}, "non-empty list"),
                     ({"per_prompt": 2, "instructed": {"helpfulness": [0, 7]}}, "levels 0-4"),
                     ({"per_prompt": 0, "instructed": {"helpfulness": [0, 4]}}, "per_prompt >= 1")]:
        with pytest.raises(ValueError, match=msg):
            SteerLMConfig(**base, samples=bad)


def test_attribute_levels_rendered_as_words():
    levels = {"helpfulness": 4, "correctness": 3, "coherence": 2, "complexity": 1, "verbosity": 0}
    assert steerlm.render_attributes(levels, style="words") == (
        "Be as helpful as possible. Be accurate. Be fairly coherent. Use simple words. Answer in a few words.")
    assert steerlm.render_attributes(levels) == steerlm.format_attributes(levels)
    # an attribute without phrases by name and level word; the checks of the codes apply
    assert steerlm.render_attributes({"humour": 3.4}, ["humour"], "words") == "Humour: high."
    with pytest.raises(steerlm.SteerError, match="no value for verbosity"):
        steerlm.render_attributes({"helpfulness": 1}, ["helpfulness", "verbosity"], "words")
    with pytest.raises(steerlm.SteerError, match="expected one of codes, words"):
        steerlm.render_attributes(levels, style="emoji")
    p = steerlm.steer_prompt("Hi?", dict(levels, verbosity=4), style="words")
    assert p.startswith("Hi?\n\n<attributes>") and p.endswith("Answer in detail.</attributes>")


def test_labeler_judges_an_attribute_by_p_good_or_rates_it(tmp_path):
    from rayalign.config import load_config
    from rayalign.labeler.backends import FunctionBackend
    from rayalign.labeler.judge import Labeler
    from rayalign.labeler.templates import PRESETS
    from rayalign.pipelines.steerlm import seed_labels

    def fn(prompt, options):
        if options == ["0", "1", "2", "3", "4"]:  # a rating: P = .1 .1 .2 .2 .4 -> 2.7
            return [math.log(w) for w in (0.1, 0.1, 0.2, 0.2, 0.4)]
        good = 0.8 if "Response: a fine answer" in prompt else 0.25
        return [math.log(good), math.log(1 - good)]  # [Yes, No]

    cfg = load_config(steer_yaml(tmp_path), ["steerlm.attributes=[helpfulness,correctness,verbosity]",
                                             "steerlm.labels.judged={helpfulness: p_good}",
                                             "steerlm.eval.base={helpfulness: 4, correctness: 4, verbosity: 2}"])
    rows = [{"prompt": "q", "response": "a fine answer"}, {"prompt": "q", "response": "bad"}]
    lab = Labeler(FunctionBackend(fn), PRESETS["helpfulness"])
    items, values, origin = seed_labels(cfg, lab, rows)
    assert items == [("q", "a fine answer"), ("q", "bad")]
    # P(good) 0.8 and 0.25 on the 0-4 scale; correctness rated; verbosity measured
    assert values["helpfulness"] == [pytest.approx(3.2), pytest.approx(1.0)]
    assert values["correctness"] == [pytest.approx(2.7)] * 2
    assert origin["helpfulness"].startswith("labeler:p_good:") and origin["correctness"].startswith("labeler:pointwise")
    assert origin["verbosity"] == "rule:words"
    with pytest.raises(Exception, match="labels.judged names .'speed'."):
        load_config(steer_yaml(tmp_path), ["steerlm.labels.judged={speed: p_good}"])
    with pytest.raises(Exception, match="which labels.rules measures"):
        load_config(steer_yaml(tmp_path), ["steerlm.labels.judged={verbosity: p_good}"])
