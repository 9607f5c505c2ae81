"""The trainable model: the NF4 base streamed from its checkpoint, the adapter, checkpointing and tiling.

The model is built one decoder layer at a time (:class:`quant.loading.UnitHook`): each layer's tensors
are read and quantized, its target linears get their adapters (from a plan checked against the empty
model before any weight is read), a PiSSA/OLoRA/LoftQ init or a resumed adapter fills them, and then an
optional ``shard_unit`` acts on the finished layer. Under FSDP2 that is ``fully_shard``
(:func:`qlora.train.parallel.unit_sharder`): only one layer is ever whole on the device, so a base
larger than one GPU loads as long as its shards fit. Everything outside the layers (embeddings, final
norm, head) loads last, whole. One process takes the same path with no ``shard_unit``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from layers.inits import INITS_FROM_WEIGHTS
from layers.tiling import decoder_layers, tile_mlps, tile_norms
from layers.vera import VeRAProjections
from qlora.adapters.adalora import install_adalora, read_adalora
from qlora.adapters.files import check_adapter_fits, install_adapter, read_adapter, save_adapter
from qlora.adapters.vera import install_vera, read_vera
from qlora.lora.adalora import AdaLoRASchedule
from qlora.lora.inits import InitialFactors, from_original_base, init_from_weights, log_initial
from qlora.lora.surgery import freeze_model, log_lora, lora_modules, plan_lora, wrap_targets
from qlora.lora.vera import attach_projections, log_vera, plan_vera, wrap_vera
from qlora.train.precision import torch_dtype
from qlora.train.recipe import LoraConfig, QuantConfig
from qlora.train.setup import enable_checkpointing
from quant.errors import InputError
from quant.loading import UnitHook, load_quantized_model

log = logging.getLogger(__name__)


class BuiltModel(NamedTuple):
    """What :func:`build_model` returns."""

    model: nn.Module
    save: Callable[[Path], Path]
    initial: InitialFactors | None


def build_model(
    model_dir: Path,
    device: torch.device,
    quant: QuantConfig,
    lora: LoraConfig,
    model_dtype: str = "auto",
    gradient_checkpointing: bool = True,
    offload_activations: bool = False,
    resume_adapter: Path | None = None,
    attn_implementation: str | None = None,
    tiled_mlp: bool = False,
    tiled_norms: bool = False,
    tile_tokens: int = 4096,
    shard_unit: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
    adalora: AdaLoRASchedule | None = None,
) -> BuiltModel:
    """NF4 base (streamed layer by layer) + LoRA + gradient checkpointing, ready to train.

    Args:
        model_dir: the local Hugging Face folder (16-bit or bnb-4bit) to load.
        quant: how the base is quantized (``quant_type``, ``blocksize``, ``double_quant``, ``compute_dtype``).
        lora: the adapter to add; ``lora.rank`` must be resolved (an int, as :func:`qlora.train.plan.plan_run`
            returns it), not ``auto``.
        model_dtype: dtype name of the non-quantized parameters (embeddings, norms, head); ``auto`` and the
            sections' ``auto`` dtypes mean :func:`qlora.train.precision.auto_dtype` on ``device``.
        gradient_checkpointing, offload_activations: see :func:`qlora.train.setup.enable_checkpointing`.
        resume_adapter: read the adapter weights from this PEFT folder instead of initializing them.
        attn_implementation: transformers' attention (recipe ``model.attn_implementation``); None: its default.
        tiled_mlp, tiled_norms: run every decoder layer's MLP, every norm in tiles of ``tile_tokens``
            tokens (:mod:`layers.tiling`).
        shard_unit: called on each decoder layer once it is complete (frozen base, adapter filled), before
            the next is read: FSDP2's ``fully_shard``. None: nothing.
        seed: the recipe's seed; the nonzero init's factors are drawn from it (per layer, by name).
        adalora: with ``lora.variant`` adalora, its schedule (:class:`qlora.lora.adalora.AdaLoRASchedule`),
            written into the saved adapter's config.

    Returns:
        A :class:`BuiltModel` ``(model, save, initial)``: ``save(folder)`` writes the PEFT adapter into
        ``folder`` (new or existing, file by file, weights before config: :func:`qlora.adapters.files.save_adapter`;
        for the original base after a PiSSA/OLoRA/LoftQ init) and returns the folder; ``initial`` the
        init's step-0 factors (None for kaiming/gaussian).

    Raises:
        InputError: an unresolved rank, a model folder the loader cannot read, targets that match
            nothing, or a resume adapter that does not fit the model; all before any weight is read,
            except a checkpoint whose tensors turn out unreadable.
    """
    if not isinstance(lora.rank, int):
        raise InputError(f"build_model needs a resolved LoRA rank, got {lora.rank!r}; plan the run first (qlora plan).")
    dtype, adapter_dtype = torch_dtype(model_dtype, device), torch_dtype(lora.dtype, device)
    log.info("non-quantized parameters (embeddings, norms, head) stay %s: recipe model.dtype", dtype)
    read = {"vera": read_vera, "adalora": read_adalora}.get(lora.variant, read_adapter)
    units = _Units(lora, adapter_dtype, None if quant.quant_type == "none" else model_dir,
                   None if resume_adapter is None else read(resume_adapter), shard_unit, device, seed)
    model = load_quantized_model(
        model_dir, device, quant.quant_type, quant.blocksize, quant.double_quant,
        torch_dtype(quant.compute_dtype, device),
        dtype=dtype, attn_implementation=attn_implementation, units=UnitHook(units.names, units.done),
    )
    units.finish(model)
    if attn_implementation is not None:
        log.info("attention %s: recipe model.attn_implementation (the planner models the same)", attn_implementation)
    model.config.use_cache = False  # no KV cache in training: keeps packed-sequence masking on (see qlora.data)
    if gradient_checkpointing:
        # non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and with kwargs
        enable_checkpointing(model, offload_activations)
        log.info("gradient checkpointing on (non-reentrant), one checkpoint per decoder layer; activation offload %s "
                 "(recipe offload_activations)", "on" if offload_activations else "off")
    # Tiling replaces a module instance's forward and finds its parameters at each call, so it works on
    # layers FSDP2 has already sharded.
    if tiled_mlp:
        tile_mlps(model, tile_tokens)
        log.info("MLPs run in tiles of %d tokens (tiled_mlp): their intermediates exist one tile at a time, for "
                 "one more MLP forward per step", tile_tokens)
    if tiled_norms:
        tile_norms(model, tile_tokens)
        log.info("norms run in tiles of %d tokens (tiled_norms): backward keeps their inputs, not transformers' "
                 "float32 copies (4 bytes x hidden x 2 per token per norm), for one more norm forward per step",
                 tile_tokens)
    base = str(Path(model_dir).resolve())  # the folder actually trained on, so other tools can find the base
    initial = units.initial

    fields = None if adalora is None else adalora.peft_fields()

    def save(folder: Path) -> Path:
        return save_adapter(model, folder, base_model_name_or_path=base, initial=initial, adalora=fields)

    return BuiltModel(model, save, initial)


def _delta_alphas(adapter, plan: list[tuple[str, int, float]], delta: float) -> dict:
    """A resumed Delta-LoRA adapter's modules with the plan's own alphas (the file holds ``alpha·(1+λ)``).

    Raises:
        InputError: a file alpha that is not the plan's times ``1+λ`` (another λ or alpha trained it).
    """
    out = {}
    for name, _, alpha in plan:
        m = adapter.modules[name]
        if abs(m.alpha - alpha * (1 + delta)) > 1e-6 * max(1.0, abs(m.alpha)):
            raise InputError(f"The checkpoint's Delta-LoRA adapter has alpha {m.alpha:g} for {name!r}, but this recipe "
                             f"(alpha {alpha:g}, delta_ratio {delta:g}) saves {alpha * (1 + delta):g}; resume with "
                             "the recipe it was trained with.")
        out[name] = dataclasses.replace(m, alpha=alpha)
    return out


class _Units:
    """The per-layer half of :func:`build_model`: the adapter of each decoder layer as that layer loads."""

    def __init__(self, lora: LoraConfig, adapter_dtype: torch.dtype, checkpoint: Path | None, resume,
                 shard_unit: Callable[[nn.Module], None] | None, device: torch.device, seed: int = 0):
        self.lora, self.adapter_dtype, self.checkpoint, self.resume = lora, adapter_dtype, checkpoint, resume
        self.shard_unit, self.device, self.seed = shard_unit, device, seed
        self.vera = lora.variant == "vera"
        self.from_weights = lora.init in INITS_FROM_WEIGHTS
        self.plan: list[tuple[str, int, float]] = []
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.initial: InitialFactors | None = None
        self.frozen = 0  # base parameters that were trainable before names() froze them

    def names(self, model: nn.Module) -> Sequence[str]:
        """On the empty model: check the adapter plan (and a resumed adapter) and freeze every parameter."""
        lo = self.lora
        if self.vera:
            self._plan_vera(model)
        else:
            self.plan = plan_lora(model, lo.targets, lo.rank, lo.alpha, lo.dropout,
                                  "kaiming" if self.from_weights else lo.init, self.adapter_dtype,
                                  lo.rank_pattern or None, lo.alpha_pattern or None)
        if self.resume is not None and lo.variant == "adalora":
            if set(self.resume.modules) != {p[0] for p in self.plan} or self.resume.init_r != lo.rank:
                raise InputError(f"The checkpoint's AdaLoRA adapter ({len(self.resume.modules)} modules, r0 "
                                 f"{self.resume.init_r}) does not fit this recipe's ({len(self.plan)} modules, rank "
                                 f"{lo.rank}); resume with the recipe it was trained with.")
        elif self.resume is not None and not self.vera:
            check_adapter_fits(model, self.resume)
        self.frozen = freeze_model(model)  # before any shard: FSDP2 treats a trainable parameter as one to reduce
        index = {id(m): n for n, m in model.named_modules()}
        return [index[id(layer)] for layer in decoder_layers(model)]

    def _plan_vera(self, model: nn.Module) -> None:
        """VeRA's plan and its shared matrices: seeded, or on a resume the checkpoint's (checked to fit)."""
        lo = self.lora
        names, max_in, max_out = plan_vera(model, lo.targets, lo.rank)
        self.plan = [(n, lo.rank, 1.0) for n in names]
        want = (lo.rank, max_in, max_out)
        if self.resume is None:
            proj = VeRAProjections.seeded(*want, lo.projection_prng_key, self.adapter_dtype, self.device)
        else:
            r = self.resume
            got = (r.rank, r.vera_A.shape[1], r.vera_B.shape[0])
            if got != want or set(r.modules) != set(names):
                raise InputError(f"The checkpoint's VeRA adapter (r, max_in, max_out = {got}, {len(r.modules)} "
                                 f"modules) does not fit this recipe's ({want}, {len(names)} modules); resume with "
                                 "the recipe it was trained with.")
            proj = VeRAProjections(r.vera_A.to(self.device, self.adapter_dtype),
                                   r.vera_B.to(self.device, self.adapter_dtype), r.projection_prng_key)
        attach_projections(model, proj)

    def done(self, model: nn.Module, unit: str) -> None:
        self._adapt(model, [p for p in self.plan if p[0].startswith(unit + ".")])
        if self.shard_unit is not None:
            self.shard_unit(model.get_submodule(unit))

    def finish(self, model: nn.Module) -> None:
        """The targets outside every decoder layer (if any), then the model-wide reports."""
        done = {n for n, _ in lora_modules(model)}
        self._adapt(model, [p for p in self.plan if p[0] not in done])
        lo = self.lora
        if self.from_weights:
            self.initial = InitialFactors(lo.init, self.factors)
            log_initial(self.initial, requantized=self.checkpoint is not None)
        if self.vera:
            log_vera(model, lo.targets, lo.rank, lo.d_initial, lo.projection_prng_key, self.adapter_dtype, self.frozen)
        else:
            log_lora(model, len(self.plan), lo.targets, lo.rank, lo.alpha, lo.use_rslora, lo.variant == "dora",
                     lo.freeze_A, self.adapter_dtype, self.frozen)
        if lo.variant == "delta":
            log.info("Delta-LoRA: the base follows %g x the adapter's change, kept implicit (the base stays frozen); "
                     "the adapter is saved for the original base with alpha x %g", lo.delta_ratio, 1 + lo.delta_ratio)
        if self.resume is not None:
            log.info("resumed the adapter of %d modules", len(self.resume.modules))

    def _adapt(self, model: nn.Module, plan: list[tuple[str, int, float]]) -> None:
        if not plan:
            return
        lo = self.lora
        names = {p[0] for p in plan}
        if self.vera:
            wrap_vera(model, [p[0] for p in plan], lo.d_initial, lo.dropout)
            if self.resume is not None:
                install_vera(model, self.resume, trainable=True, only=names)
            return
        delta = lo.delta_ratio if lo.variant == "delta" else None
        wrap_targets(model, plan, lo.dropout, lo.use_rslora, lo.variant == "dora",
                     "kaiming" if self.from_weights else lo.init, self.adapter_dtype, lo.freeze_A, delta,
                     lo.variant == "adalora")
        if lo.variant == "adalora":
            if self.resume is not None:
                install_adalora(model, self.resume, trainable=True, only=names)
            return
        if self.from_weights:  # the same factors and base on a resume: the SVD/QR of the same weights
            got = init_from_weights(model, lo.init, self.checkpoint, loftq_iters=lo.loftq_iters,
                                    pissa_niter=lo.pissa_niter, nonzero_ratio=lo.nonzero_ratio, seed=self.seed,
                                    only=names)
            self.factors.update(got.factors)
        if self.resume is not None:
            adapter = self.resume
            if self.from_weights:  # checkpoints hold the adapter for the original base: take the trained half
                mine = {n: m for n, m in adapter.modules.items() if n in names}
                adapter = dataclasses.replace(adapter, modules=from_original_base(mine, InitialFactors(lo.init,
                                                                                                       self.factors)))
            if delta is not None:  # checkpoints hold alpha·(1+λ) (the base's part included): the layer takes alpha
                adapter = dataclasses.replace(adapter, modules=_delta_alphas(adapter, plan, delta))
            install_adapter(model, adapter, dtype=self.adapter_dtype, trainable=True, only=names)
            if lo.freeze_A:  # install made fresh trainable factors: LoRA-FA freezes A again
                for name in names:
                    model.get_submodule(name).freeze_A()
