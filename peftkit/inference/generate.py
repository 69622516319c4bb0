"""`peftkit generate RUN "prompt"...` and `peftkit chat RUN`: a run's adapter answering
prompts, rendered the way training rendered its samples.

A prompt becomes one user message (after the recipe's data.system_prompt, or --system)
rendered with the run's chat template and the generation prompt, tokenized without adding
special tokens: the exact tokens `peftkit.data.render` gave training for the same conversation. Runs
trained on raw prompt/completion or text data get the prompt as raw text (as does --raw).
Tokens are streamed as they are generated; temperature 0 (the default) is greedy decoding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from peftkit.data.formats import FORMATS
from peftkit.errors import UserError

RAW_FORMATS = tuple(name for name, fmt in FORMATS.items() if not fmt.chat)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def check(self) -> Sampling:
        problems = [text for bad, text in (
            (self.max_new_tokens <= 0, "--max-new-tokens must be > 0"),
            (self.temperature < 0, "--temperature must be >= 0 (0 = greedy)"),
            (not 0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.top_k < 0, "--top-k must be >= 0 (0 = off)")) if bad]
        if problems:
            raise UserError("; ".join(problems))
        return self

    def kwargs(self) -> dict:
        """Keyword arguments of transformers' `generate`."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def trained_format(path: Path, recipe) -> str:
    """The data format training used: the recipe's, or the one it detected (metrics.jsonl)."""
    from peftkit.run import rundir

    if recipe.data.format != "auto":
        return recipe.data.format
    found = [r.get("format") for r in rundir.read_metrics(path) if r.get("event") == "data"]
    return found[0] if found and found[0] else "chat"


def messages_for(history: list[dict], system: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def render(tokenizer, messages: list[dict], raw: bool) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (raw: the last message's text,
    with the special tokens the tokenizer adds to plain text, e.g. BOS)."""
    if raw:
        return tokenizer(messages[-1]["content"])["input_ids"]
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise UserError(f"the chat template rejected the conversation ({exc}); try --raw") \
            from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer plus any the model's generation config names (e.g. Llama 3's
    <|eot_id|>)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def complete(model, tokenizer, ids: list[int], sampling: Sampling, stream: bool = False) -> str:
    """The completion of token ids `ids` (decoded, special tokens skipped); printed to stdout
    token by token when `stream`."""
    import torch
    from transformers import TextStreamer, set_seed

    if sampling.seed is not None:
        set_seed(sampling.seed)
    input_ids = torch.tensor([ids], device=model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if stream else None
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_ids(model, tokenizer), use_cache=True,
                             **sampling.kwargs())
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def generate(path: str | Path, prompts: list[str], sampling: Sampling, system: str | None = None,
             raw: bool | None = None, stream: bool = True) -> list[str]:
    """Answer each prompt with the run's adapter; returns the answers."""
    from peftkit.run.runs import load_run

    sampling.check()
    if not prompts:
        raise UserError("give at least one prompt: peftkit generate RUN \"your prompt\"")
    recipe, model, tokenizer = load_run(path)
    raw = trained_format(Path(path), recipe) in RAW_FORMATS if raw is None else raw
    system = recipe.data.system_prompt if system is None else system
    answers = []
    for n, prompt in enumerate(prompts, 1):
        if stream and len(prompts) > 1:
            print(f"--- [{n}/{len(prompts)}] {prompt}", flush=True)
        ids = render(tokenizer, messages_for([{"role": "user", "content": prompt}], system), raw)
        answers.append(complete(model, tokenizer, ids, sampling, stream=stream))
    return answers


def chat(path: str | Path, sampling: Sampling, system: str | None = None, stdin=None) -> int:
    """A conversation on stdin: each line is a user turn, answered with the whole history in
    context. /reset starts over; /exit, /quit or end of input ends it."""
    from peftkit.run.runs import load_run

    sampling.check()
    stdin = stdin or sys.stdin
    recipe, model, tokenizer = load_run(path)
    system = recipe.data.system_prompt if system is None else system
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {Path(path)}: /reset starts over, /exit or Ctrl-D quits",
              file=sys.stderr)
    history: list[dict] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = render(tokenizer, messages_for(history, system), raw=False)
        answer = complete(model, tokenizer, ids, sampling, stream=True)
        # As in training data: the content without the space the template puts before it.
        history.append({"role": "assistant", "content": answer.strip()})
    return 0
