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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.run(args)


if __name__ == "__main__":
    main()
