"""The training benchmark's bookkeeping: ratios divide by the fastest peer of the same run."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _result(bench, system, variant, preset, tps, **kw):
    return bench.Result(system, variant, preset, 8192, 4 if system == "ours" else 1, tokens_per_s=tps,
                        step_ms=8192 / tps * 1e3, peak_gib=20.0, **kw)


def test_every_ratio_divides_by_the_fastest_peer_of_its_preset_and_says_which(bench):
    results = [
        _result(bench, "ours", "fp32m:none:compile", "0.8B", 60_000.0,
                breakdown={"GDN": 24.0, "attention": 12.0, "matmuls": 48.0, "loss": 6.0, "optimizer": 12.0,
                           "other": 18.0, "idle": 90.0, "wall": 210.0}),
        _result(bench, "peer", "liger:none", "0.8B", 30_000.0),
        _result(bench, "peer", "fla:none", "0.8B", 40_000.0),
        _result(bench, "ours", "fp32m:none:compile", "2B", 30_000.0),
        _result(bench, "peer", "fla:none", "2B", 25_000.0),
        _result(bench, "peer", "liger:none", "2B", 27_000.0),
        _result(bench, "peer", "liger:none", "2B", 99_000.0, status="OOM"),
    ]
    fastest = bench.fastest_peers(results)
    assert fastest[("0.8B", 8192)].variant == "fla:none" and fastest[("2B", 8192)].variant == "liger:none"
    table = bench.final_table(results)
    assert "| 1.50x fla:none |" in table and "| 1.11x liger:none |" in table
    assert table.count("(fastest peer)") == 2
    assert "fastest peer, 0.8B at 8192 tokens: fla:none (40,000 tokens/s" in table
    # kernel times over the timed step (137 ms), not the slower profiled one; the rest is GPU idle
    assert ("| breakdown ours fp32m:none:compile 0.8B 8192 | 137 | 24 (18%) | 12 (9%) | 48 (35%) | 6 (4%) "
            "| 12 (9%) | 18 (13%) | 17 (12%) |") in table

