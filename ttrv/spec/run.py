"""One adaptation run's spec (`RunSpec`): what `ttrv run` and the trainer pod read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from ttrv.net import control_character, holds_userinfo, parse_endpoint
from ttrv.spec.base import (
    NAME_PATTERN,
    PositiveInt,
    Probability,
    Quantity,
    StrictModel,
    load_yaml,
    parse_spec,
)

# Upper bounds of counts that size what is held in memory: generous (far above any published setting), but finite, so
# that a typo or a hostile spec (votes: 100000000) is refused with its field named instead of exhausting the
# trainer's or the rollout service's memory at start.
MAX_VOTES = 1024
MAX_TOKENS = 131_072
MAX_SEED = 2**32 - 1
MAX_PIXELS = 16384 * 28 * 28


def _plain_text(value: str) -> str:
    """A path or URI without control characters: a NUL ends it early where it meets the OS (open() raises
    ValueError), a newline splits it in logs and in the pod's YAML."""
    if (bad := control_character(value)) is not None:
        raise ValueError(f"{value!r} holds the control character {bad}; write the path without it")
    return value


PathText = Annotated[str, AfterValidator(_plain_text)]


class LoraSpec(StrictModel):
    rank: Annotated[int, Field(gt=0, le=4096)] = 16
    """LoRA rank r (at most 4096: two rank x hidden matrices per adapted layer, and no model is wider than that
    would need)."""
    alpha: PositiveInt = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Names of the language-model linear layers that get adapters."""


class ModelSpec(StrictModel):
    path: PathText = "ttrv://tiny-qwen2vl"
    """Checkpoint folder: a local path, file://…, s3://bucket/prefix, a Hugging Face hub id, or ttrv://tiny-qwen2vl
    (the tiny model that ships with ttrv)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype: auto is bfloat16 on GPU and float32 on CPU."""
    trainable: Literal["language", "all", "reference"] = "language"
    """Which parts are updated: language (every vision part frozen: the tower and its projector), all, or
    reference (as the TTRV reference: InternVL's vision encoder frozen, every other family, Qwen-VL included,
    trains everything). The default is language, unlike the reference for Qwen-VL: Qwen2.5-VL-7B's vision tower
    (about 0.67B parameters) adds about 8 GB of fp32 master weights and Adam state, and the deviation is stated in
    the README's table of deviations."""
    lora: LoraSpec | None = None
    """Train LoRA adapters instead of full weights; the adapter alone is published to the rollout service."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of the trainer's model."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint (its config.json's auto_map), in the trainer and the rollout
    service (vLLM's --trust-remote-code). A security choice: that code runs with the pods' credentials. Off by
    default; prefer a transformers-native conversion (InternVL3: OpenGVLab/InternVL3-2B-hf needs none)."""
    max_pixels: Annotated[int, Field(ge=784, le=MAX_PIXELS)] | None = 1003520
    """Largest image, in pixels, after the processor's resize (Qwen-VL: one visual token per 28×28 pixels, so at
    most 1280 tokens an image by default, the Qwen2-VL image processor's own default); passed to vLLM as well.
    null: the checkpoint's own setting (Qwen2.5-VL-7B's allows 16384 tokens an image). At least one token's 784
    pixels, at most Qwen2.5-VL's own limit of 16384 tokens (12845056 pixels)."""


