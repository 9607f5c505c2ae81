"""Closed-form terms of the footprint: weights, adapters, optimizer state, chunked loss.

Everything here is arithmetic on exact module shapes (a :class:`ModelSpec`)
and on the storage layouts of the libraries that hold the tensors:

* 4-bit weights: the byte sizes of ``quant.NF4Linear``'s own buffers
  (:func:`quant.formats.weight_bytes`, which a test checks against a
  meta-device instance of the layer, so the layout cannot drift from quant's);
* optimizer state: ``torch.optim.AdamW`` keeps ``exp_avg``/``exp_avg_sq`` in
  the parameter dtype plus a 0-d float32 ``step`` (on the host for CUDA
  parameters); bitsandbytes 8-bit AdamW keeps two uint8 states plus a
  float32 absmax per 256 elements, and 32-bit state for tensors under 4096
  elements; its 32-bit AdamW keeps two float32 states; paged variants put
  the state of tensors with >= 1e5 elements in CUDA unified memory
  (host-backed, not in ``max_memory_allocated``);
* qlora's chunked loss (:func:`chunked_loss_segment`), derived op by op from
  ``qlora/loss.py``.
"""

from __future__ import annotations

from quant.formats import QUANTIZE_CHUNK

from .profile import TAGS, Segment, Vec

OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq", "nonzero")
# Peak extra bytes of initializing one layer from its weight (layers.inits via qlora.lora.inits), as a multiple
# of its float32 weight (4·out·in): the float32 copy, the SVD's (QR's) factors, the residual and the
# re-quantization's temporaries. Measured with memory.tracker on CPU (bench/init_error.py, checked by
# tests/qlora/test_lora_inits.py): 5.69-5.75 for PiSSA, OLoRA and nonzero (which has no decomposition: the
# residual and the re-quantization dominate), 8.07-8.25 for LoftQ (its round trip through 4 bits adds a
# dequantized copy); the largest of each is used.
INIT_TRANSIENT = {"pissa": 5.75, "olora": 5.75, "loftq": 8.25, "nonzero": 5.75}


# quant.blockwise.quantize_4bit's temporaries per element of one chunk (at most QUANTIZE_CHUNK elements): the
# float32 chunk and its scaled values, the int64 bucket index, the uint8 codes. Measured with memory.tracker
# on CPU at 12.1 bytes (tests/memory/test_terms.py checks it); rounded up.
QUANTIZE_TRANSIENT = 12.5


def quantize_transient_bytes(numel: int, device: str) -> int:
    """Bytes on the device while one ``numel``-element weight is quantized as it loads.

    The chunked temporaries, plus on a GPU the 16-bit weight itself, copied there from the file (on the CPU
    the loader reads it in place from the memory-mapped file: no allocation).
    """
    return int(QUANTIZE_TRANSIENT * min(numel, QUANTIZE_CHUNK)) + (2 * numel if device == "cuda" else 0)


def block_mask_bytes(batch: int, seq: int, compute_itemsize: int = 2) -> tuple[int, int]:
    """Packed rows under sdpa: ``(held, per_call)`` bytes of transformers' block-diagonal mask.

    Restarting position ids make transformers (``masking_utils.sdpa_mask``) build one dense
    ``(b, 1, s, s)`` bool mask per forward instead of running sdpa with ``is_causal`` (no mask at all).
    Every checkpointed layer keeps it as an input, so it is ``held`` from the forward until the
    backward ends (1 byte an element). Each attention call turns it into an additive mask in the
    compute dtype (``per_call``, 2 bytes an element in bf16), freed after the call in the forward and
    kept through one layer's backward. On the CPU, with this term, the packed rows of
    ``bench/memory_accuracy.py`` (1x4096 to 2x2048) are predicted within 2.7% of their measured peak.
    """
    n = batch * seq * seq
    return n, compute_itemsize * n


def init_transient_bytes(init: str, largest_linear: int) -> int:
    """Bytes an init from the weights holds on the device at its worst layer (``largest_linear`` = out·in)."""
    return int(INIT_TRANSIENT.get(init, 0.0) * 4 * largest_linear)
_PAGED_MIN = 100_000  # bitsandbytes pages a state tensor only from this many elements
_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit state below this many elements
_BLOCK_8BIT = 256  # bitsandbytes blockwise 8-bit optimizer state block


DORA_MAGNITUDE_ITEMSIZE = 4  # qlora keeps DoRA magnitudes in float32 (layers.dora.DoRALinear)


