import json
import struct

import pytest

from qwen35.plot import plot_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (path / "metrics.jsonl").write_text(text)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # axes, curve and labels, not an empty canvas


def png_width(path):
    return struct.unpack(">I", path.read_bytes()[16:20])[0]  # IHDR chunk: width, then height


def test_plot_writes_a_png_of_the_training_loss(tmp_path):
    write_metrics(tmp_path, [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 50)])
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "loss.png"
    assert_png(out)


def test_plot_includes_eval_loss_and_accuracy_when_logged(tmp_path):
    records = [{"step": s, "loss": 3.0 / s} for s in range(1, 50)]
    records += [{"step": s, "eval_loss": 3.2 / s, "eval_accuracy": 1 - 1 / s} for s in (10, 20, 30)]
    write_metrics(tmp_path, records)
    out = plot_metrics(tmp_path)
    assert_png(out)
    loss_only = tmp_path / "loss_only"
    write_metrics(loss_only, records[:49])
    # The accuracy panel sits beside the loss panel, so the figure is wider.
    assert png_width(out) > png_width(plot_metrics(loss_only))


def test_plot_skips_a_last_line_cut_off_by_a_crash(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
                  tail='{"step": 3, "lo')
    assert_png(plot_metrics(tmp_path))


def test_corrupt_line_in_the_middle_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n'
                                            '{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        plot_metrics(tmp_path)


def test_missing_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        plot_metrics(tmp_path)


def test_metrics_without_loss_is_a_clear_error(tmp_path):
    write_metrics(tmp_path, [{"step": 1, "lr": 1e-4}])
    with pytest.raises(ValueError, match="no 'loss' values"):
        plot_metrics(tmp_path)