class DataSpec(StrictModel):
    path: PathText
    """Test-set file: reference JSON (a list of records), verl parquet or JSONL; ttrv://tiny-shapes/<split> for the
    bundled benchmark."""
    format: Literal["auto", "reference_json", "verl_parquet", "jsonl"] = "auto"
    """File format; auto decides by extension and content."""
    path_map: list[PathText] = []
    """Image path-prefix rewrites OLD=NEW, applied in order (the reference's files carry absolute paths)."""
    subset_size: PositiveInt | None = 20
    """Size of the unlabeled adaptation subset drawn from the test set (reference: 20 or 500); null = all."""
    subset_seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    """Seed of the subset draw (0 to 2^32-1)."""
    single_example: bool = False
    """Adapt on one randomly chosen example, repeated `singleExampleRepeats` times (the paper's extreme case)."""
    single_example_repeats: Annotated[int, Field(gt=0, le=10_000)] = 4
    """Copies of the single example in single-example mode (at most 10000: each copy is a prompt of the adaptation
    set, sampled `votes` times per epoch)."""
    adapt_path: PathText | None = None
    """The adaptation prompts as a file (the reference's layout: `train.json`, a 20-prompt subset of `test.json`,
    with `path` the test.json evaluated). Replaces the subset draw: subsetSize and singleExample then do not apply.
    Adapting on prompts of the test set is transductive, and report.json's `setting` says so."""
    heldout_path: PathText | None = None
    """Optional split never adapted on, to measure generalisation; checked to share no example (by id, and by
    image + prompt text) with the adapted prompts."""

    @model_validator(mode="after")
    def _one_adaptation_source(self) -> DataSpec:
        if self.adapt_path and self.single_example:
            raise ValueError("data.adaptPath and data.singleExample both choose the adaptation prompts; set one")
        return self

    @field_validator("path_map")
    @classmethod
    def _path_map_pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            old, sep, new = item.partition("=")
            if not sep or not old:
                raise ValueError(f"{item!r} is not OLD=NEW; write e.g. '/data/authors/imagenet=/mnt/imagenet'")
        return value


class RolloutSpec(StrictModel):
    votes: Annotated[int, Field(ge=2, le=MAX_VOTES)] = 32
    """N: answers sampled per prompt; each answer's reward is its share of these votes (at most 1024, 32 times
    the reference's 32: every vote is a sequence held until the step's rewards are known)."""
    group_size: Annotated[int, Field(gt=0, le=MAX_VOTES)] = 16
    """G: how many of the N samples per prompt are trained on (the first G; at most votes)."""
    temperature: Annotated[float, Field(gt=0.0, le=5.0)] = 1.0
    """Sampling temperature of the votes."""
    top_p: Probability = 1.0
    """Nucleus sampling mass of the votes."""
    max_new_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] = 1024
    """Longest response sampled (at most 131072, the longest context of current VLMs: the KV cache and the
    training batch grow with it)."""
    backend: Literal["inprocess", "service"] = "inprocess"
    """inprocess: the trainer samples with its own Hugging Face engine; service: it calls a separate rollout
    service (`ttrv serve`, vLLM or Hugging Face) that loads each weight version from the store. inprocess is the
    default on GPU too, though it keeps another copy of the weights on every rank: service adds the rollout's own
    GPUs (resources.rolloutGpus) to the run and has not run on a GPU yet; `ttrv plan` names it as the fix when a
    run does not fit (docs/gpu.md)."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """Engine of the rollout service: auto takes vLLM where it is installed, else Hugging Face."""
    max_staleness: Annotated[int, Field(ge=0, le=4)] = 0
    """0: step k+1 samples from weight version k (on-policy); 1: one-step-off asynchronous rollout."""
    max_model_len: Annotated[int, Field(gt=0, le=MAX_TOKENS)] | None = None
    """vLLM's longest sequence (prompt with its image tokens, plus the response); null: room for the prompt text,
    limitMmPerPrompt images at model.maxPixels and the longest response. It sizes vLLM's KV cache per sequence."""
    max_num_seqs: Annotated[int, Field(gt=0, le=4096)] = 256
    """Sequences vLLM runs at once (votes of several prompts share a batch; at most 4096)."""
    limit_mm_per_prompt: Annotated[int, Field(gt=0, le=64)] = 1
    """Images a prompt may carry in vLLM (no video; at most 64); vLLM reserves encoder memory for this many."""
    shared: bool = False
    """In an Experiment: one rollout service for all its runs, each run's versions served as its own LoRA adapter
    (needs model.lora and backend: service); maxParallelRuns sizes it. False: a service per run."""

    @model_validator(mode="after")
    def _group_within_votes(self) -> RolloutSpec:
        if self.group_size > self.votes:
            raise ValueError(
                f"groupSize ({self.group_size}) > votes ({self.votes}): the trained group is taken from the votes; "
                "set groupSize <= votes (reference: votes 32, groupSize 16)"
            )
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"maxModelLen ({self.max_model_len}) <= maxNewTokens ({self.max_new_tokens}): vLLM's sequences hold "
                "the prompt and its image tokens as well as the response; raise maxModelLen, or leave it null to "
                "derive it"
            )
        return self


