"""The frozen 4-bit linear layer and its memory-lean autograd function."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from ._codebook import NESTED_BLOCKSIZE, code4
from .blockwise import QuantState4bit, check_args, dequantize_4bit, quantize_4bit
from .errors import InputError

log = logging.getLogger(__name__)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W)^T + b, saving nothing but a reference to the packed W.

    ``torch.nn.functional.linear`` would save both x (b*s*in*2 bytes) and the
    dequantized W (out*in*2 bytes) for backward. W0 is frozen, so its gradient
    (the only user of x) is never needed; and the input gradient needs W,
    which we re-dequantize in backward: one extra dequantization per layer per
    step, in exchange for out*in*2 bytes per layer not held across the pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer  # the module itself; its packed buffers already live on the device
        ctx.in_dtype = x.dtype
        # Autocast is off here on purpose: the layer's compute_dtype is the
        # explicit choice, not whatever an outer autocast region would pick.
        with torch.autocast(x.device.type, enabled=False):
            w = layer.dequantize(layer.compute_dtype)
            bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
            # F.linear (with its fused bias add) is what bitsandbytes runs after
            # dequantizing, so outputs match a bitsandbytes model bit for bit.
            return torch.nn.functional.linear(x.to(layer.compute_dtype), w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: NF4Linear = ctx.layer
        with torch.autocast(grad_out.device.type, enabled=False):
            w = layer.dequantize(layer.compute_dtype)  # re-dequantize: nothing was saved
            grad_x = grad_out.to(layer.compute_dtype) @ w
        return grad_x.to(ctx.in_dtype), None


def nf4_linear(x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
    """Frozen 4-bit linear map (bias included). x: (..., in) -> (..., out) in the layer's compute dtype."""
    return _NF4Matmul.apply(x, layer)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in 4 bits.

    Buffers (the bitsandbytes file layout, minus the ``weight.`` prefix):
        weight: uint8 ``(out*in/2, 1)`` packed codes (two per byte, high nibble first).
        absmax: float32 ``(n_blocks,)``, or uint8 with double quantization.
        quant_map: float32 ``(16,)`` the 4-bit code table.
        nested_absmax / nested_quant_map / offset: double quantization only.
        bias: optional, kept in its 16-bit dtype and frozen.

    Input ``(..., in_features)`` of any float dtype is cast to ``compute_dtype``;
    the output is ``(..., out_features)`` in ``compute_dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        weight_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_args(quant_type, blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        kw = dict(device=device)
        self.register_buffer("weight", torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, **kw))
        self.register_buffer(
            "absmax", torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, **kw)
        )
        self.register_buffer("quant_map", code4(quant_type).to(device or "cpu", copy=True))
        if double_quant:
            nn_blocks = -(-n_blocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.empty(nn_blocks, dtype=torch.float32, **kw))
            self.register_buffer("nested_quant_map", torch.empty(256, dtype=torch.float32, **kw))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32, **kw))
        else:
            self.nested_absmax = self.nested_quant_map = self.offset = None
        self.register_buffer("bias", torch.empty(out_features, dtype=weight_dtype, **kw) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> NF4Linear:
        """Quantize an ``nn.Linear`` (its weight's device is used for the work)."""
        w = linear.weight.data
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            quant_type, blocksize, double_quant, compute_dtype, w.dtype, device="meta",
        )
        layer.load_quantized(*quantize_4bit(w, quant_type, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = linear.bias.data.detach().clone()
        return layer

    def load_quantized(self, packed: torch.Tensor, state: QuantState4bit) -> None:
        """Install packed codes and their state (replaces the buffers, any device).

        Raises:
            InputError: the state does not describe an ``(out, in)`` weight of this layer.
        """
        expect = (self.out_features, self.in_features)
        if tuple(state.shape) != expect or packed.numel() != (expect[0] * expect[1] + 1) // 2:
            raise InputError(
                f"Quantized weight has shape {tuple(state.shape)} ({packed.numel()} packed bytes) but the layer "
                f"expects {expect}; the checkpoint does not match the model config."
            )
        if (state.quant_type != self.quant_type or state.blocksize != self.blocksize
                or state.double_quant != self.double_quant):
            raise InputError(
                f"Quantized weight uses {state.quant_type}/blocksize {state.blocksize}/double_quant "
                f"{state.double_quant}, but the layer was built for "
                f"{self.quant_type}/{self.blocksize}/{self.double_quant}."
            )
        self.weight = packed.reshape(-1, 1)
        self.absmax = state.absmax
        self.quant_map = code4(self.quant_type, packed.device).clone()
        if self.double_quant:
            self.nested_absmax = state.nested_absmax
            self.nested_quant_map = state.nested_code
            self.offset = state.offset.reshape(())
        self.weight_dtype = state.dtype

    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the codes with those of a new dense ``(out, in)`` weight, in this layer's format and device.

        For inits that move part of the weight into an adapter (PiSSA, LoftQ: :mod:`layers.inits`):
        what stays in the base is quantized. The weight is cast to the layer's 16-bit dtype first, as
        a checkpoint's weight would be. Costs one quantization (a few dense temporaries of the weight).

        Raises:
            InputError: a weight of another shape.
        """
        expect = (self.out_features, self.in_features)
        if tuple(weight.shape) != expect:
            raise InputError(f"requantize got a {tuple(weight.shape)} weight for a layer of shape {expect}.")
        device = self.weight.device
        w = weight.detach().to(device=device, dtype=self.weight_dtype)
        self.load_quantized(*quantize_4bit(w, self.quant_type, self.blocksize, self.double_quant))

    @property
    def quant_state(self) -> QuantState4bit:
        return QuantState4bit(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            offset=self.offset,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default: the original 16-bit dtype)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self)

    # The sharded tensors: every one whose size grows with the weight. The 16-entry code table, the
    # 256-entry nested table and the offset stay replicated buffers (under 1.1 KB a layer).
    SHARDED = ("weight", "absmax", "nested_absmax")

    def make_shardable(self) -> None:
        """Hold the packed codes and their scales as frozen parameters, so that FSDP2 shards them.

        FSDP2 (``fully_shard``) shards parameters, not buffers. Each of these
        tensors is a plain 1-D run of bytes or floats (codes, per-block
        absmax, per-256-block nested scales), so any split along dim 0 is
        exact, and FSDP2's all-gather before each forward returns the same
        bytes. Everything that interprets them (shape, blocksize, type, dtype)
        is a plain attribute of this module, not of the tensors, so sharding
        cannot lose it -- the failure peers hit when the quantization state
        rides on a parameter object that FSDP replaces. State-dict keys and
        values are unchanged. Idempotent.
        """
        for name in self.SHARDED:
            t = getattr(self, name, None)
            if t is None or isinstance(t, nn.Parameter):
                continue
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))

    def quant_state_json(self) -> dict:
        """The ``quant_state.bitsandbytes__<type>`` JSON object of the file format."""
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.weight_dtype).removeprefix("torch."),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(self.offset))
        return d

    def extra_repr(self) -> str:
        dq = "+double-quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}{dq}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )


def quant_state_bytes(d: dict) -> torch.Tensor:
    """Encode a quant-state dict as the uint8 tensor stored in safetensors files."""
    return torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
