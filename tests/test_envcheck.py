"""The fast-path check: what it refuses, and that it says what to install."""

import pytest

from qwen35 import ops
from qwen35.envcheck import (
    Environment,
    FastPathUnavailable,
    check_fast_path,
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
