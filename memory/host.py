"""Host memory (CPU RAM) of a run: what lives outside the GPU, and whether a machine has it.

A run that fits the GPU can still die on the host: offloaded checkpointing
keeps every layer's input in pinned host memory (``layers x 2*b*s*h``
bytes: 26 GB for Llama-3.1-8B at 100k tokens), paged optimizer state is
backed by host memory, and the loader holds tensors while it streams the
checkpoint. The host side is two moments, never both at once:

* **loading**: the process plus the loader's transient (:data:`LOADER_COPIES`
  copies of the checkpoint's largest tensor: the tensor read from the file,
  and a converted copy when the file's dtype is wider than bf16);
* **training**: the process plus the pinned offload buffers plus the paged
  optimizer state (counted whole: unified memory lives on the GPU while
  there is room, but the host must be able to take it when it is evicted).

On ``device="cpu"`` the whole step lives in host memory, so training also
holds the tensor peak (and the budget the planner checks is RAM already).

The process itself is a named default (:data:`PROCESS_BYTES`), with its
source. File-backed pages of the memory-mapped checkpoint are page cache,
reclaimable by the kernel, so they are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import ModelSpec

GIB = 1 << 30
MIB = 1 << 20
LOADER_COPIES = 2
# Resident memory of a trainer process before its model, by device:
# cpu: 449 MiB measured on the 2-core CI machine after importing torch, transformers, bitsandbytes,
#      datasets and qlora.train.loop (psutil RSS; torch 2.13.0+cpu, transformers 5.24.0), rounded up.
# cuda: the CUDA runtime and math libraries (cuBLAS, cuDNN, NCCL) mapped and initialised add
#      1-2 GiB of RSS to a PyTorch process on recent drivers; 2.5 GiB in all is a conservative default,
#      to be replaced by the figure bench/gpu_session.sh records on a real GPU.
PROCESS_BYTES = {"cpu": 512 * MIB, "cuda": int(2.5 * GIB)}


@dataclass(frozen=True)
class HostMemory:
    """Predicted host memory of a run, in bytes.

    Attributes:
        process: the interpreter and libraries (:data:`PROCESS_BYTES`).
        loader_peak: the loader's transient while it streams the checkpoint.
        pinned_offload: offloaded layer inputs in pinned memory (``offload_activations``).
        paged_optimizer_state: paged optimizer state (unified memory, host-backed).
        device_tensors: the step's tensor peak when the device is the CPU, else 0.
        offloaded_params: FSDP2 with ``offload_params``: this rank's shards of the base, the adapter,
            its gradients and optimizer state, kept in pinned host memory (:mod:`memory.distributed`).
    """

    process: int
    loader_peak: int
    pinned_offload: int
    paged_optimizer_state: int
    device_tensors: int
    offloaded_params: int = 0

    @property
    def loading_bytes(self) -> int:
        return self.process + self.loader_peak

    @property
    def training_bytes(self) -> int:
        return (self.process + self.pinned_offload + self.paged_optimizer_state + self.device_tensors
                + self.offloaded_params)

    @property
    def total_bytes(self) -> int:
        """The larger of the two moments: what the machine must have free."""
        return max(self.loading_bytes, self.training_bytes)

    def describe(self) -> str:
        """One line, in GiB: ``total = process + max(loader, offload + paged state [+ tensors])``."""
        g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        train = [f"pinned offload {g(self.pinned_offload)}", f"paged optimizer state {g(self.paged_optimizer_state)}"]
        if self.device_tensors:
            train.append(f"CPU tensors {g(self.device_tensors)}")
        if self.offloaded_params:
            train.append(f"offloaded FSDP shards {g(self.offloaded_params)}")
        return (f"{g(self.total_bytes)} GiB = process {g(self.process)} + max(loading {g(self.loader_peak)}, "
                f"training {' + '.join(train)})")


def largest_tensor_bytes(spec: ModelSpec, itemsize: int = 2) -> int:
    """Bytes of the checkpoint's largest tensor at ``itemsize`` bytes per element (a 16-bit file)."""
    linears = max((lin.numel for lin in spec.linears), default=0)
    head = spec.frozen_16bit.get("lm_head", 0)
    # The input embedding is one tensor (vocab x hidden), the largest in most LMs.
    embedding = spec.vocab_size * spec.hidden_size if spec.frozen_16bit.get("embeddings") else 0
    return itemsize * max(linears, head, embedding)


def host_memory(spec: ModelSpec, device: str, pinned: int, paged: int, tensor_peak: int,
                offloaded_params: int = 0) -> HostMemory:
    """The :class:`HostMemory` of a step whose device side is already known."""
    return HostMemory(
        process=PROCESS_BYTES["cpu" if device == "cpu" else "cuda"],
        loader_peak=LOADER_COPIES * largest_tensor_bytes(spec),
        pinned_offload=pinned,
        paged_optimizer_state=paged,
        device_tensors=tensor_peak if device == "cpu" else 0,
        offloaded_params=offloaded_params,
    )


def available_ram() -> int:
    """Bytes of RAM this machine can give a new process now (``psutil.virtual_memory().available``)."""
    import psutil

    return int(psutil.virtual_memory().available)
