import json
import re

import pytest

from qwen35.data.task import build_task, exact_match, extract_answer, generate_problems, score


def test_task_files_are_a_pure_function_of_the_seed(tmp_path):
    a = build_task(tmp_path / "a", n_train=200, n_val=20, seed=3)
    b = build_task(tmp_path / "b", n_train=200, n_val=20, seed=3)
    c = build_task(tmp_path / "c", n_train=200, n_val=20, seed=4)
    assert a.train.read_bytes() == b.train.read_bytes() and a.val.read_bytes() == b.val.read_bytes()
    assert a.train.read_bytes() != c.train.read_bytes()


def test_every_answer_is_the_result_of_the_question():
    for p in generate_problems(500, seed=0, max_operand=50):
        a, b = map(int, re.findall(r"\d+", p.question))
        subtract = " left" in p.question or " lost " in p.question
        assert int(p.answer) == (a - b if subtract else a + b)
        assert 0 <= int(p.answer) <= 100


def test_validation_questions_never_appear_in_training(tmp_path):
    files = build_task(tmp_path, n_train=2000, n_val=200, seed=0, max_operand=10)
    def questions(path):
        return {json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()}
    assert len(questions(files.val)) == 200
    assert not questions(files.train) & questions(files.val)


def test_records_are_chats_with_the_answer_as_the_assistant_turn(tmp_path):
    files = build_task(tmp_path, n_train=5, n_val=5)
    record = json.loads(files.train.read_text().splitlines()[0])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][1]["content"] == record["answer"]


def test_too_many_problems_for_the_operand_range_is_an_error():
    with pytest.raises(ValueError, match="cannot draw"):
        generate_problems(5000, max_operand=0)


@pytest.mark.parametrize("reply, answer", [
    ("19", "19"), ("The answer is 19.", "19"), ("12 + 7 = 19", "19"),
    ("<think>\n12 and 7 make 19, not 20\n</think>\n\n19", "19"), ("\n</think>\n\n19", "19"),
    ("<think>\nstill thinking about 19", None), ("nineteen", None), ("-3", "-3"), ("007", "7"),
])
def test_extract_answer_takes_the_last_integer_outside_thinking(reply, answer):
    assert extract_answer(reply) == answer


def test_exact_match_and_score():
    assert exact_match("It is 19.", "19") and not exact_match("It is 18.", "19")
    assert score(["19", "no idea", "<think>\n</think>\n\n5"], ["19", "4", "5"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        score(["1", "2"], ["1"])
