"""Choosing the backend for this machine: probe the chip, decide, build.

`decide` is a pure function of the chip, the request, the environment and the
installed vendor packages, so every case is testable with a described chip.
Rules: `--backend NAME` (the `requested` argument), else DSV3_BACKEND, else
the backend of the chip's platform (backends/platforms: huawei -> ascend,
amd -> rocm, nvidia -> cuda, cpu -> reference). Where auto picks a backend that is not installed, the reference
backend runs on the same device and the reason says what to install; a backend
asked for by name that cannot run is an error that says the same.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Mapping

from dsv3.backends import fp8
from dsv3.backends.errors import BackendUnavailable
from dsv3.backends.interface import Backend
from dsv3.backends.platforms import CPU, PLATFORMS, ChipInfo, platform, platform_of_backend, probe
from dsv3.backends.registry import BACKENDS, create_backend


@dataclass(frozen=True)
class Decision:
    """Which backend to build and why.

    Attributes:
        backend: registry name ("reference", "cuda", "rocm", "ascend").
        chip: the chip handed to the backend's constructor, or None (the backend finds its own).
        device: torch device for the backend, or None for the backend's default.
        reason: one line for the user.
        source: "auto", "requested" (--backend or the API) or "DSV3_BACKEND".
    """

    backend: str
    chip: ChipInfo | None
    device: str | None
    reason: str
    source: str = "auto"

    @property
    def native_fp8_format(self) -> str | None:
        """The FP8 format the chosen backend runs natively (None for the reference backend, which emulates)."""
        if self.backend == "reference" or self.chip is None:
            return None
        return self.chip.fp8_format


def describe(chip: ChipInfo) -> str:
    """E.g. "8 x NVIDIA H100 80GB HBM3 (sm_90, FP8 e4m3fn)"."""
    if chip.vendor == "cpu":
        return f"CPU ({chip.name})" if chip.name and chip.name != "CPU" else "CPU"
    count = f"{chip.count} x " if chip.count > 1 else ""
    fp8_text = f"FP8 {chip.fp8_format}" if chip.fp8_format else "no FP8"
    return f"{count}{chip.name or chip.vendor} ({chip.arch}, {fp8_text})"


def installed_packages() -> frozenset[str]:
    """The platforms' vendor modules that are installed (found, not imported)."""
    found = set()
    for name in {m for p in PLATFORMS for m in p.packages}:
        try:
            if importlib.util.find_spec(name) is not None:
                found.add(name)
        except (ImportError, ValueError):
            pass
    return frozenset(found)


def missing_reason(name: str, available_packages: frozenset[str] | set[str],
                   registry: Mapping[str, tuple] = BACKENDS) -> str | None:
    """Why backend `name` cannot be built here (not registered, vendor packages missing), or None."""
    if name not in registry:
        return f"this dsv3 has no {name} backend (backends/{name}.py is not registered)"
    extra = registry[name][2]
    packages = next((p.packages for p in PLATFORMS if extra is not None and p.pip_extra == extra), ())
    missing = [m for m in packages if m not in available_packages]
    if missing:
        return f"the {name} backend needs {', '.join(missing)}: pip install 'dsv3[{extra}]'"
    return None