class RewardSpec(StrictModel):
    extractor: Literal["choice", "numeric", "text", "reference"] = "choice"
    """How an answer is read from a response: a multiple-choice letter, a number, normalised free text, or
    reference: the TTRV reference's multiple-choice parsing (its `choice_answer_clean_gpqa`), where a response with
    no letter votes with its raw text, so identical unreadable texts pool into a class that can win the vote. With
    choice (ttrv's default) such a response gets `invalidReward` and no vote: a deviation from the reference, and on
    tiny-shapes the source of the gain (README, "What the benchmark shows")."""
    choices: Annotated[str, Field(pattern=r"^[A-Z]{2,26}$")] = "ABCD"
    """Option letters for the choice extractor."""
    entropy_weight: Annotated[float, Field(ge=0.0)] = 0.75
    """w in r_j = count(a_j)/N - w * H_norm (reference 0.75)."""
    entropy_mode: Literal["reference", "batch", "scale"] = "scale"
    """How the entropy term acts: reference (per-group normalisation, which cancels it: the reference's behaviour),
    scale (each prompt's group advantages times 1 - w * H_norm: updates from prompts whose votes disagree are
    damped), batch (advantages normalised over the whole step's batch, so low-entropy prompts are favoured)."""
    invalid_reward: float = -1.0
    """Reward of a response with no readable answer (not counted as a vote class). The reference extractor reads an
    answer from every response, so it never applies there."""


