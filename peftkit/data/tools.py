"""Tool use in conversations: assistant `tool_calls`, `tool` results and a row's `tools`.

A chat row may carry OpenAI-style tool use, rendered by the tokenizer's chat template:

    {"tools": [{"type": "function", "function": {"name": "add", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "2 + 3?"},
                  {"role": "assistant", "tool_calls": [{"type": "function", "function":
                      {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                  {"role": "tool", "content": "5"},
                  {"role": "assistant", "content": "5"}]}

The assistant's calls are learned like any assistant turn; tool results are context. Many
chat templates know nothing of tools and would silently drop the calls (training the model to
answer with nothing), so each feature a row uses is first checked by rendering a probe
conversation: a template that does not put the probe's marker into the text is refused.
"""

from __future__ import annotations

import json

from peftkit.data.sources import BadRow

MARK = "peftkit_probe"
_CALL = {"type": "function", "function": {"name": f"{MARK}_call", "arguments": {"x": 1}}}
_USER = {"role": "user", "content": "hi"}
_CALLER = {"role": "assistant", "content": "", "tool_calls": [_CALL]}
# feature -> (probe conversation, tools, the marker its rendering must contain)
PROBES = {
    "tool calls": ([_USER, _CALLER], None, f"{MARK}_call"),
    "tool results": ([_USER, _CALLER, {"role": "tool", "content": f"{MARK}_result",
                                       "name": f"{MARK}_call"}], None, f"{MARK}_result"),
    "tool definitions": ([_USER], [{"type": "function", "function": {
        "name": f"{MARK}_tool", "description": "a probe",
        "parameters": {"type": "object", "properties": {}}}}], f"{MARK}_tool"),
}
_rendered: dict[tuple[str, str], bool] = {}  # (template, feature) -> the template renders it


def tool_call(call, where: str, n: int) -> dict:
    """One entry of an assistant's `tool_calls`, with its arguments as a dict (templates
    render them with `tojson`; OpenAI's format gives them as a JSON string)."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments", {}) if isinstance(function, dict) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        shown = json.dumps(call, ensure_ascii=False, default=str)[:80]
        raise BadRow(f"{where}: messages[{n}].tool_calls has {shown}, not a valid call; "
                     f'expected {{"type": "function", "function": {{"name": string, '
                     f'"arguments": object or JSON string}}}}')
    clean = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        clean["id"] = call["id"]
    return clean


def tools_of(record: dict, where: str) -> list[dict] | None:
    """A row's tool definitions (a list, or that list as a JSON string); None without."""
    tools = record.get("tools")
    if isinstance(tools, str):  # columnar files often hold them as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            tools = ""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow(f"{where}: 'tools' must be a list of tool definitions (JSON schemas, "
                     f'{{"type": "function", "function": {{"name": ..., "parameters": ...}}}})')
    return tools


def features(messages: list[dict], tools: list[dict] | None) -> list[str]:
    """The tool features a conversation uses (keys of PROBES)."""
    used = []
    if any(m.get("tool_calls") for m in messages):
        used.append("tool calls")
    if any(m["role"] == "tool" for m in messages):
        used.append("tool results")
    if tools:
        used.append("tool definitions")
    return used


def renders(tokenizer, feature: str) -> bool:
    """Whether the tokenizer's chat template puts `feature` into the text (probed once per
    template)."""
    key = (str(tokenizer.chat_template), feature)  # a dict where a model names several
    if key not in _rendered:
        messages, tools, marker = PROBES[feature]
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # e.g. the template's raise_exception("Unsupported role")
            text = ""
        _rendered[key] = marker in text
    return _rendered[key]


def require_support(tokenizer, messages: list[dict], tools: list[dict] | None, name: str,
                    where: str) -> None:
    """Refuse a conversation with tool use the chat template would drop or reject."""
    missing = [f for f in features(messages, tools) if not renders(tokenizer, f)]
    if missing:
        raise BadRow(f"{where}: the conversation has {' and '.join(missing)}, which the chat "
                     f"template of {name} does not render; use a model whose chat template "
                     f"supports tools (e.g. Qwen2.5, Llama 3.1), or drop the tool turns")
