"""Process-group setup from torchrun's environment, and the few collectives the engine needs.

Everything works unchanged in a single process without any environment variable.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from sscxr.errors import ConfigError

log = logging.getLogger(__name__)


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; passed explicitly (no global state)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    backend: str | None = None
    is_main: bool = True


def _is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (or None) -> this process's CUDA device if CUDA is available, else CPU; 'cuda' ->
    cuda:local_rank; anything else as given (CUDA asked for but missing is an error)."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return resolved


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's RANK / LOCAL_RANK / WORLD_SIZE, if any.

    Args:
        device: "auto", "cpu", "cuda" or an explicit "cuda:N".

    Returns:
        A DistInfo; with WORLD_SIZE unset or 1 no process group is created.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # TF32 for the float32 matmuls and convolutions left outside autocast (Ampere and later): the
        # usual choice for training, ~8x the float32 rate at a 10-bit mantissa. CUDA-only flags: CPU
        # numerics are untouched.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend: str | None = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not _is_initialized():
            # Binding the CUDA device up front lets nccl collectives (and barrier) know their device.
            device_id = dev if dev.type == "cuda" else None
            tdist.init_process_group(
                backend=backend, init_method="env://", world_size=world, rank=rank, device_id=device_id
            )
        log.info("process group: backend %s, world size %d", backend, world)
    return DistInfo(rank, world, local_rank, dev, backend, rank == 0)


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if _is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _is_initialized():
        tdist.barrier()


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean of scalar tensors over all ranks, in one collective (identity in a single process).

    Every rank must pass the same keys. Returns detached float32 scalars on the collective's device.
    """
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if _is_initialized() and tdist.get_world_size() > 1:
        stacked = stacked.to(_collective_device())
        tdist.all_reduce(stacked, op=tdist.ReduceOp.SUM)
        stacked /= tdist.get_world_size()
    return dict(zip(keys, stacked.unbind(0), strict=True))


def all_true(flag: torch.Tensor) -> bool:
    """True when `flag` (a bool scalar tensor) is true on every rank: one host sync."""
    return bool(all_true_tensor(flag).item())


def all_true_tensor(flag: torch.Tensor) -> torch.Tensor:
    """`flag` (a bool scalar tensor) ANDed over every rank, as a bool scalar on `flag`'s device.

    No host sync where the collective runs on `flag`'s device (nccl with CUDA tensors, gloo with CPU
    ones): the all-reduce is queued like any other kernel, so the caller can act on the result on the
    device (e.g. fused AdamW's `found_inf`) without stalling.
    """
    value = flag.detach().reshape(()).to(torch.int32)
    if _is_initialized() and tdist.get_world_size() > 1:
        device = value.device
        value = value.to(_collective_device())
        tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
        value = value.to(device)
    return value.bool()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank (`[obj]` in a single process)."""
    if not (_is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every rank; `obj` itself in a single process. Only data the
    processes of this run made travel this way (never a file's content unpickled)."""
    if not (_is_initialized() and tdist.get_world_size() > 1):
        return obj
    box = [obj if tdist.get_rank() == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp` on `device` (None = full precision)."""
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.amp=bf16 but this GPU has no bfloat16 support: use train.amp=fp16")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


#: bf16 is kept on a CPU when it is at least this much faster than float32 (a margin against timing noise).
BF16_MIN_SPEEDUP = 1.1


def _cpu_has_native_bf16() -> bool:
    """Whether bf16 autocast beats float32 on this CPU, measured (`cpu_precision_timings`).

    No fixed rule holds everywhere: on an Intel Xeon without AMX oneDNN's bf16 matmul ran at half the
    float32 speed, while on an AMD EPYC with AVX512-BF16 and no AMX bf16 matmuls ran 2.1-2.3x faster; with
    AMX tiles bf16 inference of ViT-S/16 ran 2.1x faster (benchmarks/bench_inference.py); on an AMD EPYC
    with AVX2 only (no AVX-512) a bf16 block step took 2.1-2.3 s against 83-156 ms in float32.
    """
    fp32, bf16 = cpu_precision_timings()
    return fp32 >= BF16_MIN_SPEEDUP * bf16


@functools.lru_cache(maxsize=1)
def cpu_precision_timings() -> tuple[float, float]:
    """(float32, bf16 autocast) seconds of one forward + backward of a ViT-S block on this CPU.

    Measured once per process (about 0.6 s on 2 cores), on a batch of 4 x 197 tokens of width 384: the
    shapes of the models this project trains (at batch 1 the two precisions tie on AMX, so smaller
    probes mislead). The global RNG is left
    untouched (the block's initialisation draws from a forked one), so measuring never changes a run.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when asked from an inference path
        return _time_precisions()


#: a bf16 warm-up step slower than this and than 10x float32's is not timed further (`_time_precisions`)
_PROBE_HOPELESS_S = 1.0


def _best_times(timed: Callable[[torch.dtype | None], float]) -> list[float]:
    """[float32, bf16]: the best of 2 `timed(dtype)` steps after a warm-up one (kernel selection,
    allocations), except for a hopeless bf16: one whose warm-up is slower than `_PROBE_HOPELESS_S` and
    10x float32 (bf16 without native kernels; seen: 2 s against 87 ms on an AVX2-only CPU) is not timed
    further, as no faster steady state follows and more steps would only delay every command's start."""
    timings: list[float] = []
    for dtype in (None, torch.bfloat16):
        warm_up = timed(dtype)
        if timings and warm_up > max(_PROBE_HOPELESS_S, 10 * timings[0]):
            return [*timings, warm_up]
        timings.append(min(timed(dtype) for _ in range(2)))
    return timings


def _time_precisions() -> tuple[float, float]:
    from timm.models.vision_transformer import Block

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = Block(dim=384, num_heads=6)
        x = torch.randn(4, 197, 384)

    def step(dtype: torch.dtype | None) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            y = block(x)
        y.float().square().mean().backward()

    def timed(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        step(dtype)
        return time.perf_counter() - start

    timings = _best_times(timed)
    block.zero_grad(set_to_none=True)
    log.info(
        "CPU precision: a ViT-S block's forward + backward takes %.1f ms in float32, %.1f ms in bf16: "
        "amp auto uses %s", timings[0] * 1e3, timings[1] * 1e3,
        "bf16" if timings[0] >= BF16_MIN_SPEEDUP * timings[1] else "float32",
    )  # fmt: skip
    return timings[0], timings[1]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast context for `dtype` on `device` (disabled when `dtype` is None)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def precision_autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of inference (predict, evaluate, explain, serve, segmentation masks) under
    the training policy (`resolve_amp`): "auto" = bf16 on GPUs that support it and on CPUs with AMX,
    float32 elsewhere; "bf16" / "fp16" forced; "fp32" = full precision.

    Raises:
        ConfigError: an unknown precision, or bf16 asked of a GPU without it.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return autocast(device, resolve_amp("off" if precision == "fp32" else precision, device))


def to_device(batch: Mapping[str, Any], device: torch.device, keep: Collection[str] = ()) -> dict[str, Any]:
    """Move every tensor of a batch to `device` (non-blocking: loaders pin memory on CUDA), except the
    entries named in `keep` (`Task.host_keys`: values the task reads on the host)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in keep else v
        for k, v in batch.items()
    }
