"""The learner: the policy under adaptation as a DeepSpeed engine, the frozen reference for the KL term, and the
GRPO update on one step's batch.

On CPU DeepSpeed runs with its CPU accelerator (DS_ACCELERATOR=cpu), gloo, fp32; on GPU with NCCL and bf16. The
optimiser is handed to DeepSpeed as a client optimiser (ZeRO 1/2/3 shard its states), so the same code runs on
both: torch's AdamW, or DeepSpeed's CPU Adam when its states are offloaded (`make_optimizer`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ttrv import grpo
from ttrv.collectives import Collectives
from ttrv.log import get_logger
from ttrv.modeling import frozen, full_numel, load_model, torch_dtype
from ttrv.policy import TrainBatch, pack_micro_batches, token_log_probs
from ttrv.spec import RunSpec

log = get_logger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def training_device() -> torch.device:
    """The device DeepSpeed's accelerator trains this rank on: the engine puts the module there
    (deepspeed/runtime/engine.py, `_set_distributed_vars`: `get_accelerator().device_name(local_rank)`), so the
    batches and every collective's tensors go there too. The accelerator is DS_ACCELERATOR's, else probed
    (deepspeed/accelerator/real_accelerator.py, `get_accelerator`); ttrv.launch.choose_accelerator sets it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":  # the CPU accelerator names no index (cpu_accelerator.py)
        return torch.device("cpu")
    return torch.device(accelerator.device_name(int(os.environ.get("LOCAL_RANK", 0))))


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warm-up over warmup_ratio * total steps, then cosine to 0 (or constant), as verl's schedule."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(spec: RunSpec, micro_batch: int, accumulation: int, dtype: torch.dtype) -> dict:
    zero: dict = {"stage": spec.resources.zero_stage}
    if offloads_optimizer(spec):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": spec.grpo.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def offloads_optimizer(spec: RunSpec) -> bool:
    """ZeRO-Offload of the optimiser states: only a ZeRO stage partitions them, so stage 0 has nothing to offload."""
    return spec.resources.offload_optimizer and spec.resources.zero_stage > 0


