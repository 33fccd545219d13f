"""Classic RLHF PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Per step:
1. sample one response per prompt from the policy: softmax(logits / temperature) and nothing
   else, under the same autocast as the scoring passes, so the distribution the tokens come
   from is the one the loss and the KL score;
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
scheduler, KL controller, RNG) are written atomically every `save_steps` and resumed from.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from tuneloop.trainer import ppo_math as pm
from tuneloop.trainer.config import ConfigError, MetricsParams, PPOParams, PPOStageConfig
from tuneloop.trainer.distributed import world_size
from tuneloop.trainer.modeling import (
    CHECKPOINTS_DIR,
    load_policy,
    load_tokenizer,
    lora_config,
    resolve,
    save_final,
)
from tuneloop.trainer.rewards import RewardFunc
from tuneloop.trainer.stages import (
    Observers,
    StageData,
    StageResult,
    StageRun,
    checkpoint_to_resume,
    conclude,
    online_rl_data,
)

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


def sampling_config(temperature: float, max_new_tokens: int, pad_id: int | None, eos_ids: set[int]) -> GenerationConfig:
    """Plain temperature sampling, every logits processor that `generate` would add set to off.

    Each field is set even at its neutral value: `generate` fills unset fields from the
    model's generation_config.json and then from global defaults (top_k=50), and either would
    sample from a distribution other than the softmax the loss scores.
    """
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        num_return_sequences=1,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        bad_words_ids=None,
        sequence_bias=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        min_new_tokens=0,
        max_new_tokens=max_new_tokens,
        renormalize_logits=False,
        remove_invalid_values=False,
        guidance_scale=None,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )


@contextmanager
def model_generation_defaults_off(model: nn.Module) -> Iterator[None]:
    """Within: `generate` sees a blank model generation config, so nothing is inherited from it.

    The model's own config is put back afterwards: it is saved with the trained model and
    serving should keep it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel delegates
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count real tokens only, as `generate` counts them.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    # log p of each sampled token from `generate`'s own scores; only with rollout(..., keep_sample_logprobs=True)
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
        if world_size() > 1:
            # This loop has no gradient all-reduce: N processes would train N diverging
            # copies and race on output_dir. Scale it with rollout_batch_size on one device.
            raise ConfigError("ppo runs as one process; launch it without torchrun/accelerate")
        self.params = params
        self.prompts = prompts
        self.reward = reward
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
            self.policy.gradient_checkpointing_enable()
        hidden = self.policy.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden).to(self.device)

        trainable = [p for p in self.policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(
            trainable,
            lr=params.learning_rate,
            weight_decay=params.weight_decay,
            fused=params.optim == "adamw_torch_fused",
        )
        updates_per_step = params.ppo_epochs * params.rollout_batch_size // (
            params.per_device_train_batch_size * params.gradient_accumulation_steps
        )
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
        self.step = 0
        self.observers = Observers("ppo", params, path, output_dir, metrics, criteria)
        self.sink = self.observers.sink

    # ---- model passes -----------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.params.bf16))

    def _forward(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, with_values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._autocast():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                output_hidden_states=with_values,
                use_cache=False,
            )
            values = self.value_head(out.hidden_states[-1]) if with_values else None
        return out.logits, values

    def _ref_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.ref_model is not None:
            return self._forward(self.ref_model, input_ids, attention_mask, with_values=False)[0]
        with self.policy.disable_adapter():  # type: ignore[operator]
            return self._forward(self.policy, input_ids, attention_mask, with_values=False)[0]

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

    def _sample(self, enc: dict[str, torch.Tensor], *, with_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt + sampled response ids, `generate`'s per-step scores [B, R, V] if asked for)."""
        p = self.params
        config = sampling_config(p.temperature, p.max_new_tokens, self.tokenizer.pad_token_id, self.eos_ids)
        config.output_scores = with_scores
        config.return_dict_in_generate = True
        # Same autocast as the scoring passes: sampling in fp32 and scoring in bf16 would score
        # a distribution other than the sampled one.
        with model_generation_defaults_off(self.policy), self._autocast():
            out = self.policy.generate(**enc, generation_config=config)
        scores = torch.stack(out.scores, dim=1) if with_scores else None
        return out.sequences, scores

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Any], *, keep_sample_logprobs: bool = False) -> Rollout:
        p = self.params
        enc = self._encode_prompts(prompts)
        self.policy.eval()
        generated, sample_scores = self._sample(enc, with_scores=keep_sample_logprobs)
        prompt_len = enc["input_ids"].shape[1]
        responses = generated[:, prompt_len:]
        mask, ended = response_mask(responses, self.eos_ids)
        texts = self.tokenizer.batch_decode(
            [r[: int(m.sum())] for r, m in zip(responses, mask, strict=True)], skip_special_tokens=True
        )
        scores = torch.tensor(self.reward(list(prompts), texts), dtype=torch.float32, device=self.device)

        attention_mask = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        logits, values = self._forward(self.policy, generated, attention_mask, with_values=True)
        resp_logits = logits[:, prompt_len - 1 : -1]
        logprobs = response_logprobs(resp_logits, responses, p.temperature)
        entropy = pm.entropy_from_logits(resp_logits / p.temperature)
        ref_logits = self._ref_logits(generated, attention_mask)[:, prompt_len - 1 : -1]
        ref_logprobs = response_logprobs(ref_logits, responses, p.temperature)
        assert values is not None
        sample_logprobs = None
        if sample_scores is not None:
            # `generate`'s scores are the processed logits it sampled from (already / temperature).
            sample_logprobs = response_logprobs(sample_scores, responses, 1.0) * mask
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
            scores = pm.normalize_scores(scores, self.score_moments, p.reward_clip)
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
        return kl, pm.whiten(advantages, batch.mask), returns

    def micro_loss(
        self, batch: Rollout, micro: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor
    ) -> tuple[torch.Tensor, pm.PolicyLoss, pm.ValueLoss]:
        """(total loss, policy loss, value loss) of the rollout rows `micro` under the current weights."""
        p = self.params
        logits, values = self._forward(self.policy, batch.input_ids[micro], batch.attention_mask[micro], with_values=True)
        assert values is not None
        sl = slice(batch.prompt_len - 1, -1)
        logprobs = response_logprobs(logits[:, sl], batch.input_ids[micro, batch.prompt_len :], p.temperature)
        m = batch.mask[micro]
        pg = pm.clipped_policy_loss(logprobs, batch.logprobs[micro], advantages[micro], m, p.cliprange)
        vf = pm.clipped_value_loss(values[:, sl].float(), batch.values[micro], returns[micro], m, p.cliprange_value)
        return pg.loss + p.vf_coef * vf.loss, pg, vf

    def train_step(self) -> dict[str, float]:
        p = self.params
        started = time.monotonic()
        batch = self.rollout(self._batch_prompts(self.step))
        mask = batch.mask
        scores = self.shaped_scores(batch)
        kl, advantages, returns = self.advantages(batch, scores)

        update = p.per_device_train_batch_size * p.gradient_accumulation_steps
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl")}
        self.policy.train()
        for _ in range(p.ppo_epochs):
            order = torch.randperm(len(mask), device=self.device)
            for start in range(0, len(order), update):
                self.optimizer.zero_grad(set_to_none=True)
                for micro in order[start : start + update].split(p.per_device_train_batch_size):
                    loss, pg, vf = self.micro_loss(batch, micro, advantages, returns)
                    (loss / p.gradient_accumulation_steps).backward()
                    for key, value in (
                        ("policy_loss", pg.loss),
                        ("value_loss", vf.loss),
                        ("clip_fraction", pg.clip_fraction),
                        ("value_clip_fraction", vf.clip_fraction),
                        ("approx_kl", pg.approx_kl),
                    ):
                        stats[key].append(value.item())
                params_ = [q for g in self.optimizer.param_groups for q in g["params"]]
                torch.nn.utils.clip_grad_norm_(params_, p.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()

        kl_per_response = kl.sum(1)
        mean_kl = float(kl_per_response.mean())
        coef_used = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, p.rollout_batch_size)
        self.step += 1
        lengths = mask.sum(1)
        row = {
            "reward": float(batch.scores.mean()),
            "reward_std": float(batch.scores.std()) if len(batch.scores) > 1 else 0.0,
            "reward_normalized": float(scores.mean()),
            "reward_running_mean": self.score_moments.mean,
            "reward_running_std": self.score_moments.std,
            "kl": mean_kl,
            "kl_coef": coef_used,
            "non_score_reward": float(-(coef_used * kl_per_response).mean()),
            "response_length": float(lengths.float().mean()),
            "entropy": float(batch.entropy.mean()),
            "returns_mean": float(pm.masked_mean(returns, mask)),
            "value_mean": float(pm.masked_mean(batch.values, mask)),
            "learning_rate": float(self.scheduler.get_last_lr()[0]),
            "step_seconds": time.monotonic() - started,
            **{k: sum(v) / len(v) for k, v in stats.items() if v},
        }
        row["loss"] = row["policy_loss"] + p.vf_coef * row["value_loss"]
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
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, tmp / "rng.pt")
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
        rng = torch.load(checkpoint / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
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
        watch.begin(self.step, self.policy)
        every = self.params.watch.eval_every
        while self.step < self.params.max_steps:
            row = self.train_step()
            losses.append(row["loss"])
            logged = None
            if self.step % self.params.logging_steps == 0 or self.step == self.params.max_steps:
                logged = self.sink.log(self.step, row)
            flags = watch.check(self.step, logged, self.policy, measure=bool(every) and self.step % every == 0)
            if watch.should_stop(flags):
                log.warning("ppo stopped by the hacking watch at step %d: %s", self.step, flags)
                break
            if self.step % self.params.save_steps == 0 and self.step < self.params.max_steps:
                self.save_checkpoint()

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
