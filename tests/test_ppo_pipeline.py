"""`rayalign ppo` and `rayalign run` end to end on tiny models: run directory, kill and
resume, reward sources, the staged pipeline, and clear errors for bad settings."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayalign.cli import main
from rayalign.config import ConfigError, load_config
from rayalign.rollout import vllm_available
from rayalign.tracking import read_metrics

TESTS = Path(__file__).parent
pytestmark = [pytest.mark.ray]


def ppo_yaml(tmp_path, iterations=6, save_every=2, extra="", model="{name: tiny-llama}"):
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"""
name: tiny-ppo
model: {model}
cluster: {{num_cpus: 2, object_store_memory_mb: 150}}
tracking: {{root: {tmp_path / 'runs'}, wandb: disabled}}
labeler:
  backend: {{type: hf, group: {{workers: 1, cpus_per_worker: 0.25, threads_per_worker: 1}}}}
ppo:
  prompts: {{source: packaged:mixed-prompts, max_samples: 60, eval_prompts: 4}}
  policy:
    group: {{workers: 2, cpus_per_worker: 0.5, zero: {{stage: 2}}}}
    train: {{lr: 3.0e-3, lr_schedule: constant, micro_batch_size: 2}}
  critic:
    group: {{workers: 1, cpus_per_worker: 0.25}}
    train: {{lr: 3.0e-3, lr_schedule: constant, micro_batch_size: 4}}
  reference: {{workers: 1, cpus_per_worker: 0.25}}
  rewards:
    - {{type: function, function: "ppo_rewards:vowel_share"}}
  algo: {{iterations: {iterations}, prompts_per_iteration: 8, max_new_tokens: 16, temperature: 1.0,
          epochs: 2, minibatches: 2, save_every: {save_every}, defer_critic_update: true}}
  eval: {{judge_gold: "packaged:hhh-pairs", judge_gold_samples: 8, max_new_tokens: 8}}
{extra}""")
    return cfg


# vLLM's CPU kernels need a head size of 32 or more: the tiny model with 2 heads of 64.
VLLM_MODEL = ("{name: tiny-llama, overrides: {hidden_size: 128, intermediate_size: 256, num_attention_heads: 2, "
              "num_key_value_heads: 1, head_dim: 64}}")
VLLM_ROLLOUT = """
rollout: {engine: vllm, group: {workers: 1, cpus_per_worker: 0.25, threads_per_worker: 1}, kv_cache_gb: 0.25,
          max_model_len: 512, tis_cap: 2.0, sync_bucket_mb: 0.2}
"""


def cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "rayalign.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def by_step(run_dir):
    """The last row logged for each iteration (a killed run may have logged one twice)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "ppo")}


@pytest.mark.timeout(600)
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_ppo_with_a_vllm_rollout_engine(tmp_path):
    cfg = ppo_yaml(tmp_path, iterations=3, save_every=0, model=VLLM_MODEL, extra=VLLM_ROLLOUT)
    run_dir = tmp_path / "run"
    p = cli(["ppo", str(cfg), "--run-dir", str(run_dir)])
    out = p.communicate(timeout=500)[0]
    assert p.returncode == 0, out[-3000:]
    assert "vllm engine(s) ready" in out
    rows = by_step(run_dir)
    assert sorted(rows) == [1, 2, 3]
    for r in rows.values():
        # Weights synced before every rollout (the first from the start, then after each update)...
        assert r["sync_s"] > 0 and r["generate_s"] > 0
        # ...and the engine samples what the trainer would: its log-probs equal the trainer's
        # recomputation up to kernel differences, so the importance weights stay near 1.
        assert r["logprob_drift_mean"] < 1e-3 and r["logprob_drift_max"] < 1e-2, r
        assert abs(r["tis_weight_mean"] - 1) < 1e-2
    summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
    assert summary["iterations"] == 3 and "win_rate_vs_start" in summary


