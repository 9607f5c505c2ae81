"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024), computed as PEFT computes it.

One pair of frozen random matrices serves every adapted layer: ``vera_A`` ``(r, max_in)`` and
``vera_B`` ``(max_out, r)``, sized to the largest input and output width among the targets; a
layer uses their top-left corners ``A = vera_A[:, :in]`` and ``B = vera_B[:out]``. Each layer
trains two vectors only, ``d`` (``vera_lambda_d``, ``(r,)``) and ``b`` (``vera_lambda_b``,
``(out,)``)::

    h = W0·x + b ⊙ (B · (d ⊙ (A · dropout(x))))

``b`` starts at zero, so the layer starts equal to its base; ``d`` starts at ``d_initial`` (0.1,
the paper's and PEFT's default). There is no alpha: the vectors carry the scale.

The matrices are drawn exactly as PEFT draws them, so a seed (``projection_prng_key``) names them:
a CPU ``torch.Generator`` seeded with the key draws A, then B, each uniform in
``±sqrt(6 / fan_in)`` (Kaiming-uniform with gain sqrt(2)) in float32.

Costs and trade-offs:

* trainable numbers per layer: ``r + out``, against LoRA's ``r·(in + out)``; the shared matrices
  cost ``r·(max_in + max_out)`` values once for the whole model. They are kept in the adapter's
  compute dtype (bf16 by default: half of PEFT's float32 copy, and no cast per forward); the
  vectors are float32, like DoRA's magnitude (``r + out`` numbers; in bf16 small updates would
  round away).
* activations: ``b``'s gradient needs the ``(..., out)`` product ``B·(d⊙A·x)``, so backward keeps
  one out-wide tensor per adapted layer where LoRA keeps an r-wide one. VeRA trades activation
  memory for parameter and optimizer memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import AdapterLinear, module_device
from quant.errors import InputError

D_INITIAL = 0.1  # the paper's and PEFT's start for d


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """float32 ``shape`` uniform in ``±sqrt(6/shape[1])``: PEFT's ``_kaiming_init`` (gain sqrt(2), fan_in)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The shared frozen pair ``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)``, as buffers.

    Non-persistent buffers: ``model.to()`` moves them, but they stay out of the model's
    ``state_dict`` (the adapter file holds them, under PEFT's keys ``base_model.vera_A`` and
    ``base_model.vera_B``). Frozen by construction: buffers never reach an optimizer.

    Raises:
        InputError: matrices that are not ``(r, max_in)`` and ``(max_out, r)`` with one r > 0.
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, key: int | None = None):
        super().__init__()
        if vera_A.ndim != 2 or vera_B.ndim != 2 or vera_A.shape[0] != vera_B.shape[1] or vera_A.shape[0] == 0:
            raise InputError(f"VeRA matrices vera_A {tuple(vera_A.shape)} and vera_B {tuple(vera_B.shape)} are not "
                             "(r, max_in) and (max_out, r).")
        self.register_buffer("vera_A", vera_A.detach(), persistent=False)
        self.register_buffer("vera_B", vera_B.detach(), persistent=False)
        self.key = key  # the projection_prng_key that drew them; None when they came from elsewhere (a file)

    @classmethod
    def seeded(cls, rank: int, max_in: int, max_out: int, key: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> VeRAProjections:
        """The matrices PEFT draws for ``projection_prng_key=key`` (float32 draws, rounded once to ``dtype``).

        Raises:
            InputError: a rank or width that is not a positive integer, or a key that is not an integer.
        """
        for what, v in (("rank", rank), ("max_in", max_in), ("max_out", max_out)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"VeRA {what} must be a positive integer, got {v!r}.")
        if not isinstance(key, int) or isinstance(key, bool):
            raise InputError(f"VeRA projection_prng_key must be an integer, got {key!r}.")
        g = torch.Generator(device="cpu").manual_seed(key)
        a = _kaiming_uniform((rank, max_in), g)  # A first, then B: PEFT's order
        b = _kaiming_uniform((max_out, rank), g)
        return cls(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), key)

    @property
    def rank(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out(self) -> int:
        return self.vera_B.shape[0]

    def slices(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vera_A[:, :in], vera_B[:out])``: views, no copy."""
        return self.vera_A[:, :in_features], self.vera_B[:out_features]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, max_in={self.max_in}, max_out={self.max_out}, dtype={self.vera_A.dtype}"


