"""Video-text data: a document with a video equals transformers' Qwen3-VL processor output
(frames sampled, timestamps, pads, patches), both record forms, the pixel budget, and missing
or corrupt videos counted with file and line."""

import itertools
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from reference import write_video
from qwen35.data.formats import DataError, MalformedRecord
from qwen35.data.media import MediaEncoder, media_row
from qwen35.data.media_pack import build_media_datasets
from qwen35.data.processor import load_image_processor, load_video_processor
from qwen35.data.render import ChatRenderer


@pytest.fixture(scope="module")
def processors():
    # 2 frames a second; the budget keeps a 5-frame 64x96 clip at its size
    return load_image_processor(None, 64 * 64, 128 * 128), load_video_processor(None, 2, None, 64 * 64, 8 * 64 * 96)


@pytest.fixture
def media(tmp_path):
    gen = np.random.default_rng(0)
    # 20 frames at 8 fps (2.5 s): noise, so every patch differs, and a frame index in the red channel
    frames = gen.integers(0, 256, (20, 64, 96, 3), dtype=np.uint8)
    frames[..., 0] = np.arange(20, dtype=np.uint8)[:, None, None] * 12
    write_video(tmp_path / "clip.mp4", frames)
    write_video(tmp_path / "odd.mp4", gen.integers(0, 256, (6, 48, 80, 3), dtype=np.uint8), fps=4)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # a header, no video
    Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / "red.png")
    return tmp_path


