"""The typed batch and Rows handles (no Ray): columns, selection, shuffles, splits, errors."""
import numpy as np
import pytest

from rayalign.batch import Batch, BatchError, Ragged, Rows, column, frame, put, sizeof, task, unframe

SAMPLES = [
    {"prompt": "hé", "prompt_ids": [1, 2], "response_ids": [3, 4, 5], "ended": True, "rollout_logprobs": [-0.5, -1.0, -2.0]},
    {"prompt": "b", "prompt_ids": [6], "response_ids": [7], "ended": False, "rollout_logprobs": None},
    {"prompt": "", "prompt_ids": [8, 9, 10], "response_ids": [11, 12], "ended": True, "rollout_logprobs": [-0.25, -4.0]},
]


def test_rows_round_trip_with_types_and_missing_values():
    b = Batch.from_rows(SAMPLES)
    assert len(b) == 3
    assert b.columns["prompt_ids"].values.dtype == np.int32
    assert b.columns["prompt_ids"].offsets.tolist() == [0, 2, 3, 6]
    assert b.columns["ended"].dtype == bool
    assert not b.complete("rollout_logprobs") and b.complete("response_ids")
    assert b.to_rows() == SAMPLES
    # 3+1+2 response ids and 1+2+3 prompt ids (int32) + 4 offsets each (int64) + ...
    assert b.columns["response_ids"].nbytes == 6 * 4 + 4 * 8


def test_schema_is_enforced():
    with pytest.raises(BatchError, match="not declared"):
        Batch.from_rows([{"promt": "x"}])
    with pytest.raises(BatchError, match="not nullable"):
        Batch.from_rows([{"response_ids": None}])
    with pytest.raises(BatchError, match="holds float64"):
        Batch({"score": np.zeros(2)})
    with pytest.raises(BatchError, match="has 2 rows"):
        Batch({"score": np.zeros(3, np.float32), "ended": np.zeros(2, bool)})
    with pytest.raises(BatchError, match="cannot join"):
        Batch.from_rows(SAMPLES).with_columns({"score": np.zeros(2, np.float32)})


def test_take_concat_and_join():
    b = Batch.from_rows(SAMPLES)
    t = b.take(np.array([2, 0]))
    assert t.to_rows() == [SAMPLES[2], SAMPLES[0]]
    c = Batch.concat([b, t])
    assert c.get("response_ids") == [[3, 4, 5], [7], [11, 12], [11, 12], [3, 4, 5]]
    assert c.get("rollout_logprobs")[1] is None
    j = b.with_columns({"score": column("score", [1.0, 2.0, 3.0])})
    assert j.get("score") == [1.0, 2.0, 3.0] and j.get("prompt") == ["hé", "b", ""]


def test_frame_and_unframe():
    col = Ragged.of([np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)], "float32")
    t, m = frame(col, 3)
    assert t.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    assert m.tolist() == [[1, 1, 0], [1, 0, 0]]
    back = unframe(t, [2, 1])
    assert back.values.tolist() == [1.0, 2.0, 3.0] and back.offsets.tolist() == [0, 2, 3]


def _rows(n_pieces=3, per=4):
    pieces = tuple((Batch({"score": np.arange(i * per, (i + 1) * per, dtype=np.float32)}), per)
                   for i in range(n_pieces))
    return Rows(pieces)


def test_rows_split_take_and_shuffle_select_the_right_rows():
    r = _rows()
    assert len(r) == 12
    parts = r.split(5)
    assert [len(p) for p in parts] == [3, 3, 2, 2, 2]
    assert [x for p in parts for x in p.load().get("score")] == list(range(12))
    assert r.take(3, 6).load().get("score") == [3.0, 4.0, 5.0]
    s = r.shuffled(11)
    # A fixed permutation of all rows, by halves and then by rank parts.
    whole = s.load().get("score")
    assert sorted(whole) == list(range(12)) and whole != list(range(12))
    half = s.take(6, 12)
    assert [x for p in half.split(2) for x in p.load().get("score")] == whole[6:]
    assert s.load().get("score") == r.shuffled(11).load().get("score")  # same seed, same order
    with pytest.raises(BatchError, match="whole, unshuffled"):
        s.shuffled(3)
    with pytest.raises(BatchError, match="out of"):
        r.take(5, 13)


def test_rows_load_reads_only_the_pieces_its_rows_are_in():
    r = _rows()
    bad = Rows(r.pieces[:1] + (("not a batch", 4),) + r.pieces[2:])
    assert bad.take(0, 4).load().get("score") == [0.0, 1.0, 2.0, 3.0]
    assert bad.take(8, 10).load().get("score") == [8.0, 9.0]
    with pytest.raises(BatchError, match="not an object reference"):
        bad.take(3, 5).load()
    wrong = Rows(((Batch({"score": np.zeros(2, np.float32)}), 3),))
    with pytest.raises(BatchError, match="handle says 3"):
        wrong.load()


def test_in_process_task_and_sizes():
    rows = put(Batch.from_rows(SAMPLES), remote=False)
    assert rows.complete == ("prompt", "prompt_ids", "response_ids", "ended")

    def lengths(r):
        b = r.load()
        out = Batch({"score": column("score", [float(len(x)) for x in b.get("response_ids")])})
        return {"rows": len(out), "complete": ["score"]}, out

    meta, got = task(lengths, rows)
    assert got.load().get("score") == [3.0, 1.0, 2.0] and got.complete == ("score",)
    assert sizeof({"a": np.zeros(10, np.float32), "b": [1, 2]}) == 1 + 40 + 1 + 24


def test_split_methods_take_rows_and_answer_batches():
    """The dispatch wrapper: a worker method given Rows sees per-row dicts (or one column)
    and answers (meta, Batch) for its declared output."""
    from rayalign.cluster.worker import SPLIT, dispatch

    class W:
        @dispatch(SPLIT, out="rows", takes="prompt")
        def echo(self, prompts, k=1):
            return [{"response": p * k, "ended": True} for p in prompts]

        @dispatch(SPLIT)
        def count(self, rows):
            return [len(rows)]

    rows = put(Batch({"prompt": column("prompt", ["a", "bc"])}), remote=False)
    meta, b = W().echo(rows, 2)
    assert meta["rows"] == 2 and b.to_rows() == [{"response": "aa", "ended": True, "prompt": "a"},
                                                 {"response": "bcbc", "ended": True, "prompt": "bc"}]
    assert W().echo(["x"]) == [{"response": "x", "ended": True}]  # lists as before
    assert W().count(rows.take(1, 2)) == [1]
