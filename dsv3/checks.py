"""Argument checks shared by the Python API and the commands: one UsageError naming the argument.

Everything here runs before any weight is read, so a mistake costs a second, not a load.
"""

from __future__ import annotations

import math

from dsv3.errors import OutOfMemoryError, UsageError


def check_int(name: str, value, minimum: int | None = None, optional: bool = False,
              maximum: int | None = None) -> None:
    """`value` is an int (not a bool) in [minimum, maximum]; None passes when optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be at most {maximum}, got {value}")


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """`value` is a finite int or float in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise UsageError(f"{name} must be {'above' if low_open else 'at least'} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise UsageError(f"{name} must be at most {high:g}, got {value:g}")


#: below this a temperature divides logits into overflow; 0 means greedy decoding
MIN_TEMPERATURE = 1e-5


def check_sampling(max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, prefix: str = "") -> None:
    """The sampling arguments of `dsv3 generate` and Model.generate, named with `prefix` ("--" for the CLI)."""
    check_int(f"{prefix}max{'-' if prefix else '_'}new{'-' if prefix else '_'}tokens", max_new_tokens, 1)
    check_number(f"{prefix}temperature", temperature, 0.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise UsageError(f"{prefix}temperature {temperature:g} is too small to sample with (logits / temperature "
                         f"overflow); use 0 for greedy decoding or at least {MIN_TEMPERATURE:g}")
    check_number(f"{prefix}top{'-' if prefix else '_'}p", top_p, 0.0, 1.0, low_open=True)
    check_int(f"{prefix}seed", seed, 0, maximum=2**63 - 1)  # a torch generator's seed is a signed 64-bit int


def check_device(device: str | None, name: str = "device") -> None:
    """A torch device string naming a device type this torch build has and an index it can see.

    Generic over device types, with no vendor named: the torch module named after the type (which a
    vendor's torch build or extension registers) says whether it is available and how many devices it sees.
    Messages name the argument `name` ("--device" for a command's flag).
    """
    if device is None:
        return
    import torch

    if not isinstance(device, (str, torch.device)):
        raise UsageError(f"{name} must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{name} {device}: not a torch device ({str(e).splitlines()[0]})") from None
    if parsed.type == "cpu":
        return
    module = getattr(torch, parsed.type, None)
    available = getattr(module, "is_available", None)
    if available is None or parsed.type == "meta":
        raise UsageError(f"{name} {device}: dsv3 cannot run on {parsed.type} devices")
    if not available():
        raise UsageError(f"{name} {device}: this machine has no usable {parsed.type} device "
                         f"(torch.{parsed.type}.is_available() is False)")
    count = getattr(module, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"{name} {device}: only {count} {parsed.type} device{'s' if count != 1 else ''} "
                         f"visible (indices 0..{count - 1})")


def model_bytes(config, precision: str, max_batch_size: int, max_seq_len: int, plan=None,
                include_mtp: bool | None = None) -> tuple[int, int]:
    """(weight bytes, latent cache bytes) the model needs on its device, roughly, for the OOM message and
    `dsv3 doctor --plan`.

    FP8 linears count their float32 block scales; kv_b_proj (dequantized at load) and the routers
    (float32) count as loaded. With `plan` (a ParallelPlan) the weights are that rank's: its slice of each
    cut tensor and its routed experts, without the MTP module. `include_mtp` overrides whether the MTP
    module counts (default: without a plan).
    """
    from dsv3 import tensor_specs

    dense = 4 if precision == "fp32" else 2
    weights = 0
    mtp = plan is None if include_mtp is None else include_mtp
    for module, spec in tensor_specs.module_specs(config, include_mtp=mtp).items():
        if plan is not None and not plan.holds(module, config.n_routed_experts):
            continue
        shape = list(spec.shape)
        cut = None if plan is None else plan.cut(module)
        if cut is not None:
            shape[cut.dim] //= cut.parts
        numel = math.prod(shape)
        if spec.kind == tensor_specs.LINEAR and precision == "fp8" and not module.endswith("kv_b_proj"):
            weights += numel + 4 * math.ceil(shape[0] / 128) * math.ceil(shape[-1] / 128)
        elif spec.kind == tensor_specs.FP32 or module.endswith(".mlp.gate"):
            weights += numel * 4
        else:
            weights += numel * dense
    cache = config.latent_cache_bytes_per_token(dense) * max_batch_size * max_seq_len
    return weights, cache


def available_bytes(device) -> int | None:
    """Free bytes on `device`: the accelerator's free memory, or on the CPU the host's available memory
    (MemAvailable); None where neither can be read."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    info = getattr(torch.get_device_module(device), "mem_get_info", None)
    try:
        return int(info(device)[0]) if info is not None else None
    except Exception:  # noqa: BLE001 - a backend that cannot tell: no check
        return None


def check_synthetic_fits(config, precision: str, device, plan=None, include_mtp: bool = False) -> None:
    """Before random weights are built (--load-format dummy, or a config): OutOfMemoryError when they cannot fit
    in what `device` has free, rather than minutes of building that end in a crash or the OOM killer."""
    free = available_bytes(device)
    if free is None:
        return
    weights, _ = model_bytes(config, precision, 0, 0, plan, include_mtp)
    if weights > free:
        raise OutOfMemoryError(
            f"the model's synthetic weights need about {weights / 1e9:.1f} GB in {precision} and {device} has "
            f"{free / 1e9:.1f} GB free: use fewer layers (scripts/make_dummy_checkpoint.py --layers N, or "
            f"bench's --layers), --precision fp8 where the chip has it, or more devices")


def out_of_memory(error: BaseException, config, precision: str, max_batch_size: int, max_seq_len: int,
                  device) -> OutOfMemoryError:
    """The one-line error for an out-of-memory while the model was built or loaded."""
    weights, cache = model_bytes(config, precision, max_batch_size, max_seq_len)
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return OutOfMemoryError(
        f"out of memory on {device} while loading the model: it needs about {weights / 1e9:.1f} GB of {precision} "
        f"weights and {cache / 1e9:.2f} GB of cache ({max_batch_size} x {max_seq_len} tokens); use more devices "
        f"(torchrun, --tp/--ep), a smaller --max-batch-size/--max-seq-len or --precision fp8 ({detail})")


def token_batch(tokens, vocab_size: int):
    """tokens [B, T] as a LongTensor: an integer tensor or a list of equal-length lists of ints, every id
    in [0, vocab_size). A TypeError or UsageError naming what is wrong, before anything reaches the device."""
    import torch

    if isinstance(tokens, (list, tuple)):
        if not tokens or not all(isinstance(row, (list, tuple)) for row in tokens):
            raise TypeError("tokens must be a [B, T] integer tensor or a non-empty list of lists of token ids")
        if len({len(row) for row in tokens}) != 1 or not tokens[0]:
            raise UsageError(f"token lists must be non-empty and of equal length, got lengths "
                             f"{sorted({len(row) for row in tokens})}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for row in tokens for t in row):
            raise TypeError("token ids must be ints")
        tokens = torch.tensor(tokens, dtype=torch.long)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a [B, T] integer tensor or a list of lists of ints, "
                        f"got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise UsageError(f"tokens must be a non-empty [B, T] tensor, got shape {list(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise UsageError(f"token id {bad} is out of range for the vocabulary of {vocab_size} tokens")
    return tokens.long()
