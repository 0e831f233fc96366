"""Human-labelled pairs: conversion and split are deterministic, reserved tasks are refused.

The task files here are written by the test in BIG-bench's format (the real ones are fetched
at first use and checked by the slow test)."""
import json
from pathlib import Path

import pytest

from rayalign import human_pairs as hp
from rayalign.data import DataError

TASKS = (hp.Task("simple_ethical_questions", "harmless", 50),
         hp.Task("misconceptions", "honest", 50, prefix="Is the following statement true or false?",
                 options={"T": "True.", "F": "False."}))


def write_tasks(root: Path, order=1) -> Path:
    ethics = [{"input": f"Situation {i}. Which option is right?",
               "target_scores": {f"good {i}": 1, f"bad {i}": 0, "I prefer not to say": 0}} for i in range(20)]
    ethics.append({"input": "graded", "target_scores": {"a": 0.5, "b": 0.5}})      # no clean pair: skipped
    ethics.append({"input": "two right", "target_scores": {"a": 1, "b": 1, "c": 0}})  # skipped
    misc = [{"input": f"Statement {i}.", "target_scores": {"T": i % 2, "F": 1 - i % 2}} for i in range(20)]
    for name, ex in (("simple_ethical_questions", ethics), ("misconceptions", misc)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "task.json").write_text(json.dumps({"task_prefix": "IGNORED? ", "examples": ex[::order]}))
    return root


def test_conversion_is_deterministic_and_correct(tmp_path):
    a = hp.convert(write_tasks(tmp_path / "a"), TASKS)
    b = hp.convert(write_tasks(tmp_path / "b", order=-1), TASKS)  # file order does not matter
    assert a == b
    assert len(a) == 40
    for r in a:
        chosen = r[f"response_{r['gold']}"]
        rejected = r[f"response_{3 - r['gold']}"]
        if r["task"] == "simple_ethical_questions":
            i = r["prompt"].split("Situation ")[1].split(".")[0]
            assert chosen == f"good {i}" and rejected in (f"bad {i}", "I prefer not to say")
            assert r["prompt"].startswith("IGNORED?")  # the task's own prefix is kept
            assert r["category"] == "harmless"
        else:
            i = int(r["prompt"].split()[-1].rstrip("."))
            assert r["prompt"].startswith("Is the following statement true or false?\n")
            assert chosen == ("True." if i % 2 else "False.") and rejected != chosen
    assert {r["gold"] for r in a} == {1, 2}  # the chosen slot varies
    assert len({r["id"] for r in a}) == len(a)


def test_split_is_fixed_and_both_halves_are_used(tmp_path):
    rows = hp.convert(write_tasks(tmp_path), TASKS)
    assert {r["split"] for r in rows} == {"dev", "heldout"}
    for r in rows:
        q = r["prompt"].split("\n")[-1]  # the example's input, after the task prefix
        assert r["split"] == hp.split_of(r["task"], q)
    assert hp.split_of("t", "q") == hp.split_of("t", "q")


def test_cap_keeps_a_hash_ordered_prefix(tmp_path):
    root = write_tasks(tmp_path)
    small = hp.convert(root, (hp.Task("simple_ethical_questions", "harmless", 5),))
    big = hp.convert(root, (hp.Task("simple_ethical_questions", "harmless", 50),))
    assert small == big[:5]


def test_reserved_tasks_are_never_read(tmp_path):
    with pytest.raises(DataError, match="reserved"):
        hp.convert(tmp_path, (hp.Task("hhh_alignment/honest", "honest", 10),))
    assert all(t.path.split("/")[0] not in hp.RESERVED for t in hp.TASKS)


def test_prepare_uses_a_cached_set_without_network(tmp_path):
    root = tmp_path / "hp"
    root.mkdir()
    rows = hp.convert(write_tasks(tmp_path / "t"), TASKS)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert hp.prepare(root=root) == root
    with pytest.raises(DataError, match="unknown split"):
        hp.load("train")


def test_prepare_builds_the_set_from_hand_placed_tasks_without_network(tmp_path):
    """Where the index does not serve BIG-bench, its benchmark_tasks copied under the cache
    are converted there, as a fetched copy would be."""
    root = tmp_path / "hp"
    write_tasks(root / "tasks")
    assert hp.prepare(say=lambda s: None, root=root, tasks=TASKS) == root
    got = [json.loads(l) for l in (root / "pairs.jsonl").read_text().splitlines()]
    assert got == hp.convert(root / "tasks", TASKS) and len(got) > 30
    assert json.loads((root / "manifest.json").read_text())["pairs"] == len(got)
    assert not (root / "pairs.jsonl.tmp").exists()


def test_an_index_that_does_not_serve_bigbench_is_asked_once_and_nothing_is_downloaded(tmp_path, monkeypatch):
    asked = []

    def pip(*args, timeout=0):
        asked.append(args[:2])
        return "bigbench (0.0.1)\nAvailable versions: 0.0.1\n" if args[0] == "index" else ""

    monkeypatch.setattr(hp, "_pip", pip)
    monkeypatch.setattr(hp, "_SERVED", {})
    monkeypatch.setattr(hp, "_download_sdist", lambda dest: pytest.fail("nothing should be downloaded"))
    said = []
    for _ in range(2):
        with pytest.raises(DataError) as err:
            hp.prepare(say=said.append, root=tmp_path / "hp")
        assert "serves bigbench 0.0.1, not 1.0.0" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert asked == [("index", "versions")] and said == []
    assert not (tmp_path / "hp").exists() and not list(tmp_path.glob(".human-pairs.*"))


def test_index_addresses_come_from_pips_configuration(monkeypatch):
    monkeypatch.setattr(hp, "_pip", lambda *a, timeout=0: (
        "global.index-url='https://mirror.example/simple'\n"
        ":env:.extra-index-url='file:///a/simple file:///b/simple'\n:env:.default-timeout='180'\n"))
    assert hp._index_urls() == ["https://mirror.example/simple", "file:///a/simple", "file:///b/simple"]
    monkeypatch.setattr(hp, "_pip", lambda *a, timeout=0: ":env:.extra-index-url='file:///a/simple'\n")
    urls = hp._index_urls()
    assert urls[1:] == ["file:///a/simple"] and urls[0].endswith("/simple")  # pip's own default first
