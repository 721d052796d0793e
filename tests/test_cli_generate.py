"""`qwen35 generate`: `--chat` prints the assistant's answer, not the chat template's markers;
`--image` gives a vision-language model images, as `model.generate` takes them."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from qwen35 import Qwen35ForConditionalGeneration
from qwen35.build import load_tokenizer, model_config
from qwen35.cli import main, split_reply
from qwen35.data.processor import load_image_processor
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
    weights, the project's tokenizer, the image processor's preprocessor_config.json; and two
    images of different sizes."""
    root = tmp_path_factory.mktemp("vl")
    cfg = load_run_config(None, ["--model.preset", "tiny-vl", "--train.output_dir", str(root / "run")])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = Qwen35ForConditionalGeneration.from_config(model_config(cfg, tokenizer))
    with torch.no_grad():  # larger than the initial 0.02, so the image changes what is generated
        for p in model.parameters():
            p.normal_(0, 0.5)
    export_model(model, tokenizer, root / "model", Runtime(torch.device("cpu"), 0, 1, None),
                 load_image_processor(None, 32 * 32, 64 * 96), None)
    Image.effect_noise((64, 64), 80).convert("RGB").save(root / "a.png")
    Image.effect_noise((96, 32), 40).convert("RGB").save(root / "b.png")
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
