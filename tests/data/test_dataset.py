import json
from collections import Counter

import pytest

from qwen35.data.dataset import build_datasets


def write_texts(path, prefix, n):
    path.write_text("".join(json.dumps({"text": f"{prefix} {i}"}) + "\n" for i in range(n)))
    return path


def sample_texts(tokenizer, data) -> list[str]:
    """The decoded documents of every row (padding left out)."""
    texts = []
    for i in range(len(data)):
        row = data[i]
        bounds = row["cu_seqlens"].tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if row["input_ids"][lo] != tokenizer.pad_token_id:
                texts.append(tokenizer.decode(row["input_ids"][lo:hi]))
    return texts


def test_weights_set_each_sources_share_of_the_training_samples(tokenizer, tmp_path):
    write_texts(tmp_path / "a1.jsonl", "apple", 30)
    write_texts(tmp_path / "a2.jsonl", "apple", 30)
    write_texts(tmp_path / "b.jsonl", "berry", 20)
    spec = f"{tmp_path}/a*.jsonl:0.25,{tmp_path}/b.jsonl:0.75"
    data = build_datasets({"train_path": spec, "seq_len": 64}, tokenizer, progress=False)
    texts = sample_texts(tokenizer, data.train)
    kinds = Counter(t.split()[0] for t in texts)
    assert kinds == {"apple": 20, "berry": 60}  # 80 samples: 25% and 75% of them
    berries = Counter(texts[i] for i in range(len(texts)) if texts[i].startswith("berry"))
    assert set(berries.values()) == {3}  # 20 berries upsampled three times each


def test_without_weights_every_sample_is_used_once(tokenizer, tmp_path):
    write_texts(tmp_path / "a.jsonl", "apple", 7)
    write_texts(tmp_path / "b.jsonl", "berry", 5)
    data = build_datasets({"train_path": f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl", "seq_len": 64},
                          tokenizer, progress=False)
    assert sorted(sample_texts(tokenizer, data.train)) == sorted(
        [f"apple {i}<|im_end|>" for i in range(7)] + [f"berry {i}<|im_end|>" for i in range(5)])
    assert data.val is None


def test_val_fraction_holds_out_samples_that_are_not_trained_on(tokenizer, tmp_path):
    write_texts(tmp_path / "a.jsonl", "apple", 50)
    config = {"train_path": str(tmp_path / "a.jsonl"), "val_fraction": 0.2, "seq_len": 64, "seed": 1}
    data = build_datasets(config, tokenizer, progress=False)
    train, val = sample_texts(tokenizer, data.train), sample_texts(tokenizer, data.val)
    assert (len(train), len(val)) == (40, 10)
    assert not set(train) & set(val)
    again = build_datasets(config, tokenizer, progress=False)
    assert sample_texts(tokenizer, again.val) == val


def test_val_path_is_a_separate_validation_set(tokenizer, tmp_path):
    write_texts(tmp_path / "train.jsonl", "apple", 5)
    write_texts(tmp_path / "val.jsonl", "berry", 3)
    data = build_datasets({"train_path": str(tmp_path / "train.jsonl"),
                           "val_path": str(tmp_path / "val.jsonl"), "seq_len": 64},
                          tokenizer, progress=False)
    assert sorted(sample_texts(tokenizer, data.val)) == [f"berry {i}<|im_end|>" for i in range(3)]


def test_stats_count_malformed_and_dropped_samples(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": "short"}), "{broken",
                               json.dumps({"text": "long " * 100})]) + "\n")
    data = build_datasets({"train_path": str(path), "seq_len": 32, "overlong": "drop"},
                          tokenizer, progress=False)
    stats = data.stats
    assert (stats.records, stats.malformed, stats.train.dropped_overlong, stats.train.documents) == (3, 1, 1, 1)
    assert stats.problems[0].startswith(f"{path}:2: invalid JSON")
    assert "1 malformed" in stats.summary() and f"{path}:2" in stats.summary()


def test_val_path_and_val_fraction_are_exclusive(tokenizer, tmp_path):
    write_texts(tmp_path / "a.jsonl", "apple", 5)
    with pytest.raises(ValueError, match="exclusive"):
        build_datasets({"train_path": str(tmp_path / "a.jsonl"), "val_path": str(tmp_path / "a.jsonl"),
                        "val_fraction": 0.1}, tokenizer, progress=False)


def test_a_yaml_list_of_path_weight_mappings_reaches_training(tokenizer, tmp_path):
    from qwen35.train.config_parser import load_run_config

    write_texts(tmp_path / "a.jsonl", "apple", 10)
    write_texts(tmp_path / "b.jsonl", "berry", 10)
    (tmp_path / "run.yaml").write_text(
        f"data:\n  seq_len: 64\n  train_path:\n"
        f"    - {{path: {tmp_path}/a.jsonl, weight: 1}}\n    - {{path: {tmp_path}/b.jsonl, weight: 3}}\n")
    cfg = load_run_config(tmp_path / "run.yaml", [])
    kinds = Counter(t.split()[0] for t in sample_texts(tokenizer, build_datasets(
        cfg.data, tokenizer, progress=False).train))
    assert kinds == {"apple": 5, "berry": 15}
    plain = load_run_config(None, ["--data.train_path", f"{tmp_path}/a.jsonl,{tmp_path}/b.jsonl",
                                   "--data.seq_len", "64"])
    kinds = Counter(t.split()[0] for t in sample_texts(tokenizer, build_datasets(
        plain.data, tokenizer, progress=False).train))
    assert kinds == {"apple": 10, "berry": 10}


# A ChatML template where enable_thinking=false puts an empty thinking block before each answer.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{% if m.role == 'assistant' and enable_thinking is defined and enable_thinking is false %}"
            "<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}")


def test_chat_template_file_and_template_kwargs_reach_the_renderer(tokenizer, tmp_path):
    from qwen35.train.config_parser import load_run_config

    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    flags = ["--data.train_path", str(tmp_path / "d.jsonl"), "--data.seq_len", "64",
             "--data.chat_template", str(tmp_path / "template.jinja")]

    def rendered(*extra):
        cfg = load_run_config(None, flags + list(extra))
        return sample_texts(tokenizer, build_datasets(cfg.data, tokenizer, progress=False).train)

    assert rendered() == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"]
    assert rendered("--data.template_kwargs", "{enable_thinking: false}") == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n"]