@pytest.mark.timeout(600)
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_ppo_with_lora_policy_and_critic(tmp_path):
    """LoRA on a ZeRO-3 policy of 2 ranks and on the critic: the reference is the policy's base
    (no reference group), the engine gets merged weights (its log-probs equal the trainer's),
    checkpoints hold only adapters (and the critic's head), the export is a plain HF model."""
    cfg = ppo_yaml(tmp_path, iterations=2, save_every=2, model=VLLM_MODEL, extra=VLLM_ROLLOUT)
    run_dir = tmp_path / "run"
    p = cli(["ppo", str(cfg), "--run-dir", str(run_dir), "ppo.policy.group.zero.stage=3",
             "ppo.policy.train.lora={r: 4, alpha: 8}", "ppo.critic.train.lora={r: 4, alpha: 8}",
             "ppo.eval.judge_gold=null"])
    out = p.communicate(timeout=500)[0]
    assert p.returncode == 0, out[-3000:]
    assert "the policy's base model (its LoRA adapter off)" in out
    rows = by_step(run_dir)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["logprob_drift_mean"] < 1e-3 and r["logprob_drift_max"] < 1e-2, r
    # The reference is the base: KL 0 until the first update (LoRA's B starts at 0), then not.
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-5) and abs(rows[2]["kl"]) > 1e-4, rows
    assert "reference" not in json.loads((run_dir / "placement.json").read_text())
    from rayalign import checkpoint

    for role, extra_names in (("policy", ()), ("critic", ("score",))):
        sh = checkpoint.Shards(checkpoint.step_dir(str(run_dir / "checkpoints" / role), 2))
        names = set(sh.shapes)
        sh.close()
        assert names and all("lora_" in n or any(e in n for e in extra_names) for n in names), (role, names)
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "final" / "policy")
    assert not any("lora" in n for n, _ in m.named_parameters())
    summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
    assert summary["iterations"] == 2 and "win_rate_vs_start" in summary


# ~3.5 min on 2 cores: in `make test-all` (slow) to keep CI under 40 minutes.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ppo_kill_and_resume_matches_uninterrupted(tmp_path):
    cfg = ppo_yaml(tmp_path)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    p = cli(["ppo", str(cfg), "--run-dir", str(full_dir)])
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out[-3000:]
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md", "plots/ppo.png", "ppo_samples.jsonl",
              "final/policy/config.json", "final/policy/model.safetensors"):
        assert (full_dir / f).is_file(), f
    summary = json.loads((full_dir / "summary.json").read_text())["ppo"]
    assert summary["iterations"] == 6 and 0 <= summary["win_rate_vs_start"] <= 1
    assert summary["judge_gold_pairs"] == 8
    full = by_step(full_dir)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    for k in ("reward_mean", "kl", "entropy", "clipfrac", "approx_kl", "response_length",
              "generate_s", "score_s", "train_s", "approx_kl_epoch1", "clipfrac_epoch2"):
        assert k in full[1], k
    # The critic's update of a rollout runs beside the next rollout (or before a checkpoint);
    # its loss is filed under the iteration it belongs to.
    assert all("value_loss" in full[i] for i in range(1, 7))

    # Kill the whole process tree (driver and its embedded Ray) once iteration 3 is logged:
    # the last checkpoint is iteration 2's; the resumed run redoes 3 and goes on.
    p = cli(["ppo", str(cfg), "--run-dir", str(cut_dir)])
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        if 3 in (by_step(cut_dir) if (cut_dir / "metrics.jsonl").is_file() else {}):
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (cut_dir / "checkpoints" / "committed.json").is_file()
    assert not (cut_dir / "final" / "policy").exists()
    p = cli(["ppo", str(cfg), "--resume", str(cut_dir)])
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out[-3000:]
    assert "resuming after iteration" in out
    same_metrics(by_step(cut_dir), full)

    # Inside the job (ZeRO-2): two ranks SIGKILLed, the run restarts its roles from the last
    # commit each time and ends where the uninterrupted run did.
    out, killed = chaos_run(cfg, tmp_path / "chaos", [2, 4], 0)
    summary = json.loads((tmp_path / "chaos" / "summary.json").read_text())["ppo"]
    assert [r["failure"] for r in summary["recoveries"]] == [1, 2], (summary["recoveries"], killed)
    same_metrics(by_step(tmp_path / "chaos"), full)
    same_samples(tmp_path / "chaos", full_dir)
    same_samples(cut_dir, full_dir)


def chaos_run(cfg, run_dir, kills: list[int], seed: int, *over, signals=None) -> tuple[str, list[dict]]:
    """``rayalign ppo`` while a signal (SIGKILL unless ``signals`` says) hits a random rank
    of a random trained role once each iteration in ``kills`` is logged (after the previous
    recovery finished)."""
    from rayalign.chaos import kill_during_ppo

    p = cli(["ppo", str(cfg), "--run-dir", str(run_dir), *over])
    try:
        killed = kill_during_ppo(p, run_dir, kills, seed, timeout_s=500, signals=signals)
    except Exception as exc:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # the job had ended: its output says why
            pass
        raise RuntimeError(f"{exc}; the job's output:\n" + p.communicate()[0][-4000:]) from exc
    out = p.communicate(timeout=500)[0]
    assert p.returncode == 0, out[-4000:]
    return out, killed


