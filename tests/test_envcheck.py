"""The fast-path check: what it refuses, and that it says what to install."""

import pytest

from qwen35 import ops
from qwen35.envcheck import (
    Environment,
    FastPathUnavailable,
    check_delta_rule_kernel,
    check_fast_path,
    delta_rule_kernel_problems,
    fast_path_problems,
    parse_version,
    version_at_least,
)

HOPPER = dict(cuda=True, device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), torch_version="2.11.0+cu130")
AMPERE = dict(cuda=True, device_name="NVIDIA A100-SXM4-80GB", capability=(8, 0), torch_version="2.11.0+cu130")


@pytest.mark.parametrize("text, parsed", [
    ("3.7.1", (3, 7, 1)), ("2.11.0+cu130", (2, 11, 0)), ("3.6.0.dev20250101", (3, 6, 0)), ("0.6.0rc1", (0, 6, 0)),
])
def test_versions_parse_to_their_numeric_release(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize("have, want, ok", [
    ("3.7.1", "3.7.1", True), ("3.7", "3.7.1", False), ("3.10.0", "3.7.1", True), ("3.6.0", "3.7.1", False),
    ("4.0", "3.7.1", True), ("0.5.9", "0.6.0", False),
])
def test_version_comparison_is_numeric_not_lexical(have, want, ok):
    assert version_at_least(have, want) is ok


def test_a_good_hopper_environment_has_no_problems():
    env = Environment(**HOPPER, triton_version="3.7.1", fla_version="0.6.0", liger_version="0.8.5")
    assert fast_path_problems(env) == []
    assert check_fast_path(strict=True, env=env) is None


def test_old_triton_on_hopper_is_refused_with_the_fix():
    env = Environment(**HOPPER, triton_version="3.6.0", fla_version="0.6.0")
    (problem,) = fast_path_problems(env)
    assert "triton 3.6.0" in problem and "miscompiles" in problem and "triton>=3.7.1" in problem


def test_old_triton_off_hopper_is_accepted():
    env = Environment(**AMPERE, triton_version="3.6.0", fla_version="0.6.0")
    assert fast_path_problems(env) == []


def test_no_cuda_is_refused_and_names_the_reference_backend():
    (problem,) = fast_path_problems(Environment(cuda=False, torch_version="2.13.0+cpu"))
    assert "CUDA is not available" in problem and "reference" in problem


def test_missing_or_old_fla_is_refused_with_the_install_line():
    missing = Environment(**HOPPER, triton_version="3.7.1", fla_error="ModuleNotFoundError: No module named 'fla'")
    assert any("pip install fla-core==0.6.0" in p and "No module named" in p for p in fast_path_problems(missing))
    old = Environment(**HOPPER, triton_version="3.7.1", fla_version="0.4.2")
    assert any("wrong" in p and "fla-core==0.6.0" in p for p in fast_path_problems(old))


def test_strict_raises_and_lenient_returns_the_reason():
    env = Environment(**HOPPER, triton_version="3.6.0", fla_version="0.6.0")
    with pytest.raises(FastPathUnavailable, match="miscompiles"):
        check_fast_path(strict=True, env=env)
    reason = check_fast_path(strict=False, env=env)
    assert "miscompiles" in reason and "H100" in reason


def test_the_seam_refuses_fast_here_or_falls_back_with_a_warning(monkeypatch):
    import qwen35.envcheck as envcheck

    monkeypatch.setattr(envcheck, "probe", lambda: Environment(cuda=False, torch_version="cpu"))
    with pytest.raises(FastPathUnavailable):
        ops.use_backend("fast")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert ops.use_backend("fast", strict=False) == "reference"
    assert ops.current_backend() == "reference"
    with pytest.raises(ValueError, match="reference, fast"):
        ops.use_backend("triton")


def test_a_torch_without_varlen_attention_is_refused_with_the_bound():
    old = Environment(cuda=True, device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), torch_version="2.9.1+cu128",
                      triton_version="3.7.1", fla_version="0.6.0",
                      varlen_error="ModuleNotFoundError: No module named 'torch.nn.attention.varlen'")
    (problem,) = fast_path_problems(old)
    assert "torch 2.9.1+cu128" in problem and "varlen" in problem and "torch>=2.10" in problem
    # a version string alone is enough to refuse (a torch built from source may still import it)
    (problem,) = fast_path_problems(Environment(**{**HOPPER, "torch_version": "2.8.0"}, triton_version="3.7.1",
                                                fla_version="0.6.0"))
    assert "torch>=2.10" in problem


def test_the_torch_bound_in_pyproject_is_the_fast_paths():
    from pathlib import Path

    from qwen35.envcheck import MIN_TORCH

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"torch>={MIN_TORCH}",' in pyproject


def test_kernels_auto_falls_back_on_an_old_torch(monkeypatch):
    """`model.kernels: auto` on a GPU with a torch that lacks varlen attention: the reference,
    with a warning naming the bound, instead of an ImportError from the fast ops."""
    import qwen35.envcheck as envcheck

    env = Environment(**{**HOPPER, "torch_version": "2.9.1"}, triton_version="3.7.1", fla_version="0.6.0",
                      varlen_error="ModuleNotFoundError: No module named 'torch.nn.attention.varlen'")
    monkeypatch.setattr(envcheck, "probe", lambda **_: env)
    with pytest.warns(UserWarning, match="torch>=2.10"):
        assert ops.use_backend("fast", strict=False) == "reference"
    with pytest.raises(FastPathUnavailable, match="varlen"):
        ops.use_backend("fast")


def test_flash_qla_needs_sm90_and_tilelang_and_says_what_to_install():
    good = Environment(**HOPPER, triton_version="3.7.1", fla_version="0.6.0", flash_qla_version="0.1.3")
    assert delta_rule_kernel_problems(good, "flash_qla") == []
    assert check_delta_rule_kernel("flash_qla", env=good) is None
    assert check_delta_rule_kernel("fla", env=Environment(cuda=False)) is None
    ampere = Environment(**AMPERE, triton_version="3.6.0", fla_version="0.6.0")
    (problem,) = delta_rule_kernel_problems(ampere, "flash_qla")
    assert "SM90+" in problem and "sm80" in problem
    no_tilelang = Environment(**HOPPER, tilelang_error="ModuleNotFoundError: No module named 'tilelang'",
                              flash_qla_error="needs tilelang")
    (problem,) = delta_rule_kernel_problems(no_tilelang, "flash_qla")
    assert "tilelang" in problem and "pip install flash-qla" in problem
    with pytest.raises(FastPathUnavailable, match="flash_qla delta-rule kernel cannot run"):
        check_delta_rule_kernel("flash_qla", env=no_tilelang)
    assert "tilelang" in check_delta_rule_kernel("flash_qla", strict=False, env=no_tilelang)
    with pytest.raises(ValueError, match="fla, flash_qla"):
        delta_rule_kernel_problems(good, "cutlass")
    with pytest.raises(ValueError, match="fla, flash_qla"):
        ops.use_backend("fast", delta_rule_kernel="cutlass")


def test_the_config_key_reaches_the_seam(monkeypatch):
    from qwen35.train.config import RunConfig
    from qwen35.train.setup import Runtime

    calls = []
    monkeypatch.setattr(ops, "use_backend", lambda name, **kw: calls.append((name, kw)) or name)
    cfg = RunConfig()
    cfg.model.kernels, cfg.model.delta_rule_kernel = "fast", "flash_qla"
    Runtime.start(cfg)
    assert calls == [("fast", {"strict": True, "delta_rule_kernel": "flash_qla"})]
