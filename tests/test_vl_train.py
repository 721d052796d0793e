"""Vision-language training through the trainer's step: a packed micro-batch of image-text
documents equals the documents one by one; model.freeze; LoRA on the vision blocks; FSDP over
two gloo processes where one rank's micro-batch holds no image."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen35.build import FREEZE_PREFIXES, freeze, model_config
from qwen35.data.media import MediaEncoder, collate_media, media_row
from qwen35.data.processor import load_image_processor
from qwen35.data.render import ChatRenderer
from qwen35.errors import UserError
from qwen35.lora import LoraSettings, apply_lora
from qwen35.model import Qwen35ForCausalLM
from qwen35.model.vl import Qwen35ForConditionalGeneration
from qwen35.train.config_parser import load_run_config
from qwen35.train.step import forward_backward

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny-vl model, the project's tokenizer, and four documents (three with images of
    different sizes, one text-only)."""
    from qwen35.build import load_tokenizer

    root = tmp_path_factory.mktemp("vl")
    cfg = load_run_config(None, ["--model.preset", "tiny-vl", "--train.output_dir", str(root / "run")])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = Qwen35ForConditionalGeneration.from_config(model_config(cfg, tokenizer))
    processor = load_image_processor(None, 64 * 64, 128 * 128)
    for name, size, colour in (("a.png", (64, 64), (255, 0, 0)), ("b.png", (96, 64), (0, 255, 0)),
                               ("c.png", (32, 128), (0, 0, 255))):
        Image.effect_noise(size, 60).convert("RGB").save(root / name)  # texture, so patches differ
    encoder = MediaEncoder(ChatRenderer(tokenizer), processor)

    def chat(question, answer, *images):
        parts = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}

    records = [chat("What is it?", "noise", "a.png"), chat("Compare them.", "the same", "b.png", "c.png"),
               chat("Say hi.", "hi"), chat("And this?", "more noise", "c.png")]
    docs = [encoder.encode(r, f"t:{i}", root / "d.jsonl") for i, r in enumerate(records)]

    def row(docs, length=None):
        return media_row(docs, length or sum(len(d.ids) for d in docs), tokenizer.pad_token_id, processor,
                         encoder.pad_id)
    return model, docs, row


def _step(model, micro_batches):
    model.zero_grad(set_to_none=True)
    result = forward_backward(model, micro_batches)
    return result.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_packed_micro_batch_through_the_step_equals_the_documents_one_by_one(setup):
    model, docs, row = setup
    packed = collate_media([row(docs[:2], 160), row(docs[2:], 128)])  # two rows, padding at their ends
    assert packed["image_grid_thw"].shape[0] == 4  # the tower sees all images of the micro-batch at once
    loss, grads = _step(model, [packed])
    loss_one, grads_one = _step(model, [collate_media([row([d])]) for d in docs])
    torch.testing.assert_close(loss, loss_one, rtol=1e-5, atol=0)
    assert grads.keys() == grads_one.keys()
    assert any(n.startswith("model.visual.blocks.") for n in grads)  # the tower is trained
    for name, grad in grads_one.items():
        scale = max(grad.norm().item(), 1e-3)
        assert (grads[name] - grad).norm().item() <= 1e-4 * scale, name


def test_a_text_only_batch_can_still_run_the_tower_without_changing_anything(setup):
    model, docs, row = setup
    text = [collate_media([row([docs[2]])])]
    loss, grads = _step(model, text)
    model.model.run_vision_without_media = True
    try:
        loss_run, grads_run = _step(model, text)
    finally:
        model.model.run_vision_without_media = False
    assert loss == loss_run
    assert not any(n.startswith("model.visual") for n in grads)
    tower = {n: g for n, g in grads_run.items() if n.startswith("model.visual")}
    assert tower and all(g.abs().max() == 0 for g in tower.values())  # present (collectives ran), zero
    assert all(torch.equal(grads[n], grads_run[n]) for n in grads)


