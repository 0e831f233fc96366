"""One PPO iteration: rayalign's actor groups on an embedded local Ray against TRL 1.12.0's
``trl.experimental.ppo.PPOTrainer``, same settings, measured in one run on one machine.

Settings (both arms): SmolLM2-135M-Instruct as policy, reference, value and reward model
(value and reward score heads freshly initialised from one seed), fp32, batch 8 prompts,
1 mini-batch, 1 PPO epoch, 32 response tokens without a stop token, temperature 0.7,
2 threads. TRL runs in this process; rayalign runs its policy, reference, critic and
reward roles as four Ray actor groups and drives them with ``ppo_iteration``.

    pip install trl==1.12.0   # the benchmark's only extra
    python benchmarks/ppo_vs_trl.py [--iterations 4] [--out benchmarks/results/ppo_vs_trl.json]

Per-iteration times exclude the first iteration (warm-up); phases: generate (sampling),
score (reference, value and reward forwards; plus rayalign's reward-model call), train
(the PPO update of policy and value model, with everything else TRL does per update).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"


def prompts_for(n: int) -> list[str]:
    from rayalign import data

    rows = data.load_rows("packaged:mixed-prompts", ["prompt"], n, 0)
    return [r["prompt"] for r in rows]


def heads_dir(tmp: Path, seed: int) -> Path:
    """SmolLM2 with a seeded random scalar head, saved once: both arms load the same value
    and reward models."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rayalign import models

    out = tmp / "smollm2-scalar"
    if not (out / "config.json").is_file():
        src = models.resolve(MODEL)
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=torch.float32)
        tok = models.load_tokenizer(src)
        m.config.pad_token_id = tok.pad_token_id
        m.save_pretrained(out)
        tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- TRL

def run_trl(prompts: list[str], iterations: int, batch: int, length: int, threads: int, scalar: Path,
            gradient_checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as T

    from rayalign import models
    from rayalign.data import chat_prompt

    torch.set_num_threads(threads)
    src = models.resolve(MODEL)
    tok = models.load_tokenizer(src)
    tok.padding_side = "left"
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    ds = Dataset.from_dict({"input_ids": ids})

    phase = {"generate": 0.0, "score": 0.0}
    marks: list[tuple[float, float, float]] = []

    def timed(fn, key):
        def wrapper(*a, **k):
            if torch.is_grad_enabled():  # a training forward (TRL reuses `forward` there)
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase[key] += time.perf_counter() - t
        return wrapper

    # Patched on the module TRL's trainer calls them through; restored below.
    saved = (T.batch_generation, T.get_reward, T.forward)
    T.batch_generation = timed(T.batch_generation, "generate")
    T.get_reward = timed(T.get_reward, "score")   # value and reward forwards of the rollout
    T.forward = timed(T.forward, "score")         # the reference forward of the rollout

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), 0.0, 0.0))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), phase["generate"], phase["score"]))

    load = lambda cls, path, **k: cls.from_pretrained(str(path), dtype=torch.float32, **k)
    policy = load(AutoModelForCausalLM, src)
    ref = load(AutoModelForCausalLM, src)
    value = load(AutoModelForSequenceClassification, scalar, num_labels=1)
    reward = load(AutoModelForSequenceClassification, scalar, num_labels=1)
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=1, total_episodes=batch * iterations, response_length=length,
            temperature=0.7, local_rollout_forward_batch_size=batch, stop_token=None, learning_rate=3e-6,
            kl_coef=0.05, num_sample_generations=0, report_to="none", use_cpu=True, bf16=False,
            save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, dataloader_num_workers=0,
            gradient_checkpointing=gradient_checkpointing)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=ds, eval_dataset=ds, value_model=value, callbacks=[Marks()])
        trainer.train()
    T.batch_generation, T.get_reward, T.forward = saved
    its = []
    for (t0, g0, s0), (t1, g1, s1) in zip(marks, marks[1:]):
        total, gen, score = t1 - t0, g1 - g0, s1 - s0
        its.append({"iteration_s": total, "generate_s": gen, "score_s": score, "train_s": total - gen - score})
    return {"version": trl.__version__, "gradient_checkpointing": gradient_checkpointing, "iterations": its}


