"""Seconds from a killed rank to the next completed PPO iteration, recovered inside the job.

Runs ``rayalign ppo`` on a generated config (a verifiable reward, policy of 2 ZeRO-2
ranks, critic and reference of one; checkpoints every iteration), SIGKILLs a random
rank of the policy or the critic once each of the given iterations is logged, and reads
the run's own recovery records: ``restart_s`` (failure detected → roles running again
from the last commit) and ``to_next_iteration_s`` (failure detected → the next iteration
done). Baseline: the same run's uninterrupted iterations (``mean_iteration_s``).

    python benchmarks/recovery.py --model tiny-llama --out benchmarks/results/recovery_tiny.json
    python benchmarks/recovery.py --model smollm2-135m-instruct --iterations 5 --kills 2 4 \\
        --out benchmarks/results/recovery_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def vowel_share(prompts, responses):
    """The reward: the share of vowels in a response (imported by the run as recovery:vowel_share)."""
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]


def config(tmp: Path, model: str, iterations: int, zero: int) -> Path:
    cfg = tmp / "ppo.yaml"
    cfg.write_text(f"""
name: recovery-bench
model: {{name: {model}}}
cluster: {{num_cpus: 2, object_store_memory_mb: 200, max_failures: 5}}
tracking: {{root: {tmp / 'runs'}, wandb: disabled}}
rollout: {{engine: trainer}}
ppo:
  prompts: {{source: packaged:mixed-prompts, max_samples: 60, eval_prompts: 4}}
  policy:
    group: {{workers: 2, cpus_per_worker: 0.5, zero: {{stage: {zero}}}}}
    train: {{lr: 1.0e-5, lr_schedule: constant, micro_batch_size: 2}}
  critic:
    group: {{workers: 1, cpus_per_worker: 0.25}}
    train: {{lr: 1.0e-5, lr_schedule: constant, micro_batch_size: 4}}
  reference: {{workers: 1, cpus_per_worker: 0.25}}
  rewards:
    - {{type: function, function: "recovery:vowel_share"}}
  algo: {{iterations: {iterations}, prompts_per_iteration: 8, max_new_tokens: 16, temperature: 1.0,
          epochs: 1, minibatches: 2, save_every: 1}}
  eval: {{win_rate: false, judge_gold: null, reward_every: 0}}
""")
    return cfg


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--kills", type=int, nargs="+", default=[2, 4, 6], help="kill after these iterations are logged")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from rayalign.chaos import kill_during_ppo

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = config(tmp, args.model, args.iterations, args.zero)
        run_dir = tmp / "run"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent),
                                                           os.environ.get("PYTHONPATH", "")]))
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "rayalign.cli", "ppo", str(cfg), "--run-dir", str(run_dir)],
                                env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            killed = kill_during_ppo(proc, run_dir, args.kills, args.seed, timeout_s=3000)
            out = proc.communicate(timeout=3000)[0]
        except BaseException:
            os.killpg(proc.pid, 9)
            raise
        if proc.returncode != 0:
            raise SystemExit(out[-4000:])
        summary = json.loads((run_dir / "summary.json").read_text())["ppo"]
    rec = summary["recoveries"]
    for r, k in zip(rec, killed):  # from the SIGKILL itself, detection included
        r["kill_to_detected_s"] = round(r["detected_at"] - k["time"], 2)
        r["kill_to_next_iteration_s"] = round(r["kill_to_detected_s"] + r["to_next_iteration_s"], 2)
    nxt = [r["kill_to_next_iteration_s"] for r in rec]
    res = {"benchmark": "recovery", "model": args.model, "zero": args.zero, "iterations": args.iterations,
           "killed": [{k: v for k, v in x.items() if k != "time"} for x in killed], "recoveries": rec,
           "kill_to_next_iteration_s": {"median": statistics.median(nxt), "min": min(nxt), "max": max(nxt)},
           "restart_s_median": statistics.median(r["restart_s"] for r in rec),
           "mean_iteration_s": summary["mean_iteration_s"], "wall_s": round(time.time() - t0, 1),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version()},
           "command": "python benchmarks/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    import ray
    import torch

    res["machine"].update(torch=torch.__version__, ray=ray.__version__)
    print(json.dumps({k: res[k] for k in ("kill_to_next_iteration_s", "restart_s_median", "mean_iteration_s")}))
    for r in rec:
        print(f"  {r['what'][:100]} -> detected {r['kill_to_detected_s']}s after the kill, roles running again "
              f"{r['restart_s']}s after that, next iteration {r['kill_to_next_iteration_s']}s after the kill, "
              f"{r['iterations_lost']} iteration(s) redone")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