def decide(chip: ChipInfo, requested: str | None = "auto", env: Mapping[str, str] | None = None,
           available_packages: frozenset[str] | set[str] = frozenset(),
           registry: Mapping[str, tuple] = BACKENDS) -> Decision:
    """Pick the backend for `chip` (pure: no probing, no imports).

    Args:
        chip: the probed or described chip.
        requested: "auto" (or None), or a backend name (from --backend); overrides DSV3_BACKEND. An
            empty name is refused: an unset DSV3_BACKEND may be empty, a --backend '' is a mistake.
        env: environment variables; DSV3_BACKEND names a backend, DSV3_FP8_MAX sets the
            activation FP8 max (e.g. 240 instead of 224 on gfx942).
        available_packages: importable vendor modules (see installed_packages()).
        registry: backend name -> (module, class, pip extra).
    Returns:
        The Decision.
    Raises:
        BackendUnavailable: a named backend is unknown or cannot run here.
        BackendError: DSV3_FP8_MAX is not a number in (0, the format's max].
    """
    env = {} if env is None else env
    if chip.fp8_format is not None and env.get(fp8.FP8_MAX_ENV):
        chip = dataclasses.replace(chip, fp8_max=fp8.activation_max(chip.fp8_format, env))
    known = ", ".join(sorted(set(registry) | {p.backend for p in PLATFORMS}))
    if requested == "":
        raise BackendUnavailable(f"an empty backend name was requested; choose auto, {known}")
    if requested not in (None, "auto"):
        name, source, said = requested, "requested", "requested"
    elif env.get("DSV3_BACKEND", "auto") not in ("", "auto"):
        name, source, said = env["DSV3_BACKEND"], "DSV3_BACKEND", f"DSV3_BACKEND={env['DSV3_BACKEND']}"
    else:
        return _decide_auto(chip, available_packages, registry)

    if name not in registry and platform_of_backend(name) is None:
        raise BackendUnavailable(f"unknown backend {name!r} ({said}); choose auto, {known}")
    problem = missing_reason(name, available_packages, registry)
    if problem:
        raise BackendUnavailable(f"backend {name} ({said}) cannot run: {problem}")
    if name == "reference":
        return Decision("reference", chip, None, said, source)
    owner = platform_of_backend(name)
    vendor = None if owner is None or owner is CPU else owner.vendor
    if vendor is None or vendor == chip.vendor:
        return Decision(name, chip, None, f"{said}; {describe(chip)} found", source)
    return Decision(name, None, None, f"{said}, though this machine has no {vendor} device "
                    f"(found: {describe(chip)}); the backend picks its own device", source)


def _decide_auto(chip: ChipInfo, available_packages, registry) -> Decision:
    wanted = platform(chip.vendor).backend
    if wanted == "reference":
        return Decision("reference", chip, None, f"no accelerator found: {describe(chip)}")
    problem = missing_reason(wanted, available_packages, registry)
    if problem is None:
        return Decision(wanted, chip, None, f"{describe(chip)} found")
    return _fallback(chip, problem)


def _fallback(chip: ChipInfo, problem: str) -> Decision:
    device = platform(chip.vendor).torch_device
    return Decision("reference", chip, device, f"{describe(chip)} found, but {problem}; running the "
                    f"reference backend (plain PyTorch, slow) on {device} meanwhile")


def build(decision: Decision, device: str | None = None, **options) -> tuple[Backend, Decision]:
    """Construct the decided backend.

    Args:
        decision: from decide().
        device: overrides decision.device.
        options: more constructor arguments.
    Returns:
        (backend, the decision that was built: where auto picked a backend whose module or vendor
        package does not import, or whose constructor raises ValueError, the reference backend
        runs instead and the reason says why).
    Raises:
        BackendUnavailable: the same for a backend asked for by name.
    """
    kwargs = dict(options)
    if device or decision.device:
        kwargs["device"] = device or decision.device
    if decision.chip is not None:
        kwargs["chip"] = decision.chip
    try:
        return create_backend(decision.backend, **kwargs), decision
    except (ModuleNotFoundError, ValueError) as e:
        if decision.backend == "reference":
            raise
        module, _, extra = BACKENDS[decision.backend]
        if not isinstance(e, ModuleNotFoundError):
            problem = f"the {decision.backend} backend refused to start ({e})"
        elif e.name == module:
            problem = f"the {decision.backend} backend module {module} is missing"
        else:
            problem = f"the {decision.backend} backend cannot import {e.name}" + (
                f": pip install 'dsv3[{extra}]'" if extra else "")
        if decision.source != "auto" or decision.chip is None:
            raise BackendUnavailable(f"backend {decision.backend} cannot run here: {problem}") from e
        return build(_fallback(decision.chip, problem), device, **options)


def select(requested: str | None = "auto", device: str | None = None, chip: ChipInfo | None = None,
           env: Mapping[str, str] | None = None, **options) -> tuple[Backend, Decision]:
    """Probe (unless `chip` is given), decide and build.

    Args:
        requested: "auto" or a backend name.
        device: torch device for the backend (its default when None).
        chip: a described chip instead of probing.
        env: environment (os.environ when None).
        options: more constructor arguments for the backend.
    Returns:
        (backend, decision).
    """
    env = os.environ if env is None else env
    if chip is None:  # a hardware backend asked for by name probes only its vendor's devices
        named = platform_of_backend(requested if requested not in (None, "auto") else env.get("DSV3_BACKEND", ""))
        chip = probe(vendor=None if named is None or named is CPU else named.vendor)
    decision = decide(chip, requested, env, installed_packages())
    return build(decision, device, **options)

