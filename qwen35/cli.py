"""The `qwen35` command: train, generate, eval, plot."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    from qwen35 import Qwen35ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen35ForCausalLM.from_pretrained(args.model, dtype=dtype, device=device).eval()
    if args.chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        [ids], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
        generator=generator,
    )[0]
    print(tokenizer.decode(out, skip_special_tokens=True))


def _train(args: list[str]) -> None:
    """`train` takes a YAML path and dotted flags, which argparse cannot describe ahead of time."""
    from qwen35.train.config_parser import format_help

    rest = list(args)
    if "-h" in rest or "--help" in rest:
        print(TRAIN_USAGE + "\n" + format_help())
        return
    from qwen35.train.builtin import run_default_or_train

    run_default_or_train(train_config(rest))


def train_config(args: list[str]):
    """The run config of `qwen35 train ARGS`. The built-in default run's settings apply only to
    that run: with a config file, or a model or data of its own, a run starts from the defaults."""
    from qwen35.train.config_parser import load_run_config

    rest = list(args)
    yaml_path = rest.pop(0) if rest and not rest[0].startswith("-") else None
    cfg = load_run_config(yaml_path, rest)
    if yaml_path is None and cfg.model.path is None and cfg.model.preset is None and cfg.data.train_path is None:
        from qwen35.train.builtin import DEFAULT_RUN_CONFIG

        return load_run_config(DEFAULT_RUN_CONFIG, rest)
    return cfg


def _eval(args: argparse.Namespace) -> None:
    from qwen35.train.builtin import evaluate_model_dir

    evaluate_model_dir(args.model, args.data, args.limit)


def _merge(args: argparse.Namespace) -> None:
    """Base checkpoint + adapter -> one full HF checkpoint (each tensor in its stored dtype)."""
    from transformers import AutoTokenizer

    from qwen35 import Qwen35ForCausalLM
    from qwen35.lora import load_adapter, merge_lora

    model = merge_lora(load_adapter(Qwen35ForCausalLM.from_pretrained(args.model), args.adapter))
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.model}: {args.output}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("train", help="train: qwen35 train [CONFIG.yaml] [--section.key VALUE ...]; "
                        "without arguments, the built-in default run", add_help=False)

    evaluate = commands.add_parser("eval", help="exact-match accuracy on the built-in task's held-out set")
    evaluate.add_argument("--model", required=True, help="model directory")
    evaluate.add_argument("--data", help="task JSONL (default: the built-in held-out set)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    evaluate.set_defaults(run=_eval)

    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base model")
    merge.add_argument("--model", required=True, help="base model directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--output", required=True, help="directory for the merged HF checkpoint")
    merge.set_defaults(run=_merge)

    plot = commands.add_parser("plot", help="draw the loss curves of a run to OUTPUT_DIR/loss.png")
    plot.add_argument("output_dir")
    plot.set_defaults(run=_plot)

    gen = commands.add_parser("generate", help="generate text from a model directory")
    gen.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        _train(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
