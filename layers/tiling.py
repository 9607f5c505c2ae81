"""Tiling: token-wise modules (a decoder layer's MLP, every norm) run over the tokens in tiles.

An MLP or a norm acts on each token alone, so it can run on a few thousand
tokens at a time and give the same result. What that saves is what it keeps
for its backward:

* a Llama-3.1-8B MLP holds gate, up, their product and their gradients, about
  six ``tokens x 14,336`` bf16 tensors (~170 KB per token, 17 GB at 100k
  tokens) while a layer's backward runs;
* transformers' RMSNorm upcasts its input to float32 and keeps that copy for
  backward (16 KB per token at hidden 4,096, per norm; the final norm's is
  held through the whole backward), and its backward makes several more
  float32 ``tokens x hidden`` temporaries: with the MLP tiled, the norms'
  float32 tensors are most of what a token costs at a layer's backward peak
  (docs/long-context.md).

Tiled, these exist for one tile of ``tile_tokens`` tokens at a time (1.4 GB
for the MLP at 8,192). The trade: the forward keeps only the module's input
(which the untiled module keeps too), so the backward recomputes each tile's
forward before its backward: one more forward of the module per step, about a
third more MLP compute on top of gradient checkpointing's (a norm's forward is
a few memory-bound elementwise passes).

The trainable parameters inside the module (LoRA factors, DoRA magnitudes) are
inputs of the autograd function, so their gradients come back through
autograd like any other (hooks, FSDP and gradient accumulation see them);
the random state is replayed, so LoRA dropout draws the same masks in the
recompute. The recompute runs the module's own ``forward`` under autograd, so
its gradient is the one of the code that ran, not a hand-written formula.
Outputs equal the untiled module's up to float summation order
(``tests/layers/test_tiling.py`` states the tolerances).
"""

from __future__ import annotations

import torch
from torch import nn

from quant.errors import InputError


