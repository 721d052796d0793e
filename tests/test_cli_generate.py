"""`qwen35 generate --chat` prints the assistant's answer, not the chat template's markers."""

import subprocess
import sys

from qwen35.cli import split_reply


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
