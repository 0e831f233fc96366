"""Stage recovery without Ray: which errors a stage recovers from, how often, what is
recorded; the checkpoint cadence."""
import json

import pytest

from rayalign.cluster.group import GroupError, LostRankError
from rayalign.config import ConfigError, load_config
from rayalign.pipelines.common import Cadence, RecoveryError, recovering
from rayalign.tracking import read_metrics


def _cfg(tmp_path, max_failures=2):
    return load_config(data={"name": "t", "tracking": {"root": str(tmp_path), "wandb": "disabled"},
                             "cluster": {"max_failures": max_failures}})


class Flaky:
    """A stage that loses a rank on its first ``fails`` attempts; records how it was called."""

    def __init__(self, fails, exc=None):
        self.fails, self.calls = fails, []
        self.exc = exc or LostRankError("policy.train_step: rank(s) [1] died during the call (killed)")

    def __call__(self, run_dir, resume):
        self.calls.append((run_dir, resume))
        if len(self.calls) <= self.fails:
            raise self.exc
        return {"steps": 6}


def test_a_lost_rank_runs_the_stage_again_resumed_and_is_recorded(tmp_path, capsys):
    cfg, run = _cfg(tmp_path), tmp_path / "run"
    stage = Flaky(2)
    out = recovering(cfg, "sft", "sft", stage, run, False)
    assert stage.calls == [(run, False), (run, True), (run, True)]
    assert out["steps"] == 6 and [r["failure"] for r in out["recoveries"]] == [1, 2]
    assert "rank(s) [1] died" in out["recoveries"][0]["what"]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["failure"] for r in summary["sft"]["recoveries"]] == [1, 2]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl", "sft_recovery")] == [1, 2]
    assert capsys.readouterr().err.count("Starting the stage again") == 2


def test_past_max_failures_names_the_failure_and_the_resume_command(tmp_path):
    cfg, run = _cfg(tmp_path, max_failures=1), tmp_path / "run"
    stage = Flaky(5)
    with pytest.raises(RecoveryError, match=r"failure 2, past cluster.max_failures \(1\)") as e:
        recovering(cfg, "rm", "rm", stage, run, False)
    assert f"rayalign rm CONFIG --resume {run}" in str(e.value) and "rank(s) [1] died" in str(e.value)
    assert len(stage.calls) == 2


def test_bugs_and_bad_input_are_not_retried(tmp_path):
    for exc in (ValueError("bad row 3"), GroupError("policy.train_step: rank 0 raised KeyError")):
        stage = Flaky(1, exc)
        with pytest.raises(type(exc)):
            recovering(_cfg(tmp_path), "sft", "sft", stage, tmp_path / "run", False)
        assert len(stage.calls) == 1


def test_a_new_run_directory_is_made_once_and_kept_across_attempts(tmp_path):
    stage = Flaky(1)
    recovering(_cfg(tmp_path), "label", "label", stage, None, False)
    (first, _), (second, _) = stage.calls
    assert first == second and first.parent == tmp_path and first.name.startswith("t-label-")


def test_cadence_every_n_and_by_minutes(monkeypatch):
    c = Cadence(3, 0)
    assert [d for d in range(1, 10) if c.due(d, 9)] == [3, 6]  # never at the end: the caller saves
    now = [1000.0]
    monkeypatch.setattr("rayalign.pipelines.common.time.time", lambda: now[0])
    c = Cadence(0, 2)
    assert not c.due(1, 100)
    now[0] += 119
    assert not c.due(2, 100)
    now[0] += 1
    assert c.due(3, 100) and not c.due(4, 100)  # the clock restarts at each save
    now[0] += 120
    assert c.due(5, 100)
    assert not any(Cadence(0, 0).due(d, 9) for d in range(1, 10))


def test_call_timeouts_are_per_role(tmp_path):
    cfg = load_config(data={"ppo": {"prompts": {"source": "x.jsonl"}, "rewards": [{"type": "rm"}],
                                    "policy": {"group": {"call_timeout_s": 45}}}})
    assert cfg.ppo.policy.group.call_timeout_s == 45 and cfg.ppo.reference.call_timeout_s == 1800
    with pytest.raises(ConfigError, match="moved to rollout.group.call_timeout_s"):
        load_config(data={"rollout": {"call_timeout_s": 60}})
