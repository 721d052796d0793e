"""The generation benchmark's CPU smoke mode: both systems and the GRPO step run and report."""

import importlib.util
import json
import sys
from pathlib import Path

_PATH = Path(__file__).parents[1] / "benchmarks" / "bench_generate.py"


def test_smoke_run_generates_every_token_on_both_sides_and_times_a_grpo_step(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", _PATH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being built
    try:
        spec.loader.exec_module(bench)
        results = bench.main(["--device", "cpu", "--preset", "tiny", "--batches", "3", "5", "--grpo-step",
                              "--json", str(tmp_path / "out.json")])
    finally:
        del sys.modules[spec.name]
    assert [(r.system, r.batch, r.status) for r in results] == [
        ("ours", 3, "ok"), ("peer", 3, "ok"), ("ours", 5, "ok"), ("peer", 5, "ok")]
    assert all(r.tokens_per_s > 0 and r.new_tokens == 6 for r in results)
    printed = capsys.readouterr().out
    assert "x peer" in printed and "GRPO step, tiny" in printed
    saved = json.loads((tmp_path / "out.json").read_text())
    assert set(saved["grpo_step"]) >= {"rollout_s", "logprob_s", "update_s"}
    assert len(saved["results"]) == 4
