"""Instruction data: rows → text parts marked as prompt or target, by a template.

A row is either
  {"instruction": str, "input": str (optional), "output": str}       loss on the output
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}   loss on assistant turns
and renders to parts (text, is_target); `EOD` stands for the tokenizer's end-of-sequence token, which
follows every output and every assistant turn (the model learns to stop there) and is a target too.

A row may also carry a `label` (a string, or an integer >= 0) for a classification head
(finetune.head=classification): the head reads the model's last hidden state of the prompt, the token
before the output (or before the first assistant turn). With a label, `output` may be left out (and a
conversation may end with a user turn): the example is then its prompt and an <eod> outside the loss.
Either every row of a dataset has a label or none has.

The default template (plain words, so every tokenizer, even the tinyshakespeare char vocabulary, can
encode it):

    instruction        "Instruction:\\n{instruction}\\n\\nResponse:\\n"
    instruction_input  "Instruction:\\n{instruction}\\n\\nInput:\\n{input}\\n\\nResponse:\\n"
    output             "{output}"
    system             "System:\\n{content}\\n\\n"
    user               "User:\\n{content}\\n\\n"
    assistant          "Assistant:\\n{content}"

`template=<file>` (YAML or JSON) replaces any of these keys; the rest keep their default. In `output`
and `assistant`, the text before the placeholder is prompt and the placeholder and what follows it
are target. Placeholders are written {name}; a template missing one it needs, or naming one that does
not exist, is refused. Rows without an `input` (or with an empty one) use `instruction`, the others
`instruction_input`.

Parts are tokenized one by one and concatenated (as torchtune and axolotl do), so the loss mask is
exact whatever the tokenizer merges across a boundary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gorilla_dist.errors import DataError

EOD = None
"""The part standing for the tokenizer's end-of-sequence token."""
PLACEHOLDER = re.compile(r"\{(\w+)\}")
DEFAULT_TEMPLATE = {
    "instruction": "Instruction:\n{instruction}\n\nResponse:\n",
    "instruction_input": "Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:\n",
    "output": "{output}",
    "system": "System:\n{content}\n\n",
    "user": "User:\n{content}\n\n",
    "assistant": "Assistant:\n{content}",
}
NEEDS = {"instruction": ({"instruction"}, {"instruction", "input"}),  # (needed, allowed)
         "instruction_input": ({"instruction", "input"}, {"instruction", "input"}),
         "output": ({"output"}, {"output"}),
         "system": ({"content"}, {"content"}), "user": ({"content"}, {"content"}),
         "assistant": ({"content"}, {"content"})}
ROLES = ("system", "user", "assistant")

Part = tuple[str | None, bool]


@dataclass(frozen=True)
class Example:
    """One rendered row: its parts, its label (None: no label) and how many parts come before the first
    target (before train_on_inputs): the classification head reads the last token of these."""

    parts: list[Part]
    label: str | int | None = None
    prompt_parts: int = 0


class BadRow(DataError):
    """A row that cannot become a training example (prepare's on_bad_row=skip counts and drops it)."""


