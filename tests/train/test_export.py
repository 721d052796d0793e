"""`qwen35 export`: a resumable checkpoint -> the Hugging Face or PEFT directory of its weights."""

import json
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import Qwen3_5ForCausalLM

from qwen35 import Qwen35ForCausalLM
from qwen35.cli import main
from qwen35.errors import EXIT_USER_ERROR
from qwen35.lora import LoraSettings, apply_lora
from qwen35.train.config_parser import load_run_config
from qwen35.train.trainer import train
from reference import read_safetensors
from test_trainer import run_config, run_flags

STEPS = ["--train.max_steps", "6", "--train.save_steps", "3", "--checkpoint.keep_last", "0", "--train.eval_steps", "0"]


def checkpoint_weights(path, tmp_path) -> dict:
    """The model part of a DCP checkpoint, read by torch's own converter rather than our loader."""
    file = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(file))
    return torch.load(file, weights_only=False)["model"]


def logits(model, vocab_size):
    ids = torch.randint(0, vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 6-step run of the tiny preset (the built-in tokenizer) with checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("tiny")
    flags = run_flags(tmp, *STEPS)
    at = flags.index("--model.path")
    del flags[at : at + 2]
    return train(load_run_config(None, [*flags, "--model.preset", "tiny"])).output_dir


def export(*args):
    main(["export", *map(str, args)])


def test_a_checkpoint_exports_to_the_hf_format_with_its_weights_and_the_last_one_equals_final(tiny_run, tmp_path):
    step3 = tiny_run / "checkpoints" / "step_00000003"
    export("--checkpoint", step3, "--output", tmp_path / "step3")
    theirs = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "step3")
    ours = Qwen35ForCausalLM.from_pretrained(tiny_run / "final")  # the architecture; the weights follow
    missing, unexpected = ours.load_state_dict(checkpoint_weights(step3, tmp_path), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ours.tie_weights()
    assert (logits(theirs, ours.config.vocab_size) - logits(ours, ours.config.vocab_size)).abs().max() <= 1e-5
    final = read_safetensors(tiny_run / "final")
    assert any(not torch.equal(t, final[k]) for k, t in read_safetensors(tmp_path / "step3").items())  # not step 6

    export("--checkpoint", tiny_run, "--output", tmp_path / "latest")  # the output directory: its step 6
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == sorted(p.name for p in (tiny_run / "final").iterdir())
    latest = read_safetensors(tmp_path / "latest")
    assert latest.keys() == final.keys() and all(torch.equal(latest[k], final[k]) for k in final)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "latest" / name).read_bytes() == (tiny_run / "final" / name).read_bytes(), name