def same_metrics(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for it in a:
        for k in ("reward_mean", "kl", "policy_loss", "value_loss", "response_length", "kl_coef"):
            assert a[it][k] == pytest.approx(b[it][k], rel=1e-4, abs=1e-5), (it, k)


def same_samples(a_dir, b_dir) -> None:
    """The logged samples hold each iteration once, with the uninterrupted run's responses."""
    def rows(d):
        return [(r["iteration"], r["response"]) for r in map(json.loads, (d / "ppo_samples.jsonl").read_text().splitlines())]

    assert rows(a_dir) == rows(b_dir)


@pytest.mark.timeout(900)
def test_ppo_recovers_inside_the_job_under_zero3(tmp_path):
    """Two ranks killed (SIGKILL), then one frozen (SIGSTOP), during a ZeRO-3 run: the
    frozen rank is found by the role's call timeout; each time the job restarts its roles
    from the last commit, and it finishes with the uninterrupted run's metrics."""
    cfg = ppo_yaml(tmp_path, iterations=4, save_every=1)
    timeout = 40
    over = ["ppo.policy.group.zero.stage=3", "ppo.eval.win_rate=false", "ppo.eval.judge_gold=null",
            f"ppo.policy.group.call_timeout_s={timeout}", f"ppo.critic.group.call_timeout_s={timeout}"]
    full_dir = tmp_path / "full"
    p = cli(["ppo", str(cfg), "--run-dir", str(full_dir), *over])
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out[-3000:]
    out, hit = chaos_run(cfg, tmp_path / "chaos", [1, 2, 3], 3, *over,
                         signals=[signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP])
    summary = json.loads((tmp_path / "chaos" / "summary.json").read_text())["ppo"]
    rec = summary["recoveries"]
    assert len(rec) == 3, (rec, hit)
    for r in rec:
        assert r["to_next_iteration_s"] > 0, r
    assert "died" in rec[0]["what"] and "died" in rec[1]["what"], rec
    assert f"did not answer within {timeout}s" in rec[2]["what"], rec
    # Found by the timeout: no sooner than it, and not much later.
    assert timeout - 1 <= rec[2]["detected_at"] - hit[2]["time"] <= timeout + 30, (rec[2], hit[2])
    assert out.count("Restarting the roles") == 3
    same_metrics(by_step(tmp_path / "chaos"), by_step(full_dir))
    same_samples(tmp_path / "chaos", full_dir)


@pytest.mark.timeout(600)
def test_ppo_with_policy_reference_and_critic_colocated(tmp_path, capsys):
    """The layout `rayalign plan` approves is the one PPO runs: reference and critic ranks on
    the policy's bundles, one placement group, and the run completes."""
    cfg = ppo_yaml(tmp_path, iterations=2, save_every=0)
    over = ["ppo.policy.group.workers=1", "ppo.policy.group.cpus_per_worker=1",
            "ppo.critic.group.colocate_with=policy", "ppo.reference.colocate_with=policy",
            "ppo.eval.win_rate=false", "ppo.eval.judge_gold=null"]
    assert main(["plan", str(cfg), *over, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["ok"], plan["problems"]
    run_dir = tmp_path / "run"
    p = cli(["ppo", str(cfg), *over, "--run-dir", str(run_dir)])
    out = p.communicate(timeout=500)[0]
    assert p.returncode == 0, out[-3000:]
    assert sorted(by_step(run_dir)) == [1, 2]
    where = json.loads((run_dir / "placement.json").read_text())
    spots = {role: (ranks[0]["placement_group"], ranks[0]["bundle"]) for role, ranks in where.items()}
    assert spots["critic"] == spots["reference"] == spots["policy"], spots
    assert len({ranks[0]["pid"] for ranks in where.values()}) == len(where)  # separate processes


@pytest.mark.timeout(600)
def test_grpo_with_dynamic_sampling_on_two_ranks(tmp_path):
    """`rayalign ppo` as DAPO-style GRPO on a ZeRO-2 policy of 2 ranks: no critic group, the
    KL as a k3 loss term (the reference's log-probs travel with the batch), extra rounds of
    prompts drawn in the object store, the asymmetric clip and the overlong penalty."""
    cfg = ppo_yaml(tmp_path, iterations=2, save_every=2)
    run_dir = tmp_path / "run"
    p = cli(["ppo", str(cfg), "--run-dir", str(run_dir), "ppo.algo.estimator=group_norm",
             "ppo.algo.samples_per_prompt=4", "ppo.algo.prompts_per_iteration=4", "ppo.algo.dynamic_sampling=true",
             "ppo.algo.loss_aggregation=seq_mean_token_mean", "ppo.algo.clip_high=0.28",
             "ppo.algo.kl={coef: 0.05, estimator: k3, placement: loss}", "ppo.algo.overlong_buffer=4",
             "ppo.rewards=[{type: function, function: 'ppo_rewards:has_letter_e'}]",
             "ppo.eval.win_rate=false", "ppo.eval.judge_gold=null"])
    out = p.communicate(timeout=500)[0]
    assert p.returncode == 0, out[-3000:]
    rows = by_step(run_dir)
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["kl_loss"] >= 0 and "value_loss" not in r, r
        assert 1 <= r["sampling_rounds"] <= 3 and 0 <= r["varied_groups_first_round"] <= 1, r
        assert "batch_reward_mean" in r
    assert "critic" not in json.loads((run_dir / "placement.json").read_text())


def test_ppo_config_errors(tmp_path, capsys):
    cfg = ppo_yaml(tmp_path)
    assert main(["ppo", str(cfg), "ppo.algo.prompts_per_iteration=6"]) == 2
    assert "must be a multiple of ppo.policy.group.workers" in capsys.readouterr().err
    assert main(["ppo", str(cfg), "ppo.algo.estimator=rloo"]) == 2
    assert "needs samples_per_prompt >= 2" in capsys.readouterr().err
    assert main(["ppo", str(cfg), "ppo.algo.dynamic_sampling=true"]) == 2
    assert "dynamic_sampling drops groups whose rewards do not vary" in capsys.readouterr().err
    assert main(["ppo", str(cfg), "ppo.algo.overlong_buffer=17"]) == 2
    assert "overlong_buffer (17) exceeds max_new_tokens (16)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ppo.rewards.0: Value error, a function reward needs function"):
        load_config(cfg, ["ppo.rewards=[{type: function}]"])
    assert main(["ppo", str(cfg), "ppo.rewards=[{type: rm}]", "ppo.eval.win_rate=false"]) == 2
    assert "type rm needs path" in capsys.readouterr().err
    assert main(["ppo", str(cfg), "ppo.prompts.eval_prompts=100"]) == 2
    assert "eval_prompts holds out 100" in capsys.readouterr().err
    assert main(["ppo", str(cfg), "ppo.rewards=[{type: function, function: 'nowhere:fn'}]",
                 "ppo.eval.win_rate=false"]) == 2
    assert "cannot import reward function 'nowhere:fn'" in capsys.readouterr().err


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT takes the same handler: test_procs.py
def test_a_signal_stops_every_process_the_command_started(tmp_path, sig):
    """SIGTERM (systemd, Kubernetes) or SIGINT to `rayalign ppo`: within 30 s every process
    it started is gone (Ray's agents included), the exit status says which signal, and the
    last line says why."""
    from rayalign.chaos import progress
    from rayalign.cluster.procs import alive, descendants

    cfg = ppo_yaml(tmp_path, iterations=20, save_every=0)
    run_dir = tmp_path / "run"
    p = cli(["ppo", str(cfg), "--run-dir", str(run_dir), "ppo.eval.win_rate=false", "ppo.eval.judge_gold=null"])
    deadline = time.time() + 200
    while progress(run_dir)[0] < 1 and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[0][-3000:]
    started = descendants(p.pid)
    assert any((Path("/proc") / str(c) / "cmdline").read_bytes().startswith(b"ray::PolicyWorker") for c in started)
    t0 = time.time()
    p.send_signal(sig)
    out = p.communicate(timeout=60)[0]
    took = time.time() - t0
    assert p.returncode == 128 + int(sig), out[-3000:]
    assert took < 30, took
    assert f"stopped by {sig.name}" in out.strip().splitlines()[-1], out[-2000:]
    time.sleep(1)
    left = [c for c in started if alive(c)]
    assert not left, [(c, (Path("/proc") / str(c) / "cmdline").read_bytes()[:80]) for c in left]