def _fill(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


@dataclass(frozen=True)
class Template:
    parts: dict[str, str]
    source: str = "the default template"

    @classmethod
    def load(cls, path: str | None) -> Template:
        if path is None:
            return cls(dict(DEFAULT_TEMPLATE))
        file = Path(path)
        if not file.is_file():
            raise DataError(f"template={path!r}: no such file")
        import yaml

        try:
            given = yaml.safe_load(file.read_text()) if file.suffix in (".yaml", ".yml") else json.loads(file.read_text())
        except (ValueError, yaml.YAMLError) as err:
            raise DataError(f"template={path!r}: not a YAML / JSON mapping ({err})") from None
        if not isinstance(given, dict):
            raise DataError(f"template={path!r}: expected a mapping of {list(DEFAULT_TEMPLATE)} to strings")
        unknown = sorted(set(given) - set(DEFAULT_TEMPLATE))
        if unknown:
            raise DataError(f"template={path!r}: unknown key(s) {unknown}; valid keys: {list(DEFAULT_TEMPLATE)}")
        template = cls({**DEFAULT_TEMPLATE, **given}, f"template={path!r}")
        template.check()
        return template

    def check(self) -> None:
        for key, (needed, allowed) in NEEDS.items():
            text = self.parts[key]
            if not isinstance(text, str):
                raise DataError(f"{self.source}: {key} is a {type(text).__name__}, expected a string")
            names = PLACEHOLDER.findall(text)
            missing, extra = sorted(needed - set(names)), sorted(set(names) - allowed)
            if missing:
                raise DataError(f"{self.source}: {key} has no {{{missing[0]}}} placeholder, which it needs "
                                f"(it has {sorted(set(names)) or 'none'})")
            if extra:
                raise DataError(f"{self.source}: {key} names {{{extra[0]}}}, which is not a field it can use; "
                                f"valid: {sorted('{' + n + '}' for n in allowed)}")
            if key in ("output", "assistant") and len(names) != 1:
                raise DataError(f"{self.source}: {key} must name {{{next(iter(needed))}}} exactly once")

    def render(self, row, where: str, *, train_on_inputs: bool = False) -> Example:
        """One row as an Example (BadRow naming `where` when it cannot be used)."""
        if not isinstance(row, dict):
            raise BadRow(f"{where}: expected a JSON object with instruction/output or messages, got "
                         f"{type(row).__name__}")
        label = _label(row, where)
        if "messages" in row and row["messages"] is not None:
            parts = self._chat(row["messages"], where, labelled=label is not None)
        elif "instruction" in row or "output" in row:
            parts = self._instruction(row, where, labelled=label is not None)
        else:
            raise BadRow(f"{where}: no 'instruction'/'output' or 'messages' field (found {sorted(row)})")
        prompt = next((i for i, (_, target) in enumerate(parts) if target), len(parts) - 1)
        if train_on_inputs:
            parts = [(text, True) for text, _ in parts]
        return Example(parts, label, prompt)

    def _instruction(self, row: dict, where: str, *, labelled: bool = False) -> list[Part]:
        fields = {}
        for name, required in (("instruction", True), ("input", False), ("output", not labelled)):
            value = row.get(name)
            if value is None and not required:
                value = ""
            if not isinstance(value, str):
                what = "missing" if value is None else f"a {type(value).__name__}, expected a string"
                raise BadRow(f"{where}: field {name!r} is {what}")
            if required and not value.strip():
                raise BadRow(f"{where}: field {name!r} is empty")
            fields[name] = value
        prompt = self.parts["instruction_input" if fields["input"].strip() else "instruction"]
        if not fields["output"].strip():  # a labelled row without an output: its prompt, then <eod>
            return [(_fill(prompt, fields), False), (EOD, False)]
        before, after = self._split("output", fields["output"])
        return [(_fill(prompt, fields) + before, False), (after, True), (EOD, True)]

    def _split(self, key: str, value: str) -> tuple[str, str]:
        """(the template's text before the placeholder, the value and the text after it)."""
        m = PLACEHOLDER.search(self.parts[key])
        return self.parts[key][:m.start()], value + self.parts[key][m.end():]

    def _chat(self, messages, where: str, *, labelled: bool = False) -> list[Part]:
        if not isinstance(messages, list) or not messages:
            raise BadRow(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
        parts: list[Part] = []
        for i, msg in enumerate(messages):
            at = f"{where}: messages[{i}]"
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise BadRow(f"{at}: expected {{role, content}} with string content")
            role = msg.get("role")
            if role not in ROLES:
                raise BadRow(f"{at}: role {role!r}; valid roles: {list(ROLES)}")
            if role == "assistant":
                if not msg["content"].strip():
                    raise BadRow(f"{at}: the assistant's content is empty")
                before, after = self._split("assistant", msg["content"])
                parts += [(before, False), (after, True), (EOD, True)]
            else:
                parts.append((_fill(self.parts[role], {"content": msg["content"]}), False))
        if messages[-1].get("role") != "assistant" and labelled:
            parts.append((EOD, False))
        elif messages[-1].get("role") != "assistant":
            raise BadRow(f"{where}: the last message is from {messages[-1].get('role')!r}; a conversation must "
                         "end with an assistant turn (the loss is on assistant turns) unless it has a label")
        return parts


def _label(row: dict, where: str) -> str | int | None:
    label = row.get("label")
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, int) and label < 0):
        raise BadRow(f"{where}: field 'label' is {label!r}; expected a string or an integer >= 0")
    if isinstance(label, str) and not label.strip():
        raise BadRow(f"{where}: field 'label' is empty")
    return label


def label_names(labels: list) -> list[str]:
    """The classes of a dataset's labels, in id order: 0 .. max for integer labels, else the distinct
    strings sorted (integers among strings count as their text)."""
    if all(isinstance(x, int) for x in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted({str(x) for x in labels})


def rendered_text(parts: list[Part] | Example) -> str:
    """The parts as one string (without the end-of-sequence tokens): what a char vocabulary or a BPE is
    built from."""
    parts = parts.parts if isinstance(parts, Example) else parts
    return "".join(text for text, _ in parts if text is not EOD)
