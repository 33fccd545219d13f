"""Classic RLHF PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Per step:
1. sample one response per prompt from the policy: softmax(logits / temperature) and nothing
   else, under the same autocast as the scoring passes, so the distribution the tokens come
   from is the one the loss and the KL score; each row from its own seed (`sampling`), by
   `generate` or, with rollout_engine vllm, by a vLLM engine holding this step's weights
   (`vllm_rollouts`);
2. score each (prompt, response) with the reward function and normalise the score by running
   statistics over the run (the reward model's scale then does not set beta's meaning);
3. with the rollout's weights, compute token log-probs of the policy and of the frozen
   reference, and the value head's estimates;
4. per-token rewards = -beta * KL(policy || reference) at each token (k3 bounded), plus the
   score on the last token; GAE advantages (whitened) and returns;
5. `ppo_epochs` passes of clipped-surrogate policy loss + clipped value loss in updates of
   per_device_train_batch_size * gradient_accumulation_steps rollouts;
6. the KL coefficient is fixed or steered to a target KL (adaptive controller).

The value head is a linear layer on the policy's last hidden state (shared trunk). The
arithmetic is in `ppo_math`. Checkpoints (policy or adapter, value head, optimizer,
scheduler, KL controller, score statistics) are written atomically every `save_steps` and
resumed from, also on another number of processes: sampling and shuffling seeds derive from
the run's seed and the step, so no RNG state is carried.

Under torchrun each of N processes samples and trains on its share of every step's global
batch (rollout_batch_size / N rows), with the policy and value head in DistributedDataParallel.
What one process would compute over the whole batch is computed over all of them: score
normalisation sees every score, advantages are whitened by the global moments, losses are
token means over the update's tokens in all processes, and the KL controller steps on the
global KL. Only the main process writes checkpoints, metrics and the model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import LogitsProcessorList
from tuneloop.trainer import ppo_math as pm
from tuneloop.trainer.config import (
    ConfigError,
    MetricsParams,
    PPOParams,
    PPOStageConfig,
)
from tuneloop.trainer.distributed import (
    barrier,
    check_ranks_agree,
    ddp_backend,
    is_main_process,
    on_main,
    world_size,
)
from tuneloop.trainer.modeling import (
    CHECKPOINTS_DIR,
    load_policy,
    load_tokenizer,
    lora_config,
    resolve,
    save_final,
)
from tuneloop.trainer.rewards import RewardFunc
from tuneloop.trainer.sampling import (
    SeededSampler,
    derived_seed,
    greedy_config,
    model_generation_defaults_off,
)
from tuneloop.trainer.stages import (
    Observers,
    StageData,
    StageResult,
    StageRun,
    checkpoint_to_resume,
    conclude,
    online_rl_data,
)
from tuneloop.trainer.vllm_rollouts import RolloutEngine, check_gap

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.pt"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Start near zero: early advantages then come from rewards, not from a random critic.
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


# Config fields (and same-named attributes that attention modules copy at init) holding a
# dropout probability, across the decoder families the trainer loads (Llama, Qwen, Mistral,
# Gemma, Phi, GPT-2, Falcon, ...). nn.Dropout modules alone miss the attention dropout that
# Llama-style models pass straight to the attention kernel.
DROPOUT_FIELDS = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "activation_dropout",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "summary_first_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of `model` off: nn.Dropout modules, config fields and attention modules' copies.

    PPO needs the rollout pass and the first update pass over it to give the same log-probs
    (ratio 1), and the reference's log-probs to be those of the model it is.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        _zero_dropout_fields(module)
        config = getattr(module, "config", None)
        if config is not None:
            _zero_dropout_fields(config)
            if hasattr(config, "get_text_config"):  # multimodal configs nest the decoder's
                _zero_dropout_fields(config.get_text_config())


def _zero_dropout_fields(obj: object) -> None:
    for name in DROPOUT_FIELDS:
        if isinstance(getattr(obj, name, None), float):
            setattr(obj, name, 0.0)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count real tokens only, as `generate` counts them.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValue(nn.Module):
    """The trained parameters in one module: (logits, values) of a batch, for DDP to wrap."""

    def __init__(self, policy: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=True,
            use_cache=False,
        )
        return out.logits, self.value_head(out.hidden_states[-1])


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under logits / temperature (the distribution the tokens were sampled from)."""
    logits = logits.float() / temperature
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_mask(responses: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of tokens up to and including the first eos, whether an eos was produced)."""
    is_eos = torch.zeros_like(responses, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= responses == eos
    ended = is_eos.any(dim=1)
    # Tokens after the first eos: at least one eos strictly before them.
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).float(), ended


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + R] prompt (left-padded) + response
    attention_mask: torch.Tensor
    prompt_len: int
    mask: torch.Tensor  # [B, R] response tokens that count
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # the reward function's, as it gave them
    ended: torch.Tensor  # whether each response produced an eos
    entropy: torch.Tensor  # mean per-token entropy of each response
    # log p of each sampled token in the distribution the sampler drew it from; only with
    # rollout(..., keep_sample_logprobs=True)
    sample_logprobs: torch.Tensor | None = None


class PPOTrainer:
    def __init__(
        self,
        params: PPOParams,
        model_ref: str,
        prompts: list[Any],
        reward: RewardFunc,
        output_dir: Path,
        *,
        registry_root: Path | None = None,
        metrics: MetricsParams | None = None,
        criteria: Path | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.params = params
        self.prompts = prompts
        self.reward = reward
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        update = params.per_device_train_batch_size * params.gradient_accumulation_steps
        share, rest = divmod(params.rollout_batch_size, self.world)
        if rest or share % update:
            raise ConfigError(
                f"rollout_batch_size ({params.rollout_batch_size}) must split into {self.world} equal shares, each a "
                f"multiple of per_device_train_batch_size * gradient_accumulation_steps ({update})"
            )
        self.share = share
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=ddp_backend() or "nccl")
        torch.manual_seed(params.seed)

        path = resolve(model_ref, registry_root)
        self.model_path = path
        self.tokenizer = load_tokenizer(path, padding_side="left")
        self.policy = load_policy(path)
        lora = lora_config(params.lora)
        if lora is not None:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, lora)
        self.ref_model: nn.Module | None = None
        if params.reference:
            self.ref_model = load_policy(resolve(params.reference, registry_root))
        elif lora is None:
            self.ref_model = copy.deepcopy(self.policy)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False).eval().to(self.device)
        for module in (self.policy, self.ref_model):
            if module is not None:
                disable_dropout(module)
        self.policy.to(self.device)
        if params.gradient_checkpointing:
            # Non-reentrant: the reentrant variant re-runs forwards that DDP has already counted.
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hidden = self.policy.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden).to(self.device)
        self.model = PolicyWithValue(self.policy, self.value_head)
        # The module the update passes run through: DDP averages its gradients across processes.
        self.trained: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.trained = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # rotary tables and the like: the same in every process
            )

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=params.learning_rate,
            weight_decay=params.weight_decay,
            fused=params.optim == "adamw_torch_fused",
        )
        updates_per_step = params.ppo_epochs * share // update
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            params.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=params.warmup_steps * updates_per_step,
            num_training_steps=params.max_steps * updates_per_step,
        )
        kl = params.kl
        self.kl_ctl: pm.FixedKLController = (
            pm.AdaptiveKLController(kl.init_coef, kl.target, kl.horizon) if kl.adaptive else pm.FixedKLController(kl.init_coef)
        )
        gen = self.policy.generation_config
        eos = gen.eos_token_id if gen is not None else None
        self.eos_ids = {self.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.discard(None)
        self.score_moments = pm.RunningMoments()
        self.engine: RolloutEngine | None = None
        self._pushed_at: int | None = None  # the step whose weights the engine holds
        if params.rollout_engine == "vllm":
            self.engine = RolloutEngine(
                path,
                dtype="bfloat16" if params.bf16 else "float32",
                max_model_len=params.max_prompt_length + params.max_new_tokens,
                sequences=share,
            )
        self.step = 0
        self.observers = Observers("ppo", params, path, output_dir, metrics, criteria)
        self.sink = self.observers.sink

    # ---- model passes -----------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.params.bf16))

    def _logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
            ).logits

    def _with_values(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            return model(input_ids, attention_mask)

    def _ref_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logits(self.ref_model, input_ids, attention_mask)
        with self.policy.disable_adapter():  # type: ignore[operator]
            return self._logits(self.policy, input_ids, attention_mask)

    # ---- across processes -------------------------------------------------------------

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the processes."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def _max(self, x: torch.Tensor) -> float:
        """The largest of `x` (a scalar) over the processes."""
        x = x.detach().clone().float()
        if self.world > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch's rows of a per-row tensor, in row order."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _mean(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """Mean of `x` (over `mask`'s entries) across the global batch."""
        m = torch.ones_like(x) if mask is None else mask
        total, count = self._sum(torch.stack([(x * m).sum(), m.sum()]).double()).tolist()
        return total / max(count, 1.0)

    def _rows(self) -> range:
        """This process's rows of a step's global batch."""
        return range(self.rank * self.share, (self.rank + 1) * self.share)

    # ---- one step ---------------------------------------------------------------------

    def _batch_prompts(self, step: int) -> list[Any]:
        """Prompts of a step: epochs of seeded permutations, so a resumed run sees the same ones."""
        n, size = len(self.prompts), self.params.rollout_batch_size
        perms: dict[int, list[int]] = {}
        out = []
        for i in range(step * size, (step + 1) * size):
            epoch, pos = divmod(i, n)
            if epoch not in perms:
                seeded = torch.Generator().manual_seed(self.params.seed * 100003 + epoch)
                perms[epoch] = torch.randperm(n, generator=seeded).tolist()
            out.append(self.prompts[perms[epoch][pos]])
        return out

    def _encode_prompts(self, prompts: Sequence[Any]) -> dict[str, torch.Tensor]:
        texts = [
            p if isinstance(p, str) else self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        self.tokenizer.truncation_side = "left"  # keep the end of a long prompt: it holds the question
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.params.max_prompt_length,
            add_special_tokens=False,
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _sample(
        self, enc: dict[str, torch.Tensor], rows: Sequence[int], *, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt + sampled response ids, the log-probs each token was drawn from [B, R, V] if kept)."""
        p = self.params
        sampler = SeededSampler(
            [derived_seed(p.seed, self.step, row) for row in rows], p.temperature, self.device, keep=keep
        )
        config = greedy_config(p.max_new_tokens, self.tokenizer.pad_token_id, self.eos_ids)
        # Same autocast as the scoring passes: sampling in fp32 and scoring in bf16 would score
        # a distribution other than the sampled one.
        with model_generation_defaults_off(self.policy), self._autocast():
            sequences = self.policy.generate(
                **enc, generation_config=config, logits_processor=LogitsProcessorList([sampler])
            )
        kept = torch.stack(sampler.kept, dim=1) if sampler.kept is not None else None
        return sequences, kept

    def _sample_vllm(self, enc: dict[str, torch.Tensor], rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt + sampled response ids, vLLM's log-probs of the sampled tokens [B, R]), from the
        rollout engine holding this step's weights."""
        p = self.params
        assert self.engine is not None
        if self._pushed_at != self.step:
            self.engine.push(self._named_weights())
            self._pushed_at = self.step
        prompts = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        seeds = [derived_seed(p.seed, self.step, row) for row in rows]
        sampled = self.engine.sample(prompts, seeds, p.temperature, p.max_new_tokens, self.eos_ids)
        width = max(1, max(len(tokens) for tokens, _ in sampled))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        # Only a response that ended at an eos is shorter than the longest: padding follows its eos.
        responses = torch.full((len(sampled), width), pad, dtype=torch.long)
        logprobs = torch.zeros(len(sampled), width)
        for i, (tokens, lps) in enumerate(sampled):
            responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, : len(lps)] = torch.tensor(lps)
        return torch.cat([enc["input_ids"], responses.to(self.device)], dim=1), logprobs.to(self.device)

    def _named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights under the names of the full model (adapters merged in while read)."""
        if not self.params.lora.enabled:
            for name, param in self.policy.named_parameters():
                yield name, param.data
            return
        self.policy.merge_adapter()  # type: ignore[operator]
        try:
            for name, param in self.policy.named_parameters():
                if "lora_" in name:
                    continue
                yield name.removeprefix("base_model.model.").replace(".base_layer", ""), param.data
        finally:
            self.policy.unmerge_adapter()  # type: ignore[operator]

    @torch.no_grad()
    def rollout(
        self, prompts: Sequence[Any], rows: Sequence[int] | None = None, *, keep_sample_logprobs: bool = False
    ) -> Rollout:
        """Samples and scores `prompts`, the rows `rows` of this step's global batch (default: 0, 1, ...)."""
        p = self.params
        enc = self._encode_prompts(prompts)
        self.policy.eval()
        rows = rows or range(len(prompts))
        engine_logprobs = None
        if self.engine is not None:
            generated, engine_logprobs = self._sample_vllm(enc, rows)
            sampled_from = None
        else:
            generated, sampled_from = self._sample(enc, rows, keep=keep_sample_logprobs)
        prompt_len = enc["input_ids"].shape[1]
        responses = generated[:, prompt_len:]
        mask, ended = response_mask(responses, self.eos_ids)
        texts = self.tokenizer.batch_decode(
            [r[: int(m.sum())] for r, m in zip(responses, mask, strict=True)], skip_special_tokens=True
        )
        scores = torch.tensor(self.reward(list(prompts), texts), dtype=torch.float32, device=self.device)

        attention_mask = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        logits, values = self._with_values(self.model, generated, attention_mask)
        resp_logits = logits[:, prompt_len - 1 : -1]
        logprobs = response_logprobs(resp_logits, responses, p.temperature)
        entropy = pm.entropy_from_logits(resp_logits / p.temperature)
        ref_logits = self._ref_logits(generated, attention_mask)[:, prompt_len - 1 : -1]
        ref_logprobs = response_logprobs(ref_logits, responses, p.temperature)
        sample_logprobs = None if engine_logprobs is None else engine_logprobs * mask
        if sampled_from is not None:
            sample_logprobs = torch.gather(sampled_from, 2, responses.unsqueeze(-1)).squeeze(-1) * mask
        return Rollout(
            input_ids=generated,
            attention_mask=attention_mask,
            prompt_len=prompt_len,
            mask=mask,
            logprobs=logprobs * mask,
            ref_logprobs=ref_logprobs * mask,
            values=values[:, prompt_len - 1 : -1].float() * mask,
            scores=scores,
            ended=ended,
            entropy=(entropy * mask).sum(1) / mask.sum(1).clamp(min=1),
            sample_logprobs=sample_logprobs,
        )

    def shaped_scores(self, batch: Rollout) -> torch.Tensor:
        """The scores that enter the rewards: normalised by the run's statistics, then the eos penalty."""
        p = self.params
        scores = batch.scores
        if p.reward_normalization == "running":
            # Every process takes in the whole batch's scores, so the statistics stay one.
            everyone = pm.normalize_scores(self._gather(scores), self.score_moments, p.reward_clip)
            scores = everyone[self.rank * len(scores) : (self.rank + 1) * len(scores)]
        if p.missing_eos_penalty is not None:
            scores = scores - p.missing_eos_penalty * (~batch.ended).float()
        return scores

    def advantages(self, batch: Rollout, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token KL, whitened advantages, returns) of a rollout at the current KL coefficient."""
        p = self.params
        kl, rewards = pm.assemble_rewards(
            scores, batch.logprobs, batch.ref_logprobs, batch.mask, self.kl_ctl.value, p.kl.estimator, p.kl.clip
        )
        advantages, returns = pm.gae(rewards, batch.values, batch.mask, p.gamma, p.lam)
        all_reduce = self._sum if self.world > 1 else None
        return kl, pm.whiten(advantages, batch.mask, all_reduce=all_reduce), returns

    def micro_loss(
        self,
        batch: Rollout,
        micro: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, pm.PolicyLoss, pm.ValueLoss]:
        """(total loss, policy loss, value loss) of the rollout rows `micro` under the current weights;
        token means over `count` tokens (default: those of `micro`)."""
        p = self.params
        logits, values = self._with_values(self.trained, batch.input_ids[micro], batch.attention_mask[micro])
        sl = slice(batch.prompt_len - 1, -1)
        logprobs = response_logprobs(logits[:, sl], batch.input_ids[micro, batch.prompt_len :], p.temperature)
        m = batch.mask[micro]
        pg = pm.clipped_policy_loss(logprobs, batch.logprobs[micro], advantages[micro], m, p.cliprange, count)
        vf = pm.clipped_value_loss(values[:, sl].float(), batch.values[micro], returns[micro], m, p.cliprange_value, count)
        return pg.loss + p.vf_coef * vf.loss, pg, vf

    def _update(self, batch: Rollout, rows: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """One optimizer update on `rows` (and the other processes' rows of the same update).

        Each micro-batch's loss is its share of the token mean over the whole update, so the
        update's gradient is the same however it is split into micro-batches and processes.
        Returns the update's (policy loss, value loss, clip fraction, value clip fraction,
        approx KL), global token means.
        """
        p = self.params
        count = self._sum(batch.mask[rows].sum())
        self.optimizer.zero_grad(set_to_none=True)
        micros = rows.split(p.per_device_train_batch_size)
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for i, micro in enumerate(micros):
            # DDP all-reduces gradients in the backward of the last micro-batch only.
            last = i == len(micros) - 1
            with nullcontext() if last or self.world == 1 else self.trained.no_sync():  # type: ignore[operator]
                loss, pg, vf = self.micro_loss(batch, micro, advantages, returns, count)
                # DDP averages gradients over processes; each loss is already a share of the global mean.
                (loss * self.world).backward()
            sums += torch.stack([pg.loss, vf.loss, pg.clip_fraction, vf.clip_fraction, pg.approx_kl]).detach().double()
        params_ = [q for g in self.optimizer.param_groups for q in g["params"]]
        torch.nn.utils.clip_grad_norm_(params_, p.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return self._sum(sums)

    def train_step(self) -> dict[str, float]:
        p = self.params
        started = time.monotonic()
        rows = self._rows()
        step_prompts = self._batch_prompts(self.step)
        batch = self.rollout([step_prompts[i] for i in rows], rows)
        mask = batch.mask
        gap = None
        if self.engine is not None and batch.sample_logprobs is not None:
            # Checked before any update: rollouts from other weights must not be trained on.
            gap = self._max(((batch.logprobs - batch.sample_logprobs).abs() * mask).max())
            check_gap(gap, p.max_rollout_logprob_gap)
        scores = self.shaped_scores(batch)
        kl, advantages, returns = self.advantages(batch, scores)

        update = p.per_device_train_batch_size * p.gradient_accumulation_steps
        updates = []
        self.trained.train()
        for epoch in range(p.ppo_epochs):
            shuffle = torch.Generator().manual_seed(derived_seed(p.seed, self.step, -1 - epoch, self.rank))
            order = torch.randperm(len(mask), generator=shuffle).to(self.device)
            for start in range(0, len(order), update):
                updates.append(self._update(batch, order[start : start + update], advantages, returns))
        stats = torch.stack(updates).mean(0).tolist()

        mean_kl = self._mean(kl.sum(1))
        coef_used = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, p.rollout_batch_size)
        self.step += 1
        raw = self._gather(batch.scores)
        row = {
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "reward_normalized": self._mean(scores),
            "reward_running_mean": self.score_moments.mean,
            "reward_running_std": self.score_moments.std,
            "kl": mean_kl,
            "kl_coef": coef_used,
            "non_score_reward": -coef_used * mean_kl,
            "response_length": self._mean(mask.sum(1)),
            "entropy": self._mean(batch.entropy),
            "returns_mean": self._mean(returns, mask),
            "value_mean": self._mean(batch.values, mask),
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "step_seconds": time.monotonic() - started,
            **dict(zip(("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl"), stats, strict=True)),
        }
        row["loss"] = row["policy_loss"] + p.vf_coef * row["value_loss"]
        if gap is not None:
            row["rollout_logprob_gap"] = gap
        return row

    # ---- checkpoints ------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        checkpoints = self.output_dir / CHECKPOINTS_DIR
        checkpoints.mkdir(parents=True, exist_ok=True)
        final = checkpoints / f"checkpoint-{self.step}"
        tmp = checkpoints / f".checkpoint-{self.step}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        self.policy.save_pretrained(tmp / "policy")  # a PeftModel saves its adapter only
        torch.save(self.value_head.state_dict(), tmp / VALUE_HEAD_FILE)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(
            json.dumps(
                {"global_step": self.step, "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict()}
            )
        )
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        kept = sorted(
            (c for c in checkpoints.glob("checkpoint-*") if c.name[11:].isdigit()), key=lambda c: int(c.name[11:])
        )
        for old in kept[: -self.params.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, checkpoint: Path) -> None:
        if self.params.lora.enabled:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.policy, load_peft_weights(str(checkpoint / "policy")))
        else:
            loaded = load_policy(checkpoint / "policy")
            self.policy.load_state_dict(loaded.state_dict())
        self.value_head.load_state_dict(torch.load(checkpoint / VALUE_HEAD_FILE, map_location=self.device))
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt"))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.step = int(state["global_step"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if "score_moments" in state:  # checkpoints from before running normalisation start afresh
            self.score_moments.load_state_dict(state["score_moments"])

    def train(self, *, resume: bool = False) -> StageResult:
        started = time.monotonic()
        checkpoint = checkpoint_to_resume(self.output_dir, resume)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            log.info("resuming ppo from %s (step %d)", checkpoint, self.step)
        losses = []
        watch = self.observers.watch
        # The watch (and its eval generations) runs in the main process; every process gets
        # its decision. The step rows it reads are global figures, the same in each process.
        on_main(lambda: watch.begin(self.step, self.policy))
        every = self.params.watch.eval_every
        while self.step < self.params.max_steps:
            row = self.train_step()
            losses.append(row["loss"])
            logged = None
            if self.step % self.params.logging_steps == 0 or self.step == self.params.max_steps:
                logged = self.sink.log(self.step, row)
            measure = bool(every) and self.step % every == 0
            flags = on_main(lambda: watch.check(self.step, logged, self.policy, measure=measure))  # noqa: B023
            if watch.should_stop(flags):
                log.warning("ppo stopped by the hacking watch at step %d: %s", self.step, flags)
                break
            if self.step % self.params.save_steps == 0 and self.step < self.params.max_steps:
                if is_main_process():
                    self.save_checkpoint()
                barrier()  # a process that died past this point resumes from the checkpoint

        def save(model_dir: Path) -> None:
            save_final(self.policy, self.tokenizer, model_dir)
            # The critic is kept beside the policy so a later PPO run can start from it.
            torch.save(self.value_head.state_dict(), self.output_dir / VALUE_HEAD_FILE)

        return conclude(
            "ppo",
            self.output_dir,
            self.observers,
            save,
            steps=self.step,
            train_loss=sum(losses) / len(losses) if losses else None,
            started=started,
            checkpoint=checkpoint,
            weights_sha256=check_ranks_agree(self.model),
        )


def run_ppo_on(params: PPOParams, data: StageData, run: StageRun) -> StageResult:
    """PPO of `run.model` on `data`'s prompts, rewarded by `data.reward`."""
    trainer = PPOTrainer(
        params,
        run.model,
        data.prompt_set("ppo"),
        data.reward_func("ppo"),
        run.output_dir,
        registry_root=run.registry_root,
        metrics=run.metrics,
        criteria=run.criteria,
    )
    return trainer.train(resume=run.resume)


def run_ppo(config: PPOStageConfig, *, resume: bool = False) -> StageResult:
    return run_ppo_on(config, online_rl_data(config), StageRun.of(config, resume))
