"""The ``rayalign`` command."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .errors import RayalignError
from .jobs import DEFAULT_ADDRESS as DEFAULT_JOBS_ADDRESS


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.train.lr=1e-5")
    p.add_argument("--run-dir", help="write into this run directory (default: a new one under tracking.root)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _run_dir(args) -> Path | None:
    where = args.resume or args.run_dir
    return Path(where) if where else None


def cmd_sft(args) -> int:
    from .pipelines.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    summary = run_sft(cfg, run_dir=_run_dir(args), resume=bool(args.resume))
    _print_summary(summary)
    return 0


def cmd_run(args) -> int:
    """Every stage the config defines, in pipeline order, in one run directory."""
    from .pipelines.run import run_pipeline

    cfg = load_config(args.config, args.overrides)
    out = run_pipeline(cfg, _run_dir(args), resume=bool(args.resume))
    print("\n" + out["table"])
    print(f"run directory: {out['run_dir']}")
    return 0


def _policy_stage(run, args) -> int:
    """A stage that trains the final policy (ppo, dpo): its summary, less the examples."""
    summary = run(load_config(args.config, args.overrides), run_dir=_run_dir(args), resume=bool(args.resume))
    summary.pop("win_examples", None)
    _print_summary(summary)
    return 0


def cmd_ppo(args) -> int:
    from .pipelines.ppo import run_ppo

    return _policy_stage(run_ppo, args)


def cmd_dpo(args) -> int:
    from .pipelines.dpo import run_dpo

    return _policy_stage(run_dpo, args)


def cmd_label(args) -> int:
    from .pipelines.label import run_label

    cfg = load_config(args.config, args.overrides)
    _print_summary(dict(run_label(cfg, _run_dir(args), resume=bool(args.resume))))
    return 0


def cmd_rm(args) -> int:
    from .pipelines.rm import run_rm

    cfg = load_config(args.config, args.overrides)
    _print_summary(run_rm(cfg, run_dir=_run_dir(args), resume=bool(args.resume)))
    return 0


def cmd_aligner(args) -> int:
    from .pipelines.aligner import run_aligner_build, run_aligner_data, run_aligner_train

    cfg = load_config(args.config, args.overrides)
    if args.action == "data":
        _print_summary(run_aligner_data(cfg, _run_dir(args)))
    elif args.action == "build":
        if args.resume:
            raise ConfigError("aligner build has no --resume (it rewrites its output)")
        _print_summary(run_aligner_build(cfg, _run_dir(args)))
    else:
        summary = run_aligner_train(cfg, run_dir=_run_dir(args), resume=bool(args.resume))
        _print_summary(summary)
    return 0


def cmd_steerlm(args) -> int:
    from .pipelines import steerlm

    cfg = load_config(args.config, args.overrides)
    if args.action == "annotate":
        _print_summary(steerlm.run_annotate(cfg, _run_dir(args), resume=bool(args.resume)))
    elif args.action == "train":
        summary = steerlm.run_train(cfg, _run_dir(args), resume=bool(args.resume))
        summary.pop("verbosity_examples", None)
        _print_summary(summary)
    else:
        if not args.prompt:
            raise ConfigError("steerlm generate needs --prompt TEXT (one or more)")
        if _run_dir(args) is None:
            raise ConfigError("steerlm generate needs --run-dir: the run whose conditioned policy answers")
        for q, a in zip(args.prompt, steerlm.generate(cfg, _run_dir(args), args.prompt, args.attributes,
                                                       args.max_new_tokens)):
            print(f"> {q}\n{a}\n")
    return 0


def cmd_serve(args) -> int:
    """Serve an Aligner checkpoint on Ray Serve (or write the Serve config that does)."""
    import yaml

    from .aligner import find_model_dir
    from .cluster import ray_session

    cfg = load_config(args.config, args.overrides)
    checkpoint = args.checkpoint or cfg.serve.checkpoint
    if not checkpoint:
        raise ConfigError("serve needs a checkpoint: `rayalign serve RUN_DIR|MODEL_DIR`")
    model_dir = find_model_dir(checkpoint)  # a wrong path stops here, before Ray starts
    from .serve.app import deploy, serve_config

    doc = serve_config(cfg.serve, str(model_dir.resolve()))
    text = yaml.safe_dump(doc, sort_keys=False)
    if args.write_config:
        Path(args.write_config).write_text(text)
        print(f"wrote {args.write_config} (deploy it with `serve deploy {args.write_config}`)")
        return 0
    from ray import serve

    s = cfg.serve
    import time

    with ray_session(cfg.cluster):
        try:  # Ctrl-C at any point, even mid-deployment, takes the application down cleanly
            deploy(doc)
            url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
            print(f"[rayalign] serving {model_dir} at {url}/v1/correct (docs: {url}/docs); Ctrl-C stops",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
            print("[rayalign] stopping", file=sys.stderr, flush=True)
            raise
        finally:
            serve.shutdown()
    return 0


def _print_summary(summary: dict) -> None:
    samples = summary.pop("samples", [])
    width = max((len(k) for k in summary), default=0)
    print("\n" + "\n".join(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                           for k, v in summary.items()))
    for s in samples:
        print(f"\nQ: {s['prompt']}\n  before: {s['before'].strip()[:200]}\n  after:  {s['after'].strip()[:200]}")


def cmd_plan(args) -> int:
    """Per-rank memory of every role and the layout's fit, before launching anything."""
    from .cluster.plan import PlanError, format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    try:
        plan = make_plan(cfg, args.cluster, prompt_tokens=args.prompt_tokens, reserve_gb=args.reserve_gb)
    except PlanError as exc:
        print(f"rayalign: plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan["ok"] else 1


def cmd_submit(args) -> int:
    """A pipeline config (or a script) as a job on a running Ray cluster."""
    from . import jobs

    env = {}
    for kv in args.env or []:
        if "=" not in kv:
            raise jobs.JobError(f"--env {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    job = jobs.prepare(args.target, args.overrides, command=args.command, working_dir=args.working_dir,
                       runtime_env_file=args.runtime_env, env=env, ship_package=not args.no_ship_package,
                       script_args=args.script_args or "")
    if args.dry_run:
        print(json.dumps(job, indent=1))
        return 0
    job_id = jobs.submit(job, args.address, args.submission_id, args.entrypoint_num_cpus, args.entrypoint_num_gpus)
    url = jobs.address_of(args.address)
    print(f"submitted {job_id} to {url}: {job['entrypoint']}")
    if not args.follow:
        print(f"follow it: rayalign jobs logs {job_id} --address {url}   (status, stop: rayalign jobs ...)")
        return 0
    final = jobs.follow(args.address, job_id)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from . import jobs

    if args.action == "list":
        for j in jobs.list_jobs(args.address):
            print(f"{j['job_id']}  {j['status']:<9}  {j['entrypoint']}")
        return 0
    if not args.job_id:
        raise jobs.JobError(f"`rayalign jobs {args.action}` needs a job id")
    if args.action == "status":
        st = jobs.status(args.address, args.job_id)
        print(f"{st['job_id']}: {st['status']}" + (f" ({st['message']})" if st["message"] else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            final = jobs.follow(args.address, args.job_id)
            print(f"job {args.job_id}: {final}")
            return 0
        sys.stdout.write(jobs.logs(args.address, args.job_id))
        return 0
    stopped = jobs.stop(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0


def cmd_models(args) -> int:
    from . import models

    if args.action == "list":
        rows = models.list_models()
        print(f"{'name':<30}{'kind':<11}{'installed':<11}{'prepared':<10}description")
        for r in rows:
            print(f"{r['name']:<30}{r['kind']:<11}{str(r['installed']):<11}{str(r['prepared']):<10}{r['description']}")
            for key in ("size", "format", "license", "provenance"):
                if r.get(key):
                    print(f"{'':<30}{key}: {r[key]}")
        print(f"\ncache: {models.models_cache()}")
        return 0
    if not args.name:
        raise ConfigError("models prepare needs a model name (see `rayalign models list`)")
    for name in args.name:
        models.prepare(name, say=lambda s: print(f"[rayalign] {s}", file=sys.stderr, flush=True))
    return 0


def cmd_data(args) -> int:
    from . import data

    if args.action == "list":
        for name, (_, desc) in data.PACKAGED_SOURCES.items():
            print(f"packaged:{name:<14}{desc}")
        return 0
    rows, origin = data.read_rows(args.source)
    print(f"{origin}: {len(rows)} rows")
    for r in rows[: args.n]:
        print(json.dumps(r, ensure_ascii=False)[:300])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayalign", description="Align language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    # The pipeline commands all take a config, overrides, --run-dir and --resume.
    for name, fn, text in [
        ("run", cmd_run, "run every stage of a pipeline config (the quickstart)"),
        ("sft", cmd_sft, "distributed supervised fine-tuning"),
        ("label", cmd_label, "AI preference labelling of response pairs"),
        ("rm", cmd_rm, "reward-model training on preferences"),
        ("ppo", cmd_ppo, "PPO with a KL penalty against reward models, the labeler, functions or endpoints "
                         "(and GRPO, Dr. GRPO, DAPO)"),
        ("dpo", cmd_dpo, "DPO or IPO on preference pairs against a frozen reference (no reward model)"),
    ]:
        p = sub.add_parser(name, help=text)
        _config_args(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("aligner", help="Aligner: write the training triples (data), build triples with a "
                       "corrector and the labeler (build), or train (residual warm-up)")
    p.add_argument("action", choices=["train", "build", "data"])
    _config_args(p)
    p.set_defaults(fn=cmd_aligner)

    p = sub.add_parser("steerlm", help="SteerLM: annotate data with an attribute predictor, attribute-"
                       "conditioned SFT with a steerability evaluation (train), or answer at chosen levels "
                       "(generate)")
    p.add_argument("action", choices=["annotate", "train", "generate"])
    _config_args(p)
    p.add_argument("--prompt", action="append", help="generate: a prompt (repeatable)")
    p.add_argument("--attributes", default="", help="generate: levels, e.g. 'verbosity:4,helpfulness:3' (the "
                   "rest from steerlm.eval.base)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(fn=cmd_steerlm)

    p = sub.add_parser("serve", help="serve an Aligner checkpoint with Ray Serve (HTTP)")
    p.add_argument("checkpoint", nargs="?", help="exported Aligner or run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8080 serve.replicas=2")
    p.add_argument("--config", help="a YAML with a `serve:` (and `cluster:`) section")
    p.add_argument("--write-config", metavar="PATH", help="write the Serve config YAML (for `serve deploy` / "
                   "RayService) instead of serving")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("plan", help="preflight: per-rank memory of every role and whether the layout fits")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cluster", metavar="SPEC", help="a YAML with `nodes:` (see clusters/), or e.g. 8x80GB, "
                   "2*8x80GB,cpus=96,mem=1TB; default: this machine")
    p.add_argument("--prompt-tokens", type=int, default=128, help="PPO/sampling prompt length assumed")
    p.add_argument("--reserve-gb", type=float, help="runtime memory outside tensors per rank (default 1 GPU, "
                   "0.5 CPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("submit", help="run a pipeline config (or a .py script) as a job on a Ray cluster")
    p.add_argument("target", metavar="CONFIG", help="pipeline YAML (validated here first) or a .py script, "
                   "inside the working directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the config")
    p.add_argument("--address", help=f"the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS, "
                   f"else {DEFAULT_JOBS_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if "
                   "it succeeded")
    p.add_argument("--command", help="run, sft, label, rm, ppo, aligner-train, aligner-build (default: from the "
                   "config's stages)")
    p.add_argument("--working-dir", help="directory uploaded with the job (default: the current one)")
    p.add_argument("--runtime-env", help="a runtime_env YAML merged in (e.g. clusters/runtime_env.yaml)")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="an environment variable for the job")
    p.add_argument("--no-ship-package", action="store_true", help="use the rayalign installed on the cluster "
                   "instead of uploading this one")
    p.add_argument("--script-args", help="arguments for a .py target, one quoted string")
    p.add_argument("--submission-id", help="the job id to use (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0)
    p.add_argument("--entrypoint-num-gpus", type=float, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the job (entrypoint, runtime env), send nothing")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("jobs", help="status, logs, stop or list jobs on a Ray cluster")
    p.add_argument("action", choices=["status", "logs", "stop", "list"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="the cluster's dashboard (default: RAY_ADDRESS, else "
                   f"{DEFAULT_JOBS_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.set_defaults(fn=cmd_jobs)

    p = sub.add_parser("models", help="list or prepare offline models")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("name", nargs="*")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("data", help="list packaged data sources or show a source's rows")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("source", nargs="?", default="packaged:chatterbot")
    p.add_argument("-n", type=int, default=5)
    p.set_defaults(fn=cmd_data)

    # Overrides may stand anywhere, also after options (`--run-dir X a.b=1`).
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from .cluster.procs import stop_on_signals

    stop_on_signals()
    try:
        return args.fn(args)
    except RayalignError as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"rayalign: {kind}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"rayalign: stopped by {signal.Signals(signum).name}; the processes it started are stopped "
              "(a run with checkpoints continues with --resume RUN_DIR)", file=sys.stderr, flush=True)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
