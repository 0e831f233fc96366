import json

import pytest
import torch

from rayalign import data, models


def test_tiny_model_is_deterministic_and_cached(tiny_dir):
    assert (tiny_dir / "config.json").is_file()
    assert models.resolve("tiny-llama") == tiny_dir
    other = models.resolve("tiny-llama", seed=1)
    a = models.load_causal_lm(tiny_dir).state_dict()
    b = models.load_causal_lm(other).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    tok = models.load_tokenizer(tiny_dir)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_model_spec_errors(tmp_path):
    with pytest.raises(models.ModelError, match="hub id"):
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(models.ModelError, match="holds no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(models.ModelError, match="unknown packaged model"):
        models.prepare("gpt-5")


def test_model_list_names_packaged_and_tiny():
    names = {r["name"] for r in models.list_models()}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "tiny-llama", "tiny-bert"} <= names


def test_packaged_sources():
    harmful, _ = data.read_rows("packaged:donotanswer")
    assert len(harmful) == 939 and all(r["prompt"] for r in harmful)
    qa, _ = data.read_rows("packaged:chatterbot")
    assert len(qa) > 1000 and all(r["prompt"] and r["response"] for r in qa)
    with pytest.raises(data.DataError, match="unknown packaged source"):
        data.read_rows("packaged:nope")


def test_malformed_jsonl_names_file_and_row(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    with pytest.raises(data.DataError, match=r"d\.jsonl: row 2: not valid JSON"):
        data.read_rows(str(f))
    f.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(data.DataError, match="row 2: expected a JSON object"):
        data.read_rows(str(f))
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match="row 2: not valid UTF-8"):
        data.read_rows(str(f))
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl: row 2: missing field 'response'"):
        data.load_rows(str(f), ["prompt", "response"])
    f.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(data.DataError, match="row 1: field 'response' must be a string, got int"):
        data.load_rows(str(f), ["prompt", "response"])
    f.write_text('{"prompt": " ", "response": "x"}\n')
    with pytest.raises(data.DataError, match="row 1: field 'prompt' is empty"):
        data.load_rows(str(f), ["prompt", "response"])


def test_parquet_json_and_saved_dataset(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    ds = data.as_dataset(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for src in ("d.parquet", "saved", "d.json"):
        got = data.load_rows(str(tmp_path / src), ["prompt", "response"])
        assert sorted(r["prompt"] for r in got) == [f"q{i}" for i in range(5)]
    with pytest.raises(data.DataError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        data.read_rows(str(tmp_path / "x.csv"))
    with pytest.raises(data.DataError, match="does not exist"):
        data.read_rows(str(tmp_path / "none.jsonl"))


def test_encode_sft_masks_the_prompt(tiny_dir):
    tok = models.load_tokenizer(tiny_dir)
    ex = data.encode_sft(tok, "what is the capital of france?", "paris.", max_length=128)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    learned = [t for t, l in zip(ids, labels) if l != -100]
    assert tok.decode(learned) == "paris.<|end|>"  # the response and the end of turn
    prompt_part = tok.decode([t for t, l in zip(ids, labels) if l == -100])
    assert prompt_part == "<|user|>what is the capital of france?<|end|><|assistant|>"
    short = data.encode_sft(tok, "what is the capital of france?", "paris.", max_length=8)
    assert len(short["input_ids"]) == 8
    from rayalign.algos.lm import layout_labeled

    t, labels = layout_labeled([ex, short], tok.pad_token_id)
    assert t.ids.shape == (2, len(ids))
    assert t.attention_mask[1].sum() == 8
    assert (labels[1, 8:] == -100).all()
    assert labels[0].tolist() == list(ex["labels"])
    packed, plabels = layout_labeled([short, short, ex], tok.pad_token_id, packed=True)
    assert packed.ids.shape == (2, len(ids)) and packed.attention_mask is None  # the two short ones share a row
    assert packed.position_ids[1, :16].tolist() == list(range(8)) * 2
    # the second sequence's first token is never a target of the first's last position
    assert plabels[1, 8] == -100 and plabels[0].tolist() == [-100] + list(ex["labels"][1:])


def test_encode_rm_cuts_the_prompt_first_and_both_when_the_response_alone_is_too_long():
    from rayalign import data, models

    tok = models.load_tokenizer(models.resolve("tiny-bert"))
    tok.chat_template = None  # an encoder's text-pair path (MiniLM's)
    ids = data.encode_rm(tok, "question " * 100, "answer " * 10, 48)
    assert len(ids) == 48 and tok.decode(ids).count("answer") == 10  # the whole response is kept
    # A response longer than max_length: cutting only the prompt cannot fit it (this raised).
    ids = data.encode_rm(tok, "question " * 10, "answer " * 400, 48)
    assert len(ids) == 48


def test_harm_request_splits_and_harmbench():
    dev, _ = data.read_rows("packaged:harm-requests-dev")
    held, _ = data.read_rows("packaged:harm-requests-heldout")
    # Two disjoint halves of the same requests, kinds alternating, each request once.
    assert not {r["prompt"] for r in dev} & {r["prompt"] for r in held}
    for rows in (dev, held):
        assert len(rows) > 300 and len({r["prompt"] for r in rows}) == len(rows)
        assert [r["kind"] for r in rows[:4]] == ["harmful", "benign", "harmful", "benign"]
    everything = {r["prompt"] for r in data.read_rows("packaged:donotanswer")[0]}
    assert {r["prompt"] for r in dev + held if r["kind"] == "harmful"} <= everything
    hb, _ = data.read_rows("packaged:harmbench")
    assert len(hb) == 200 and all(r["kind"] == "harmful" and r["prompt"] for r in hb)


def test_safety_sft_data_teaches_refusals_only_on_questions_ppo_never_sees():
    from rayalign.refusal import is_refusal

    rows, _ = data.read_rows("packaged:chatterbot-safety")
    taught = [r for r in rows if r["category"] == "refusal"]
    assert len(taught) == 110 and len(rows) == 440
    assert all(r["response"] in data.REFUSALS and is_refusal(r["response"]) for r in taught)
    benign = [r for r in rows if r["category"] != "refusal"]
    chatter = {(r["prompt"], r["response"]) for r in data.read_rows("packaged:chatterbot")[0]}
    assert all((r["prompt"], r["response"]) in chatter for r in benign)
    ppo_prompts = {r["prompt"] for r in data.read_rows("packaged:mixed-prompts")[0]}
    assert not {r["prompt"] for r in taught} & ppo_prompts
    # The same rows every time: a run's SFT data is reproducible.
    assert rows == data.read_rows("packaged:chatterbot-safety")[0]


def test_packaged_names_are_found_anywhere_in_a_config():
    tree = {"model": {"name": "smollm2-135m-instruct"},
            "labeler": {"backend": {"model": {"name": "qwen2.5-coder-1.5b-instruct"}}},
            "rm": {"model": {"name": "all-minilm-l6-v2"}}, "sft": {"name": "not-a-model"},
            "ppo": {"rewards": [{"type": "rm", "path": "/some/dir"}, {"path": "smollm2-135m-instruct"}]}}
    assert models.packaged_names(tree) == ["smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct",
                                           "all-minilm-l6-v2"]