def _autocast_state(device_type: str) -> tuple[str, torch.dtype] | None:
    """The caller's autocast (device type, dtype), or None (off, or a device without autocast: meta)."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _autocast(state: tuple[str, torch.dtype] | None):
    if state is None:  # autocast was off: a context that changes nothing (cpu's off; valid on every machine)
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(state[0], dtype=state[1])


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _TiledForward(torch.autograd.Function):
    """``forward(x, *params)`` of a token-wise module over ``x`` (rows, features) in tiles; see the module docstring."""

    @staticmethod
    def forward(ctx, x, forward, tile_tokens, max_tiles, *params):
        ctx.module_forward, ctx.tile_tokens, ctx.max_tiles = forward, tile_tokens, max_tiles
        ctx.autocast = _autocast_state(x.device.type)  # backward runs outside the caller's autocast: re-enter it
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, *params)
        out = None
        for start, end in _tiles(x.shape[0], tile_tokens, max_tiles):
            y = forward(x[start:end])
            if out is None:  # the output dtype is the module's (autocast may differ from x's)
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[start:end] = y
            del y  # the tile's intermediates went with it: forward holds one tile at a time
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        cpu_rng, cuda_rng = ctx.rng
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for start, end in _tiles(x.shape[0], ctx.tile_tokens, ctx.max_tiles):
                xt = x[start:end].detach().requires_grad_(grad_x is not None)
                with torch.enable_grad(), _autocast(ctx.autocast):
                    y = ctx.module_forward(xt)
                wrt = ([xt] if grad_x is not None else []) + params  # params: the trainable ones (Tiled)
                got = list(torch.autograd.grad(y, wrt, grad_out[start:end], allow_unused=True))
                del y  # frees this tile's intermediates before the next tile's recompute
                if grad_x is not None:
                    grad_x[start:end] = got.pop(0)
                for k, g in enumerate(got):
                    if g is not None:
                        grads[k] = g if grads[k] is None else grads[k].add_(g)
        return (grad_x, None, None, None, *grads)


def _tiles(n: int, tile_tokens: int, max_tiles: int | None):
    """(start, end) of each tile of ``n`` tokens; ``max_tiles`` stops early (dry runs only)."""
    starts = range(0, n, tile_tokens)
    for k, start in enumerate(starts):
        if max_tiles is not None and k == max_tiles:
            return
        yield start, min(start + tile_tokens, n)


class Tiled:
    """Makes one token-wise module run in tiles of ``tile_tokens`` rows (its own ``forward``, per tile).

    The module keeps its class, children and state-dict keys; only the
    instance's ``forward`` is replaced (:meth:`remove` restores it), so
    adapter files and checkpoints are unchanged.

    Args:
        module: maps ``(..., features)`` to ``(..., features_out)`` row by row, each row
            alone (an MLP, a norm). The rows are all leading dimensions flattened:
            tokens, or tokens x heads for a per-head norm (Qwen3's ``q_norm``).
        tile_tokens: rows per tile, >= 1.
        max_tiles: run only the first ``max_tiles`` tiles. For the planner's meta-device
            dry runs only, whose values are never read: every tile after the second
            allocates what the second did, so two tiles show the peak.

    Raises:
        InputError: ``tile_tokens`` is not a positive integer.
    """

    def __init__(self, module: nn.Module, tile_tokens: int, max_tiles: int | None = None):
        if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
            raise InputError(f"Tile size must be a positive number of tokens, got {tile_tokens!r}.")
        self.module, self.tile_tokens, self.max_tiles = module, tile_tokens, max_tiles
        self._original = module.forward
        module.forward = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., features) -> (..., features_out) in ``x``'s leading shape; tiles over the flattened rows."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if not torch.is_grad_enabled() and self.max_tiles is None:
            out = torch.cat([self._original(flat[a:b]) for a, b in _tiles(flat.shape[0], self.tile_tokens, None)])
            return out.reshape(*lead, out.shape[-1])
        params = [p for p in self.module.parameters() if p.requires_grad]
        out = _TiledForward.apply(flat, self._original, self.tile_tokens, self.max_tiles, *params)
        return out.reshape(*lead, out.shape[-1])

    def remove(self) -> None:
        """Give the module its own ``forward`` back."""
        if self.module.__dict__.get("forward") is self:
            del self.module.forward


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (``model.<base>.layers``), or ``[]`` when it has none."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's ``mlp`` module (Llama, Mistral, Qwen, Gemma, Phi-3 lay them out alike).

    Raises:
        InputError: the model has no ``layers`` whose members have an ``mlp``.
    """
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    if not mlps or not all(isinstance(m, nn.Module) for m in mlps):
        raise InputError(
            f"{type(model).__name__} has no decoder layers with an 'mlp' module, so its MLP cannot be tiled; "
            "set tiled_mlp: false (the tiled MLP supports Llama-style layouts: model.layers[i].mlp)."
        )
    return mlps


def _is_norm(module: nn.Module) -> bool:
    # transformers gives each architecture its own norm class (LlamaRMSNorm, GemmaRMSNorm, Qwen3RMSNorm...);
    # all of them, and torch's, normalise each row over its last dimension alone
    name = type(module).__name__
    return isinstance(module, (nn.RMSNorm, nn.LayerNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def norms(model: nn.Module) -> list[nn.Module]:
    """Every RMSNorm and LayerNorm of the model: the layers' norms, per-head norms, the final norm.

    Raises:
        InputError: the model has none.
    """
    found = [m for m in model.modules() if _is_norm(m)]
    if not found:
        raise InputError(
            f"{type(model).__name__} has no RMSNorm or LayerNorm modules, so its norms cannot be tiled; "
            "set tiled_norms: false."
        )
    return found


def tile_mlps(model: nn.Module, tile_tokens: int, max_tiles: int | None = None) -> list[Tiled]:
    """Tile every decoder layer's MLP (:class:`Tiled`); returns the handles (``remove()`` undoes one)."""
    return [Tiled(m, tile_tokens, max_tiles) for m in decoder_mlps(model)]


def tile_norms(model: nn.Module, tile_tokens: int, max_tiles: int | None = None) -> list[Tiled]:
    """Tile every norm (:func:`norms`, :class:`Tiled`); returns the handles (``remove()`` undoes one)."""
    return [Tiled(m, tile_tokens, max_tiles) for m in norms(model)]
