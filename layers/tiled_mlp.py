"""Tiled MLP: a decoder layer's MLP run over the tokens in tiles, forward and backward.

An MLP acts on each token alone, so it can run on a few thousand tokens at a
time and give the same result. What that saves is its intermediates: a
Llama-3.1-8B MLP holds gate, up, their product and their gradients, about
six ``tokens x 14,336`` bf16 tensors (~170 KB per token, 17 GB at 100k
tokens) while a layer's backward runs; tiled, they exist for one tile of
``tile_tokens`` tokens at a time (1.4 GB at 8,192). The trade: the forward
keeps only the MLP's input (which the untiled MLP keeps too), so the backward
recomputes each tile's forward before its backward: one more MLP forward per
step, about a third more MLP compute on top of gradient checkpointing's.

The trainable parameters inside the MLP (LoRA factors, DoRA magnitudes) are
inputs of the autograd function, so their gradients come back through
autograd like any other (hooks, FSDP and gradient accumulation see them);
the random state is replayed, so LoRA dropout draws the same masks in the
recompute. Outputs equal the untiled MLP's up to float summation order
(``tests/layers/test_tiled_mlp.py`` states the tolerances).
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


class _TiledMLP(torch.autograd.Function):
    """``forward(x, *params)`` of ``mlp`` over ``x`` (tokens, hidden) in tiles; see the module docstring."""

    @staticmethod
    def forward(ctx, x, forward, tile_tokens, max_tiles, *params):
        ctx.mlp_forward, ctx.tile_tokens, ctx.max_tiles = forward, tile_tokens, max_tiles
        ctx.autocast = _autocast_state(x.device.type)  # backward runs outside the caller's autocast: re-enter it
        ctx.rng = _rng_state(x.device)
        ctx.save_for_backward(x, *params)
        out = None
        for start, end in _tiles(x.shape[0], tile_tokens, max_tiles):
            y = forward(x[start:end])
            if out is None:  # the output dtype is the MLP's (autocast may differ from x's)
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
                    y = ctx.mlp_forward(xt)
                wrt = ([xt] if grad_x is not None else []) + params  # params: the trainable ones (TiledMLP)
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


class TiledMLP:
    """Makes one MLP module run in tiles of ``tile_tokens`` tokens (its own ``forward``, per tile).

    The module keeps its class, children and state-dict keys; only the
    instance's ``forward`` is replaced (:meth:`remove` restores it), so
    adapter files and checkpoints are unchanged.

    Args:
        mlp: a module mapping ``(..., hidden)`` to ``(..., hidden)`` token by token.
        tile_tokens: tokens per tile (over batch and sequence together), >= 1.
        max_tiles: run only the first ``max_tiles`` tiles. For the planner's meta-device
            dry runs only, whose values are never read: every tile after the second
            allocates what the second did, so two tiles show the peak.

    Raises:
        InputError: ``tile_tokens`` is not a positive integer.
    """

    def __init__(self, mlp: nn.Module, tile_tokens: int, max_tiles: int | None = None):
        if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
            raise InputError(f"MLP tile size must be a positive number of tokens, got {tile_tokens!r}.")
        self.mlp, self.tile_tokens, self.max_tiles = mlp, tile_tokens, max_tiles
        self._original = mlp.forward
        mlp.forward = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden_out) in ``x``'s leading shape; tiles over the flattened tokens."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if not torch.is_grad_enabled() and self.max_tiles is None:
            out = torch.cat([self._original(flat[a:b]) for a, b in _tiles(flat.shape[0], self.tile_tokens, None)])
            return out.reshape(*lead, out.shape[-1])
        params = [p for p in self.mlp.parameters() if p.requires_grad]
        out = _TiledMLP.apply(flat, self._original, self.tile_tokens, self.max_tiles, *params)
        return out.reshape(*lead, out.shape[-1])

    def remove(self) -> None:
        """Give the module its own ``forward`` back."""
        if self.mlp.__dict__.get("forward") is self:
            del self.mlp.forward


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's ``mlp`` module (Llama, Mistral, Qwen, Gemma, Phi-3 lay them out alike).

    Raises:
        InputError: the model has no ``layers`` whose members have an ``mlp``.
    """
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers] if layers is not None else []
    if not mlps or not all(isinstance(m, nn.Module) for m in mlps):
        raise InputError(
            f"{type(model).__name__} has no decoder layers with an 'mlp' module, so its MLP cannot be tiled; "
            "set tiled_mlp: false (the tiled MLP supports Llama-style layouts: model.layers[i].mlp)."
        )
    return mlps


def tile_mlps(model: nn.Module, tile_tokens: int, max_tiles: int | None = None) -> list[TiledMLP]:
    """Tile every decoder layer's MLP (:class:`TiledMLP`); returns the handles (``remove()`` undoes one)."""
    return [TiledMLP(m, tile_tokens, max_tiles) for m in decoder_mlps(model)]
