"""`peftkit generate` and `peftkit chat`: answers from a run's adapter, for prompts given on
the command line or for turns read from stdin."""

from __future__ import annotations

from peftkit.cli.common import RUN_HELP, add_command
from peftkit.inference.generate import Sampling, chat, generate

GENERATE_HELP = "answer prompts with a run's adapter (streamed)"
GENERATE_EXAMPLES = """\
examples:
  peftkit generate runs/demo "What is the capital of Peru?" "What is the capital of Chile?"
  peftkit generate runs/tiny-demo "Sort: 9 4 7" --temperature 0.7 --top-p 0.9 --seed 1
  peftkit generate runs/my-run "Once upon a time" --raw --max-new-tokens 64"""
CHAT_HELP = "talk to a run's adapter: each stdin line is a user turn"
CHAT_EXAMPLES = """\
examples:
  peftkit chat runs/demo                   # /reset starts over, /exit quits
  printf 'Sort: 3 1 2\\n/exit\\n' | peftkit chat runs/tiny-demo"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "generate", cmd_generate, GENERATE_HELP, GENERATE_EXAMPLES)
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    _add_sampling_args(p)
    p.add_argument("--raw", action="store_true", default=None,
                   help="feed the prompt as raw text, without the chat template (the default "
                        "for runs trained on prompt_completion or text data)")
    p = add_command(subparsers, "chat", cmd_chat, CHAT_HELP, CHAT_EXAMPLES)
    p.add_argument("run", help=RUN_HELP)
    _add_sampling_args(p)


def _add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256,
                   metavar="N", help="token budget per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) = greedy, deterministic")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest token set with probability P")
    p.add_argument("--top-k", dest="top_k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (0 = no limit)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system message (default: the recipe's data.system_prompt)")


def _sampling(args) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def cmd_generate(args) -> int:
    generate(args.run, args.prompts, _sampling(args), system=args.system, raw=args.raw)
    return 0


def cmd_chat(args) -> int:
    return chat(args.run, _sampling(args), system=args.system)