class EarlyStopSpec(StrictModel):
    """Label-free early stopping (ttrv.guard.EarlyStop): stop adapting once a vote signal has stopped moving. The
    settings were chosen on tiny-shapes' validation split (`bench/early_stop.py --replay`, README "Early stopping");
    off by default until a measurement on test and held-out meets the goal there."""

    enabled: bool = False
    """Stop once `signal`, averaged over `window` steps, has not improved by `minDelta` for `patience` steps."""
    signal: Literal["entropy", "majorityShare", "reward"] = "majorityShare"
    """The step metric watched: mean vote entropy (improves by falling), the mean share of a prompt's votes won by
    its majority answer, or the mean vote reward (both improve by rising)."""
    window: Annotated[int, Field(gt=0, le=1000)] = 4
    """Steps averaged into one value of the signal (votes of one step are noisy)."""
    min_delta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Smallest change of the windowed signal that counts as an improvement."""
    patience: Annotated[int, Field(gt=0, le=1000)] = 4
    """Steps without an improvement before the run stops."""
    min_steps: Annotated[int, Field(ge=0, le=100_000)] = 13
    """Steps always taken before the rule may stop the run."""


class GRPOSpec(StrictModel):
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 5e-7
    """Peak learning rate of AdamW."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.03
    """Share of all optimiser steps spent in linear warm-up."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0.0)] = 1.0
    """Global gradient-norm clip."""
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.001
    """Weight of the KL penalty to the frozen base model (0 disables the reference model)."""
    kl_kind: Literal["low_var_kl", "kl", "mse"] = "low_var_kl"
    """KL estimator: k3 (low_var_kl, clamped to [-10, 10]), k1 (kl) or k2 (mse)."""
    clip_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """PPO ratio clip below 1."""
    clip_high: Annotated[float, Field(gt=0.0)] = 0.2
    """PPO ratio clip above 1."""
    dual_clip: Annotated[float, Field(gt=1.0)] = 3.0
    """Dual-clip constant c bounding the loss of negative-advantage tokens."""
    epochs: Annotated[int, Field(gt=0, le=1000)] = 2
    """Passes over the adaptation subset (at most 1000: test-time adaptation takes a few; each step's events and
    weight version are kept)."""
    prompts_per_step: Annotated[int, Field(gt=0, le=4096)] = 4
    """Prompts per optimiser step (the reference uses one per GPU; at most 4096: a step holds prompts x votes
    sampled sequences)."""
    ppo_epochs: Annotated[int, Field(gt=0, le=100)] = 1
    """Gradient passes over each step's batch (at most 100)."""
    mini_batch_prompts: Annotated[int, Field(gt=0, le=4096)] | None = None
    """Prompts per optimiser step (PPO mini-batch): each step's batch is split into mini-batches of this many
    prompts' sequences, one optimiser step each, with the old log-probs computed once per rollout, so the ratio
    moves and clipping acts. null = promptsPerStep (one optimiser step per step: the ratio stays 1). The reference
    uses 1 (verl's ppo_mini_batch_size=1: 8 optimiser steps per step of 8 prompts)."""
    micro_batch_size: Annotated[int, Field(gt=0, le=4096)] = 16
    """Sequences per forward/backward on one rank (at most 4096: their activations are held at once)."""
    micro_batch_tokens: Annotated[int, Field(gt=0, le=4_194_304)] | None = 16384
    """Token budget of one forward/backward on one rank: consecutive sequences are packed into a micro-batch while
    its padded size (sequences x its longest sequence) stays within this, and at most microBatchSize sequences (a
    longer sequence goes alone). Activations and logits grow with these tokens, not with the sequence count, so
    long responses or large images cannot run a GPU out of memory; the loss is the same however they are split.
    16384 is verl's ppo_max_token_len_per_gpu; null: microBatchSize sequences whatever their length."""
    early_stop: EarlyStopSpec = EarlyStopSpec()
    """Stop before `epochs` when the votes stop changing (label-free)."""

    @model_validator(mode="after")
    def _mini_batch_within_step(self) -> GRPOSpec:
        if self.mini_batch_prompts is not None and self.mini_batch_prompts > self.prompts_per_step:
            raise ValueError(f"miniBatchPrompts ({self.mini_batch_prompts}) > promptsPerStep "
                             f"({self.prompts_per_step}): a mini-batch is part of a step's prompts; set "
                             "miniBatchPrompts <= promptsPerStep (the reference: 1)")
        return self


class EvalSpec(StrictModel):
    before: bool = True
    """Evaluate the base model before adapting."""
    after: bool = True
    """Evaluate the adapted model at the end."""
    full_test_set: bool = True
    """Also evaluate on the whole test set (the reference's transductive setting), not only the subset."""
    limit: PositiveInt | None = None
    """Evaluate on at most this many prompts of each split (null = all)."""
    maj_votes: Annotated[int, Field(ge=0, le=MAX_VOTES)] = 0
    """Votes for maj@N evaluation; 0 = rollout.votes (at most 1024, as votes)."""
    max_new_tokens: Annotated[int, Field(gt=0, le=MAX_TOKENS)] | None = None
    """Longest greedy answer in evaluation; null = rollout.max_new_tokens (at most 131072, as that)."""
    every: Annotated[int, Field(ge=0)] = 0
    """Also evaluate greedy accuracy on the adaptation subset every this many steps (0 = never)."""