def lora_tensors(in_features: int, out_features: int, rank: int, dora: bool, itemsize: int) -> list[tuple[int, int]]:
    """(elements, bytes per element) of one adapted module's trainable tensors.

    A ``(r, in)`` and B ``(out, r)`` in the adapter dtype; with DoRA, the
    magnitude ``(out,)`` in float32.
    """
    out = [(rank * in_features, itemsize), (out_features * rank, itemsize)]
    if dora:
        out.append((out_features, DORA_MAGNITUDE_ITEMSIZE))
    return out


def optimizer_state_bytes(numel: int, param_itemsize: int, optimizer: str, device: str) -> tuple[int, int]:
    """(device bytes, host-backed bytes) of the state one parameter tensor of ``numel`` elements gets.

    Raises:
        ValueError: unknown optimizer (callers validate user input first).
    """
    if optimizer == "adamw":
        # exp_avg + exp_avg_sq in the param dtype; 'step' is a 0-d fp32 tensor kept
        # on the host for CUDA params (non-capturable, non-fused), with the param on CPU
        return 2 * numel * param_itemsize + (4 if device == "cpu" else 0), 0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        if numel < _MIN_8BIT:
            state = 8 * numel
        else:
            state = 2 * numel + 2 * 4 * -(-numel // _BLOCK_8BIT)
    elif optimizer == "paged_adamw_32bit":
        state = 8 * numel
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    # Only the two state tensors are paged; absmax stays a plain device tensor.
    paged = optimizer.startswith("paged") and device == "cuda" and numel >= _PAGED_MIN
    if not paged:
        return state, 0
    moments = 2 * numel * (1 if optimizer.endswith("8bit") and numel >= _MIN_8BIT else 4)
    return state - moments, moments


def optimizer_shared_bytes(optimizer: str) -> int:
    """Per-optimizer tensors: bitsandbytes' two 256-entry float32 quantization maps for 8-bit state."""
    return 2 * 256 * 4 if optimizer.endswith("8bit") else 0


def optimizer_step_temporaries(tensors: list[tuple[int, int]], optimizer: str, device: str) -> int:
    """Peak extra bytes while ``optimizer.step()`` runs.

    * torch AdamW on CUDA (foreach, the default there): ``_foreach_sqrt`` of
      every ``exp_avg_sq`` at once -- one param-dtype copy of all adapter
      parameters.
    * torch AdamW on CPU (single-tensor): ``exp_avg_sq.sqrt()`` and its
      division by the bias correction, per tensor -- two copies of the
      largest parameter.
    * bitsandbytes: one fused kernel call per tensor; on CUDA it allocates
      nothing, on CPU its temporaries live inside the op and no tensor
      outlives it.
    """
    if optimizer != "adamw" or not tensors:
        return 0
    if device == "cuda":
        return sum(n * size for n, size in tensors)
    return 2 * max(n * size for n, size in tensors)


def _vec(**by_tag: int) -> Vec:
    return [by_tag.get(tag, 0) for tag in TAGS]


def chunked_loss_segment(
    b: int, s: int, hidden: int, vocab: int, chunk_tokens: int | None, softcap: bool, itemsize: int = 2
) -> Segment:
    """Peak and net effect of ``qlora.train.loss.causal_lm_loss`` (forward + backward), per tag.

    Worst case: every position after the first carries a label, so the
    loss reads ``n = b*(s-1)`` rows. ``k = min(chunk_tokens, n)`` rows of
    logits exist at a time (all ``n`` when unchunked).

    Gather: the final hidden states (``b*s*H``), the gathered rows ``h``
    (``n*H``; for b > 1 the shifted slice is first copied, ``n*H`` more, and
    the shifted labels, ``8n``), the int64 target index and labels (``8n``
    each).

    Fused forward (the gradient is computed here, see qlora/loss.py): ``h``,
    the ``n*H`` gradient buffer, the index, and one chunk at a time: bf16
    logits and their fp32 copy (6 bytes per logit at the worst moment), then
    in place, then the 16-bit softmax gradient beside the fp32 buffer (6
    again); with soft-capping the kept tanh adds 4 (8 at worst). Nothing of
    vocab size is saved.

    Backward: the saved gradient, its scaled copy and the zero-padded
    gradient of the gathered rows (``3*n*H``) with the index; last, the
    gradient of the final hidden states (``b*s*H``) is handed to the stack
    (tag ``seed``).
    """
    n = b * (s - 1)
    k = n if chunk_tokens is None else min(chunk_tokens, n)
    H, hs = hidden, itemsize
    per_logit = 8 if softcap else 6
    final = b * s * H * hs
    rows = n * H * hs
    index = 16 * n
    gather = final + (rows + 8 * n if b > 1 else 0) + rows + index
    fwd = final + 2 * rows + index + per_logit * k * vocab
    tail = 3 * rows + index
    peak = max(gather, fwd, tail, final + rows)
    return Segment(_vec(head=peak), _vec(seed=final))
