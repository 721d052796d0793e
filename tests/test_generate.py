import torch

from reference import hf_text_model, ours_from_hf
from qwen35.generate import sample_next
from qwen35.model.cache import InferenceCache


def test_greedy_generate_matches_transformers_on_prompts_of_different_lengths(tmp_path):
    hf = hf_text_model("tied_interval2_gva2")
    ours = ours_from_hf(hf, tmp_path)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 97, (n,), generator=gen).tolist() for n in (5, 12, 1)]
    ours_out = ours.generate(prompts, max_new_tokens=10, eos_token_id=None)

    width = max(map(len, prompts))  # transformers: left padding with an attention mask
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, width:].tolist()
    assert ours_out == theirs


def test_incremental_decoding_logits_equal_one_full_forward(tmp_path):
    ours = ours_from_hf(hf_text_model("explicit_layer_types_gva4"), tmp_path)
    seqs = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(seqs).logits
        cache = InferenceCache(ours.config, 2, 20, "cpu", torch.float32)
        steps = [ours(seqs[:, :6], cache=cache).logits]
        steps += [ours(seqs[:, t : t + 1], cache=cache).logits for t in range(6, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_generation_stops_at_eos_per_sequence(tmp_path):
    ours = ours_from_hf(hf_text_model("tied_interval2_gva2"), tmp_path)
    prompts = [[5, 6, 7], [9]]
    free = ours.generate(prompts, max_new_tokens=6, eos_token_id=None)
    eos = free[0][2]
    stopped = ours.generate(prompts, max_new_tokens=6, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, do_sample=True, top_k=2, generator=gen)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample_next(logits, do_sample=True, top_p=0.5, generator=gen)
    assert set(top_p.tolist()) == {0}  # token 0 alone has p = 0.72 >= 0.5
    hot = sample_next(logits, do_sample=True, temperature=100.0, generator=gen)
    assert set(hot.tolist()) == {0, 1, 2, 3}
