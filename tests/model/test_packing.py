"""A packed row of documents must equal the documents run one by one (DESIGN §4)."""

import torch

from reference import hf_text_model, ours_from_hf

DOC_LENGTHS = (23, 70, 9)  # one longer than a delta-rule chunk, one shorter than the conv window x 3


def _documents(vocab: int):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (1, n), generator=gen) for n in DOC_LENGTHS]


def _packed(docs):
    lengths = torch.tensor([0, *[d.shape[1] for d in docs]])
    return torch.cat(docs, dim=1), lengths.cumsum(0).to(torch.int32)


def test_packed_logits_equal_separate_documents_ours_and_transformers(tmp_path):
    hf = hf_text_model("tied_interval2_gva2")
    ours = ours_from_hf(hf, tmp_path)
    docs = _documents(hf.config.vocab_size)
    ids, cu_seqlens = _packed(docs)
    with torch.no_grad():
        packed = ours(ids, cu_seqlens=cu_seqlens).logits[0]
        ours_alone = torch.cat([ours(d).logits[0] for d in docs])
        hf_alone = torch.cat([hf(d).logits[0] for d in docs])
    assert (packed - ours_alone).abs().max().item() <= 1e-5
    assert (packed - hf_alone).abs().max().item() <= 1e-5


def test_packed_gradients_equal_separate_documents(tmp_path):
    hf = hf_text_model("explicit_layer_types_gva4")
    ours = ours_from_hf(hf, tmp_path)
    docs = _documents(hf.config.vocab_size)
    ids, cu_seqlens = _packed(docs)
    ours(ids, cu_seqlens=cu_seqlens, labels=ids).loss_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    for d in docs:
        ours(d, labels=d).loss_sum.backward()
        hf_out = hf(d, labels=d)
        (hf_out.loss * (d.shape[1] - 1)).backward()  # transformers averages; we compare sums
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        assert (packed_grads[name] - param.grad).abs().max().item() <= 1e-5, name
        assert (packed_grads[name] - hf_params[name].grad).abs().max().item() <= 1e-5, name


def test_document_start_is_never_a_target_across_a_boundary(tmp_path):
    hf = hf_text_model("tied_interval2_gva2")
    ours = ours_from_hf(hf, tmp_path)
    docs = _documents(hf.config.vocab_size)
    ids, cu_seqlens = _packed(docs)
    out = ours(ids, cu_seqlens=cu_seqlens, labels=ids)
    assert out.num_loss_tokens.item() == sum(n - 1 for n in DOC_LENGTHS)