# ---------------------------------------------------------------- rayalign

def run_rayalign(prompts: list[str], iterations: int, batch: int, length: int, threads: int,
                 scalar: Path, defer_critic: bool = False, engine: str = "trainer",
                 engine_logprobs: bool = False) -> dict:
    from rayalign.cluster import placement, ray_session
    from rayalign.cluster.group import ActorGroup
    from rayalign.config import ClusterConfig, GroupConfig, ModelConfig, TrainConfig, ZeroConfig
    from rayalign.pipelines.ppo import ppo_iteration
    from rayalign.rewards import RewardMix, _rm_scorer
    from rayalign.workers.critic import CriticWorker
    from rayalign.workers.frozen import FrozenLMWorker
    from rayalign.workers.policy import PolicyWorker
    from rayalign.workers.reward import RewardWorker

    from rayalign.pipelines.sampling import Sampler, engine_settings
    from rayalign.config import Config, RolloutConfig
    from rayalign.workers.rollout import RolloutWorker

    names = ["policy", "reference", "critic", "reward"] + (["rollout"] if engine != "trainer" else [])
    share = 2.0 / len(names)  # the roles on two logical CPUs; phases run one after another
    g = GroupConfig(workers=1, cpus_per_worker=share, threads_per_worker=threads)
    roles = {n: g for n in names}
    rc = RolloutConfig(engine=engine, logprobs="engine" if engine_logprobs else "trainer")
    train = TrainConfig(lr=3e-6, lr_schedule="constant", batch_size=batch, micro_batch_size=batch).model_dump()
    zero = ZeroConfig().model_dump()
    its = []
    with ray_session(ClusterConfig(num_cpus=2, object_store_memory_mb=300)):
        pools = placement.place(roles)
        groups = []
        try:
            policy = ActorGroup("policy", PolicyWorker, g, pools, roles=roles)
            groups.append(policy)
            reference = ActorGroup("reference", FrozenLMWorker, g, pools, roles=roles)
            groups.append(reference)
            critic = ActorGroup("critic", CriticWorker, g, pools, roles=roles)
            groups.append(critic)
            reward = ActorGroup("reward", RewardWorker, g, pools, roles=roles)
            groups.append(reward)
            policy.init_model({"name": MODEL}, zero, train, iterations)
            reference.init_model({"name": MODEL}, zero, True)
            critic.init_model(ModelConfig(name=str(scalar)).model_dump(), zero, train, iterations)
            reward.init_model(ModelConfig(name=str(scalar)).model_dump(), zero, train, 1)
            sampler = None
            if engine != "trainer":
                engines = ActorGroup("rollout", RolloutWorker, g, pools, roles=roles, timeout_s=g.call_timeout_s)
                groups.append(engines)
                info = engines.init_engine({"name": MODEL}, engine,
                                           engine_settings(Config(rollout=rc)) | {"max_model_len": 1024}, -1)
                print(f"{engine} engine ready in {info[0]['init_s']:.0f}s", file=sys.stderr)
                sampler = Sampler(policy, engines, rc, engine)
            score = RewardMix([("rm", 1.0, _rm_scorer(reward, normalize=False))])
            backlog = None
            for it in range(iterations):
                # With --defer-critic the critic's update of iteration k runs beside the rollout
                # of k+1 (each timed iteration still carries one critic update, like TRL's).
                m = ppo_iteration(policy, reference, critic, score, prompts[it * batch:(it + 1) * batch],
                                  temperature=0.7, max_new_tokens=length, min_new_tokens=length,
                                  kl_coef=0.05, epochs=1, minibatches=1, rollout_batch_size=batch,
                                  defer_critic=defer_critic, critic_backlog=backlog, seed=it,
                                  sampler=sampler, logprobs_from_rollout=engine == "trainer" or engine_logprobs)
                if sampler is not None:
                    sampler.version = it + 1  # the next rollout syncs the updated weights
                backlog = m.pop("critic_backlog", None)
                m.pop("batch")
                m.pop("examples")
                its.append({k: m.get(k, 0.0) for k in ("iteration_s", "generate_s", "score_s", "train_s", "sync_s",
                                                       "response_length", "approx_kl_epoch1", "kl",
                                                       "logprob_drift_mean", "logprob_drift_max")})
                print(f"rayalign iteration {it + 1}: {its[-1]['iteration_s']:.1f}s", file=sys.stderr)
        finally:
            for grp in groups:
                grp.kill()
            placement.release(pools.values())
    return {"iterations": its}


