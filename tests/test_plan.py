"""`rayalign plan`: estimates against hand-computed values and against memory measured on
real ranks, cluster specs, and the exit code of layouts that cannot fit."""
import json
from pathlib import Path

import pytest

from rayalign.cli import main
from rayalign.cluster.plan import (GB, PlanError, RoleLoad, estimate, model_shape, parse_cluster)
from rayalign.config import GroupConfig, ModelConfig, TrainConfig, ZeroConfig

ROOT = Path(__file__).resolve().parent.parent
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama70b")
    (d / "config.json").write_text(json.dumps(LLAMA_70B))  # architecture only: plan reads no weights
    return d


def sft_yaml(tmp_path, model_dir, stage, extra=""):
    p = tmp_path / f"sft{stage}.yaml"
    p.write_text(f"""model: {{name: {model_dir}, dtype: bfloat16}}
sft:
  data: {{source: packaged:chatterbot, max_length: 512}}
  group: {{workers: 8, cpus_per_worker: 8, gpus_per_worker: 1, zero: {{stage: {stage}{extra}}}}}
  train: {{batch_size: 64, micro_batch_size: 1}}
""")
    return p


def test_parameter_count_is_exact(tiny_dir):
    from rayalign.models import load_causal_lm

    real = sum(p.numel() for p in load_causal_lm(tiny_dir).parameters())
    assert model_shape(ModelConfig(name="tiny-llama")).params == real


def test_zero_stages_by_hand():
    m = ModelConfig(name="tiny-llama")
    P = model_shape(m).params
    train = TrainConfig(batch_size=8, micro_batch_size=1)

    def est(stage, workers, **zero):
        g = GroupConfig(workers=workers, zero=ZeroConfig(stage=stage, **zero))
        return estimate(RoleLoad("t", "policy", m, g, train=train, train_tokens=64))

    z0, z3 = est(0, 2), est(3, 2)
    assert (z0["params"], z0["grads"], z0["optimizer"], z0["gathered"]) == (4 * P, 4 * P, 8 * P, 0)
    assert (z3["params"], z3["grads"], z3["optimizer"], z3["gathered"]) == (2 * P, 2 * P, 4 * P, 4 * P)
    z2 = est(2, 4)
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (4 * P, P, 2 * P)
    assert est(1, 4)["state"] == z2["state"]  # DeepSpeed partitions gradients in stage 1 too
    off = est(3, 2, offload_optimizer=True, offload_params=True)
    assert off["host"] == 2 * P + 4 * P + 2 * P  # optimizer + fp32 grad partition + parameters
    assert off["device"] == pytest.approx(z3["device"] - off["host"])
    # bf16 mixed precision, ZeRO-0: 2 + (2 + 4) + (8 + 4 master) bytes per parameter
    mb = ModelConfig(name="tiny-llama", dtype="bfloat16")
    r = estimate(RoleLoad("t", "policy", mb, GroupConfig(), train=train, train_tokens=64))
    assert r["state"] == 20 * P
    # activations scale with tokens; gradient checkpointing cuts them
    a1 = est(0, 1)["activations"]
    a2 = estimate(RoleLoad("t", "policy", m, GroupConfig(), train=train, train_tokens=128))["activations"]
    assert a2 == pytest.approx(2 * a1)
    ck = ModelConfig(name="tiny-llama", gradient_checkpointing=True)
    assert estimate(RoleLoad("t", "policy", ck, GroupConfig(), train=train, train_tokens=64))["activations"] < a1
    # generation: KV cache = 2 x layers x kv_dim x bytes x batch x tokens
    s = model_shape(m)
    g = estimate(RoleLoad("t", "sampler", m, GroupConfig(), gen_batch=4, gen_tokens=100))
    assert g["kv_cache"] == 2 * s.layers * s.kv_dim * 4 * 4 * 100 and g["grads"] == 0


