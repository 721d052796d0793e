"""Image-text data: records in both forms, pad expansion by transformers' image processor,
assistant-only loss, bad images counted with file and line, text and image sources mixed, rows
with their images decoded in loader workers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.data.formats import DataError, MalformedRecord
from qwen35.data.loader import PackedLoader
from qwen35.data.media import MediaEncoder, collate_media, media_row
from qwen35.data.media_pack import build_media_datasets
from qwen35.data.processor import load_image_processor
from qwen35.data.render import ChatRenderer


@pytest.fixture(scope="module")
def image_processor():
    return load_image_processor(None, 64 * 64, 128 * 128)


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (96, 64), (200, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 128), (0, 0, 200)).save(tmp_path / "tall.png")
    (tmp_path / "broken.png").write_bytes(Image.open(tmp_path / "wide.png").tobytes()[:100])  # not an image
    return tmp_path


def openai(question, answer, *paths):
    parts = [{"type": "image", "image": p} for p in paths] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]}


def sharegpt(question, answer, *paths):
    return {"conversations": [{"from": "human", "value": "<image>" * len(paths) + question},
                              {"from": "gpt", "value": answer}], "images": list(paths)}


def test_both_record_forms_give_the_same_document_with_pads_the_processor_counts(tokenizer, image_processor, images):
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor)
    doc = encoder.encode(openai("Which colours?", "red and blue", "wide.png", "tall.png"), "f:1", images / "d.jsonl")
    same = encoder.encode(sharegpt("Which colours?", "red and blue", "wide.png", "tall.png"), "f:2", images / "d.jsonl")
    assert np.array_equal(doc.ids, same.ids) and np.array_equal(doc.loss, same.loss)
    assert doc.images == (str(images / "wide.png"), str(images / "tall.png"))
    row = media_row([doc], len(doc.ids), tokenizer.pad_token_id, image_processor, encoder.pad_id)
    # the processor's own rule: t*h*w / merge² pads per image, from the grids it computed
    assert row["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 2]]
    assert int((doc.ids == encoder.pad_id).sum()) == int(row["image_grid_thw"].prod(-1).sum()) // 4 == 10
    assert row["pixel_values"].shape == (24 + 16, 1536)
    # loss on the answer and its end only; never on the image pads
    assert tokenizer.decode(doc.ids[doc.loss]).endswith("red and blue<|im_end|>")
    assert not doc.loss[doc.ids == encoder.pad_id].any()


def test_media_root_and_image_url_parts(tokenizer, image_processor, images, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("data") / "d.jsonl"
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor, media_root=str(images))
    record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "wide.png"}},
                                                        {"type": "text", "text": "?"}]},
                           {"role": "assistant", "content": "red"}]}
    assert encoder.encode(record, "f:1", elsewhere).images == (str(images / "wide.png"),)


def test_a_missing_or_corrupt_image_is_a_malformed_record_naming_file_line_and_image(tokenizer, image_processor, images):
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor)
    with pytest.raises(MalformedRecord, match=r"d.jsonl:3: image 0 \(.*nothere.png\)"):
        encoder.encode(openai("?", "x", "nothere.png"), "d.jsonl:3", images / "d.jsonl")
    with pytest.raises(MalformedRecord, match=r"d.jsonl:4: image 1 \(.*broken.png\)"):
        encoder.encode(openai("?", "x", "wide.png", "broken.png"), "d.jsonl:4", images / "d.jsonl")
    with pytest.raises(MalformedRecord, match="2 <image> tags but 1 images"):
        encoder.encode(sharegpt("<image>?", "x", "wide.png"), "d.jsonl:5", images / "d.jsonl")


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_text_and_image_sources_mix_and_bad_images_are_counted_or_fatal(tokenizer, image_processor, images):
    _write(images / "img.jsonl", [openai("Colour?", "red", "wide.png"), openai("Colour?", "blue", "nothere.png"),
                                  sharegpt("Colour?", "blue", "tall.png"), openai("Colour?", "x", "broken.png")])
    _write(images / "text.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}."},
                                                 {"role": "assistant", "content": w}]} for w in ("hi", "yes", "no")])
    config = {"train_path": f"{images / 'img.jsonl'},{images / 'text.jsonl'}", "seq_len": 96}
    data = build_media_datasets(config, tokenizer, image_processor)
    assert data.stats.records == 7 and data.stats.malformed == 2
    assert data.stats.problems[0].startswith(f"{images / 'img.jsonl'}:2: image 0")
    assert data.stats.problems[1].startswith(f"{images / 'img.jsonl'}:4: image 0")
    assert data.stats.train.documents == 5
    rows = [data.train[i] for i in range(len(data.train))]
    assert sum(len(r.get("image_grid_thw", [])) for r in rows) == 2  # both good images, once each
    with pytest.raises(DataError, match=r"img.jsonl:2: image 0"):
        build_media_datasets({**config, "on_malformed": "error"}, tokenizer, image_processor)


def test_rows_restart_mrope_positions_per_document_and_loader_workers_decode_them(tokenizer, image_processor, images):
    _write(images / "img.jsonl", [openai("Colour?", "red", "wide.png"), openai("Colour?", "blue", "tall.png")] * 3)
    data = build_media_datasets({"train_path": str(images / "img.jsonl"), "seq_len": 200}, tokenizer, image_processor)
    row = data.train[0]
    bounds = row["cu_seqlens"].tolist()
    assert len(bounds) >= 3  # several documents in the row
    docs = [data.train.docs[i] for i in data.train.rows[0]]
    for doc, start, end in zip(docs, bounds[:-1], bounds[1:]):  # each document as if it ran alone
        alone = media_row([doc], len(doc.ids), tokenizer.pad_token_id, image_processor, data.train.image_token_id)
        assert torch.equal(row["position_ids"][:, start:end], alone["position_ids"])
        assert row["position_ids"][:, start].tolist() == [0, 0, 0]
    assert not torch.equal(row["position_ids"][0], row["position_ids"][1])  # the image's h and w axes
    in_process = list(zip(range(2), PackedLoader(data.train, 2, collate_fn=collate_media)))
    in_workers = list(zip(range(2), PackedLoader(data.train, 2, collate_fn=collate_media, num_workers=2)))
    for (_, a), (_, b) in zip(in_process, in_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert in_process[0][1]["position_ids"].shape == (3, 1, 400)
