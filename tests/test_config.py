from pathlib import Path

import pytest

from rayalign.config import ConfigError, apply_overrides, load_config

BASE = """
name: t
model: {name: tiny-llama}
sft:
  data: {source: packaged:chatterbot}
  group: {workers: 2, zero: {stage: 2}}
  train: {lr: 1.0e-4, batch_size: 8, micro_batch_size: 2}
"""


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(BASE)
    return p


def test_loads_and_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.sft.group.zero.stage == 2
    assert cfg.sft.train.lr == 1e-4
    assert cfg.sft_model().name == "tiny-llama"
    assert cfg.tracking.wandb == "offline"


def test_override_types_are_parsed(cfg_file):
    cfg = load_config(cfg_file, ["sft.train.lr=3e-5", "sft.group.zero.stage=3", "sft.data.max_samples=10",
                                 "cluster.address=ray://h:10001"])
    assert cfg.sft.train.lr == 3e-5 and cfg.sft.group.zero.stage == 3
    assert cfg.sft.data.max_samples == 10 and cfg.cluster.address == "ray://h:10001"


def test_unknown_key_names_key_and_file(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, ["sft.train.learning_rate=1"])
    msg = str(e.value)
    assert "sft.train.learning_rate: unknown key" in msg and str(cfg_file) in msg


def test_wrong_type_and_impossible_values(cfg_file):
    with pytest.raises(ConfigError, match=r"sft\.group\.workers: .*integer.*'two'"):
        load_config(cfg_file, ["sft.group.workers=two"])
    with pytest.raises(ConfigError, match=r"sft\.group\.zero\.stage: .*less than or equal to 3"):
        load_config(cfg_file, ["sft.group.zero.stage=4"])
    with pytest.raises(ConfigError, match=r"sft\.train\.lr: Input should be greater than 0 \(got -1\)"):
        load_config(cfg_file, ["sft.train.lr=-1"])
    with pytest.raises(ConfigError, match="offload_params needs stage 3"):
        load_config(cfg_file, ["sft.group.zero.offload_params=true"])
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be a multiple of micro_batch_size \(3\)"):
        load_config(cfg_file, ["sft.train.micro_batch_size=3"])


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    missing = tmp_path / "missing.yaml"
    missing.write_text("sft: {group: {workers: 1}}\n")
    with pytest.raises(ConfigError, match="sft.data: required key is missing"):
        load_config(missing)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["sft.train.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["sft..lr=1"])
    with pytest.raises(ConfigError, match="sft.train is a value, not a section"):
        apply_overrides({"sft": {"train": 3}}, ["sft.train.lr=1"])


def test_shipped_configs_validate():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_run_dir_keeps_the_first_config_and_records_a_changed_resume(tmp_path):
    """A stage that continues a run with the same settings (every stage after the first of
    `rayalign run`) writes nothing new; a resume with other settings keeps both files."""
    from rayalign.config import Config
    from rayalign.pipelines.common import prepare_run_dir

    c = Config()
    d = prepare_run_dir(c, tmp_path / "r", "x", False)
    prepare_run_dir(c, d, "x", True)
    assert not (d / "config.resumed.yaml").exists()
    prepare_run_dir(c.model_copy(update={"name": "other"}), d, "x", True)
    assert "other" in (d / "config.resumed.yaml").read_text() and "other" not in (d / "config.yaml").read_text()


def test_ppo_rejects_train_settings_it_would_replace(tmp_path):
    from rayalign.config import dump_config

    p = tmp_path / "ppo.yaml"
    p.write_text(BASE + """
ppo:
  prompts: {source: packaged:chatterbot}
  rewards: [{type: function, function: "ppo_rewards:vowel_share"}]
  algo: {prompts_per_iteration: 4, samples_per_prompt: 2, minibatches: 2}
  policy: {train: {micro_batch_size: 2}}
""")
    cfg = load_config(p)
    assert cfg.ppo.policy.train.batch_size == 4 and cfg.ppo.critic.train.batch_size == 4  # what PPO uses
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again).ppo.policy.train.batch_size == 4  # a run's resolved config reloads
    assert load_config(p, ["ppo.policy.train.batch_size=4"]).ppo.policy.train.batch_size == 4
    with pytest.raises(ConfigError, match=r"ppo.policy.train.batch_size \(8\) is decided by PPO.* = 4 samples"):
        load_config(p, ["ppo.policy.train.batch_size=8"])
    with pytest.raises(ConfigError, match="ppo.critic.train.save_every is not used by PPO; set ppo.algo.save_every"):
        load_config(p, ["ppo.critic.train.save_every=3"])
    with pytest.raises(ConfigError, match="ppo.policy.train.epochs .*ppo.algo.epochs"):
        load_config(p, ["ppo.policy.train.epochs=2"])


def test_serve_engine_and_the_gone_rejoin_window():
    cfg = load_config(data={"serve": {"engine": "vllm", "dtype": "bfloat16"}})
    assert cfg.serve.engine == "vllm" and load_config(data={}).serve.engine == "auto"
    with pytest.raises(ConfigError, match="rejoin_wait_s is gone.*continuous batching"):
        load_config(data={"serve": {"rejoin_wait_s": 0.25}})
    with pytest.raises(ConfigError, match="engine"):
        load_config(data={"serve": {"engine": "tgi"}})


def test_a_config_extends_another(tmp_path):
    from rayalign.config import ConfigError, load_config

    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel: {name: tiny-llama, dtype: float32}\n"
        "sft: {data: {source: packaged:chatterbot, max_length: 48}, train: {lr: 1.0e-3}}\n"
        "rm: {train: {lr: 1.0e-4}}\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\nsft: {train: {max_steps: 3}}\nrm: null\n")
    cfg = load_config(tmp_path / "child.yaml")
    # Mappings merge key by key, values replace, null removes a section.
    assert cfg.name == "child" and cfg.model.name == "tiny-llama"
    assert cfg.sft.train.lr == 1e-3 and cfg.sft.train.max_steps == 3 and cfg.sft.data.max_length == 48
    assert cfg.rm is None
    # The shipped DPO quickstart is the quickstart with rm and ppo replaced.
    q = load_config(Path(__file__).parent.parent / "configs" / "quickstart_dpo.yaml")
    base = load_config(Path(__file__).parent.parent / "configs" / "quickstart.yaml")
    assert q.rm is None and q.ppo is None and q.dpo is not None and q.sft == base.sft and q.label == base.label
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist \\(extended by"):
        load_config(tmp_path / "lost.yaml")