def test_an_adapter_checkpoint_exports_a_peft_directory_loadable_from_anywhere(tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)  # the run names its base model by a relative path
    flags = run_flags(tmp_path, *STEPS, "--lora.rank", "4", "--lora.alpha", "8", "--model.path", "model")
    result = train(load_run_config(None, flags))
    step3 = result.output_dir / "checkpoints" / "step_00000003"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    export("--checkpoint", step3, "--output", "adapter")
    config = json.loads((elsewhere / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    assert not (elsewhere / "adapter" / "model.safetensors").exists()

    peft = PeftModel.from_pretrained(Qwen3_5ForCausalLM.from_pretrained(tmp_path / "model"), elsewhere / "adapter")
    ours = Qwen35ForCausalLM.from_pretrained(tmp_path / "model")
    apply_lora(ours, LoraSettings(4, 8.0, 0.0, False, list(run_config(tmp_path).lora.target_modules)))
    missing, unexpected = ours.load_state_dict(checkpoint_weights(step3, tmp_path), strict=False)
    assert not unexpected and missing and all("lora_" not in k for k in missing)  # every adapter tensor read
    plain = Qwen35ForCausalLM.from_pretrained(tmp_path / "model")
    vocab = ours.config.vocab_size
    assert (logits(peft, vocab) - logits(ours, vocab)).abs().max() <= 1e-5
    assert (logits(plain, vocab) - logits(ours, vocab)).abs().max() > 1e-3  # the adapter is not a no-op

    export("--checkpoint", result.output_dir, "--output", tmp_path / "latest")
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == sorted(p.name for p in result.export_dir.iterdir())
    assert (tmp_path / "latest" / "adapter_config.json").read_text() == (result.export_dir / "adapter_config.json").read_text()
    latest, final = read_safetensors(tmp_path / "latest"), read_safetensors(result.export_dir)
    assert latest.keys() == final.keys() and all(torch.equal(latest[k], final[k]) for k in final)


def refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stopped:
        export(*args)
    assert stopped.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_export_refusals_name_the_checkpoint_and_need_overwrite_for_an_existing_output(tiny_run, tmp_path, capsys):
    out = ["--output", tmp_path / "out"]
    assert "neither a checkpoint" in refused(capsys, "--checkpoint", tmp_path, *out)
    assert "does not exist" in refused(capsys, "--checkpoint", tmp_path / "missing", *out)

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    step3, step6 = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000006"
    partial = step6.rename(step6.with_name(step6.name + ".partial"))
    assert "incomplete" in refused(capsys, "--checkpoint", partial, *out)
    partial.rename(step6)
    shard = next(step6.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert f"checkpoint {step6} is unreadable" in refused(capsys, "--checkpoint", run, *out)
    (step3 / ".metadata").unlink()
    assert f"checkpoint {step3} is incomplete" in refused(capsys, "--checkpoint", step3, *out)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    (tmp_path / "out").mkdir()
    assert "--overwrite" in refused(capsys, "--checkpoint", tiny_run, *out)
    export("--checkpoint", tiny_run, *out, "--overwrite")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_vision_language_checkpoint_exports_with_its_processor_files_as_final(tmp_path):
    """The tiny-vl preset, two steps on image, video and text records: the export of its last
    checkpoint equals the trainer's own `final/` file for file, the image and video processors'
    settings included."""
    import numpy as np
    from PIL import Image

    from reference import write_video

    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    write_video(tmp_path / "blue.mp4", np.full((8, 64, 64, 3), (0, 0, 255), dtype=np.uint8), fps=4)
    records = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "red.png"},
                                                          {"type": "text", "text": "Colour?"}]},
                             {"role": "assistant", "content": "red"}]},
               {"conversations": [{"from": "human", "value": "<video>Colour?"}, {"from": "gpt", "value": "blue"}],
                "videos": ["blue.mp4"]},
               {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}] * 2
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    result = train(load_run_config(None, [
        "--model.preset", "tiny-vl", "--data.train_path", str(tmp_path / "d.jsonl"), "--data.seq_len", "128",
        "--data.image_min_pixels", "4096", "--data.image_max_pixels", "8192", "--data.video_fps", "1",
        "--data.video_max_pixels", "16384", "--train.max_steps", "2",
        "--train.save_steps", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
        "--train.output_dir", str(tmp_path / "run"), "--log.tensorboard", "false"]))
    export("--checkpoint", result.output_dir, "--output", tmp_path / "exported")
    final, exported = result.export_dir, tmp_path / "exported"
    names = sorted(p.name for p in final.iterdir())
    assert "preprocessor_config.json" in names and sorted(p.name for p in exported.iterdir()) == names
    weights, expected = read_safetensors(exported), read_safetensors(final)
    assert any(k.startswith("model.visual.") for k in expected)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    for name in names:
        if not name.endswith(".safetensors"):
            assert (exported / name).read_bytes() == (final / name).read_bytes(), name
    # the run's pixel budget, not the processor's default, travels with the export
    assert json.loads((exported / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 8192
    video = json.loads((exported / "video_preprocessor_config.json").read_text())
    assert video["fps"] == 1 and video["size"]["longest_edge"] == 16384