class GuardSpec(StrictModel):
    """The collapse guard (ttrv.guard.CollapseGuard). The defaults were chosen on tiny-shapes' validation split
    (never test or held-out): over 4-step windows, healthy runs at the demo's lr (seeds 0-2) kept a mean vote entropy
    >= 0.17 and a dominant-answer share <= 0.54, while the lr 3e-3 collapse held entropy <= 0.13 and one answer at
    >= 0.74 (README, "The collapse guard")."""

    enabled: bool = True
    """Stop and roll back to the last healthy weights when the policy collapses (label-free signals)."""
    entropy_below: Annotated[float, Field(ge=0.0, le=1.0)] = 0.15
    """Collapse needs the mean vote entropy of the window's steps at or below this..."""
    dominant_answer_share: Probability = 0.6
    """...and one answer to win this share of each step's votes across different prompts (window mean), or the
    response length to fall below `lengthRatio` of its first-step value."""
    length_ratio: Probability = 0.5
    """Response-length collapse threshold relative to the first step."""
    patience: PositiveInt = 2
    """Consecutive collapsed windows before the guard fires."""
    window: Annotated[int, Field(gt=0, le=1000)] = 4
    """Steps whose signals are averaged before the thresholds apply (one step's few prompts are noisy)."""


# The value is not repeated: it holds a credential, and the message reaches logs and the resource's status.
_NO_USERINFO = ("holds credentials (user:password@); remove them: the store reads them from AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, in a cluster from the Secret named by s3Secret")


class StorageSpec(StrictModel):
    uri: str = "file://runs/store"
    """Where weight versions, checkpoints and progress go: file:///path or s3://bucket/prefix. Credentials never go
    here: they come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a Secret in the cluster)."""
    endpoint: str | None = None
    """S3 endpoint (host:port or URL) for s3:// URIs; default from AWS_ENDPOINT_URL."""
    keep_versions: Annotated[int, Field(gt=0, le=1000)] = 3
    """Weight versions kept; older ones are garbage-collected unless being loaded (at most 1000: each is a full
    copy of the trained weights in the store)."""
    checkpoint_every: Annotated[int, Field(ge=0)] = 10
    """Full checkpoint every K steps (and on SIGTERM); 0 = only on SIGTERM and at the end."""
    full_every: Annotated[int, Field(ge=1, le=1000)] = 10
    """Full-weight versions: a full version at least every K steps; between them a version stores only the values
    whose bits changed since the last full one (a sparse delta; at small learning rates a few % of the weights).
    1 = every version full. Deltas cost the trainer's main rank a CPU copy of the trained weights."""
    delta_max_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """A version is written full instead of as a delta when the delta would exceed this share of the full size."""

    @field_validator("endpoint")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and holds_userinfo(value):
            raise ValueError(_NO_USERINFO)
        if value is not None:
            parse_endpoint(value)  # a bad port or character is named here, not by the S3 client at the first call
        return value

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if (bad := control_character(value)) is not None:
            raise ValueError(f"{value!r} holds the control character {bad}; write the URI without it")
        scheme, sep, rest = value.partition("://")
        if scheme == "s3" and holds_userinfo(rest.split("/", 1)[0]):
            raise ValueError(_NO_USERINFO)
        if not sep or scheme not in ("file", "s3"):
            raise ValueError(f"{value!r} has no known scheme; use file:///abs/path, file://rel/path or s3://bucket/prefix")
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise ValueError(f"{value!r} names no bucket; write s3://bucket/prefix")
        if ".." in rest.split("/"):
            raise ValueError(f"{value!r} contains '..'; write the store prefix without parent-directory steps")
        return value


