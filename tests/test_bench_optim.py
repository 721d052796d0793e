"""The optimizer benchmark on the CPU (`--smoke`): its float32 reference in the backward is the
plain float32 curve, and the comparison is written."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).parents[1] / "benchmarks" / "bench_optim.py"


def test_the_in_backward_reference_draws_the_float32_curve_and_the_outputs_are_written(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_optim", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    curves = bench.main(["--smoke", "--steps", "6", "--grad-clip", "0", "--out", str(tmp_path),
                         "--variants", "float32:adamw:in_backward", "float32:adamw", "bf16:adamw"])
    reference, plain, low = (curves[v]["losses"] for v in ("float32:adamw:in_backward", "float32:adamw", "bf16:adamw"))
    assert len(reference) == 6 and reference[-1] < reference[0]
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(reference, plain))
    assert any(abs(a - b) > 1e-3 for a, b in zip(low, plain))  # a different variant shows as one
    assert (tmp_path / "curves.png").is_file()
    header = (tmp_path / "curves.csv").read_text().splitlines()[0]
    assert header == "step,float32:adamw:in_backward,float32:adamw,bf16:adamw"