def summarise(its: list[dict]) -> dict:
    timed = its[1:] or its
    return {k: statistics.fmean(i.get(k, 0.0) for i in timed)
            for k in ("iteration_s", "generate_s", "score_s", "train_s", "sync_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    ap.add_argument("--defer-critic", action="store_true",
                    help="run each critic update beside the next rollout (ppo.algo.defer_critic_update)")
    ap.add_argument("--engine", choices=["trainer", "vllm", "hf"], default="trainer",
                    help="where rayalign samples: its training workers, or a rollout engine role with weight sync")
    ap.add_argument("--engine-logprobs", action="store_true",
                    help="with an engine: its log-probs as PPO's behaviour log-probs (no recompute forward)")
    ap.add_argument("--skip-trl", action="store_true", help="rayalign only (compare with a committed TRL run)")
    a = ap.parse_args()

    import ray
    import torch
    import transformers

    prompts = prompts_for(a.batch * a.iterations)
    with tempfile.TemporaryDirectory() as tmp:
        scalar = heads_dir(Path(tmp), seed=0)
        # TRL as it comes (its PPOConfig turns gradient checkpointing on), and tuned for
        # speed (off, as rayalign runs).
        ours = run_rayalign(prompts, a.iterations, a.batch, a.response_length, a.threads, scalar, a.defer_critic,
                            a.engine, a.engine_logprobs)
        if a.skip_trl:
            r = summarise(ours["iterations"])
            print(json.dumps({"rayalign": {"mean": r, "iterations": ours["iterations"]}}, indent=1))
            if a.out:
                Path(a.out).write_text(json.dumps({"settings": vars(a), "rayalign": {"mean": r, "iterations":
                                                                                     ours["iterations"]}}, indent=1))
            return
        trl_default = run_trl(prompts, a.iterations, a.batch, a.response_length, a.threads, scalar, True)
        trl_fast = run_trl(prompts, a.iterations, a.batch, a.response_length, a.threads, scalar, False)
    t, tf, r = (summarise(x["iterations"]) for x in (trl_default, trl_fast, ours))
    trl_res = trl_default
    result = {
        "benchmark": "ppo_vs_trl", "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
                     "trl": trl_res["version"], "python": platform.python_version()},
        "settings": vars(a) | {"model": MODEL, "dtype": "float32", "ppo_epochs": 1, "minibatches": 1,
                               "temperature": 0.7},
        "trl_default": {"mean": t, "iterations": trl_default["iterations"],
                        "note": "PPOConfig defaults: gradient_checkpointing=True"},
        "trl_no_checkpointing": {"mean": tf, "iterations": trl_fast["iterations"]},
        "rayalign": {"mean": r, "iterations": ours["iterations"]},
        "speedup_vs_trl_default": t["iteration_s"] / r["iteration_s"],
        "speedup_vs_trl_no_checkpointing": tf["iteration_s"] / r["iteration_s"],
    }
    print(f"\n{'phase':<10}{'TRL default':>13}{'TRL no-ckpt':>13}{'rayalign':>10}{'vs default':>12}{'vs no-ckpt':>12}")
    for k in ("generate_s", "score_s", "train_s", "iteration_s"):
        print(f"{k[:-2]:<10}{t[k]:>12.2f}s{tf[k]:>12.2f}s{r[k]:>9.2f}s{t[k] / r[k]:>11.2f}x{tf[k] / r[k]:>11.2f}x")
    if a.engine != "trainer":
        print(f"{'sync':<10}{'-':>13}{'-':>13}{r['sync_s']:>9.2f}s  ({r['sync_s'] / r['iteration_s']:.1%} of the iteration)")
    print(f"\nrayalign per PPO iteration (mean of iterations 2..{a.iterations}): "
          f"{result['speedup_vs_trl_default']:.2f}x TRL 1.12.0 as configured by default, "
          f"{result['speedup_vs_trl_no_checkpointing']:.2f}x TRL without gradient checkpointing")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