class VeRALinear(AdapterLinear):
    """``h = W0·x + b ⊙ (B·(d ⊙ (A·dropout(x))))`` around a frozen base (see the module docstring).

    Args:
        base_layer: the frozen linear (``nn.Linear`` or ``quant.NF4Linear``).
        projections: the model's shared :class:`VeRAProjections`; held by reference, not as a
            submodule (the caller registers it once, on the model).
        d_initial: the start of ``d``; ``b`` starts at zero.
        dropout: probability in [0, 1) on the adapter input (training mode only).

    The rank is the projections' r. Input ``(..., in)``, output ``(..., out)`` in the base's
    output dtype; the adapter path runs in the projections' dtype.

    Raises:
        InputError: a base wider than the projections, a d_initial that is not a number, or a
            bad dropout / base (as :class:`layers.lora.LoRALinear`).
    """

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, d_initial: float = D_INITIAL,
                 dropout: float = 0.0):
        nn.Module.__init__(self)  # not AdapterLinear.__init__: there are no per-layer A and B factors
        self._wrap(base_layer, dropout)
        if not isinstance(projections, VeRAProjections):
            raise InputError(f"VeRALinear needs the model's VeRAProjections, got {type(projections).__name__}.")
        if self.in_features > projections.max_in or self.out_features > projections.max_out:
            raise InputError(
                f"The VeRA matrices (r={projections.rank}, max_in={projections.max_in}, max_out={projections.max_out}) "
                f"are too small for a layer with in={self.in_features}, out={self.out_features}; size them to the "
                "largest target layer."
            )
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool):
            raise InputError(f"VeRA d_initial must be a number, got {d_initial!r}.")
        object.__setattr__(self, "_projections", projections)  # shared: not a submodule of every layer
        self.d_initial = float(d_initial)
        device = module_device(base_layer)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=torch.float32, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((projections.rank,), float(d_initial), dtype=torch.float32,
                                                     device=device))
        self.alpha, self.use_rslora = 1.0, False  # VeRA has no alpha: the vectors carry the scale
        self.train(base_layer.training)

    @property
    def projections(self) -> VeRAProjections:
        return self._projections

    @property
    def rank(self) -> int:
        return 0 if self.vera_lambda_d is None else self.vera_lambda_d.shape[0]

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def has_adapter(self) -> bool:
        return self.vera_lambda_d is not None

    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """``[('vera_lambda_b', b), ('vera_lambda_d', d)]`` (PEFT's names); empty for a pass-through."""
        if not self.has_adapter:
            return []
        return [("vera_lambda_b", self.vera_lambda_b), ("vera_lambda_d", self.vera_lambda_d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active:
            return result
        a, b = self._projections.slices(self.in_features, self.out_features)
        dt = a.dtype
        h = F.linear(self.lora_dropout(x).to(dt), a) * self.vera_lambda_d.to(dt)  # (..., r)
        h = F.linear(h, b) * self.vera_lambda_b.to(dt)  # the (..., out) product is kept for b's gradient
        return result + h.to(result.dtype)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``(b ⊙ B)·(d ⊙ A)`` ``(out, in)`` in ``dtype``, detached (out*in values)."""
        a, b = self._projections.slices(self.in_features, self.out_features)
        lam_b, lam_d = self.vera_lambda_b.to(dtype)[:, None], self.vera_lambda_d.to(dtype)[:, None]
        return (b.to(dtype) * lam_b) @ (a.to(dtype) * lam_d)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(d ⊙ A, b ⊙ B)``, ``(r, in)`` and ``(out, r)``: the same update as a LoRA with scale 1."""
        a, b = self._projections.slices(self.in_features, self.out_features)
        return a.float() * self.vera_lambda_d.float()[:, None], b.float() * self.vera_lambda_b.float()[:, None]

    def load_vectors(self, lambda_b: torch.Tensor, lambda_d: torch.Tensor, trainable: bool = False) -> None:
        """Put trained vectors ``b`` ``(out,)`` and ``d`` ``(r,)`` into the layer (float32 copies on the base's device).

        Raises:
            InputError: shapes that do not fit this layer and its projections, or a merged layer.
        """
        if self._merged:
            raise InputError("Cannot load VeRA vectors into a merged layer; unmerge it first.")
        want_b, want_d = (self.out_features,), (self._projections.rank,)
        if tuple(lambda_b.shape) != want_b or tuple(lambda_d.shape) != want_d:
            raise InputError(f"VeRA vectors vera_lambda_b {tuple(lambda_b.shape)} and vera_lambda_d "
                             f"{tuple(lambda_d.shape)} do not fit this layer: it needs {want_b} and {want_d}.")
        device = self.device

        def copy(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().to(device=device, dtype=torch.float32, copy=True), requires_grad=trainable)

        self.vera_lambda_b, self.vera_lambda_d = copy(lambda_b), copy(lambda_d)

    def install(self, *args, **kwargs) -> None:
        raise InputError("A VeRA layer holds no per-layer A and B; load trained vectors with load_vectors, or read "
                         "a VeRA adapter file, which qlora runs as the equivalent LoRA.")

    def clear(self) -> None:
        self.vera_lambda_b = self.vera_lambda_d = None

    def freeze_A(self) -> None:
        raise InputError("LoRA-FA (freeze_A) does not apply to VeRA: its A and B are frozen already and only the "
                         "vectors d and b train.")

    def _merge_fp32(self, w0: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_factors()
        return w0.addmm_(b, a)

    def extra_repr(self) -> str:
        return f"vera, rank={self.rank}"