@pytest.mark.parametrize("parts", [["vision"], ["merger"], ["language"], ["vision", "merger"]])
def test_freeze_leaves_exactly_the_named_parts_without_gradient(setup, parts):
    model, docs, row = setup
    freeze(model, parts)
    try:
        _, grads = _step(model, [collate_media([row(docs[:2])])])
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    frozen = tuple(prefix for part in parts for prefix in FREEZE_PREFIXES[part])
    names = [n for n, _ in model.named_parameters()]
    assert {n for n in names if not n.startswith(frozen)} == set(grads)
    assert any(n.startswith(frozen) for n in names)


def test_the_2b_vl_preset_has_the_published_tower_and_the_run_tokenizers_media_ids(tmp_path):
    """2B-vl (the benchmark's vision-language preset) is the 2B language model with the 27-block,
    1152-wide tower merged to its width; trained with the run's tokenizer, its media tokens sit at
    that tokenizer's ids, as tiny-vl's do."""
    from qwen35.build import is_vision_language, load_tokenizer

    cfg = load_run_config(None, ["--model.preset", "2B-vl", "--train.output_dir", str(tmp_path)])
    tokenizer = load_tokenizer(cfg)
    config = model_config(cfg, tokenizer)
    assert is_vision_language(cfg) and (config.hidden_size, config.num_hidden_layers) == (2048, 24)
    v = config.vision
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (27, 1152, 16, 4304, 2048)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") != 248056
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")


def test_freeze_is_refused_for_a_text_model():
    from qwen35.model import preset

    with torch.device("meta"):
        model = Qwen35ForCausalLM(preset("tiny", vocab_size=64))
    with pytest.raises(UserError, match="text-only"):
        freeze(model, ["vision"])


def test_lora_on_the_vision_blocks_trains_only_their_adapters(setup):
    model, docs, row = setup
    import copy

    adapted = apply_lora(copy.deepcopy(model), LoraSettings(4, 8, 0.0, False, ["attn.qkv", "attn.proj"], []))
    _, grads = _step(adapted, [collate_media([row(docs[:2])])])
    assert grads and all(".lora_" in n for n in grads)
    vision = {n for n in grads if n.startswith("model.visual.blocks.")}
    language = {n for n in grads if n.startswith("model.language_model.")}
    assert len(vision) == 2 * 2 * len(model.model.visual.blocks)  # A and B of qkv and proj per block
    assert not language  # the language model's attention is q/k/v/o_proj: not targeted
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.endswith("lora_B.weight"))


def _launch(nproc, data_dir, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE / "parallel" / "vl_step_worker.py"), str(data_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


def test_fsdp_on_two_processes_where_one_rank_has_no_image_finishes_and_equals_one_process(tmp_path):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (96, 64), colour).save(tmp_path / name)
    one = _launch(1, tmp_path, tmp_path / "one.pt")
    two = _launch(2, tmp_path, tmp_path / "two.pt")
    assert abs(one["loss"].item() - two["loss"].item()) <= 1e-6
    assert one["grads"].keys() == two["grads"].keys()
    whole = torch.cat([g.flatten() for g in one["grads"].values() if g is not None])
    for name, grad in one["grads"].items():
        scale = max(grad.norm().item(), 1e-3 * whole.norm().item())
        assert (two["grads"][name] - grad).norm().item() <= 1e-5 * scale, name
    assert one["grads"]["model.visual.blocks.0.attn.qkv.weight"].abs().max() > 0


