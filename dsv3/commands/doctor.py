"""`dsv3 doctor`: what this machine has and what dsv3 will run on it.

Device, vendor, arch, memory, library versions, the backend picked and why,
FP8 support and the implementation of every op. It probes and builds the
backend but runs nothing: no kernel is compiled, no model is loaded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from dsv3.backends.errors import BackendUnavailable
from dsv3.backends.interface import OPS
from dsv3.backends.platforms import probe
from dsv3.backends.select import build, decide, describe, installed_packages
from dsv3.checks import check_device, check_int, check_number
from dsv3.commands.args import KV_CACHE_DTYPE_NAMES, add_setting_arguments
from dsv3.errors import Dsv3Error, UsageError
from dsv3.precision import resolve_precision

#: distribution names that provide each library, first found wins
_DISTRIBUTIONS = {
    "triton": ("triton", "pytorch-triton-rocm", "pytorch-triton"),
    "torch_npu": ("torch-npu", "torch_npu"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto (default; DSV3_BACKEND overrides) or a backend name")
    p.add_argument("--device", help="torch device for the backend (default: the backend's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group("memory plan", "--plan: what a multi-device layout needs on each rank and whether it "
                             "fits, from the model's config alone (no device is probed, no weight read)")
    g.add_argument("--plan", action="store_true", help="print the memory plan of a layout instead")
    g.add_argument("--model", default="deepseek-v3", help="a checkpoint directory or a built-in config name "
                   "(default deepseek-v3)")
    g.add_argument("--devices", default="H200x8", help="device kind and count: H200x8, H100x8, MI300Xx8 or 910Bx32 "
                   "(default H200x8)")
    add_setting_arguments(g, ["tensor_parallel_size", "data_parallel_size", "enable_expert_parallel", "precision",
                              "kv_cache_dtype", "gpu_memory_utilization", "max_model_len"], tensor_parallel_size=1)
    g.add_argument("--reserve-gib", type=float, default=5.0, help="GiB per rank kept for the runtime context, "
                   "communication buffers and activations (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.plan:
        return run_plan(args)
    check_device(args.device, "--device")
    report = collect(args.backend, args.device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 2 if report["backend"]["error"] else 0


def run_plan(args: argparse.Namespace) -> int:
    """`dsv3 doctor --plan`: 0 when the layout fits, 1 when it does not; impossible layouts raise (exit 2)."""
    from dsv3.config import load_config
    from dsv3.memory_plan import GiB, format_plan, memory_plan, not_fitting, parse_devices

    check_int("-tp", args.tensor_parallel_size, 1)
    check_int("-dp", args.data_parallel_size, 1)
    check_int("--max-model-len", args.max_model_len, 1, optional=True)
    check_number("--gpu-memory-utilization", args.gpu_memory_utilization, 0.0, 1.0, low_open=True)
    check_number("--reserve-gib", args.reserve_gib, 0.0)
    kv_cache_dtype = KV_CACHE_DTYPE_NAMES.get(args.kv_cache_dtype, args.kv_cache_dtype)
    if kv_cache_dtype not in ("auto", "bf16", "fp8"):
        raise UsageError(f"--kv-cache-dtype {args.kv_cache_dtype}: a plan takes auto, bf16 or fp8 (fp8_e4m3)")
    if args.precision not in ("auto", "fp8", "bf16"):
        raise UsageError(f"--precision {args.precision}: a plan takes auto, fp8 or bf16")
    kind, count = parse_devices(args.devices)
    config = load_config(args.model)
    plan = memory_plan(config, kind, count, args.tensor_parallel_size, args.data_parallel_size,
                       args.enable_expert_parallel, args.precision, kv_cache_dtype, args.gpu_memory_utilization,
                       int(args.reserve_gib * GiB), args.max_model_len)
    print(json.dumps({"model": args.model, **plan.to_dict()}, indent=2) if args.json else format_plan(plan, args.model))
    if plan.fits:
        return 0
    print(f"dsv3: error: {not_fitting(plan)}", file=sys.stderr)
    return 1


def collect(requested: str = "auto", device: str | None = None) -> dict:
    """The doctor's report as a JSON-ready dict."""
    import torch

    chip = probe()
    report = {
        "device": describe(chip),
        "vendor": chip.vendor,
        "arch": chip.arch,
        "name": chip.name,
        "count": chip.count,
        "memory_bytes": chip.memory_bytes,
        "chip_fp8_format": chip.fp8_format,
        "versions": versions(torch),
        "backend": {"name": None, "device": None, "reason": None, "error": None, "dist_backend": None},
        "fp8": {"available": False, "native": False, "format": None, "max": None},
        "precision_auto": {},
        "ops": {},
    }
    try:
        backend, decision = build(decide(chip, requested, os.environ, installed_packages()), device)
    except (BackendUnavailable, Dsv3Error) as e:
        report["backend"]["error"] = str(e)
        return report
    caps = backend.capabilities
    report["backend"].update(name=caps.name, device=caps.device, reason=decision.reason, dist_backend=caps.dist_backend)
    fmt = str(caps.fp8_dtype).removeprefix("torch.float8_") if caps.fp8_dtype is not None else None
    report["fp8"] = {"available": fmt is not None, "native": caps.native_fp8, "format": fmt, "max": caps.fp8_max}
    for kind, is_fp8 in (("fp8_checkpoint", True), ("bf16_checkpoint", False)):
        precision, why = resolve_precision("auto", caps, is_fp8, decision.chip)
        report["precision_auto"][kind] = {"precision": precision, "why": why}
    report["ops"] = {op: caps.ops.get(op, "not supported") for op in OPS}
    report["ops"].update({op: impl for op, impl in caps.ops.items() if op not in OPS})
    return report


