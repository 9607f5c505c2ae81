"""AdaLoRA's rank allocation (Zhang et al., 2023), as PEFT's ``RankAllocator`` runs it.

Every adapter layer (:class:`layers.adalora.AdaLoRALinear`) starts at rank ``init_r``; over training
the allocator prunes the least important singular triplets of the whole model until ``target_r``
per layer remain on average, so important layers keep more rank than others.

- **Importance** of each parameter entry: its sensitivity ``|p · ∂L/∂p|``, smoothed by an EMA
  (``beta1``), times the EMA (``beta2``) of its uncertainty ``|sensitivity − smoothed|``. A
  triplet's score is its E entry's plus the mean over its A row and the mean over its B column.
- **Budget** (total kept triplets): all of them for the first ``tinit`` steps, then a cubic
  decrease to ``target_r x layers``, reached ``tfinal`` steps before the end; every ``deltaT``
  steps on the way the lowest-scoring triplets beyond the budget are masked (E set to zero). At
  the start of the final phase the mask is fixed and re-applied after every step.
- **Orthogonality**: ``orth_reg_weight`` times the mean over all A and B of ``‖P·Pᵀ − I‖_F``
  (``AAᵀ`` for A, ``BᵀB`` for B) is added to each step's loss (:meth:`RankAllocator.orth_backward`),
  keeping P and Q near orthogonal so that E acts like singular values.

Cost: two float32 tensors per adapter tensor (the two EMAs), i.e. 8 bytes per adapter element, plus
one entry-wise product per parameter per step. Steps are counted as PEFT's ``update_and_allocate``
counts them: the 0-based index of the optimizer step just taken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from layers.adalora import AdaLoRALinear
from qlora.lora.surgery import lora_modules
from quant.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaLoRASchedule:
    """AdaLoRA's settings, PEFT's ``AdaLoraConfig`` names (``init_r`` is the adapter's rank).

    Raises:
        InputError: on construction, values PEFT refuses too (a target above init_r, an empty schedule...).
    """

    init_r: int
    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self):
        if not 0 < self.target_r <= self.init_r:
            raise InputError(f"AdaLoRA's target rank must be between 1 and the starting rank {self.init_r} "
                             f"(lora.rank), got {self.target_r} (lora.adalora_target_r).")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_step - self.tfinal:
            raise InputError(f"AdaLoRA's schedule needs tinit ({self.tinit}) < total steps ({self.total_step}) - "
                             f"tfinal ({self.tfinal}): there must be steps left to prune in. Lower "
                             "lora.adalora_tinit or lora.adalora_tfinal, or train longer.")
        if self.deltaT < 1 or not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.orth_reg_weight < 0:
            raise InputError(f"AdaLoRA needs deltaT >= 1, beta1 and beta2 in (0, 1) and orth_reg_weight >= 0, got "
                             f"{self.deltaT}, {self.beta1}, {self.beta2}, {self.orth_reg_weight}.")

    def peft_fields(self) -> dict:
        """The ``adapter_config.json`` fields PEFT's ``AdaLoraConfig`` reads."""
        return {"init_r": self.init_r, "target_r": self.target_r, "total_step": self.total_step, "tinit": self.tinit,
                "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg_weight": self.orth_reg_weight}


def adalora_schedule(lora, total_steps: int) -> AdaLoRASchedule | None:
    """The recipe's AdaLoRA schedule over ``total_steps`` (``lora``: the recipe's lora section), None for others.

    Raises:
        InputError: see :class:`AdaLoRASchedule`.
    """
    if lora.variant != "adalora":
        return None
    return AdaLoRASchedule(lora.rank, lora.adalora_target_r, total_steps, lora.adalora_tinit, lora.adalora_tfinal,
                           lora.adalora_delta_t, lora.adalora_beta1, lora.adalora_beta2, lora.adalora_orth_reg)


class RankAllocator:
    """Scores, budget and masks over a model's AdaLoRA layers (module docstring). Call :meth:`orth_backward`
    after each step's backward, and :meth:`step` after the optimizer step, while the gradients are still there.

    Raises:
        InputError: the model has no AdaLoRA layers, or layers of another starting rank.
    """

    def __init__(self, model: nn.Module, schedule: AdaLoRASchedule):
        self.schedule = schedule
        self.layers = {n: m for n, m in lora_modules(model) if isinstance(m, AdaLoRALinear) and m.has_adapter}
        if not self.layers:
            raise InputError("The model has no AdaLoRA layers; apply_lora(..., adalora=True) comes first.")
        ranks = {m.rank for m in self.layers.values()}
        if ranks != {schedule.init_r}:
            raise InputError(f"AdaLoRA layers of ranks {sorted(ranks)} under a schedule for init_r={schedule.init_r}.")
        self.init_bgt = schedule.init_r * len(self.layers)
        self.target_bgt = schedule.target_r * len(self.layers)
        self.avg_ipt: dict[str, torch.Tensor] = {}
        self.avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, torch.Tensor] | None = None  # module -> kept triplets (bool, (r,))

    def budget(self, step: int) -> tuple[int, bool]:
        """``(kept triplets, whether to mask at this step)``: PEFT's cubic schedule."""
        s = self.schedule
        if step <= s.tinit:
            return self.init_bgt, False
        if step > s.total_step - s.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((self.init_bgt - self.target_bgt) * coeff**3 + self.target_bgt), step % s.deltaT == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for name, layer in self.layers.items():
            for kind, p in layer.adapter_tensors():
                if p.grad is None:
                    continue
                key = f"{name}.{kind}"
                ipt = p.detach().float().mul(p.grad.float()).abs_()  # in place from here: one tensor's temporaries
                if key not in self.avg_ipt:
                    self.avg_ipt[key], self.avg_unc[key] = torch.zeros_like(ipt), torch.zeros_like(ipt)
                avg = self.avg_ipt[key].mul_(b1).add_(ipt, alpha=1 - b1)
                self.avg_unc[key].mul_(b2).add_(ipt.sub_(avg).abs_(), alpha=1 - b2)

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.layers:
            keys = [(k, f"{name}.{k}") for k in ("lora_A", "lora_B", "lora_E")]
            score = {k: self.avg_ipt[key] * self.avg_unc[key] for k, key in keys if key in self.avg_ipt}
            if len(score) < 3:
                raise InputError(f"AdaLoRA has no importance scores for {name!r} yet: its tensors got no gradient.")
            out[name] = score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self._triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune yet (the budget rounds to all of them)
            self.rank_pattern = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
            return
        threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), k).values.item()
        self.rank_pattern = {n: s > threshold for n, s in scores.items()}
        for name, keep in self.rank_pattern.items():
            self.layers[name].mask(keep)

    def step(self, step: int) -> None:
        """After optimizer step ``step`` (0-based) with the gradients in place: score, then prune per the schedule."""
        s = self.schedule
        final = s.total_step - s.tfinal
        if step < final:
            self._update_importance()
            budget, now = self.budget(step)
            if now:
                self._mask_to_budget(budget)
        elif step == final:
            self._mask_to_budget(self.budget(step)[0])
            self.avg_ipt, self.avg_unc = {}, {}
            kept = sum(int(k.sum()) for k in self.rank_pattern.values())
            log.info("AdaLoRA: ranks fixed at step %d: %d of %d triplets kept over %d layers (target %d)", step + 1,
                     kept, self.init_bgt, len(self.layers), self.target_bgt)
        elif self.rank_pattern is not None:
            for name, keep in self.rank_pattern.items():
                self.layers[name].mask(keep)

    def orth_backward(self, scaler=None) -> torch.Tensor:
        """Add the orthogonality penalty's gradient to A's and B's; returns the penalty (float32, detached).

        The penalty is ``orth_reg_weight`` x the mean over every A and B of ``‖P·Pᵀ − I‖_F``. Each term runs
        its own backward, so one tensor's float32 copy and Gram matrix exist at a time, not every layer's
        at once (which would cost 4 bytes per A and B entry while the step's gradients are alive).
        ``scaler``: a ``GradScaler`` (float16 training) to scale each term as the loss is.
        """
        pairs = [(kind, p) for layer in self.layers.values() for kind, p in layer.adapter_tensors()[:2]]
        weight = self.schedule.orth_reg_weight / len(pairs)
        total = torch.zeros((), dtype=torch.float32)
        for kind, p in pairs:
            q = p.float()
            cov = q @ q.T if kind == "lora_A" else q.T @ q
            term = torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)) * weight
            (scaler.scale(term) if scaler is not None else term).backward()
            total += term.detach().cpu()
        return total

    def state_dict(self) -> dict:
        """The EMAs and the current mask (CPU tensors), for a checkpoint."""
        return {"avg_ipt": {k: v.cpu() for k, v in self.avg_ipt.items()},
                "avg_unc": {k: v.cpu() for k, v in self.avg_unc.items()},
                "rank_pattern": None if self.rank_pattern is None else
                {k: v.cpu() for k, v in self.rank_pattern.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Undo :meth:`state_dict` (tensors go to each layer's device).

        Raises:
            InputError: state for other modules than this model's AdaLoRA layers.
        """
        names = {k.rsplit(".", 1)[0] for k in state["avg_ipt"]} | set(state["rank_pattern"] or {})
        if not names <= set(self.layers):
            missing = sorted(names - set(self.layers))[:3]
            raise InputError(f"The checkpoint's AdaLoRA state names modules this model lacks: {missing}.")
        dev = {n: m.device for n, m in self.layers.items()}
        self.avg_ipt = {k: v.to(dev[k.rsplit('.', 1)[0]]) for k, v in state["avg_ipt"].items()}
        self.avg_unc = {k: v.to(dev[k.rsplit('.', 1)[0]]) for k, v in state["avg_unc"].items()}
        rp = state["rank_pattern"]
        self.rank_pattern = None if rp is None else {k: v.to(dev[k]) for k, v in rp.items()}
