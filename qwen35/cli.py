"""The `qwen35` command: train, rl, generate, eval, export, merge, plot.

Exit codes: 0 done; 1 an internal error (with its traceback); 2 a user error (bad config, data,
path, or a refused output-directory state; one message, no traceback unless `--debug` or
`QWEN35_DEBUG=1`); 3 training diverged (too many non-finite steps in a row); 130/143 training
stopped by SIGINT/SIGTERM after writing a checkpoint (128 + the signal's number).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from qwen35.errors import UserError


def _generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from qwen35 import Qwen35ForCausalLM, Qwen35ForConditionalGeneration
    from qwen35.model.config import read_config_json

    vision = "vision_config" in _as_user_error(read_config_json, args.model)
    for flag, paths in (("--image", args.image), ("--video", args.video)):
        if paths and not vision:
            raise UserError(f"{flag}: {args.model} holds a text-only model (its config.json has no vision_config); "
                            f"{flag[2:]}s need a vision-language model")
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_class = Qwen35ForConditionalGeneration if vision else Qwen35ForCausalLM
    model = model_class.from_pretrained(args.model, dtype=dtype, device=device).eval()
    # the media's placeholders come first, images then videos, then the text (as the chat
    # template writes media parts)
    if args.chat:
        parts = [{"type": "image"}] * len(args.image) + [{"type": "video"}] * len(args.video)
        content = parts + [{"type": "text", "text": args.prompt}] if parts else args.prompt
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
            return_dict=False, enable_thinking=args.thinking,
        )
    else:
        ids = tokenizer(IMAGE_PLACEHOLDER * len(args.image) + VIDEO_PLACEHOLDER * len(args.video) + args.prompt)["input_ids"]
    media = {}
    if args.image or args.video:
        ids, media = _media_inputs(args.model, args.image, args.video, ids, tokenizer, model.config)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        [ids], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
        generator=generator, **media,
    )[0]
    if not args.chat:
        print(tokenizer.decode(out, skip_special_tokens=True))
        return
    thinking, answer = split_reply(tokenizer.decode(out, skip_special_tokens=False))
    if args.thinking and thinking:
        print(f"[thinking]\n{thinking}\n[answer]")
    print(answer)


# what Qwen3.5's chat template writes per image and per video
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _media_inputs(model_dir: str, images: list[str], videos: list[str], ids: list[int], tokenizer,
                  config) -> tuple[list[int], dict]:
    """`ids` with each image's `<|image_pad|>` and each video's `<|video_pad|>` expanded as
    transformers' processor expands them, and the media's pixels and grids, through the model
    directory's own image and video processors (transformers', as in training). A file that
    cannot be decoded is named in a UserError."""
    import numpy as np

    from qwen35.data.media import expand_placeholders, load_images
    from qwen35.data.processor import load_image_processor, load_video_processor
    from qwen35.data.video import video_clip, video_pixels, video_placeholder

    media, counts, pieces = {}, [], []
    if images:
        processor = _as_user_error(load_image_processor, model_dir)
        try:
            pixels = processor(images=load_images(tuple(images)), return_tensors="pt")
        except OSError as e:
            raise UserError(f"--image: {e}") from None
        media.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        counts = (pixels["image_grid_thw"].prod(-1) // processor.merge_size ** 2).tolist()
    if videos:
        processor = load_video_processor(model_dir)
        if processor is None:
            raise UserError(f"--video: {model_dir} has no video_preprocessor_config.json")
        try:
            clips = [video_clip(path, processor) for path in videos]
            media.update(video_pixels(clips, processor))
        except OSError as e:
            raise UserError(f"--video: {e}") from None
        pieces = [tokenizer(video_placeholder(c, processor), add_special_tokens=False)["input_ids"] for c in clips]
    ids = np.asarray(ids)
    expanded, _ = expand_placeholders(ids, np.zeros(len(ids), dtype=bool), config.image_token_id, counts,
                                      config.video_token_id, pieces)
    return expanded.tolist(), media


def split_reply(text: str) -> tuple[str, str]:
    """An assistant turn as generated after the chat template's generation prompt -> (thinking,
    answer), without template markers: the turn ends at `<|im_end|>`; the thinking, if any, is
    what comes before the last `</think>` (the prompt already opened `<think>`)."""
    text = text.split("<|im_end|>", 1)[0].replace("<|endoftext|>", "")
    thinking, marker, answer = text.rpartition("</think>")
    if not marker:
        return "", text.strip()
    return thinking.replace("<think>", "").strip(), answer.strip()


def _train(args: list[str]) -> int:
    """`train` takes a YAML path and dotted flags, which argparse cannot describe ahead of time."""
    from qwen35.train.config_parser import format_help

    rest = list(args)
    if "-h" in rest or "--help" in rest:
        print(TRAIN_USAGE + "\n" + format_help())
        return 0
    from qwen35.train.builtin import run_default_or_train

    cfg = _as_user_error(train_config, rest)
    return _finish(run_default_or_train(cfg))


def _as_user_error(read_config, *args):
    """A config read whose ValueError / FileNotFoundError is the user's: each names the key, file
    or line, so it is printed as one line (exit 2)."""
    try:
        return read_config(*args)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


def _finish(result) -> int:
    """The end of a `train` or `rl` run: leave the process group, and exit 128 + the signal that
    stopped the run (130 / 143), else 0."""
    from qwen35.parallel import leave_process_group

    leave_process_group()
    return 128 + result.stopped_by_signal if result.stopped_by_signal else 0


def train_config(args: list[str]):
    """The run config of `qwen35 train ARGS`. The built-in default run's settings apply only to
    that run: with a config file, or a model or data of its own, a run starts from the defaults."""
    from qwen35.train.config_parser import load_run_config, override_keys

    rest = list(args)
    yaml_path = rest.pop(0) if rest and not rest[0].startswith("-") else None
    # decided from the flags, before any checking: a flag may be valid only with the built-in
    # run's settings (optim.in_backward needs its one micro-batch per step)
    if yaml_path is None and not override_keys(rest) & {"model.path", "model.preset", "data.train_path"}:
        from qwen35.train.builtin import DEFAULT_RUN_CONFIG, fit_micro_batch

        return fit_micro_batch(load_run_config(DEFAULT_RUN_CONFIG, rest))
    return load_run_config(yaml_path, rest)


def _rl(args: list[str]) -> int:
    """`rl`: without arguments the built-in run; else a YAML path and dotted flags, read by the
    parser of `train` into the GRPO run config (`qwen35.rl.config`)."""
    from qwen35.rl.config import RLRunConfig
    from qwen35.train.config_parser import format_help, load_run_config

    if "-h" in args or "--help" in args:
        print(RL_USAGE + "\n" + format_help(RLRunConfig))
        return 0
    if not args:
        from qwen35.rl.builtin import run_builtin

        run_builtin()
        return 0
    rest = list(args)
    yaml_path = rest.pop(0) if not rest[0].startswith("-") else None
    cfg = _as_user_error(load_run_config, yaml_path, rest, RLRunConfig)
    from qwen35.rl.run import run_rl

    return _finish(run_rl(cfg))


def _eval(args: argparse.Namespace) -> None:
    from qwen35.evaluate import run_eval

    run_eval(args.model, args.data, args.limit, args.seq_len)


def _merge(args: argparse.Namespace) -> None:
    """Base checkpoint + adapter -> one full HF checkpoint (each tensor in its stored dtype)."""
    from transformers import AutoTokenizer

    from qwen35 import Qwen35ForCausalLM
    from qwen35.lora import load_adapter, merge_lora

    model = merge_lora(load_adapter(Qwen35ForCausalLM.from_pretrained(args.model), args.adapter))
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.model}: {args.output}")


def _export(args: argparse.Namespace) -> None:
    from qwen35.train.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.output, args.overwrite)


def _plot(args: argparse.Namespace) -> None:
    from qwen35.plot import plot_metrics

    print(plot_metrics(args.output_dir))


TRAIN_USAGE = """usage: qwen35 train [CONFIG.yaml] [--section.key VALUE ...]

