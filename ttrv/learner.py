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
from ttrv.modeling import frozen, load_model, torch_dtype
from ttrv.policy import TrainBatch, token_log_probs
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


class Learner:
    def __init__(self, spec: RunSpec, model_path: str, total_steps: int, world: World, sequences_per_rank: int,
                 collectives: Collectives):
        import deepspeed

        self.spec = spec
        self.world = world
        self.collectives = collectives
        self.device = collectives.device
        self.dtype = torch_dtype(spec.model.dtype, self.device)
        model = load_model(model_path, spec.model.dtype, self.device, spec.model.attn_implementation,
                           spec.model.trust_remote_code)
        for name, param in model.named_parameters():
            if frozen(name, spec.model.trainable, model.config.model_type):
                param.requires_grad_(False)
        self.reference = None
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
            self.reference = load_model(model_path, spec.model.dtype, self.device, spec.model.attn_implementation,
                           spec.model.trust_remote_code)
            self.reference.requires_grad_(False)
        if spec.resources.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model.trainable: no trainable parameters were found in this model")
        g = spec.grpo
        trainable_params = sum(p.numel() for p in trainable)  # counted before ZeRO-3 partitions them to empty
        optimizer = make_optimizer(spec, trainable)
        optimizer_steps = total_steps * g.ppo_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optimizer_steps, g.warmup_ratio,
                                                                              g.schedule))
        self._model_path = model_path
        # on every rank, before DeepSpeed partitions anything: a roll-back to the base restores it on every rank
        self._initial_adapter = _initial_adapter(model) if spec.model.lora is not None else None
        self.micro_batch = min(g.micro_batch_size, max(1, sequences_per_rank))
        self.accumulation = max(1, math.ceil(sequences_per_rank / self.micro_batch))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(spec, self.micro_batch, self.accumulation, self.dtype),
        )
        if torch.device(self.engine.device).type != self.device.type:
            raise RuntimeError(f"DeepSpeed put the policy on {self.engine.device}, the trainer's collectives expect "
                               f"{self.device}; set DS_ACCELERATOR to match the hardware (cpu or cuda)")
        log.info("learner_ready", trainable_params=trainable_params, zero=spec.resources.zero_stage,
                 optimizer=type(optimizer).__name__, offload=offloads_optimizer(spec),
                 micro_batch=self.micro_batch, accumulation=self.accumulation, world=world.size)

    @property
    def module(self):
        return self.engine.module

    def _micro_batches(self, batch: TrainBatch) -> list[slice]:
        return [slice(s, min(s + self.micro_batch, len(batch))) for s in range(0, len(batch), self.micro_batch)]

    @torch.no_grad()
    def reference_log_probs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs under the frozen base model (LoRA: the policy with its adapter switched off)."""
        if self.spec.grpo.kl_coef == 0:
            return None
        temperature = self.spec.rollout.temperature
        parts = []
        for rows in self._micro_batches(batch):
            mb = self._to_device(batch.select(rows))
            if self.reference is not None:
                parts.append(token_log_probs(self.reference, mb, temperature))
            else:
                with self.module.disable_adapter():
                    parts.append(token_log_probs(self.module, mb, temperature))
        return _cat_padded(parts)

    @torch.no_grad()
    def old_log_probs(self, batch: TrainBatch) -> torch.Tensor | None:
        """Log-probs before the update. With one gradient pass over the batch (ppoEpochs 1, one optimiser step) the
        ratio is 1 at the only forward, so the detached current log-probs serve and this pass is skipped."""
        if self.spec.grpo.ppo_epochs == 1:
            return None
        self.engine.eval()
        parts = [token_log_probs(self.engine, self._to_device(batch.select(r)), self.spec.rollout.temperature)
                 for r in self._micro_batches(batch)]
        self.engine.train()
        return _cat_padded(parts)

    def update(self, batch: TrainBatch, advantages: torch.Tensor, old: torch.Tensor | None,
               ref: torch.Tensor | None) -> dict[str, float]:
        """ppoEpochs optimiser steps on this rank's sequences; every rank runs `accumulation` micro-batches per
        optimiser step (padding with zero-weight passes) so DeepSpeed's gradient reduction stays in lockstep.

        The objective and its metrics are `grpo.ttrv_loss`; here it is only scheduled. Each micro-batch's
        token-mean loss is weighted by its share of all ranks' response tokens of the step, times the world size
        (`total_tokens`), so the gradient DeepSpeed averages over ranks is exactly the token-mean over every
        response token of the step, however the tokens fall on ranks and micro-batches (DeepSpeed's division by
        the accumulation steps is undone here). The metrics are token-weighted the same way."""
        g = self.spec.grpo
        self.engine.train()
        tokens = self.collectives.all_reduce(self.collectives.place(batch.target_mask.sum().reshape(1)))
        total_tokens = tokens[0].clamp(min=1.0) / self.world.size
        stats: dict[str, float] = {}
        for _ in range(g.ppo_epochs):
            slices = self._micro_batches(batch)
            padded = slices + [slices[0]] * (self.accumulation - len(slices))
            for index, rows in enumerate(padded):
                mb = self._to_device(batch.select(rows))
                # a padding pass counts no tokens: zero weight, so zero gradient and no share of the metrics
                mask = mb.target_mask if index < len(slices) else torch.zeros_like(mb.target_mask)
                log_prob = token_log_probs(self.engine, mb, self.spec.rollout.temperature)
                old_mb = old[rows, : log_prob.shape[1]].to(log_prob) if old is not None else log_prob.detach()
                ref_mb = ref[rows, : log_prob.shape[1]].to(log_prob) if ref is not None else None
                loss, terms = grpo.ttrv_loss(log_prob, old_mb, ref_mb, advantages[rows].to(log_prob), mask,
                                             total_tokens, g.clip_low, g.clip_high, g.dual_clip, g.kl_coef, g.kl_kind)
                self.engine.backward(loss * self.accumulation)
                self.engine.step()
                w = float(terms.pop("weight")) / self.world.size
                for key, value in terms.items():
                    stats[key] = stats.get(key, 0.0) + w * float(value) / g.ppo_epochs
        # token-weighted shares of the step's metrics: their sum over ranks is the step's
        summed = self.collectives.all_reduce(self.collectives.tensor(list(stats.values())))
        stats |= dict(zip(stats, summed.tolist(), strict=True))
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
