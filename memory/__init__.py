"""memory: predict a QLoRA run's GPU footprint before loading anything, and fit it to a GPU.

For scripts (typed results, no printing):

    import memory
    spec = memory.load_spec("llama-3.1-8b")           # or a config.json / model folder
    fp = memory.estimate(spec, seq_len=4096, micro_batch_size=2, rank=32)
    fp.tensor_peak_bytes, fp.breakdown                 # what max_memory_allocated should read, by term
    s = memory.Settings(seq_len=4096, rank=32, loss="hf")   # one frozen object for all of a run's choices
    memory.estimate(spec, s, micro_batch_size=4)       # keyword changes apply on top (dataclasses.replace)
    p = memory.plan("24GB", spec, micro_batch_size="auto", rank="auto")
    p.fits, p.micro_batch_size, p.gradient_accumulation_steps, p.suggestions, p.settings
    rows = memory.sweep(spec, seq_lens=[1024, 2048, 4096], micro_batch_sizes=[1, 2, 4])

A recipe's settings come from ``qlora.train.plan.settings_from_recipe`` (the
trainer owns recipes; ``qlora plan --model RECIPE.yaml`` plans one).

How predictions are made: module shapes come from instantiating the
transformers model on the meta device (:mod:`memory.spec`); activation
memory from meta-device dry runs of the real forward/backward code fitted
as exact polynomials in batch, sequence and rank (:mod:`memory.probe`,
:mod:`memory.profile`); the rest is closed-form storage arithmetic
(:mod:`memory.terms`). :mod:`memory.footprint` explains the terms and phases.
"""

from .catalog import DEFAULT_MODEL, known_models
from .footprint import TERMS, Footprint, estimate
from .gpus import GPU, known_gpus, parse_gpu
from .plan import RANKS, Plan, Suggestion, plan, sweep
from .settings import Flag, Settings
from .spec import ModelSpec, load_spec, spec_from_config

__all__ = [
    "DEFAULT_MODEL",
    "GPU",
    "RANKS",
    "TERMS",
    "Flag",
    "Footprint",
    "ModelSpec",
    "Plan",
    "Settings",
    "Suggestion",
    "estimate",
    "known_gpus",
    "known_models",
    "load_spec",
    "parse_gpu",
    "plan",
    "spec_from_config",
    "sweep",
]
