"""Can the fast GPU path run here, and run correctly? Checked once, when it is asked for.

The fast ops (`qwen35.ops.fast`) need CUDA and flash-linear-attention (`fla-core` >= 0.6.0). One
trap is worse than a crash: on Hopper (sm90), triton releases before 3.7.1 miscompile fla's
gated-delta-rule backward (wrong dk/dg, fla issue #640), and torch <= 2.12.0 pins such a triton.
fla 0.6.0 refuses that backward itself; older fla releases compute the wrong gradients in silence.
So this module refuses both, and says what to install.

`check_fast_path(strict)` returns None when the fast path is fine; otherwise it raises
`FastPathUnavailable` (strict) or returns the reason, and the caller decides to use the torch
reference (`qwen35.ops.use_backend("fast", strict=False)` does that, with a warning).
liger-kernel is optional: without it the loss uses the chunked torch cross-entropy (slower).

The fast path also needs torch >= 2.10 (`torch.nn.attention.varlen`, the packed flash attention;
`mm` with `out_dtype`), so an older torch is refused here rather than crashing on import.

`check_delta_rule_kernel("flash_qla")` checks the optional FlashQLA kernel the same way: an SM90+
GPU (its TileLang kernels exist for Hopper and Blackwell only), and `tilelang` and `flash_qla`
importable. It is probed only when asked for: importing TileLang takes seconds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass

MIN_FLA = "0.6.0"
MIN_TRITON_HOPPER = "3.7.1"
MIN_TORCH = "2.10"
DELTA_RULE_KERNELS = ("fla", "flash_qla")
FIX_TRITON = (
    f"pip install 'triton>={MIN_TRITON_HOPPER}' (after torch, with --no-deps if your torch pins an "
    f"older triton; torch <= 2.12.0 does)"
)


class FastPathUnavailable(RuntimeError):
    """The fast GPU ops cannot run (correctly) in this environment; the message says why."""


@dataclass
class Environment:
    cuda: bool
    device_name: str | None = None
    capability: tuple[int, int] | None = None
    torch_version: str = ""
    triton_version: str | None = None  # None: not installed
    fla_version: str | None = None
    fla_error: str | None = None  # why `import fla` failed
    liger_version: str | None = None
    varlen_error: str | None = None  # why `torch.nn.attention.varlen` failed to import
    tilelang_error: str | None = None  # FlashQLA's requirements, probed only when asked for
    flash_qla_version: str | None = None
    flash_qla_error: str | None = None


def parse_version(text: str) -> tuple[int, ...]:
    """'3.7.1' -> (3, 7, 1); '2.11.0+cu130' -> (2, 11, 0); '3.6.0.dev2025' -> (3, 6, 0)."""
    numbers = []
    for part in text.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def version_at_least(text: str, minimum: str) -> bool:
    have, want = parse_version(text), parse_version(minimum)
    width = max(len(have), len(want))
    return have + (0,) * (width - len(have)) >= want + (0,) * (width - len(want))


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # an ImportError, or a package failing on this GPU or triton
        return f"{type(e).__name__}: {e}"
    return None


def probe(flash_qla: bool = False) -> Environment:
    """What this process sees: the GPU, torch, triton, fla, liger (and FlashQLA if asked)."""
    import torch

    env = Environment(cuda=torch.cuda.is_available(), torch_version=torch.__version__)
    env.varlen_error = _import_error("torch.nn.attention.varlen")
    if env.cuda:
        env.device_name = torch.cuda.get_device_name(0)
        env.capability = tuple(torch.cuda.get_device_capability(0))
    try:
        import triton

        env.triton_version = triton.__version__
    except ImportError:
        env.triton_version = None
    try:
        fla = importlib.import_module("fla")
        env.fla_version = getattr(fla, "__version__", None) or _distribution_version("fla-core")
    except Exception as e:  # an ImportError, or fla failing on an unusable triton
        env.fla_error = f"{type(e).__name__}: {e}"
    env.liger_version = _distribution_version("liger-kernel")
    if flash_qla:
        env.tilelang_error = _import_error("tilelang")
        env.flash_qla_error = _import_error("flash_qla") if env.tilelang_error is None else "needs tilelang"
        env.flash_qla_version = _distribution_version("flash-qla") if env.flash_qla_error is None else None
    return env


def fast_path_problems(env: Environment) -> list[str]:
    """Everything that stops the fast path, each with what to install. Empty: all good."""
    problems = []
    if not env.cuda:
        problems.append(
            f"CUDA is not available (torch {env.torch_version}); the fast kernels need an NVIDIA GPU "
            "and a CUDA build of torch. Use ops backend 'reference' on this machine."
        )
        return problems
    if not version_at_least(env.torch_version, MIN_TORCH) or env.varlen_error is not None:
        problems.append(
            f"torch {env.torch_version} has no usable torch.nn.attention.varlen "
            f"({env.varlen_error or 'added in torch ' + MIN_TORCH}), the packed flash attention; "
            f"pip install 'torch>={MIN_TORCH}'"
        )
    if env.triton_version is None:
        problems.append(f"triton is not installed; {FIX_TRITON}")
    if env.fla_version is None:
        problems.append(
            f"flash-linear-attention is not importable ({env.fla_error or 'not installed'}); "
            f"pip install fla-core=={MIN_FLA}"
        )
    elif not version_at_least(env.fla_version, MIN_FLA):
        problems.append(
            f"fla {env.fla_version} is older than {MIN_FLA}: older releases compute wrong "
            f"gated-delta-rule gradients on Hopper without a word; pip install fla-core=={MIN_FLA}"
        )
    hopper = env.capability is not None and env.capability[0] == 9
    if hopper and env.triton_version is not None and not version_at_least(env.triton_version, MIN_TRITON_HOPPER):
        problems.append(
            f"triton {env.triton_version} on {env.device_name} (sm90, Hopper) miscompiles fla's "
            f"gated-delta-rule backward (wrong dk/dg; fla refuses to run it); {FIX_TRITON}"
        )
    return problems


def delta_rule_kernel_problems(env: Environment, kernel: str) -> list[str]:
    """What stops `model.delta_rule_kernel: <kernel>` (on top of the fast path's needs)."""
    if kernel not in DELTA_RULE_KERNELS:
        raise ValueError(f"unknown delta-rule kernel {kernel!r}; choose one of {', '.join(DELTA_RULE_KERNELS)}")
    if kernel == "fla":
        return []
    problems = []
    if env.capability is None or env.capability[0] < 9:
        gpu = f"{env.device_name} (sm{env.capability[0]}{env.capability[1]})" if env.capability else "no GPU"
        problems.append(f"FlashQLA needs an SM90+ GPU (Hopper or Blackwell); this is {gpu}")
    if env.tilelang_error is not None:
        problems.append(f"tilelang is not importable ({env.tilelang_error}); pip install flash-qla "
                        "(it brings tilelang>=0.1.12)")
    elif env.flash_qla_error is not None:
        problems.append(f"flash_qla is not importable ({env.flash_qla_error}); pip install flash-qla")
    return problems


def describe(env: Environment) -> str:
    gpu = f"{env.device_name} (sm{env.capability[0]}{env.capability[1]})" if env.capability else "no GPU"
    return (f"{gpu}, torch {env.torch_version}, triton {env.triton_version}, fla {env.fla_version}, "
            f"liger-kernel {env.liger_version}"
            + (f", flash-qla {env.flash_qla_version}" if env.flash_qla_version else ""))


def check_fast_path(strict: bool = True, env: Environment | None = None) -> str | None:
    """None if the fast ops can run correctly; else raise (strict) or return the reason."""
    env = probe() if env is None else env
    problems = fast_path_problems(env)
    if not problems:
        return None
    message = "the fast GPU path cannot run here: " + "; ".join(problems) + f" [{describe(env)}]"
    if strict:
        raise FastPathUnavailable(message)
    return message


def check_delta_rule_kernel(kernel: str, strict: bool = True, env: Environment | None = None) -> str | None:
    """None if the delta-rule kernel `kernel` can run; else raise (strict) or return the reason."""
    if kernel == "fla":
        return None
    env = probe(flash_qla=True) if env is None else env
    problems = delta_rule_kernel_problems(env, kernel)
    if not problems:
        return None
    message = f"the {kernel} delta-rule kernel cannot run here: " + "; ".join(problems) + f" [{describe(env)}]"
    if strict:
        raise FastPathUnavailable(message)
    return message