class ResourcesSpec(StrictModel):
    nodes: Annotated[int, Field(gt=0, le=1024)] = 1
    """Trainer nodes (PyTorchJob Master + nodes-1 Workers; at most 1024)."""
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] = 1
    """GPUs per trainer node (nprocPerNode); 0 trains on CPU (at most 64, above any node built)."""
    processes_per_node: Annotated[int, Field(gt=0, le=256)] | None = None
    """Data-parallel processes per node; default one per GPU (one on CPU; at most 256: each loads the model)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimiser states to CPU memory."""
    offload_reference: bool = False
    """Keep the frozen reference model (grpo.klCoef > 0, full fine-tuning) in host memory, moved to the GPU only
    for its log-prob passes once per step: a model's weights less on each GPU for two host-device copies a step."""
    gradient_checkpointing: bool = True
    """Activation checkpointing in the trainer's model: activations are recomputed in the backward pass (on by
    default, as verl's actor config has it: enable_gradient_checkpointing)."""
    gpu_memory: Quantity = "80Gi"
    """Memory of one GPU (trainer and rollout alike; 80Gi: an H100), for `ttrv plan`'s budget."""
    cpu: Quantity = "8"
    """CPU request of each trainer pod."""
    memory: Quantity = "64Gi"
    """Memory request of each trainer pod."""
    rollout_gpus: Annotated[int, Field(ge=0, le=64)] = 1
    """GPUs of the rollout service (vLLM tensor-parallel size; at most 64)."""
    rollout_gpu_memory_utilization: Probability = 0.85
    """Share of each rollout GPU that vLLM may take."""
    rollout_cpu: Quantity | None = None
    """CPU request of the rollout pod; default: `cpu`."""
    rollout_memory: Quantity | None = None
    """Memory request of the rollout pod; default: `memory`."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> ResourcesSpec:
        # ZeRO-Offload moves the partitioned optimiser states; stage 0 partitions none (DeepSpeed ignores the key)
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offloadOptimizer needs zeroStage 1, 2 or 3 (stage 0 keeps no optimiser partition to "
                             "offload); set zeroStage: 2 or offloadOptimizer: false")
        return self

    @property
    def nproc_per_node(self) -> int:
        return self.processes_per_node or max(1, self.gpus_per_node)


class BudgetSpec(StrictModel):
    """What one run may spend; a run that reaches a limit stops cleanly (final evaluation, report, the last weight
    version published) and says why (progress.json's `stopReason`, the AdaptationRun's status)."""

    max_steps: Annotated[int, Field(gt=0, le=1_000_000)] | None = None
    """Optimiser steps at most (null = the epochs' steps)."""
    gpu_hours: Annotated[float, Field(gt=0.0, le=1_000_000.0)] | None = None
    """Device-hours of adaptation at most: the adaptation steps' wall time (kept across restarts) times the run's
    devices (nodes x GPUs per node; on CPU, nodes x processes). Evaluations are not counted: the final one always
    runs. Null = no limit."""


class AdaptationSettings(StrictModel):
    """What every adaptation run of an experiment shares."""

    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    """Seed of sampling, shuffling and initialisation (0 to 2^32-1: every generator it seeds accepts it)."""
    model: ModelSpec = ModelSpec()
    rollout: RolloutSpec = RolloutSpec()
    reward: RewardSpec = RewardSpec()
    grpo: GRPOSpec = GRPOSpec()
    eval: EvalSpec = EvalSpec()
    guard: GuardSpec = GuardSpec()
    budget: BudgetSpec = BudgetSpec()
    """Limits of each run (in an Experiment: of each dataset's run, unless the dataset sets its own)."""
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @model_validator(mode="after")
    def _shared_rollout_needs_lora(self) -> AdaptationSettings:
        if self.rollout.shared and self.model.lora is None:
            raise ValueError("rollout.shared: true serves each run as a LoRA adapter of one service, but model.lora "
                             "is not set; set model.lora (e.g. {rank: 16}), or rollout.shared: false")
        if self.rollout.shared and self.rollout.backend != "service":
            raise ValueError("rollout.shared: true needs rollout.backend: service (the in-process engine is each "
                             "trainer's own); set rollout.backend: service, or rollout.shared: false")
        return self


class RunSpec(AdaptationSettings):
    """One adaptation run on one dataset."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "ttrv-run"
    """Run name (DNS label): names the store prefix and, in a cluster, the objects."""
    data: DataSpec




def load_run_spec(path: str | Path) -> RunSpec:
    return parse_spec(load_yaml(path), RunSpec, str(path))

