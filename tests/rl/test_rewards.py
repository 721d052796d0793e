import sys
import time
import types

import pytest

from qwen35.rl.rewards import (check_prompts, deepscaler_reward, exact_reward, final_answer, math_reward,
                               resolve_reward, score_completions)


def test_final_answer_is_the_last_box_else_the_last_answer_line():
    assert final_answer("first \\boxed{1}, then \\boxed{\\frac{a}{b}} done") == "\\frac{a}{b}"
    assert final_answer("work\nAnswer: 12\nmore\nAnswer: 34\n") == "34"
    assert final_answer("Answer: 5 and \\boxed{6}") == "6"
    assert final_answer("cut inside \\boxed{\\frac{1}{") is None
    assert final_answer("no answer here") is None


def test_math_reward_grades_equivalent_forms_with_math_verify():
    assert math_reward("", "so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("", "Answer: 34", "34") == 1.0
    assert math_reward("", "\\boxed{35}", "34") == 0.0
    assert math_reward("", "34", "34") == 0.0  # no box, no Answer line: nothing to grade


def test_deepscaler_grades_only_the_text_after_the_last_think():
    assert deepscaler_reward("", "<think>\\boxed{3}</think> so \\boxed{34}", "34") == 1.0
    assert deepscaler_reward("", "<think>\\boxed{34}</think> so \\boxed{3}", "34") == 0.0
    assert deepscaler_reward("", "\\boxed{34}", "34") == 0.0  # no </think>


def test_deepscaler_refuses_prompts_that_already_close_the_thinking():
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    with pytest.raises(ValueError, match="enable_thinking"):
        check_prompts("deepscaler", [closed, closed])
    with pytest.warns(UserWarning, match="1 of 2"):
        check_prompts("deepscaler", [closed, "<|im_start|>assistant\n<think>\n"])
    check_prompts("math", [closed])  # the math reward reads the completion whatever the prompt


def test_exact_compares_the_final_text():
    assert exact_reward("", " 19\n", "19") == 1.0
    assert exact_reward("", "<think>x</think>19", "19") == 1.0
    assert exact_reward("", "19 apples", "19") == 0.0


def test_module_function_rewards_and_failures_are_counted_not_raised(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda prompt, completion, label: len(completion)
    module.broken = lambda prompt, completion, label: 1 / 0
    module.nan = lambda prompt, completion, label: float("nan")
    module.slow = lambda prompt, completion, label: time.sleep(5) or 1.0
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert score_completions(resolve_reward("my_rewards:length"), ["p", "p"], ["ab", "abc"], ["", ""]).rewards == [2, 3]
    broken = score_completions(resolve_reward("my_rewards:broken"), ["p"], ["x"], ["y"])
    assert (broken.rewards, broken.errors) == ([0.0], 1)
    assert score_completions(resolve_reward("my_rewards:nan"), ["p"], ["x"], ["y"]).errors == 1
    start = time.monotonic()
    slow = score_completions(resolve_reward("my_rewards:slow"), ["p", "p"], ["x", "x"], ["y", "y"], timeout_s=0.1)
    assert (slow.rewards, slow.timeouts) == ([0.0, 0.0], 2)
    assert time.monotonic() - start < 2.0
    with pytest.raises(ValueError, match="no function 'missing'"):
        resolve_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="built-in"):
        resolve_reward("nonsense")