def make_optimizer(spec: RunSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over `params`: DeepSpeed's CPU Adam when the optimiser states are offloaded, else torch's.

    With `offload_optimizer` DeepSpeed refuses any client optimiser that is not its CPU Adam (or CPU Lion):
    `DeepSpeedEngine._configure_optimizer` (deepspeed/runtime/engine.py) raises ZeRORuntimeException unless
    `zero_force_ds_cpu_optimizer` is false. That switch would keep torch's AdamW, but the offloaded step then runs
    as plain torch ops on the CPU, which DeepSpeed's message itself calls poor performance, and ZeRO-3 keeps its
    fused offload path (`deepspeed_adam_offload` in deepspeed/runtime/zero/stage3.py) for DeepSpeedCPUAdam only.
    Letting DeepSpeed build the optimiser from the config (`_configure_basic_optimizer`) would choose CPU Adam
    too, but would also replace torch's AdamW by FusedAdam when nothing is offloaded and take the LR scheduler's
    optimiser out of our hands. So CPU Adam is built here, as a client optimiser that passes the check
    (deepspeed/ops/adam/cpu_adam.py: `adamw_mode=True` is AdamW's decoupled weight decay, torch's formula). Its
    C++ op is built by DeepSpeed's op builder on first use (JIT, cached under TORCH_EXTENSIONS_DIR) unless the
    image prebuilt it."""
    g = spec.grpo
    if offloads_optimizer(spec):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=g.lr, weight_decay=g.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=g.lr, weight_decay=g.weight_decay)


def lora_target_pattern(modules: list[str]) -> str:
    """LoRA goes on the language model's linear layers only (vision towers use some of the same names)."""
    return rf".*language_model.*\.({'|'.join(map(str, modules))})$"


def held_numel(param: torch.nn.Parameter) -> int:
    """The elements of `param` this rank holds: its ZeRO-3 partition (`ds_tensor`), else the whole tensor."""
    partition = getattr(param, "ds_tensor", None)
    return partition.numel() if partition is not None else param.numel()


def load_policy(spec: RunSpec, model_path: str, device: torch.device, config: dict):
    """The policy, loaded straight to where it trains, without a full copy in this rank's host memory first:
    - under ZeRO-3 (full fine-tuning), partitioned while it loads: a live `HfDeepSpeedConfig` holding the engine's
      config makes transformers build the model inside `deepspeed.zero.Init` and load the checkpoint into the
      partitions (transformers/modeling_utils.py: `is_deepspeed_zero3_enabled()` adds `deepspeed.zero.Init` to the
      init contexts, and `_load_pretrained_model` loads through `_load_state_dict_into_zero3_model`;
      transformers/integrations/deepspeed.py keeps the config behind a weakref). Each rank then holds 1/world of
      the weights, as DeepSpeed's engine later would anyway; the config is dropped after the load so the reference
      and every later load are whole models again. LoRA is left out: peft adds unpartitioned adapter modules.
    - otherwise `load_model` puts each tensor on `device` as it is read (device_map)."""
    if spec.resources.zero_stage != 3 or spec.model.lora is not None:
        model = load_model(model_path, spec.model.dtype, device, spec.model.attn_implementation,
                           spec.model.trust_remote_code)
    else:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        live = HfDeepSpeedConfig(config)
        try:
            model = load_model(model_path, spec.model.dtype, device, spec.model.attn_implementation,
                               spec.model.trust_remote_code)
        finally:
            unset_hf_deepspeed_config()
            del live
    params = list(model.parameters())
    log.info("policy_loaded", device=str(device), parameters=sum(full_numel(p) for p in params),
             held=sum(held_numel(p) for p in params), zero3_init=spec.resources.zero_stage == 3
             and spec.model.lora is None)
    return model


class Learner:
    def __init__(self, spec: RunSpec, model_path: str, total_steps: int, world: World, sequences_per_rank: int,
                 collectives: Collectives):
        import deepspeed

        self.spec = spec
        self.world = world
        self.collectives = collectives
        self.device = collectives.device
        self.dtype = torch_dtype(spec.model.dtype, self.device)
        g = spec.grpo
        # PPO mini-batches: each rank splits its sequences into `mini_batches` equal parts, one optimiser step each,
        # so a global mini-batch holds miniBatchPrompts prompts' worth of sequences, as verl's ppo_mini_batch_size
        # (prompts x n, divided over the ranks: verl/workers/fsdp_workers.py)
        self.mini_batches = math.ceil(g.prompts_per_step / (g.mini_batch_prompts or g.prompts_per_step))
        self.mini_batch_rows = max(1, math.ceil(sequences_per_rank / self.mini_batches))
        self.micro_batch = min(g.micro_batch_size, self.mini_batch_rows)
        # DeepSpeed's nominal accumulation steps (its batch-size bookkeeping); `update` sets the boundary itself
        self.accumulation = max(1, math.ceil(self.mini_batch_rows / self.micro_batch))
        config = deepspeed_config(spec, self.micro_batch, self.accumulation, self.dtype)
        model = load_policy(spec, model_path, self.device, config)
        for name, param in model.named_parameters():
            if frozen(name, spec.model.trainable, model.config.model_type):
                param.requires_grad_(False)
        self.reference = None
        self.offload_reference = spec.resources.offload_reference
        if spec.model.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = spec.model.lora
            for param in model.parameters():
                param.requires_grad_(False)
            model = get_peft_model(model, LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora_target_pattern(lora.target_modules),
            ))
        elif spec.grpo.kl_coef > 0:
            # offloaded: loaded straight into host memory, in the dtype it computes in on the device
            self.reference = load_model(model_path, str(self.dtype).removeprefix("torch."),
                                        "cpu" if self.offload_reference else self.device,
                                        spec.model.attn_implementation, spec.model.trust_remote_code)
            self.reference.requires_grad_(False)
        if spec.resources.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model.trainable: no trainable parameters were found in this model")
        trainable_params = sum(full_numel(p) for p in trainable)
        optimizer = make_optimizer(spec, trainable)
        optimizer_steps = total_steps * g.ppo_epochs * self.mini_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optimizer_steps, g.warmup_ratio,
                                                                              g.schedule))
        self._model_path = model_path
        # on every rank, before DeepSpeed partitions anything: a roll-back to the base restores it on every rank
        self._initial_adapter = _initial_adapter(model) if spec.model.lora is not None else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        if torch.device(self.engine.device).type != self.device.type:
            raise RuntimeError(f"DeepSpeed put the policy on {self.engine.device}, the trainer's collectives expect "
                               f"{self.device}; set DS_ACCELERATOR to match the hardware (cpu or cuda)")
        log.info("learner_ready", trainable_params=trainable_params, zero=spec.resources.zero_stage,
                 optimizer=type(optimizer).__name__, offload=offloads_optimizer(spec),
                 mini_batches=self.mini_batches, micro_batch=self.micro_batch, accumulation=self.accumulation,
                 micro_batch_budget=g.micro_batch_tokens, offload_reference=self.offload_reference,
                 world=world.size)

    @property
    def module(self):
        return self.engine.module

    def _micro_batches(self, batch: TrainBatch, part: slice | None = None) -> list[slice]:
        """Rows of `part` (default: all) in micro-batches of at most grpo.microBatchSize sequences and
        grpo.microBatchTokens padded tokens (`pack_micro_batches`)."""
        part = part or slice(0, len(batch))
        return pack_micro_batches(batch.lengths()[part], self.micro_batch, self.spec.grpo.micro_batch_tokens,
                                  part.start)

    def _in_lockstep(self, plans: list[list[slice]]) -> list[int]:
        """The most micro-batches any rank has for each of `plans`. Under a token budget the count depends on this
        rank's sequence lengths, but every pass must be matched on every rank: ZeRO-2 reduces gradients in each
        backward, ZeRO-3 gathers parameters in each forward (collectives), so a rank with fewer micro-batches pads
        with passes that count nothing."""
        counts = self.collectives.place(torch.tensor([len(plan) for plan in plans], dtype=torch.float64))
        return [int(count) for count in self.collectives.all_reduce(counts, op="max").tolist()]

    def _forwards(self, model, batch: TrainBatch, engine_forward: bool) -> torch.Tensor:
        """token_log_probs of every micro-batch, without gradients. A forward through the engine's module under
        ZeRO-3 gathers parameters (a collective), so such passes are padded to the same count on every rank."""
        plan = self._micro_batches(batch)
        extra = 0
        if engine_forward and self.spec.resources.zero_stage == 3:
            extra = self._in_lockstep([plan])[0] - len(plan)
        temperature = self.spec.rollout.temperature
        parts = [token_log_probs(model, self._to_device(batch.select(rows)), temperature) for rows in plan]
        for _ in range(extra):
            token_log_probs(model, self._to_device(batch.select(slice(0, 1))), temperature)
        return _cat_padded(parts)

    @torch.no_grad()
    def reference_log_probs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs under the frozen base model (LoRA: the policy with its adapter switched off). With
        resources.offloadReference the reference waits in host memory and is on the device only for these passes."""
        if self.spec.grpo.kl_coef == 0:
            return None
        if self.reference is None:
            with self.module.disable_adapter():
                return self._forwards(self.module, batch, engine_forward=True)
        if self.offload_reference:
            self.reference.to(self.device)
        try:
            return self._forwards(self.reference, batch, engine_forward=False)
        finally:
            if self.offload_reference:
                self.reference.to("cpu")

    @torch.no_grad()
    def old_log_probs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs before the update, once per rollout. With one optimiser step per rollout (ppoEpochs 1, one
        mini-batch) the ratio is 1 at the only forward, so the detached current log-probs serve and this pass is
        skipped; with several, every step after the first sees a moved policy, and the ratio and clipping act."""
        if self.spec.grpo.ppo_epochs == 1 and self.mini_batches == 1:
            return None
        self.engine.eval()
        old = self._forwards(self.engine, batch, engine_forward=True)
        self.engine.train()
        return old

    def update(self, batch: TrainBatch, advantages: torch.Tensor, old: torch.Tensor | None,
               ref: torch.Tensor | None) -> dict[str, float]:
        """ppoEpochs x mini_batches optimiser steps on this rank's sequences: each epoch walks the mini-batches (this
        rank's share of miniBatchPrompts prompts' sequences), one optimiser step each. A mini-batch's micro-batches
        are sized by grpo.microBatchSize and microBatchTokens (`_micro_batches`); every rank runs as many as the rank
        with the most (padding with zero-weight passes) so DeepSpeed's gradient reduction stays in lockstep, and the
        last of them is the accumulation boundary, set explicitly (DeepSpeedEngine.set_gradient_accumulation_boundary,
        deepspeed/runtime/engine.py): the count varies from step to step, while the engine's own boundary counts a
        fixed gradient_accumulation_steps.

        The objective and its metrics are `grpo.ttrv_loss`; here it is only scheduled. Each micro-batch's
        token-mean loss is weighted by its share of all ranks' response tokens of its mini-batch, times the world
        size (`total_tokens`), so the gradient DeepSpeed averages over ranks is exactly the token-mean over every
        response token of the mini-batch, however the tokens fall on ranks and micro-batches (so the backward skips
        DeepSpeed's division by the accumulation steps: `backward(scale_wrt_gas=False)`). The metrics are token-weighted the same way, and averaged over
        the optimiser steps (`clipfrac` is non-zero once the ratio moves: from the second step on)."""
        g = self.spec.grpo
        self.engine.train()
        rows_total = len(batch)
        parts = [slice(min(k * self.mini_batch_rows, rows_total), min((k + 1) * self.mini_batch_rows, rows_total))
                 for k in range(self.mini_batches)]
        tokens = self.collectives.all_reduce(self.collectives.place(
            torch.stack([batch.target_mask[part].sum() for part in parts])))
        plans = [self._micro_batches(batch, part) for part in parts]
        # at least one pass: a mini-batch with no rows on any rank still takes its (zero-gradient) optimiser step,
        # so the step count, and the LR schedule's, do not depend on how the rows fell
        counts = [max(1, count) for count in self._in_lockstep(plans)]
        steps = g.ppo_epochs * self.mini_batches
        stats: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            for slices, count, part_tokens in zip(plans, counts, tokens, strict=True):
                total_tokens = part_tokens.clamp(min=1.0) / self.world.size
                padded = slices + [slice(0, 1)] * (count - len(slices))
                for index, rows in enumerate(padded):
                    self.engine.set_gradient_accumulation_boundary(index == count - 1)
                    mb = self._to_device(batch.select(rows))
                    # a padding pass counts no tokens: zero weight, so zero gradient and no share of the metrics
                    mask = mb.target_mask if index < len(slices) else torch.zeros_like(mb.target_mask)
                    log_prob = token_log_probs(self.engine, mb, self.spec.rollout.temperature)
                    old_mb = old[rows, : log_prob.shape[1]].to(log_prob) if old is not None else log_prob.detach()
                    ref_mb = ref[rows, : log_prob.shape[1]].to(log_prob) if ref is not None else None
                    loss, terms = grpo.ttrv_loss(log_prob, old_mb, ref_mb, advantages[rows].to(log_prob), mask,
                                                 total_tokens, g.clip_low, g.clip_high, g.dual_clip, g.kl_coef,
                                                 g.kl_kind)
                    self.engine.backward(loss, scale_wrt_gas=False)
                    self.engine.step()
                    w = float(terms.pop("weight")) / self.world.size
                    for key, value in terms.items():
                        stats[key] = stats.get(key, 0.0) + w * float(value) / steps
        # token-weighted shares of the step's metrics: their sum over ranks is the step's
        summed = self.collectives.all_reduce(self.collectives.tensor(list(stats.values())))
        stats |= dict(zip(stats, summed.tolist(), strict=True))
        stats["optimizer_steps"] = self.engine.global_steps  # DeepSpeed's count of optimiser steps taken so far
        stats["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return stats

    def weight_files(self) -> dict[str, bytes]:
        """The files a weight version carries beside its tensors: for LoRA, peft's adapter_config.json (what
        `PeftConfig.save_pretrained` writes, sets as sorted lists), which vLLM's /v1/load_lora_adapter and peft read.
        Without it the store refuses a LoRA version, so a LoRA run failed at its first publish."""
        if self.spec.model.lora is None:
            return {}
        config = {key: sorted(value) if isinstance(value, set) else value
                  for key, value in self.module.peft_config["default"].to_dict().items()}
        config["base_model_name_or_path"] = self.spec.model.path
        return {"adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode()}

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """What a rollout engine needs to serve the current policy: the LoRA adapter (peft names), or the trainable
        parameters under the base checkpoint's names (a frozen vision tower is not re-sent).

        Every rank must call it: under ZeRO-3 it gathers the partitioned parameters, a collective. Rank 0 gets the
        tensors (it alone publishes them), the other ranks None."""
        return self.trainable_state_of(self.module)

    def base_trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights as they were before adaptation: the initial adapter, or the base checkpoint's."""
        if self._initial_adapter is not None:
            return self._initial_adapter
        base = load_model(self._model_path, self.spec.model.dtype, "cpu",
                          trust_remote_code=self.spec.model.trust_remote_code).state_dict()
        names = {name for name, p in self.module.named_parameters() if p.requires_grad}
        return {name: base[name] for name in names}

    def trainable_state_of(self, module) -> dict[str, torch.Tensor] | None:
        """See `trainable_state`. Under ZeRO-3 each rank holds a partition of every parameter (an empty
        placeholder in the module); `deepspeed.zero.GatheredParameters` all-gathers them on entry and partitions
        them again on exit (deepspeed/runtime/zero/partition_parameters.py), so every rank must enter it, rank 0
        alone copying the gathered tensors out. modifier_rank=0 (nothing is modified) frees the gathered memory on
        exit, as its docstring asks."""
        trainable = [p for p in module.parameters() if p.requires_grad]
        with self._gathered(trainable, modifier_rank=0):
            if not self.world.is_main:
                return None
            if self.spec.model.lora is not None:
                from peft import get_peft_model_state_dict

                return {k: v.detach().cpu().clone().contiguous()
                        for k, v in get_peft_model_state_dict(module).items()}
            names = {name for name, p in module.named_parameters() if p.requires_grad}
            return {n: p.detach().cpu().clone().contiguous() for n, p in module.named_parameters() if n in names}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore trainable weights (collapse-guard roll-back); optimiser state is kept. Every rank calls it with
        the same tensors; under ZeRO-3 rank 0 writes them into the gathered parameters and DeepSpeed broadcasts
        rank 0's values on exit (GatheredParameters with modifier_rank=0)."""
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        with self._gathered(trainable, modifier_rank=0):
            if self.spec.resources.zero_stage == 3 and not self.world.is_main:
                return
            if self.spec.model.lora is not None:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.module, tensors)
            else:
                with torch.no_grad():
                    named = dict(self.module.named_parameters())
                    for name, value in tensors.items():
                        named[name].copy_(value.to(named[name]))

    def _gathered(self, params: list[torch.nn.Parameter], modifier_rank: int):
        """The full parameters inside the block under ZeRO-3 (a collective: every rank enters); a no-op otherwise."""
        import contextlib

        if self.spec.resources.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        return batch if self.device.type == "cpu" else batch.to(self.device)


def _initial_adapter(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batches differ in length; right-pad with 0 to the longest (masked positions are never read)."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]).cpu()
