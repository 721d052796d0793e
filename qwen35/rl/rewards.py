"""Verifiable rewards: a function of (prompt, completion, label) -> float, scored per completion.

Built in: `math` (the last `\\boxed{...}`, else the last `Answer:` line, graded against the label
by the `math-verify` package), `deepscaler` (the same, on the text after the last `</think>` only;
0 without one), `exact` (the final text equals the label). Any other name is `module:function`.
A reward that raises, returns something that is not a finite number, or runs past its time limit
scores 0 and is counted; a run never stops for it.
"""

from __future__ import annotations

import importlib
import math
import re
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFn = Callable[[str, str, str], float]

_ANSWER_LINE = re.compile(r"^\s*Answer\s*:\s*(.+?)\s*$", re.MULTILINE)


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None  # unbalanced: the completion was cut inside the box


def final_answer(text: str) -> str | None:
    """The last `\\boxed{}` of a completion, else its last `Answer:` line (dapo-math's prompt asks
    for "Answer: \\boxed{...}"), else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = _ANSWER_LINE.findall(text)
    return lines[-1] if lines else None


def after_thinking(text: str) -> str | None:
    """The text after the last `</think>`, None when there is none."""
    _, sep, tail = text.rpartition("</think>")
    return tail if sep else None


def math_reward(prompt: str, completion: str, label: str) -> float:
    """1.0 when math-verify finds the completion's final answer equal to the label, else 0.0."""
    from math_verify import parse, verify

    answer = final_answer(completion)
    if answer is None:
        return 0.0
    gold, predicted = parse(f"${label}$"), parse(f"${answer}$")
    return 1.0 if gold and predicted and verify(gold, predicted) else 0.0


def deepscaler_reward(prompt: str, completion: str, label: str) -> float:
    """DeepScaleR's rule: only the text after the last `</think>` is graded; none scores 0."""
    answer_part = after_thinking(completion)
    return 0.0 if answer_part is None else math_reward(prompt, answer_part, label)


def exact_reward(prompt: str, completion: str, label: str) -> float:
    """1.0 when the completion (after any `</think>`), stripped, is the label, stripped."""
    answer_part = after_thinking(completion)
    text = completion if answer_part is None else answer_part
    return 1.0 if text.strip() == str(label).strip() else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "deepscaler": deepscaler_reward, "exact": exact_reward}


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward by name, or the function `module:function` names."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, sep, function_name = name.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) "
                         f"nor a 'module:function' path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {function_name!r}")
    return fn


def check_prompts(reward_name: str, prompts: Sequence[str]) -> None:
    """The deepscaler trap: with thinking off, Qwen's template puts an empty `<think></think>` in
    the prompt, the completion then has no `</think>`, and every sample scores 0."""
    if reward_name != "deepscaler" or not prompts:
        return
    with_close = sum("</think>" in p for p in prompts)
    message = (f"{with_close} of {len(prompts)} rendered prompts already contain '</think>' (thinking is "
               "off in the chat template), so their completions have none and the deepscaler reward "
               "scores them all 0; turn thinking on (data.template_kwargs: {enable_thinking: true}) or use the 'math' reward")
    if with_close == len(prompts):
        raise ValueError(message)
    if with_close:
        warnings.warn(message, stacklevel=2)


class RewardTimeout(Exception):
    pass


def _call_with_timeout(fn: RewardFn, args: tuple, timeout_s: float):
    """`fn(*args)`, interrupted by SIGALRM after `timeout_s` (main thread on Unix only; elsewhere
    unbounded). Built-in rewards are not wrapped: math-verify sets its own alarms, which would
    cancel this one."""
    usable = timeout_s > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        return fn(*args)

    def on_alarm(signum, frame):
        raise RewardTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class RewardBatch:
    rewards: list[float]
    errors: int = 0  # raised, or returned no finite number
    timeouts: int = 0


def score_completions(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], labels: Sequence[str],
                      timeout_s: float = 10.0) -> RewardBatch:
    """Each completion's reward; failures score 0 and are counted."""
    out = RewardBatch([])
    builtin = fn in BUILTIN_REWARDS.values()
    for prompt, completion, label in zip(prompts, completions, labels, strict=True):
        try:
            value = fn(prompt, completion, label) if builtin else _call_with_timeout(fn, (prompt, completion, label), timeout_s)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"reward {value}")
        except RewardTimeout:
            out.timeouts += 1
            value = 0.0
        except Exception:  # a user's reward function may fail in any way: count it, go on
            out.errors += 1
            value = 0.0
        out.rewards.append(value)
    return out