def openai(question, answer, *parts):
    content = [{"type": "video" if p.endswith(".mp4") else "image", ("video" if p.endswith(".mp4") else "image"): p}
               for p in parts]
    return {"messages": [{"role": "user", "content": content + [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def sharegpt(question, answer, videos, images=()):
    return {"conversations": [{"from": "human", "value": "<image>" * len(images) + "<video>" * len(videos) + question},
                              {"from": "gpt", "value": answer}], "videos": list(videos), "images": list(images)}


def _transformers_processor(tokenizer, video_processor):
    """transformers' Qwen3VLProcessor for its placeholder text. It cannot be built the usual way
    here (its constructor looks the video processor up through torchvision's registry), so it gets
    the attributes its `replace_video_token` reads."""
    processor = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    processor.video_processor, processor.video_token = video_processor, "<|video_pad|>"
    processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    return processor


def test_a_document_with_a_video_equals_transformers_processor_output(tokenizer, processors, media):
    image_processor, video_processor = processors
    renderer = ChatRenderer(tokenizer)
    encoder = MediaEncoder(renderer, image_processor, video_processor=video_processor)
    record = openai("What happens?", "it flickers", "clip.mp4")
    doc = encoder.encode(record, "f:1", media / "d.jsonl")
    same = encoder.encode(sharegpt("What happens?", "it flickers", ["clip.mp4"]), "f:2", media / "d.jsonl")
    assert np.array_equal(doc.ids, same.ids) and np.array_equal(doc.loss, same.loss)
    # 2.5 s at 2 frames a second: 5 frames spread over the 20, the last repeated to make pairs
    assert doc.videos[0].frames == (0, 5, 10, 14, 19)
    row = media_row([doc], len(doc.ids), tokenizer.pad_token_id, image_processor, encoder.pad_id, video_processor,
                    encoder.video_pad_id)

    # transformers: every frame decoded, the sampled ones taken, its processor's patches and text
    with av.open(str(media / "clip.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    metadata = VideoMetadata(total_num_frames=len(decoded), fps=8.0, height=64, width=96)
    indices = video_processor.sample_frames(metadata, fps=2)
    metadata.frames_indices = indices
    frames = torch.from_numpy(decoded[indices]).permute(0, 3, 1, 2)
    theirs = video_processor(videos=[frames], do_sample_frames=False, do_resize=False, do_rescale=False,
                             do_normalize=False, do_convert_rgb=False, cap_pixels_per_frame=False,
                             return_tensors="pt")  # its resize and normalise need torchvision: the frames fit
    placeholder = _transformers_processor(tokenizer, video_processor).replace_video_token(
        {"video_grid_thw": theirs["video_grid_thw"], "video_metadata": [metadata]}, 0)
    text = renderer.render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                            {"role": "assistant", "content": "it flickers"}])
    expected_ids = tokenizer(text.replace("<|video_pad|>", placeholder), add_special_tokens=False)["input_ids"]

    assert row["input_ids"].tolist() == expected_ids
    assert row["video_grid_thw"].tolist() == theirs["video_grid_thw"].tolist() == [[3, 4, 6]]
    torch.testing.assert_close(row["pixel_values_videos"], (theirs["pixel_values_videos"].float() / 255 - 0.5) / 0.5,
                               rtol=0, atol=1e-6)
    assert "<0.3 seconds>" in placeholder and "<2.4 seconds>" in placeholder  # frame pairs (0, 5) and (19, 19)
    # loss on the answer only, never on the video's tokens
    assert tokenizer.decode(doc.ids[doc.loss]).endswith("it flickers<|im_end|>")
    assert int((doc.ids == encoder.video_pad_id).sum()) == 3 * 6 == int(row["video_grid_thw"].prod()) // 4
    assert not doc.loss[doc.ids == encoder.video_pad_id].any()
    # M-RoPE: each frame pair is its own vision run, so the temporal axis moves between them
    assert row["position_ids"].shape == (3, len(expected_ids))


def test_a_video_outside_the_budget_is_resized_to_the_processors_grid(tokenizer, processors, media):
    image_processor, video_processor = processors
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor, video_processor=video_processor)
    doc = encoder.encode(sharegpt("?", "x", ["odd.mp4"], ["red.png"]), "f:1", media / "d.jsonl")
    row = media_row([doc], len(doc.ids), tokenizer.pad_token_id, image_processor, encoder.pad_id, video_processor,
                    encoder.video_pad_id)
    # 6 frames at 4 fps (1.5 s) at 2 fps gives 3, raised to the processor's min_frames 4; 48x80 to 64x64
    assert doc.videos[0].frames == (0, 2, 3, 5) and (doc.videos[0].height, doc.videos[0].width) == (64, 64)
    t, h, w = row["video_grid_thw"][0].tolist()
    assert t * h * w == video_processor.get_num_of_video_patches(4, 48, 80)
    assert row["pixel_values_videos"].shape == (t * h * w, 1536) and row["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert row["pixel_values_videos"].abs().max() <= 1.0


def test_the_frame_rate_and_frame_cap_keys_choose_the_frames(tokenizer, media):
    image_processor = load_image_processor(None, 64 * 64, 128 * 128)
    capped = load_video_processor(None, 8, 6, 64 * 64, 64 * 64 * 96)  # every frame, at most 6
    encoder = MediaEncoder(ChatRenderer(tokenizer), image_processor, video_processor=capped)
    assert encoder.encode(openai("?", "x", "clip.mp4"), "f:1", media / "d.jsonl").videos[0].frames == (
        0, 4, 8, 11, 15, 19)


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_a_missing_or_corrupt_video_is_counted_with_file_and_line_or_fatal(tokenizer, processors, media):
    image_processor, video_processor = processors
    data_file = _write(media / "v.jsonl", [openai("?", "a", "clip.mp4"), openai("?", "b", "broken.mp4"),
                                           sharegpt("?", "c", ["nothere.mp4"]), openai("?", "d", "red.png")])
    config = {"train_path": str(data_file), "seq_len": 256}
    data = build_media_datasets(config, tokenizer, image_processor, video_processor)
    assert data.stats.records == 4 and data.stats.malformed == 2 and data.stats.train.documents == 2
    assert data.stats.problems[0].startswith(f"{data_file}:2: video 0 ({media / 'broken.mp4'})")
    assert data.stats.problems[1].startswith(f"{data_file}:3: video 0 ({media / 'nothere.mp4'})")
    rows = [data.train[i] for i in range(len(data.train))]
    assert sum(len(r.get("video_grid_thw", [])) for r in rows) == 1
    with pytest.raises(DataError, match=r"v.jsonl:2: video 0 \(.*broken.mp4\)"):
        build_media_datasets({**config, "on_malformed": "error"}, tokenizer, image_processor, video_processor)
    with pytest.raises(MalformedRecord, match="1 <video> tags but 2 videos"):
        MediaEncoder(ChatRenderer(tokenizer), image_processor, video_processor=video_processor).encode(
            sharegpt("?", "x", ["clip.mp4"]) | {"videos": ["clip.mp4"] * 2}, "f:9", media / "d.jsonl")
    with pytest.raises(ValueError, match="no video_preprocessor_config.json"):
        build_media_datasets(config, tokenizer, image_processor, None)


def test_rows_with_videos_are_decoded_in_loader_workers_as_in_process(tokenizer, processors, media):
    from qwen35.data.loader import PackedLoader
    from qwen35.data.media import collate_media

    image_processor, video_processor = processors
    data_file = _write(media / "v.jsonl", [openai("?", "a", "clip.mp4"), openai("?", "b", "red.png", "odd.mp4"),
                                           openai("?", "c", "red.png")] * 2)
    data = build_media_datasets({"train_path": str(data_file), "seq_len": 256}, tokenizer, image_processor,
                                video_processor)
    def epoch(**workers):
        loader = PackedLoader(data.train, 2, collate_fn=collate_media, shuffle=False, **workers)
        return list(itertools.islice(loader, loader.batches_per_epoch))

    in_process, in_workers = epoch(), epoch(num_workers=2)
    assert len(in_process) == len(in_workers) > 0
    assert sum(len(b.get("video_grid_thw", [])) for b in in_process) == 4
    for a, b in zip(in_process, in_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
