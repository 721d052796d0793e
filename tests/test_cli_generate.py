"""`qwen35 generate`: `--chat` prints the assistant's answer, not the chat template's markers;
`--image` and `--video` give a vision-language model images and videos, as `model.generate` takes
them."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35 import Qwen35ForConditionalGeneration
from qwen35.build import load_tokenizer, model_config
from qwen35.cli import main, split_reply
from qwen35.data.processor import load_image_processor, load_video_processor
from qwen35.errors import EXIT_USER_ERROR
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import Runtime, export_model


def test_the_answer_is_cut_at_the_end_of_turn_and_after_the_thinking():
    assert split_reply("\n\n</think>\n\n42<|im_end|>\n<|im_start|>user") == ("", "42")
    assert split_reply("Add 40 and 2.\n</think>\n\nIt is 42.<|im_end|>") == ("Add 40 and 2.", "It is 42.")
    assert split_reply("no thinking markers at all<|endoftext|>") == ("", "no thinking markers at all")
    # a model that mentions the tag inside its thinking: the answer follows the last one
    assert split_reply("<think>a </think> b</think>c") == ("a </think> b", "c")


def test_generate_chat_runs_on_a_model_directory(tmp_path):
    from reference import tiny_model_dir

    tiny_model_dir(tmp_path / "model")
    for extra in ([], ["--thinking"]):
        run = subprocess.run([sys.executable, "-m", "qwen35", "generate", "--model", str(tmp_path / "model"),
                              "--prompt", "What is 2 + 3?", "--chat", "--max-new-tokens", "8", *extra],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "<|im_start|>" not in run.stdout and "<|im_end|>" not in run.stdout


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """A tiny vision-language model directory as the trainer exports one: the tiny-vl preset's
    weights, the project's tokenizer, the image and video processors' configs; two images of
    different sizes and a video."""
    from reference import write_video

    root = tmp_path_factory.mktemp("vl")
    cfg = load_run_config(None, ["--model.preset", "tiny-vl", "--train.output_dir", str(root / "run")])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = Qwen35ForConditionalGeneration.from_config(model_config(cfg, tokenizer))
    with torch.no_grad():  # larger than the initial 0.02, so the image changes what is generated
        for p in model.parameters():
            p.normal_(0, 0.5)
    export_model(model, tokenizer, root / "model", Runtime(torch.device("cpu"), 0, 1, None),
                 load_image_processor(None, 32 * 32, 64 * 96), None, load_video_processor(None, 2, 8, 32 * 32, 4 * 64 * 64))
    Image.effect_noise((64, 64), 80).convert("RGB").save(root / "a.png")
    Image.effect_noise((96, 32), 40).convert("RGB").save(root / "b.png")
    write_video(root / "v.mp4", np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), fps=4)
    return root


def _cli(capsys, *args) -> str:
    main(["generate", *map(str, args)])
    return capsys.readouterr().out.strip()


def _expected(directory, images, prompt, chat) -> str:
    """The answer of `model.generate` on the prompt as transformers' Qwen3-VL processor builds it:
    the chat template's image placeholders (or the raw ones before the text), each
    `<|image_pad|>` repeated for its image's tokens."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    if chat:
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False, enable_thinking=False)
    else:
        text = "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + prompt
    for grid in pixels["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    ids = tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
    model = Qwen35ForConditionalGeneration.from_pretrained(directory)
    out = model.generate([ids], pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                         max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)[0]
    if not chat:
        return tokenizer.decode(out, skip_special_tokens=True).strip()
    return split_reply(tokenizer.decode(out, skip_special_tokens=False))[1]


def test_generate_with_images_prints_what_model_generate_gives(vl_dir, capsys):
    model, a, b = vl_dir / "model", vl_dir / "a.png", vl_dir / "b.png"
    answers = {}
    for images in ([a], [a, b], [b, a]):
        for chat in ([], ["--chat"]):
            flags = [x for path in images for x in ("--image", path)]
            printed = _cli(capsys, "--model", model, *flags, "--prompt", "What is this?", "--max-new-tokens", 8, *chat)
            assert printed == _expected(model, images, "What is this?", bool(chat))
            answers[tuple(images), bool(chat)] = printed
    assert len(set(answers.values())) > 1  # the images make a difference


def _refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["generate", *map(str, args)])
    assert stopped.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_generate_refuses_images_for_a_text_model_and_names_a_missing_or_unreadable_image(vl_dir, tmp_path, capsys):
    from reference import tiny_model_dir

    text_model = tiny_model_dir(tmp_path / "text")
    capsys.readouterr()  # what saving it printed
    assert "text-only" in _refused(capsys, "--model", text_model, "--image", vl_dir / "a.png", "--prompt", "hi")
    missing = tmp_path / "missing.png"
    assert f"--image {missing}: no such file" in _refused(capsys, "--model", vl_dir / "model", "--image", missing,
                                                           "--prompt", "hi")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert str(broken) in _refused(capsys, "--model", vl_dir / "model", "--image", vl_dir / "a.png",
                                   "--image", broken, "--prompt", "hi")