Without a config file and without a model or data of its own (model.path, model.preset,
data.train_path), this is the built-in default run (qwen35/train/default.yaml: the tiny preset
trained from scratch on a generated arithmetic task, then evaluated). Any other run starts from
the defaults below and needs model.path or model.preset; without data.train_path it trains on
the generated task. Keys may be set in the YAML file or as flags:
"""


RL_USAGE = """usage: qwen35 rl [CONFIG.yaml] [--section.key VALUE ...]

Without arguments, the built-in GRPO run: starts from the built-in SFT run's export
(outputs/default/final, trained first when missing), runs GRPO on the generated arithmetic task
with exact match as the reward, and prints held-out exact match before and after (also in
outputs/default-rl/eval.json). Otherwise a GRPO run of model.path (or model.preset) on the prompt
records of data.train_path (configs/rl/dapo_math_4b.yaml is the miles Qwen3.5 recipe). Docs:
docs/rl.md. Keys may be set in the YAML file or as flags:
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (or set QWEN35_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("train", help="train: qwen35 train [CONFIG.yaml] [--section.key VALUE ...]; "
                        "without arguments, the built-in default run", add_help=False)

    commands.add_parser("rl", help="GRPO: qwen35 rl [CONFIG.yaml] [--section.key VALUE ...]; without arguments, "
                        "the built-in run", add_help=False)

    evaluate = commands.add_parser("eval", help="loss and perplexity on a data file (assistant tokens); "
                                   "on the built-in task's files also exact match")
    evaluate.add_argument("--model", required=True, help="model directory: a full export or a LoRA adapter")
    evaluate.add_argument("--data", help="any data file the trainer reads (default: the held-out file of "
                          "the run that wrote the model, its data.val_path, or the built-in task's beside it)")
    evaluate.add_argument("--limit", type=int, default=None, help="exact match on the first N problems only")
    evaluate.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser("export", help="a resumable checkpoint -> Hugging Face format (full weights) "
                                 "or a PEFT adapter directory (adapter runs), as the run's final export")
    export.add_argument("--checkpoint", required=True, help="a checkpoint (OUT/checkpoints/step_NNNNNNNN), or a "
                        "run's output directory for its latest complete checkpoint")
    export.add_argument("--output", required=True, help="directory to write (must not exist)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    export.set_defaults(run=_export)

    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model")
    merge.add_argument("--model", required=True, help="base model directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--output", required=True, help="directory for the merged HF checkpoint")
    merge.set_defaults(run=_merge)

    plot = commands.add_parser("plot", help="draw the loss curves of a run to OUTPUT_DIR/loss.png")
    plot.add_argument("output_dir")
    plot.set_defaults(run=_plot)

    gen = commands.add_parser("generate", help="generate text from a model directory, with images and "
                              "videos for a vision-language model")
    gen.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer; "
                     "a vision-language model's also preprocessor_config.json, video_preprocessor_config.json)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image for a vision-language model, placed before the prompt's text (repeat for "
                     "several, in order)")
    gen.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video for a vision-language model (decoded with PyAV, frames sampled by the model's "
                     "video processor), placed after the images and before the text (repeat for several)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template and "
                     "print only the answer")
    gen.add_argument("--thinking", action="store_true", help="with --chat: let the model think first "
                     "(enable_thinking) and print its thinking before the answer")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs a command; exits with a non-zero code (see the module docstring) when it did not finish."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QWEN35_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv and argv[0] == "train":
            code = _train(argv[1:])
        elif argv and argv[0] == "rl":
            code = _rl(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            args.run(args)
            code = 0
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
