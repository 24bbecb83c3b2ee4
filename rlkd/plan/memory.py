"""Per-GPU memory of a distillation run, by component, from model shapes alone.

Components (bytes per GPU):

* student ZeRO-3 model states (parameters, gradients, Adam): DeepSpeed's own
  ``estimate_zero3_model_states_mem_needs`` for 16-bit training (18 bytes per parameter over all
  GPUs plus the largest gathered layer), with and without optimizer offload. For fp32 training
  (rlkd on CPU) the same accounting with 16 bytes per parameter (fp32 parameter, gradient, two moments).
* teacher: its ZeRO-3 partition plus one gathered layer (with parameter offload, the layer only).
* activations of the student's forward kept for backward, counted from the tensors autograd saves
  in a Llama-style decoder layer with fused (SDPA) attention, per token:
  fp32 ``4 (9H + 2H_kv + 4I)`` bytes; 16-bit ``22H + 4H_kv + 8I`` bytes (RMSNorm keeps an fp32
  copy of its input). With gradient checkpointing only each layer's input is kept, plus one layer
  recomputed in backward.
* loss working set: logits path = student logits, their gradient and teacher logits (each
  tokens x V) plus the loss's chunk temporaries; fused path = the fp32 head-weight gradient, the
  chunk's temporaries and one block of logits (no tokens x V tensor; the gathered head weights
  are the one gathered layer the model-state figures already allow for).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkd.objectives.fused import fused_block_rows
from rlkd.objectives.loss import CHUNK_ELEMENT_BUDGET
from rlkd.plan.shapes import ModelShape

GIB = 1024**3
# fp32 chunk x V temporaries alive at once inside DistillLoss.chunk_loss_and_grad, forward and backward (softmaxes,
# log-softmaxes, products, the gradient): counted for KL+R on CPU (tests/plan/test_plan.py measures it).
CHUNK_COPIES = 8
# CUDA context, NCCL buffers and allocator slack on a GPU; nothing on CPU.
GPU_RUNTIME_OVERHEAD = 2 * GIB


@dataclass(frozen=True)
class Setup:
    gpus_per_node: int
    nodes: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    dtype_bytes: int = 2       # 2: bf16/fp16 training, 4: fp32
    vocab: int | None = None   # compared vocabulary (shared prefix); default the student's
    device: str = "cpu"        # whose default fused block budget applies (rlkd plan: cuda)
    device_bytes: int | None = None     # memory of one device (the GPU block default is a share of it)
    fused_block_mib: float | None = None  # loss.fused_block_mib of the run, if set

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def student_states(student: ModelShape, setup: Setup, *, offload_optimizer: bool) -> dict[str, int]:
    """``{"gpu": bytes per GPU, "cpu": bytes per node}`` of the student's parameters, gradients and Adam states."""
    if setup.dtype_bytes == 2:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            student.params, student.largest_layer_params, num_gpus_per_node=setup.gpus_per_node,
            num_nodes=setup.nodes, cpu_offload=offload_optimizer, cpu_offload_params=False)
        return {"gpu": gpu, "cpu": cpu}
    layer = 4 * student.largest_layer_params
    if offload_optimizer:  # fp32 parameters stay, gradients and moments move to the host
        return {"gpu": layer + 4 * student.params // setup.world, "cpu": 12 * student.params // setup.nodes}
    return {"gpu": layer + 16 * student.params // setup.world, "cpu": 0}


def teacher_partition(teacher: ModelShape, setup: Setup, *, offload_params: bool) -> dict[str, int]:
    layer = setup.dtype_bytes * teacher.largest_layer_params
    if offload_params:
        return {"gpu": layer, "cpu": setup.dtype_bytes * teacher.params // setup.nodes}
    return {"gpu": layer + setup.dtype_bytes * teacher.params // setup.world, "cpu": 0}


def layer_activation_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    h, kv, i = shape.hidden, shape.kv_heads * (shape.hidden // shape.heads), shape.intermediate
    if dtype_bytes == 4:
        return 4 * (9 * h + 2 * kv + 4 * i)
    return 22 * h + 4 * kv + 8 * i


def _final_norm_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    return 12 * shape.hidden if dtype_bytes == 4 else 8 * shape.hidden


def _backward_transient_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Gradients flowing through one layer's MLP at once (gate, up and their product) and the residual stream."""
    return dtype_bytes * (3 * shape.intermediate + 2 * shape.hidden)


def student_activations(student: ModelShape, setup: Setup, *, checkpointing: bool) -> int:
    tokens = setup.micro_batch * setup.seq_len
    per_layer = layer_activation_bytes_per_token(student, setup.dtype_bytes)
    final = _final_norm_bytes_per_token(student, setup.dtype_bytes)
    transient = _backward_transient_per_token(student, setup.dtype_bytes)
    if checkpointing:
        kept = student.layers * setup.dtype_bytes * student.hidden + per_layer
    else:
        kept = student.layers * per_layer
    return tokens * (kept + final + transient)


def teacher_activations(teacher: ModelShape, setup: Setup) -> int:
    """No-grad forward: a layer's MLP intermediates and two hidden-state buffers at a time."""
    return setup.micro_batch * setup.seq_len * setup.dtype_bytes * (3 * teacher.intermediate + 2 * teacher.hidden)


def fused_block(setup: Setup, vocab: int) -> tuple[int, int]:
    """(rows per block, rows per chunk) of the fused path for this setup (rlkd.objectives.fused)."""
    return fused_block_rows(vocab, setup.dtype_bytes, setup.device, device_bytes=setup.device_bytes,
                            setting_mib=setup.fused_block_mib)


def loss_working_set(student: ModelShape, teacher: ModelShape | None, setup: Setup, *, fused: bool) -> int:
    tokens = setup.micro_batch * setup.seq_len
    vocab = setup.vocab or student.vocab
    p = setup.dtype_bytes
    grad_hidden = tokens * student.hidden * p
    if not fused:
        logits = tokens * vocab * p * (3 if teacher is not None else 2)  # student, its gradient, teacher
        chunk = CHUNK_COPIES * min(tokens * vocab, CHUNK_ELEMENT_BUDGET) * 4
        head_grad = student.vocab * student.hidden * p  # full-shape before DeepSpeed reduce-scatters it
        return logits + chunk + head_grad + grad_hidden
    block_rows, chunk_rows = fused_block(setup, vocab)
    chunk = CHUNK_COPIES * min(tokens, chunk_rows) * vocab * 4
    # one block of student and teacher logits (the student's overwritten by its gradient), and, on
    # the CPU in 16-bit training, the block's fp32 copy for the weight-gradient sum (a GPU adds the
    # 16-bit product into the fp32 sum directly)
    copy = 4 if p != 4 and setup.device != "cuda" else 0
    chunk += min(tokens, block_rows) * vocab * (2 * p + copy)
    head_grad = student.vocab * student.hidden * (4 + (p if p != 4 else 0))  # fp32 sum, then its cast
    # The gathered head weights are the "largest layer" that the states and teacher partition
    # already allow for: at loss time no other layer is gathered.
    return chunk + head_grad + grad_hidden


@dataclass(frozen=True)
class Variant:
    """One way to run: optimizer offload, teacher parameter offload, gradient checkpointing, fused loss."""

    offload: bool
    checkpointing: bool
    fused: bool

    def label(self) -> str:
        parts = ["offload" if self.offload else "no offload", "ckpt" if self.checkpointing else "no ckpt",
                 "fused" if self.fused else "logits"]
        return ", ".join(parts)


def per_gpu(student: ModelShape, teacher: ModelShape | None, setup: Setup, variant: Variant,
            *, overhead: int = GPU_RUNTIME_OVERHEAD) -> dict[str, int]:
    """Bytes per GPU by component for one variant, and their total."""
    parts = {"student_states": student_states(student, setup, offload_optimizer=variant.offload)["gpu"],
             "teacher": 0, "activations": student_activations(student, setup, checkpointing=variant.checkpointing),
             "loss": loss_working_set(student, teacher, setup, fused=variant.fused), "runtime": overhead}
    if teacher is not None:
        parts["teacher"] = (teacher_partition(teacher, setup, offload_params=variant.offload)["gpu"]
                            + teacher_activations(teacher, setup))
    parts["total"] = sum(parts.values())
    return parts


def largest_micro_batch(student: ModelShape, teacher: ModelShape | None, setup: Setup, variant: Variant,
                        gpu_bytes: int, *, overhead: int = GPU_RUNTIME_OVERHEAD, limit: int = 4096) -> int:
    """The largest micro-batch (sequences of ``setup.seq_len``) whose total fits ``gpu_bytes``; 0 if none."""
    from dataclasses import replace

    def fits(batch: int) -> bool:
        return per_gpu(student, teacher, replace(setup, micro_batch=batch), variant, overhead=overhead)["total"] <= gpu_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # total grows with the batch, so bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