def _expected_with_video(directory, video, prompt) -> str:
    """`model.generate` on the chat prompt with the video as the training pipeline prepares it."""
    from transformers import AutoTokenizer

    from qwen35.data.media import expand_placeholders
    from qwen35.data.video import video_clip, video_pixels, video_placeholder

    tokenizer = AutoTokenizer.from_pretrained(directory)
    processor = load_video_processor(str(directory))
    clip = video_clip(str(video), processor)
    ids = np.asarray(tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False))
    model = Qwen35ForConditionalGeneration.from_pretrained(directory)
    piece = tokenizer(video_placeholder(clip, processor), add_special_tokens=False)["input_ids"]
    ids, _ = expand_placeholders(ids, np.zeros(len(ids), dtype=bool), model.config.image_token_id, [],
                                 model.config.video_token_id, [piece])
    out = model.generate([ids.tolist()], **video_pixels([clip], processor), max_new_tokens=8,
                         eos_token_id=tokenizer.eos_token_id)[0]
    return split_reply(tokenizer.decode(out, skip_special_tokens=False))[1]


def test_generate_with_a_video_prints_what_model_generate_gives(vl_dir, capsys):
    model = vl_dir / "model"
    assert (model / "video_preprocessor_config.json").is_file()  # the export carries the video processor
    printed = _cli(capsys, "--model", model, "--video", vl_dir / "v.mp4", "--prompt", "What is this?",
                   "--max-new-tokens", 8, "--chat")
    assert printed == _expected_with_video(model, vl_dir / "v.mp4", "What is this?")
    without = _cli(capsys, "--model", model, "--prompt", "What is this?", "--max-new-tokens", 8, "--chat")
    with_image = _cli(capsys, "--model", model, "--image", vl_dir / "a.png", "--video", vl_dir / "v.mp4",
                      "--prompt", "What is this?", "--max-new-tokens", 8)
    assert printed != without and with_image  # the video makes a difference; images and videos together run


def test_generate_names_a_missing_or_corrupt_video_and_refuses_videos_for_a_text_model(vl_dir, tmp_path, capsys):
    from reference import tiny_model_dir

    missing = tmp_path / "missing.mp4"
    assert f"--video {missing}: no such file" in _refused(capsys, "--model", vl_dir / "model", "--video", missing,
                                                           "--prompt", "hi")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert f"--video: video {broken}" in _refused(capsys, "--model", vl_dir / "model", "--video", broken,
                                                  "--prompt", "hi")
    text_model = tiny_model_dir(tmp_path / "text")
    capsys.readouterr()
    assert "text-only" in _refused(capsys, "--model", text_model, "--video", vl_dir / "v.mp4", "--prompt", "hi")