def versions(torch) -> dict[str, str | None]:
    """Library and toolkit versions; None where absent. Reads package metadata, imports no vendor module."""
    return {
        "python": platform.python_version(),
        "dsv3": _distribution_version(("dsv3",)),
        "torch": torch.__version__,
        "triton": _distribution_version(_DISTRIBUTIONS["triton"]),
        "torch_npu": _distribution_version(_DISTRIBUTIONS["torch_npu"]),
        "cuda": getattr(torch.version, "cuda", None),
        "rocm": getattr(torch.version, "hip", None),
        "cann": cann_version(),
    }


def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cann_version() -> str | None:
    """The CANN toolkit version: torch_npu's answer where it is already imported, else the toolkit's version file."""
    torch_npu = sys.modules.get("torch_npu")
    get = getattr(getattr(torch_npu, "utils", None), "get_cann_version", None)
    if get is not None:
        try:
            return get() or None
        except Exception:  # noqa: BLE001 - a diagnostic must not fail on a vendor quirk
            pass
    home = (os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
            or "/usr/local/Ascend/ascend-toolkit/latest")
    for name in ("compiler/version.info", "version.cfg"):
        try:
            for line in (Path(home) / name).read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "version" and value.strip():
                    return value.strip()
        except OSError:
            continue
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "unknown"


def format_report(r: dict) -> str:
    """The report as aligned text lines."""
    v = r["versions"]
    shown = ", ".join(f"{name} {version or '-'}" for name, version in v.items())
    lines = [
        ("device", f"{r['device']}, {r['count']} visible"),
        ("vendor", r["vendor"]),
        ("arch", r["arch"]),
        ("memory", f"{_gib(r['memory_bytes'])} {'host' if r['vendor'] == 'cpu' else 'per device'}"),
        ("versions", shown),
    ]
    b = r["backend"]
    if b["error"]:
        lines.append(("backend", f"unavailable: {b['error']}"))
        return "\n".join(f"{k:<10} {val}" for k, val in lines)
    lines.append(("backend", f"{b['name']} on {b['device']} (distributed: {b['dist_backend']}): {b['reason']}"))
    f = r["fp8"]
    if f["native"]:
        fp8 = f"yes, {f['format']} (activation max {f['max']:g})"
    elif f["available"]:
        fp8 = f"no native FP8; {f['format']} emulated by the {b['name']} backend when --precision fp8 is asked"
    else:
        fp8 = "no"
    lines.append(("FP8", fp8))
    for kind, label in (("fp8_checkpoint", "FP8 ckpt"), ("bf16_checkpoint", "BF16 ckpt")):
        lines.append((label, r["precision_auto"][kind]["why"]))
    lines.append(("ops", ""))
    width = max(map(len, r["ops"]))
    text = "\n".join(f"{k:<10} {val}".rstrip() for k, val in lines)
    return text + "\n" + "\n".join(f"  {op:<{width}}  {impl}" for op, impl in r["ops"].items())
