"""The rollout engine on the GPU: fla's recurrent decode step, CUDA graphs, bf16 log-probs."""

import pytest
import torch

from qwen35 import Qwen35Config, Qwen35ForCausalLM, ops
from qwen35.engine import DecodeEngine
from qwen35.ops.delta_rule import recurrent_gated_delta_rule
from qwen35.rl.logprobs import completion_logprobs, pack_samples

pytestmark = pytest.mark.gpu

TINY = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4, full_attention_interval=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True, eos_token_id=1,
)


def test_fla_decode_step_equals_the_reference_recurrence(fast_backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(5, 1, 2, 128, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(5, 1, 4, 128, device="cuda", generator=gen)
    g = -torch.rand(5, 1, 4, device="cuda", generator=gen)
    beta = torch.rand(5, 1, 4, device="cuda", generator=gen)
    state = torch.randn(5, 4, 128, 128, device="cuda", generator=gen) * 0.1
    o, final = ops.gated_delta_rule(q, k, v, g, beta, None, state.clone(), output_final_state=True)
    o_ref, final_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    in_place = state.clone()
    o_step = ops.gated_delta_rule_step_(q, k, v, g, beta, in_place)
    torch.testing.assert_close(o_step, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(in_place, final_ref, rtol=1e-4, atol=1e-4)
    from qwen35.ops import fast
    print(f"decode step in place through fla's kernel: {fast._STEP_IN_PLACE}")


def _model(dtype):
    torch.manual_seed(0)
    return Qwen35ForCausalLM.from_config(Qwen35Config(**TINY), device="cuda", dtype=dtype).eval()


def test_graphs_replay_the_eager_step(fast_backend):
    model = _model(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 1000, (n,), generator=gen).tolist() for n in (40, 7, 130, 64, 1, 90)]
    graphed = DecodeEngine(model, num_slots=4, max_length=200, attention_bucket=64)
    eager = DecodeEngine(model, num_slots=4, max_length=200, attention_bucket=64, cuda_graphs=False)
    assert graphed.graphs and not eager.graphs
    args = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, stop_token_ids=[5, 6])
    a = graphed.generate(prompts, generator=torch.Generator().manual_seed(2), **args)
    b = eager.generate(prompts, generator=torch.Generator().manual_seed(2), **args)
    assert a == b


def test_bf16_logprobs_are_close_to_the_training_forward(fast_backend):
    model = _model(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 1000, (n,), generator=gen).tolist() for n in (300, 17, 129)]
    tokens, logps = DecodeEngine(model, num_slots=2, max_length=400).generate(
        prompts, 60, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train, _ = completion_logprobs(model, pack_samples(prompts, tokens, "cuda"), temperature=1.0)
    delta = (torch.tensor([v for row in logps for v in row]) - train.cpu()).abs()
    print(f"bf16 engine vs training forward log-probs: mean |d| {delta.mean():.2e}, max |d| {delta.max():.2e}")
    assert delta.mean() < 0.05 and delta.max() < 0.5
