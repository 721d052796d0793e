"""The 35B-A3B QLoRA benchmark's CPU-checkable parts: its arguments, and both sides on tiny-moe."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import bench_qlora_moe  # noqa: E402


def test_defaults_are_the_35b_a3b_at_8k_tokens_on_the_gpu():
    args = bench_qlora_moe.parse_args([])
    assert (args.preset, args.tokens, args.layers, args.rank, args.device) == ("35B-A3B", 8192, 0, 16, "cuda")
    assert bench_qlora_moe.model_config(args.preset, 10).num_hidden_layers == 10
    assert bench_qlora_moe.model_config(args.preset, 0).num_experts == 256


def test_smoke_run_trains_the_same_adapters_on_both_sides():
    ours, peer = bench_qlora_moe.main(["--smoke", "--layers", "2"])
    assert ours.status == "ok" and peer.status == "ok", (ours.status, peer.status)
    assert ours.trainable == peer.trainable > 0  # the same targets, rank and shapes as PEFT's
    for r in (ours, peer):
        assert abs(r.loss - math.log(1024)) < 0.5 and r.tokens_per_s > 0
