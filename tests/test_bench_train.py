"""The training benchmark's bookkeeping: ratios divide by the fastest peer of the same run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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



def test_parallel_layouts_parse_and_a_bad_one_is_refused_by_name(bench, capsys):
    import parallel_runs

    assert [parallel_runs.parse_layout(t) for t in ("one", "sp2", "cp4", "cp16")] == [
        (None, 1), ("sp", 2), ("cp", 4), ("cp", 16)]
    for bad in ("sp1", "tp2", "cp", "sp2x"):
        with pytest.raises(SystemExit):
            bench.main(["--parallel", "one", bad])
        assert f"unknown parallel layout {bad!r}" in capsys.readouterr().err


def test_each_layout_is_a_torchrun_job_with_its_degree_of_processes(bench, tmp_path):
    import argparse
    import parallel_runs

    args = argparse.Namespace(presets=["0.8B", "2B"], seq_lens=[65536], docs=[4], steps=3, warmup=1,
                              parallel_ac="full", max_context=True, max_context_lens=[131072, 262144],
                              max_context_preset="0.8B", smoke=False, only_max_context=False)
    one = parallel_runs.worker_command("one", args, tmp_path / "one.jsonl")
    cp2 = parallel_runs.worker_command("cp2", args, tmp_path / "cp2.jsonl")
    assert "--nproc-per-node=1" in one and "--nproc-per-node=2" in cp2
    assert cp2[cp2.index("--layout") + 1] == "cp2" and cp2[cp2.index("--presets") + 1:][:2] == ["0.8B", "2B"]
    assert cp2[cp2.index("--max-context-lens") + 1:][:2] == ["131072", "262144"] and "--smoke" not in cp2
    args.only_max_context = True  # no throughput rows: no presets for them
    only = parallel_runs.worker_command("cp2", args, tmp_path / "cp2.jsonl")
    assert only[only.index("--presets") + 1] == "--seq-lens"


def test_parallel_table_gives_ratios_to_one_gpu_and_the_longest_rows(bench):
    import parallel_runs

    def row(layout, trial, seq_len, tps, status="ok"):
        return {"layout": layout, "preset": "0.8B", "trial": trial, "seq_len": seq_len, "docs": 4, "status": status,
                "tokens_per_s": tps, "step_ms": 1e3 * seq_len / max(tps, 1), "peak_gib": 40.0}

    rows = [row("one", "throughput", 65536, 20_000.0), row("cp2", "throughput", 65536, 30_000.0),
            row("one", "max-context", 262144, 1.0), row("one", "max-context", 524288, 1.0, "OOM"),
            row("cp2", "max-context", 262144, 1.0), row("cp2", "max-context", 524288, 1.0),
            row("cp2", "max-context", 524288, 1.0, "stopped for time")]
    table = parallel_runs.parallel_table(rows)
    assert "| cp2 | 0.8B | 65536 | 4 | 30,000 | 2185 | 40.0 | 1.50x |" in table
    assert "one  0.8B: 262,144 tokens\n" in table
    assert "cp2  0.8B: 524,288 tokens or more (the search stopped for time) (2.00x one GPU)" in table


def test_parallel_smoke_run_on_the_cpu_writes_its_trials(bench, tmp_path):
    """One layout job, cp=2 under torchrun with gloo: a throughput row and a longest-row trial."""
    rows = bench.main(["--parallel", "cp2", "--smoke", "--presets", "0.8B", "--seq-lens", "64", "--steps", "1",
                       "--warmup", "0", "--max-context", "--max-context-lens", "32", "--parallel-dir", str(tmp_path)])
    assert [(r["layout"], r["trial"], r["seq_len"], r["status"]) for r in rows] == [
        ("cp2", "throughput", 64, "ok"), ("cp2", "max-context", 32, "ok")]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_vision_language_rows_pack_the_same_documents_the_peer_gets_padded(bench):
    """The 2B-vl workload at 8k: image-text documents filling the row exactly, ~448-pixel images;
    ours and the peer get the same tokens and images, ours in one row, the peer one per row."""
    from vl_rows import VLWorkload

    from qwen35 import preset

    config = preset("2B-vl")
    v = config.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (27, 1152, 16, 4304, 2048)
    media = VLWorkload(config, 8192, 448, 300)
    docs = len(media.docs)
    assert sum(media.lengths) == 8192 and 12 <= docs <= 20
    assert 150 <= media.image_tokens / docs <= 250 and media.pixel_values.shape[0] == 4 * media.image_tokens
    packed, padded = media.packed("cpu"), media.padded("cpu")
    ids = packed["input_ids"][0]
    assert (ids == config.image_token_id).sum() == media.image_tokens == (packed["labels"] == -100).sum()
    assert torch.equal(padded["input_ids"][padded["attention_mask"].bool()], ids)
    assert padded["input_ids"].shape == (docs, max(media.lengths))
    assert torch.equal(padded["pixel_values"], packed["pixel_values"])
    starts = packed["cu_seqlens"][:-1].long()
    assert packed["position_ids"][:, 0, starts].eq(0).all() and packed["position_ids"][0, 0, 1:].gt(0).any()
    assert (padded["labels"] != -100).sum() == (packed["labels"] != -100).sum()


def test_vision_language_smoke_run_on_the_cpu_gives_ours_and_the_peer_with_numbers(bench, capsys):
    """The smoke path of the VL rows: tiny 2B-vl (2-block tower), ours packed and transformers'
    Qwen3_5ForConditionalGeneration padded, in one table with the ratio to the peer."""
    results = bench.main(["--smoke", "--presets", "2B-vl", "--seq-lens", "160", "--steps", "1", "--warmup", "0",
                          "--ours", "fp32m:none"])
    assert [(r.system, r.variant, r.preset, r.seq_len, r.status) for r in results] == [
        ("ours", "fp32m:none", "2B-vl", 160, "ok"), ("peer", "fla:none", "2B-vl", 160, "ok")]
    ours, peer = results
    assert ours.docs == peer.docs > 1  # one packed row of several documents; the peer's batch of as many rows
    assert all(r.tokens_per_s > 0 and r.step_ms > 0 and r.mfu > 0 for r in results)
    table = capsys.readouterr().out.split("\n\n")[-2]  # the final table, before its fastest-peer line
    assert f"| ours | fp32m:none | 2B-vl | 160 | {ours.docs} | {ours.tokens_per_s:,.0f} |" in table
    assert "x fla:none |" in table and "| peer | fla:none | 2B-vl | 160 |" in table and "(fastest peer)" in table


def test_the_peer_padded_batch_and_our_packed_row_are_the_same_training_problem(bench):
    """Same weights (float32, CPU, reference ops): transformers' model on the padded batch and ours
    on the packed row give the same mean loss, so both sides train on the same documents, images,
    positions and loss tokens."""
    import dataclasses

    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from vl_rows import VLWorkload

    from qwen35 import Qwen35ForConditionalGeneration, ops

    ops.use_backend("reference")
    # a rotary of 12 frequencies, 4 per M-RoPE axis, so that every axis turns
    config = dataclasses.replace(bench.smoke_config("2B-vl"), partial_rotary_factor=0.75, mrope_section=(4, 4, 4))
    media = VLWorkload(config, 200, 64, 24)
    torch.manual_seed(0)
    ours = Qwen35ForConditionalGeneration.from_config(config, dtype=torch.float32)
    hf_config = Qwen3_5Config(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    peer = Qwen3_5ForConditionalGeneration(hf_config).float()
    missing, unexpected = peer.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    with torch.no_grad():
        mine = ours(**media.packed("cpu")).loss
        theirs = peer(**media.padded("cpu"), use_cache=False).loss
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_breakdown_counts_each_kernel_once_and_not_the_annotated_ranges_around_them(bench):
    """The optimizer's `record_function` range shows on the GPU timeline spanning its kernels;
    counted as well, it doubled the optimizer's share (30 ms for a 15 ms AdamW at 2B)."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, ms, device=cuda, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=ms * 1e3, device_type=device,
                               is_user_annotation=annotation)

    events = [
        event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", 15.0),
        event("Optimizer.step#AdamW.step", 15.5, annotation=True),
        event("Optimizer.step#AdamW.step", 0.0, device=cpu),
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 40.0),
        event("causal_conv1d_silu_bwd_kernel", 9.0),
        event("triton_poi_fused_add_mul_0", 2.0),
    ]
    split, others = bench.kernel_split(bench.gpu_kernels(events))
    assert split == {"GDN": 9.0, "attention": 0.0, "matmuls": 40.0, "loss": 0.0, "optimizer": 15.0, "other": 2.0}
    assert [e.key for e in others] == ["triton_poi_fused_add_mul_0"]
