"""The step's loss normalisation: accumulation and packing must not change the gradient."""

import torch

from reference import hf_text_model, ours_from_hf, relative_error
from qwen35.train.step import forward_backward


def _packed_batch(docs):
    ids = torch.cat(docs)[None]
    cu = torch.tensor([0, *[len(d) for d in docs]]).cumsum(0).to(torch.int32)
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100  # as the data pipeline marks prompt tokens
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def _documents():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (n,), generator=gen) for n in (30, 7, 52, 12, 3)]


def test_accumulating_uneven_micro_batches_equals_one_batch(tmp_path):
    model = ours_from_hf(hf_text_model("tied_interval2_gva2"), tmp_path)
    docs = _documents()
    micro = [_packed_batch(docs[:1]), _packed_batch(docs[1:4]), _packed_batch(docs[4:])]  # 30, 71, 3 tokens
    micro_result = forward_backward(model, micro)
    loss_micro, count_micro = micro_result.loss, micro_result.loss_tokens
    grads_micro = _grads(model)
    one_result = forward_backward(model, [_packed_batch(docs)])
    loss_one, count_one = one_result.loss, one_result.loss_tokens
    grads_one = _grads(model)
    assert count_micro == count_one
    assert abs(loss_micro.item() - loss_one.item()) <= 1e-6 * loss_one.item()
    whole = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads_micro, grads_one)]
    assert relative_error(*whole) <= 1e-6  # the gradient as one vector
    for name in grads_one:  # and each parameter's, up to float32 summation order
        assert relative_error(grads_micro[name], grads_one[name]) <= 1e-5, name


def test_packed_step_equals_the_documents_unpacked(tmp_path):
    model = ours_from_hf(hf_text_model("explicit_layer_types_gva4"), tmp_path)
    docs = _documents()
    loss_packed = forward_backward(model, [_packed_batch(docs)]).loss
    grads_packed = _grads(model)
    unpacked = [{"input_ids": d[None], "labels": torch.cat([torch.tensor([-100]), d[1:]])[None]} for d in docs]
    loss_unpacked = forward_backward(model, unpacked).loss
    grads_unpacked = _grads(model)
    assert abs(loss_packed.item() - loss_unpacked.item()) <= 1e-6 * loss_packed.item()
    for name in grads_packed:
        assert relative_error(grads_packed[name], grads_unpacked[name]) <= 1e-5, name


def _moe_rows(count, length=24, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (1, length), generator=gen) for _ in range(count)]


def test_global_router_balance_over_micro_batches_equals_one_forward_of_the_whole_step(tmp_path):
    """f_e over the whole step (a counting pass first), each micro-batch backward carrying its
    share: loss and gradient equal one forward over all the step's rows (transformers' aux)."""
    from reference import hf_moe_model

    model = ours_from_hf(hf_moe_model(router_aux_loss_coef=0.5), tmp_path)
    rows = _moe_rows(4)
    micro = [{"input_ids": torch.cat(rows[i:i + 2]), "labels": torch.cat(rows[i:i + 2])} for i in (0, 2)]
    whole = [{"input_ids": torch.cat(rows), "labels": torch.cat(rows)}]
    step = forward_backward(model, micro, router_z_loss_coef=0.1, router_balance="global")
    grads_step = _grads(model)
    one = forward_backward(model, whole, router_z_loss_coef=0.1, router_balance="micro_batch")
    grads_one = _grads(model)
    per_micro = forward_backward(model, micro, router_z_loss_coef=0.1, router_balance="micro_batch")
    grads_per_micro = _grads(model)
    assert abs(step.router["aux_loss"].item() - one.router["aux_loss"].item()) <= 1e-6
    assert abs(step.router["z_loss"].item() - one.router["z_loss"].item()) <= 1e-5
    assert abs(per_micro.router["aux_loss"].item() - one.router["aux_loss"].item()) > 1e-5  # a different loss
    for name in grads_one:
        assert relative_error(grads_step[name], grads_one[name]) <= 1e-5, name
    router = "model.layers.0.mlp.gate.weight"
    assert relative_error(grads_per_micro[router], grads_one[router]) > 1e-4