def test_qwen35_train_on_image_and_text_data_exports_a_checkpoint_transformers_loads(tmp_path):
    """The whole trainer on a mixed image and text file: two steps, then the export loads in
    transformers' Qwen3_5ForConditionalGeneration with our logits, and its image processor loads."""
    import json

    from transformers import AutoImageProcessor, Qwen3_5ForConditionalGeneration

    from qwen35.train.trainer import train

    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    records = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "red.png"},
                                                          {"type": "text", "text": "Colour?"}]},
                             {"role": "assistant", "content": "red"}]},
               {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}] * 4
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_run_config(None, [
        "--model.preset", "tiny-vl", "--model.freeze", "[merger]", "--data.train_path", str(tmp_path / "d.jsonl"),
        "--data.seq_len", "96", "--data.image_min_pixels", "4096", "--data.image_max_pixels", "4096",
        "--train.max_steps", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "1",
        "--train.output_dir", str(tmp_path / "run"), "--log.tensorboard", "false", "--train.save_steps", "0"])
    result = train(cfg)
    assert result.steps == 2 and result.export_dir is not None
    ours = Qwen35ForConditionalGeneration.from_pretrained(result.export_dir)
    theirs = Qwen3_5ForConditionalGeneration.from_pretrained(result.export_dir).eval()
    processor = AutoImageProcessor.from_pretrained(result.export_dir, backend="pil")
    pixels = processor(images=[Image.open(tmp_path / "red.png")], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]]
    pad = ours.config.image_token_id
    ids = torch.tensor([[5, ours.config.vision_start_token_id, pad, pad, pad, pad, ours.config.vision_end_token_id, 7]])
    with torch.no_grad():
        expected = theirs(input_ids=ids, **pixels, mm_token_type_ids=(ids == pad).long()).logits
        got = ours(input_ids=ids, **pixels).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def video_docs(setup, tmp_path_factory):
    """A video document (a 12-frame noise clip, 6 frames kept) and an image document, encoded
    with the preset's video processor, and their row builder."""
    import numpy as np

    from reference import write_video
    from qwen35.build import load_tokenizer
    from qwen35.data.processor import load_video_processor

    root = tmp_path_factory.mktemp("video")
    cfg = load_run_config(None, ["--model.preset", "tiny-vl", "--train.output_dir", str(root / "run")])
    tokenizer = load_tokenizer(cfg)
    images, videos = load_image_processor(None, 64 * 64, 128 * 128), load_video_processor(None, 4, 6, 64 * 64, 6 * 64 * 96)
    write_video(root / "v.mp4", np.random.default_rng(1).integers(0, 256, (12, 64, 96, 3), dtype=np.uint8), fps=4)
    Image.effect_noise((64, 64), 60).convert("RGB").save(root / "a.png")
    encoder = MediaEncoder(ChatRenderer(tokenizer), images, video_processor=videos)

    def chat(question, answer, kind, path):
        parts = [{"type": kind, kind: path}, {"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}

    docs = [encoder.encode(chat("What moves?", "the noise", "video", "v.mp4"), "t:1", root / "d.jsonl"),
            encoder.encode(chat("What is it?", "a square", "image", "a.png"), "t:2", root / "d.jsonl")]

    def row(docs, length=None):
        return media_row(docs, length or sum(len(d.ids) for d in docs), tokenizer.pad_token_id, images,
                         encoder.pad_id, videos, encoder.video_pad_id)
    return docs, row


def test_a_packed_row_with_a_video_and_an_image_document_equals_the_documents_one_by_one(setup, video_docs):
    model = setup[0]
    docs, row = video_docs
    packed = collate_media([row(docs, sum(len(d.ids) for d in docs) + 7)])  # padding at the end
    assert packed["video_grid_thw"].tolist() == [[3, 4, 6]] and packed["image_grid_thw"].shape[0] == 1
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for doc in docs:
            alone = collate_media([row([doc])])
            expected = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            torch.testing.assert_close(logits[start:start + len(doc.ids)], expected, rtol=1e-5, atol=1e-5)
            start += len(doc.ids)
    # and through the trainer's step: the same loss and gradients, the tower's included
    loss, grads = _step(model, [packed])
    loss_one, grads_one = _step(model, [collate_media([row([d])]) for d in docs])
    torch.testing.assert_close(loss, loss_one, rtol=1e-5, atol=0)
    assert any(n.startswith("model.visual.blocks.") for n in grads)
    for name, grad in grads_one.items():
        assert (grads[name] - grad).norm().item() <= 1e-4 * max(grad.norm().item(), 1e-3), name
