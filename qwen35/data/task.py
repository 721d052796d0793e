"""The built-in task: arithmetic word problems with answers a program can check.

The default run trains a tiny model from scratch on a CPU in minutes, so the task must be
learnable by a few million parameters yet still measure something: two operands, addition or
subtraction, a handful of sentence templates, names and objects, and an answer that is just the
number. Held-out exact match then says plainly whether training worked.

Operands go up to 20 by default: a few hundred facts a tiny model can learn in minutes. Larger
operands ask it to learn carrying, which it does not in that time.

Everything is a pure function of the seed: the same call writes byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

# (name, pronoun)
PEOPLE = [("Ann", "she"), ("Ben", "he"), ("Cleo", "she"), ("Dan", "he"), ("Eva", "she"),
          ("Finn", "he"), ("Gia", "she"), ("Hugo", "he")]
OBJECTS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells"]

# (operation, template); `b` never exceeds `a` in a subtraction, so answers are never negative.
TEMPLATES = [
    ("+", "{name} has {a} {obj} and buys {b} more. How many {obj} does {pron} have now?"),
    ("+", "{name} has {a} {obj}. {friend} gives {name} {b} more. How many {obj} does {name} have?"),
    ("+", "There are {a} {obj} in a box and {b} {obj} on the table. How many {obj} are there?"),
    ("-", "{name} has {a} {obj} and gives {b} to {friend}. How many {obj} does {name} have left?"),
    ("-", "There are {a} {obj} in a box. {name} takes {b} out. How many {obj} are left in the box?"),
    ("-", "{name} had {a} {obj} and lost {b}. How many {obj} does {pron} have now?"),
]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


@dataclass(frozen=True)
class TaskFiles:
    train: Path
    val: Path


def make_problem(rng: random.Random, max_operand: int = 20) -> Problem:
    op, template = rng.choice(TEMPLATES)
    (name, pron), (friend, _) = rng.sample(PEOPLE, 2)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    question = template.format(name=name, pron=pron, friend=friend, obj=rng.choice(OBJECTS), a=a, b=b)
    return Problem(question, str(a + b if op == "+" else a - b))


def generate_problems(n: int, seed: int = 0, max_operand: int = 20,
                      exclude: set[str] = frozenset()) -> list[Problem]:
    """`n` problems with distinct questions, none of them in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    problems, misses = [], 0
    while len(problems) < n:
        p = make_problem(rng, max_operand)
        if p.question in seen:
            misses += 1
            if misses > 1000:  # in a row: the space of questions is (nearly) used up
                raise ValueError(f"cannot draw {n} distinct problems with operands up to "
                                 f"{max_operand}: raise max_operand or ask for fewer")
            continue
        misses = 0
        seen.add(p.question)
        problems.append(p)
    return problems


def to_record(problem: Problem, index: int) -> dict:
    """A record in the `messages` format that the data pipeline reads, plus the answer to score."""
    return {
        "id": f"arith-{index}",
        "messages": [{"role": "user", "content": problem.question},
                     {"role": "assistant", "content": problem.answer}],
        "answer": problem.answer,
    }


def build_task(directory: str | Path, n_train: int = 20000, n_val: int = 500, seed: int = 0,
               max_operand: int = 20) -> TaskFiles:
    """Writes `train.jsonl` and `val.jsonl` into `directory`; no validation question is in train."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    val = generate_problems(n_val, seed=seed + 1, max_operand=max_operand)
    train = generate_problems(n_train, seed=seed, max_operand=max_operand,
                              exclude={p.question for p in val})
    files = TaskFiles(directory / "train.jsonl", directory / "val.jsonl")
    for path, problems in ((files.train, train), (files.val, val)):
        lines = (json.dumps(to_record(p, i)) + "\n" for i, p in enumerate(problems))
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text("".join(lines))
        partial.replace(path)  # atomic: ranks of a torchrun job may all write the same file
    return files


def load_eval_examples(path: str | Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, answer) pairs of a task file: the conversation without its answer turn."""
    examples = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            examples.append((record["messages"][:-1], record["answer"]))
    return examples


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The last integer of a reply, outside any thinking block; None when there is none.

    The last rather than the first, so that "12 + 7 = 19" and "The answer is 19." both score.
    A reply cut inside an unfinished `<think>` has no answer yet.
    """
    text = _THINK.sub(" ", text)
    if "<think>" in text:
        text = text.split("<think>")[0]
    text = text.split("</think>")[-1]
    numbers = _INTEGER.findall(text)
    return str(int(numbers[-1])) if numbers else None


def exact_match(prediction: str, answer: str) -> bool:
    return extract_answer(prediction) == str(int(answer))


def score(predictions: list[str], answers: list[str]) -> float:
    """Fraction of replies whose extracted answer equals the reference."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)