def test_70b_zero0_on_8x80gb_is_rejected_and_zero3_offload_accepted(llama70b, tmp_path, capsys):
    rc = main(["plan", str(sft_yaml(tmp_path, llama70b, 0)), "--cluster", "8x80GB"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "per GPU rank" in out and "the GPUs have 80 GB" in out
    assert "70.6B" in out
    cfg = sft_yaml(tmp_path, llama70b, 3, ", offload_optimizer: true")
    rc = main(["plan", str(cfg), "model.gradient_checkpointing=true", "--cluster", "8x80GB"])
    out = capsys.readouterr().out
    assert rc == 0 and "fits: yes" in out
    # more ranks than GPUs: a placement problem, not a memory one
    rc = main(["plan", str(cfg), "sft.group.workers=16", "sft.train.batch_size=64", "--cluster", "8x80GB"])
    out = capsys.readouterr().out
    assert rc == 1 and "cannot place" in out
    # host memory counts too: offloaded state of 8 ranks does not fit in 256 GB of RAM
    rc = main(["plan", str(cfg), "--cluster", "8x80GB,mem=256GB", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 1 and any("memory" in p for p in plan["problems"])


def test_feasible_layouts_pass(capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), "--cluster", "1*0x0GB,cpus=2,mem=24GB"]) == 0
    out = capsys.readouterr().out
    # The quickstart's PPO is RLOO: no critic; the rollout engine is a role of its own.
    roles = {line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in
             ("sft", "sample", "label", "rm", "ppo")}
    assert {"policy", "labeler", "reward", "reference", "rollout"} <= roles and "critic" not in roles
    assert main(["plan", str(ROOT / "configs/aligner.yaml")]) in (0, 1)  # this machine: whatever it has


def test_cluster_specs(tmp_path):
    name, nodes = parse_cluster("2*8x80GB,cpus=96,mem=1TB")
    assert (nodes[0].count, nodes[0].gpus, nodes[0].gpu_memory_gb, nodes[0].cpus, nodes[0].memory_gb) == \
        (2, 8, 80.0, 96.0, 1024.0)
    f = tmp_path / "c.yaml"
    f.write_text("nodes:\n  - {count: 2, cpus: 32, gpus: 4, gpu_memory_gb: 24, memory_gb: 256}\n")
    assert parse_cluster(str(f))[1][0].gpus == 4
    f.write_text("nodes:\n  - {count: 2, gpus: 4}\n")
    with pytest.raises(PlanError, match="nodes\\[0\\]"):
        parse_cluster(str(f))
    with pytest.raises(PlanError, match="expected a YAML file"):
        parse_cluster("eight-gpus")
    with pytest.raises(PlanError, match="no such file"):
        parse_cluster(str(tmp_path / "missing.yaml"))
    assert parse_cluster(None)[1][0].cpus >= 1


def test_plan_cli_errors(tmp_path, capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), "--cluster", "nonsense"]) == 2
    assert "expected a YAML file" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), "sft.group.workers=0"]) == 2
    assert "sft.group.workers" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers,stage", [(1, 0), (2, 2), (2, 3)])
def test_estimate_within_25_percent_of_measured(local_ray, workers, stage):
    """The per-rank tensor memory of a real SFT step (held after backward + saved for
    backward + gathered by ZeRO-3) against the estimate for the same layout."""
    import random

    from rayalign.pipelines.common import role_group
    from rayalign.workers.policy import PolicyWorker

    model = ModelConfig(name="tiny-llama", overrides={"hidden_size": 128, "intermediate_size": 384,
                                                      "num_hidden_layers": 3})
    train = TrainConfig(lr=1e-4, batch_size=4, micro_batch_size=1, lr_schedule="constant")
    g = GroupConfig(workers=workers, cpus_per_worker=1, zero=ZeroConfig(stage=stage))
    rng = random.Random(0)
    seq = 64
    examples = []
    for _ in range(4):
        ids = [rng.randrange(3, 300) for _ in range(seq)]
        examples.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": ids})
    with role_group("policy", PolicyWorker, g) as grp:
        grp.init_model(model.model_dump(), g.zero.model_dump(), train.model_dump(), 4)
        grp.train_step(examples, 4 * (seq - 1))
        r = grp.train_step(examples, 4 * (seq - 1), measure_memory=True)
    measured = max(h + a + x for h, a, x in zip(r["held_bytes"], r["activation_bytes"], r["gathered_bytes"]))
    est = estimate(RoleLoad("sft", "policy", model, g, train=train, train_tokens=seq))["device"]
    err = est / measured - 1
    print(f"ZeRO-{stage} x{workers}: measured {measured / 2**20:.1f} MiB, plan {est / 2**20:.1f} MiB ({err:+.1%})")
    assert abs(err) < 0.25
    assert GB == 2**30
