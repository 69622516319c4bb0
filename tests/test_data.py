"""peftkit.data: sources, formats, chat rendering, loss masks, truncation, splits, prompts."""

import copy
import csv
import json
import os
import time

import pytest

from peftkit.data.dataset import build
from peftkit.data.example import IGNORE
from peftkit.data.formats import FORMATS, detect_format, to_messages
from peftkit.data.render import prompt_of, tokenize_record
from peftkit.data.sources import load_records, resolve_source
from peftkit.recipe import Data
from peftkit.recipe.schema import DATA_FORMATS
from peftkit.errors import UserError

CHAT = {"messages": [{"role": "user", "content": "hello world"},
                     {"role": "assistant", "content": "the quick fox"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hello world"},
                              {"from": "gpt", "value": "the quick fox"}]}
ALPACA = {"instruction": "sort the list", "input": "3 1 2", "output": "1 2 3"}
PROMPT_COMPLETION = {"prompt": "Q: reverse abc\nA:", "completion": " cba"}
TEXT = {"text": "the lazy dog sleeps"}
RECORDS = {"chat": CHAT, "sharegpt": SHAREGPT, "alpaca": ALPACA, "prompt_completion": PROMPT_COMPLETION,
           "text": TEXT}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write(path, rows):
    """Write rows as .jsonl/.json/.csv/.parquet, chosen by the suffix of `path`."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return str(path)


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


# ---------------------------------------------------------------------------------------------
# Loss masks

def test_chat_prompt_masked_completion_and_eos_trained(bpe_tokenizer):
    tok = bpe_tokenizer
    example = tokenize_record(CHAT, "chat", tok, Data(), "x")
    prompt = ids(tok, "<|bos|>User: hello world\nAssistant:")
    completion = ids(tok, " the quick fox<|eos|>")
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    assert completion[-1] == tok.eos_token_id
    # The sample ends at EOS: the template's "\n" after it is not part of it.
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE] * len(prompt) + completion


def test_multi_turn_trains_every_assistant_turn(bpe_tokenizer):
    tok = bpe_tokenizer
    record = {"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "sort 3 1"},
                           {"role": "assistant", "content": "1 3"},
                           {"role": "user", "content": "reverse it"},
                           {"role": "assistant", "content": "3 1"}]}
    example = tokenize_record(record, "chat", tok, Data(), "x")
    p1 = ids(tok, "<|bos|>System: be brief\nUser: sort 3 1\nAssistant:")
    c1 = ids(tok, " 1 3<|eos|>")
    p2 = ids(tok, "\nUser: reverse it\nAssistant:")  # the newline after EOS opens turn 2
    c2 = ids(tok, " 3 1<|eos|>")
    assert example.input_ids == p1 + c1 + p2 + c2
    assert example.labels == [IGNORE] * len(p1) + c1 + [IGNORE] * len(p2) + c2
    assert example.labels.count(tok.eos_token_id) == 2


def test_loss_on_all_trains_every_token(bpe_tokenizer):
    for fmt, record in RECORDS.items():
        example = tokenize_record(record, fmt, bpe_tokenizer, Data(loss_on="all"), "x")
        assert example.labels == example.input_ids, fmt


def test_eos_appended_when_the_template_does_not_emit_it(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    example = tokenize_record(CHAT, "chat", tok, Data(), "x")
    prompt = ids(tok, "user: hello world\nassistant:")
    completion = ids(tok, " the quick fox\n") + [tok.eos_token_id]
    assert example.input_ids == prompt + completion
    assert example.labels == [IGNORE] * len(prompt) + completion


def test_turns_after_the_last_answer_are_context_only(bpe_tokenizer):
    tok = bpe_tokenizer
    record = {"messages": CHAT["messages"] + [{"role": "user", "content": "thanks"}]}
    example = tokenize_record(record, "chat", tok, Data(), "x")
    tail = ids(tok, "\nUser: thanks\n")
    assert example.input_ids[-len(tail):] == tail
    assert example.labels[-len(tail):] == [IGNORE] * len(tail)


def test_raw_formats(bpe_tokenizer):
    tok, eos = bpe_tokenizer, bpe_tokenizer.eos_token_id
    example = tokenize_record(PROMPT_COMPLETION, "prompt_completion", tok, Data(), "x")
    prompt, completion = ids(tok, "Q: reverse abc\nA:"), ids(tok, " cba") + [eos]
    assert example.input_ids == prompt + completion  # no chat template, no BOS (tok adds none)
    assert example.labels == [IGNORE] * len(prompt) + completion
    example = tokenize_record(TEXT, "text", tok, Data(), "x")
    assert example.input_ids == example.labels == ids(tok, "the lazy dog sleeps") + [eos]


def test_alpaca_renders_as_a_chat(bpe_tokenizer):
    tok = bpe_tokenizer
    as_chat = chat("sort the list\n\n3 1 2", "1 2 3")
    assert tokenize_record(ALPACA, "alpaca", tok, Data(), "x") == \
        tokenize_record(as_chat, "chat", tok, Data(), "x")
    no_input = {**ALPACA, "input": ""}
    assert tokenize_record(no_input, "alpaca", tok, Data(), "x") == \
        tokenize_record(chat("sort the list", "1 2 3"), "chat", tok, Data(), "x")


def test_system_prompt_is_prepended_unless_the_row_has_one(bpe_tokenizer):
    tok, cfg = bpe_tokenizer, Data(system_prompt="be brief")
    example = tokenize_record(CHAT, "chat", tok, cfg, "x")
    assert example.input_ids[:len(ids(tok, "<|bos|>System: be brief\n"))] == \
        ids(tok, "<|bos|>System: be brief\n")
    own = {"messages": [{"role": "system", "content": "be kind"}] + CHAT["messages"]}
    assert to_messages(own, "chat", "x", "be brief")[0]["content"] == "be kind"


# ---------------------------------------------------------------------------------------------
# ShareGPT and tool use

def test_sharegpt_trains_every_gpt_turn_token_by_token(bpe_tokenizer):
    tok = bpe_tokenizer
    record = {"conversations": [{"from": "system", "value": "be brief"},
                                {"from": "human", "value": "sort 3 1"},
                                {"from": "gpt", "value": "1 3"},
                                {"from": "user", "value": "reverse it"},
                                {"from": "assistant", "value": "3 1"}]}
    example = tokenize_record(record, "sharegpt", tok, Data(), "x")
    p1 = ids(tok, "<|bos|>System: be brief\nUser: sort 3 1\nAssistant:")
    c1 = ids(tok, " 1 3<|eos|>")
    p2 = ids(tok, "\nUser: reverse it\nAssistant:")
    c2 = ids(tok, " 3 1<|eos|>")
    assert example.input_ids == p1 + c1 + p2 + c2
    assert example.labels == [IGNORE] * len(p1) + c1 + [IGNORE] * len(p2) + c2
    # a system prompt kept beside the turns (some exports) opens the conversation
    beside = {"system": "be brief", "conversations": record["conversations"][1:]}
    assert tokenize_record(beside, "sharegpt", tok, Data(), "x") == example


def test_sharegpt_bad_turns_are_named(bpe_tokenizer):
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    with pytest.raises(UserError, match=r"^x: conversations\[1\] = .*robot.* is not a valid "
                                        r"turn; expected \"conversations\""):
        tokenize_record(bad, "sharegpt", bpe_tokenizer, Data(), "x")
    only_human = {"conversations": [{"from": "human", "value": "a"}]}
    with pytest.raises(UserError, match=r"x: no assistant turn"):
        tokenize_record(only_human, "sharegpt", bpe_tokenizer, Data(), "x")


# A chat template that renders tools, tool calls and tool results (test-only; the tiny models'
# template, like many, has none of them).
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}{{ '\\n' }}{% endif %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
TOOL_ROW = {"tools": [ADD], "messages": [
    {"role": "user", "content": "2 + 3?"},
    # OpenAI's format: content null, arguments as a JSON string
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "assistant", "content": "5"}]}


@pytest.fixture
def tool_tokenizer(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_tool_calls_are_learned_and_tool_results_are_context(tool_tokenizer):
    tok = tool_tokenizer
    example = tokenize_record(TOOL_ROW, "chat", tok, Data(), "x")
    p1 = ids(tok, "<|bos|>Tools: add\nUser: 2 + 3?\nAssistant:")
    c1 = ids(tok, ' <call>add {"a": 2, "b": 3}</call><|eos|>')  # the call, then EOS
    p2 = ids(tok, "\nTool: 5\nAssistant:")  # the tool's result: prompt, no loss
    c2 = ids(tok, " 5<|eos|>")
    assert example.input_ids == p1 + c1 + p2 + c2
    assert example.labels == [IGNORE] * len(p1) + c1 + [IGNORE] * len(p2) + c2
    # arguments given as an object render the same as the JSON string
    as_object = copy.deepcopy(TOOL_ROW)
    as_object["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    assert tokenize_record(as_object, "chat", tok, Data(), "x") == example


def test_sharegpt_tool_turns_render_with_a_tools_template(tool_tokenizer):
    tok = tool_tokenizer
    record = {"conversations": [{"from": "human", "value": "2 + 3?"},
                                {"from": "gpt", "value": "<call>add</call>"},
                                {"from": "function", "value": "5"},
                                {"from": "gpt", "value": "5"}]}
    example = tokenize_record(record, "sharegpt", tok, Data(), "x")
    p1, c1 = ids(tok, "<|bos|>User: 2 + 3?\nAssistant:"), ids(tok, " <call>add</call><|eos|>")
    p2, c2 = ids(tok, "\nTool: 5\nAssistant:"), ids(tok, " 5<|eos|>")
    assert example.input_ids == p1 + c1 + p2 + c2
    assert example.labels == [IGNORE] * len(p1) + c1 + [IGNORE] * len(p2) + c2


@pytest.mark.parametrize("template", ["tests' (ignores tools)", "peftkit's (raises on 'tool')"])
def test_tool_use_is_refused_where_the_template_cannot_render_it(bpe_tokenizer, tmp_path,
                                                                 template):
    from peftkit.model.loading import DEFAULT_CHAT_TEMPLATE

    tok = copy.deepcopy(bpe_tokenizer)
    if template.startswith("peftkit"):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    with pytest.raises(UserError) as info:
        tokenize_record(TOOL_ROW, "chat", tok, Data(), "x")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("x: the conversation has tool calls and tool results and tool "
                              "definitions, which the chat template of ")
    assert "does not render; use a model whose chat template supports tools" in message
    calls_only = {"messages": TOOL_ROW["messages"][:2]}
    with pytest.raises(UserError, match=r"^x: the conversation has tool calls, which"):
        tokenize_record(calls_only, "chat", tok, Data(), "x")
    # with data.skip_bad_rows the tool rows are skipped and counted, the others train
    path = write(tmp_path / "t.jsonl", [CHAT, TOOL_ROW, CHAT])
    train, _, _, stats = build(Data(train=path, eval_size=0, skip_bad_rows=True), tok, seed=0)
    assert (len(train), stats.skipped) == (2, 1)


def test_a_malformed_tool_call_is_named(tool_tokenizer):
    bad = copy.deepcopy(TOOL_ROW)
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(UserError, match=r"^x: messages\[1\]\.tool_calls has .* not a valid "
                                        r"call"):
        tokenize_record(bad, "chat", tool_tokenizer, Data(), "x")


def test_a_file_of_another_format_names_the_setting_to_change(tmp_path, bpe_tokenizer):
    path = write(tmp_path / "alpaca.jsonl", [ALPACA, ALPACA])
    with pytest.raises(UserError) as info:
        build(Data(train=path, format="chat", eval_size=0), bpe_tokenizer, seed=0)
    assert str(info.value) == (f"{path}:1: data.format=chat, but the data looks like alpaca "
                               "(its first row has 'instruction', 'output'); set "
                               "data.format=alpaca, or auto to detect each source's format")
    chats = write(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(UserError, match=r"chat\.jsonl:1: data\.format=alpaca, but the data looks "
                                        r"like chat \(its first row has 'messages'\)"):
        build(Data(train=path, eval=chats, format="alpaca"), bpe_tokenizer, seed=0)
    # a later row of another shape is a bad row: it says what is missing
    mixed = write(tmp_path / "mixed.jsonl", [CHAT, TEXT])
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: 'messages' is missing"):
        build(Data(train=mixed, format="chat", eval_size=0), bpe_tokenizer, seed=0)


# ---------------------------------------------------------------------------------------------
# Files and formats

# every format from every file type, except conversations from CSV (a cell cannot hold a list)
FILE_CASES = [(fmt, suffix) for fmt in RECORDS for suffix in (".jsonl", ".json", ".csv", ".parquet")
              if not (fmt in ("chat", "sharegpt") and suffix == ".csv")]


@pytest.mark.parametrize("fmt,suffix", FILE_CASES)
def test_every_format_from_every_file_type(tmp_path, bpe_tokenizer, fmt, suffix):
    record = RECORDS[fmt]
    path = write(tmp_path / f"train{suffix}", [record, record])
    rows, skipped = load_records(path)
    assert skipped == 0 and len(rows) == 2
    assert detect_format(rows[0], rows[0].where) == fmt
    expected = tokenize_record(record, fmt, bpe_tokenizer, Data(), "x")
    assert tokenize_record(rows[1], fmt, bpe_tokenizer, Data(), "x") == expected
    train, _, _, stats = build(Data(train=path, eval_size=0), bpe_tokenizer, seed=0)
    assert train == [expected, expected] and stats.format == fmt


def test_csv_cells_stay_exact_strings(tmp_path):
    path = write(tmp_path / "t.csv", [{"prompt": "NA", "completion": "007"},
                                      {"prompt": "x", "completion": "1.50"}])
    rows, _ = load_records(path)
    assert [(r["prompt"], r["completion"]) for r in rows] == [("NA", "007"), ("x", "1.50")]


def test_auto_detection():
    assert [detect_format(r, "x") for r in RECORDS.values()] == list(RECORDS)
    # columnar files fill absent columns with None: those do not count as present
    assert detect_format({"messages": None, "text": "a"}, "x") == "text"
    with pytest.raises(UserError, match=r"f\.jsonl:3: cannot tell the data format.*'question'"):
        detect_format({"question": "q"}, "f.jsonl:3")


def test_the_recipe_offers_exactly_the_formats_of_the_table():
    # recipe/ cannot import data/, so it keeps its own list of data.format names.
    assert DATA_FORMATS == ("auto", *FORMATS)
    assert list(RECORDS) == list(FORMATS)  # and every format is exercised in this file
    with pytest.raises(UserError, match=r"^data\.format='yaml': must be one of chat, sharegpt, "
                                        r"alpaca, prompt_completion, text$"):
        to_messages(TEXT, "yaml", "x")


def test_malformed_jsonl_line_names_file_and_line(tmp_path, bpe_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + '{"messages": [\n' + json.dumps(CHAT) + "\n")
    with pytest.raises(UserError, match=rf"{path}:3: malformed JSON"):
        load_records(str(path))
    path.write_text(json.dumps(CHAT) + "\n[1, 2]\n")
    with pytest.raises(UserError, match=rf"{path}:2: a JSON list, not an object"):
        build(Data(train=str(path)), bpe_tokenizer, seed=0)


@pytest.mark.parametrize("suffix,where", [(".jsonl", ":3"), (".parquet", " row 3")])
def test_bad_row_names_file_and_line(tmp_path, bpe_tokenizer, suffix, where):
    rows = [ALPACA, ALPACA, {"instruction": "x", "input": "", "output": None}]
    path = write(tmp_path / f"train{suffix}", rows)
    with pytest.raises(UserError, match=rf"{path}{where}: missing 'output'; expected "
                                        r"\"instruction\" and \"output\""):
        build(Data(train=path, format="alpaca", eval_size=0), bpe_tokenizer, seed=0)


def test_wrong_types_are_named(tmp_path, bpe_tokenizer):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}
    path = write(tmp_path / "t.jsonl", [CHAT, bad])
    with pytest.raises(UserError, match=r"t\.jsonl:2: messages\[1\] = .* not a valid message"):
        build(Data(train=path, eval_size=0), bpe_tokenizer, seed=0)
    no_answer = {"messages": [{"role": "user", "content": "a"}]}
    with pytest.raises(UserError, match=r"x: no assistant turn"):
        tokenize_record(no_answer, "chat", bpe_tokenizer, Data(), "x")
    with pytest.raises(UserError, match=r"x: 'prompt' is a int, not a string"):
        tokenize_record({"prompt": 1, "completion": "a"}, "prompt_completion", bpe_tokenizer,
                        Data(), "x")


def test_skip_bad_rows_counts(tmp_path, bpe_tokenizer):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(chat(f"q{i}", f"a{i}")) for i in range(3)]
    lines += ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    path.write_text("\n".join(lines) + "\n")
    cfg = Data(train=str(path), eval_size=0, skip_bad_rows=True)
    train, _, _, stats = build(cfg, bpe_tokenizer, seed=0)
    assert (len(train), stats.rows, stats.skipped) == (3, 3, 2)


def test_empty_missing_and_unreadable_files(tmp_path, bpe_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=rf"{empty}: the file is empty"):
        load_records(str(empty))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    with pytest.raises(UserError, match=rf"{blank}: no records"):
        load_records(str(blank))
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(UserError, match=rf"{notes}: not a data file"):
        load_records(str(notes))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(UserError, match=rf"{broken}: cannot parse it as json"):
        load_records(str(broken))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{latin}: cannot read the file"):
        load_records(str(latin))


# ---------------------------------------------------------------------------------------------
# Truncation, splits, prompts

def test_truncation_and_drop_counts(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    short = chat("hi", "ok")
    long_answer = chat("hi", "the quick brown fox jumps over the lazy dog " * 3)
    long_prompt = chat("the quick brown fox jumps over the lazy dog " * 3, "ok")
    path = write(tmp_path / "t.jsonl", [short, long_answer, long_prompt])
    max_len = len(tokenize_record(short, "chat", tok, Data(), "x").input_ids) + 2
    train, _, _, stats = build(Data(train=path, eval_size=0, max_len=max_len), tok, seed=0)
    assert (stats.rows, stats.truncated, stats.dropped_no_labels) == (3, 2, 1)
    assert len(train) == stats.rows - stats.dropped_no_labels == 2
    assert [len(e.input_ids) for e in train] == [max_len - 2, max_len]
    assert stats.tokens == 2 * max_len - 2
    assert stats.loss_tokens == sum(label != IGNORE for e in train for label in e.labels)
    assert stats.to_dict()["dropped_no_labels"] == 1
    # truncation is from the right: the kept part is the start of the full sample
    full = tokenize_record(long_answer, "chat", tok, Data(), "x")
    assert train[1].input_ids == full.input_ids[:max_len]


def test_hold_out_is_disjoint_and_deterministic(tmp_path, bpe_tokenizer):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(40)]
    path = write(tmp_path / "t.jsonl", rows)

    def split(seed, **kw):
        train, evals, prompts, stats = build(Data(train=path, eval_size=10, **kw),
                                             bpe_tokenizer, seed)
        return [tuple(e.input_ids) for e in train], [tuple(e.input_ids) for e in evals]

    train, evals = split(seed=1)
    assert len(train) == 30 and len(evals) == 10 and not set(train) & set(evals)
    assert len(set(train) | set(evals)) == 40
    assert split(seed=1) == (train, evals)
    assert split(seed=2)[1] != evals
    capped, capped_evals = split(seed=1, max_samples=5)
    assert capped == train[:5] and capped_evals == evals  # the eval set ignores max_samples
    with pytest.raises(UserError, match="eval_size=40 would leave no training rows"):
        build(Data(train=path, eval_size=40), bpe_tokenizer, seed=0)


def test_eval_file_and_prompts_match_training_prefix(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    multi = {"messages": [{"role": "user", "content": "sort 3 1"},
                          {"role": "assistant", "content": "1 3"},
                          {"role": "user", "content": "reverse it"},
                          {"role": "assistant", "content": "  3 1 "}]}
    evals = [CHAT, multi, ALPACA, PROMPT_COMPLETION, TEXT]
    train = write(tmp_path / "train.jsonl", [CHAT])
    got = []  # (eval example, eval prompts) of an eval file holding just that record
    for i, record in enumerate(evals):
        path = write(tmp_path / f"eval{i}.jsonl", [record])
        _, examples, prompts, _ = build(Data(train=train, eval=path), tok, seed=0)
        got.append((examples[0], prompts))
    for (example, prompts), record in zip(got, evals):
        if record is TEXT:
            assert prompts == []
            continue
        (prompt,) = prompts
        n = len(prompt.input_ids)
        assert example.input_ids[:n] == prompt.input_ids
        assert example.labels[n - 1] == IGNORE and example.labels[n] != IGNORE
    assert got[0][1][0].reference == "the quick fox"
    assert got[1][1][0].reference == "3 1"
    assert got[2][1][0].reference == "1 2 3"
    assert got[3][1][0].reference == "cba"
    # single turn: the prompt is exactly the generation prompt rendered by the template
    rendered = tok.apply_chat_template(CHAT["messages"][:1], tokenize=False,
                                       add_generation_prompt=True)
    assert got[0][1][0].input_ids == ids(tok, rendered)
    assert prompt_of(TEXT, "text", tok, Data(), "x") is None


# ---------------------------------------------------------------------------------------------
# Sources and tokenizer checks

def test_peftkit_asset_resolution():
    source = "peftkit:data/sort_reverse/train.jsonl"
    path = resolve_source(source)
    if not os.path.exists(path):
        pytest.skip("asset not shipped yet")
    assert os.path.isabs(path) and path.endswith(os.path.join("sort_reverse", "train.jsonl"))
    assert resolve_source("local.jsonl") == "local.jsonl"
    rows, _ = load_records(source)
    assert detect_format(rows[0], rows[0].where) == "chat"


def test_unknown_asset_lists_what_ships():
    with pytest.raises(UserError, match=r"peftkit:nope\.jsonl: no such data file ships"):
        resolve_source("peftkit:nope.jsonl")


def test_hub_id_offline_is_a_clear_error():
    start = time.monotonic()
    with pytest.raises(UserError, match="Hugging Face Hub is unreachable.*local"):
        load_records("someone/some-dataset")
    assert time.monotonic() - start < 20  # fails at once offline; a hang means it retried the network


def test_tokenizer_requirements(tmp_path, bpe_tokenizer):
    path = write(tmp_path / "t.jsonl", [CHAT, CHAT])
    same = copy.deepcopy(bpe_tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(UserError, match="pad token must be set and differ from EOS"):
        build(Data(train=path, eval_size=0), same, seed=0)
    plain = copy.deepcopy(bpe_tokenizer)
    plain.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        build(Data(train=path, eval_size=0), plain, seed=0)
    # raw formats need no template
    raw = write(tmp_path / "raw.jsonl", [TEXT])
    assert build(Data(train=raw, eval_size=0), plain, seed=0)[3].rows == 1


def test_prefix_unstable_template_is_refused(bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                         "{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="not prefix-stable"):
        tokenize_record(CHAT, "chat", tok, Data(), "x")


def test_10k_rows_build_with_the_default_hold_out(tmp_path, bpe_tokenizer):
    # Speed is measured by benchmarks, never asserted here (a loaded CI machine would flake).
    rows = [chat(f"Sort: {i % 10} {i % 7} {i % 3}", f"{i % 3} {i % 7} {i % 10}")
            for i in range(10_000)]
    path = write(tmp_path / "big.jsonl", rows)
    train, evals, prompts, stats = build(Data(train=path), bpe_tokenizer, seed=0)
    assert (len(train), len(evals), len(prompts), stats.rows) == (9800, 200, 200, 9800)
