"""The chat format: conversations to token ids, and a reply's token ids back to text and parts.

Rendering (what training and prompting feed the model): `render_conversation` gives a
conversation's ids and the loss mask of what the assistant writes; `render_for_completion` gives
the prompt for the assistant's next reply. Parsing (what comes back): `reply_text` is a finished
reply's text, `ReplyText` shows a reply to a person token by token (tool calls as `[expr = result]`),
and `reply_parts` turns a reply into the assistant message the next prompt should carry.

Everything here needs only a tokenizer with the chat's special tokens (tokenizer.SPECIAL_TOKENS):

    <|bos|> <|user_start|>…<|user_end|> <|assistant_start|>…<|assistant_end|>

where an assistant's turn may hold calculator calls `<|python_start|>expr<|python_end|>`, each
followed by its result `<|output_start|>result<|output_end|>`.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from nanochat.tokenizer import Tokenizer, TokenizerError

# ---------------------------------------------------------------------------------------------
# Rendering


def render_conversation(tok: Tokenizer, messages: Sequence[dict], max_tokens: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a loss mask: 1 on exactly the tokens the assistant
    writes (its text, python tool calls with their start/end tokens, and <|assistant_end|>),
    0 on everything else, including <|assistant_start|> and tool outputs
    (<|output_start|> ... <|output_end|>), which are forced, not learned.

    messages: [{"role": "system"|"user"|"assistant", "content": str | [parts]}], where an
    assistant's parts are {"type": "text"|"python"|"python_output", "text": str}. A system
    message may only come first; it is merged into the first user message (separated by a
    blank line), as the format has no system tokens. After it, user and assistant alternate,
    starting with the user. Message text is always ordinary text: a special-token string
    typed by a user cannot inject that token. max_tokens truncates both lists.
    """
    ids, mask = [tok.special_id("<|bos|>")], [0]

    def add(token_ids: list[int], learned: bool) -> None:
        ids.extend(token_ids)
        mask.extend([int(learned)] * len(token_ids))

    def special(token: str, learned: bool) -> None:
        add([tok.special_id(token)], learned)

    for role, content in _turns(messages):
        if role == "user":
            if not isinstance(content, str):
                raise TokenizerError("a user message's content must be a string")
            special("<|user_start|>", False)
            add(tok.encode_ordinary(content), False)
            special("<|user_end|>", False)
            continue
        special("<|assistant_start|>", False)
        for kind, text in _assistant_parts(content):
            if kind == "text":
                add(tok.encode_ordinary(text), True)
            elif kind == "python":
                special("<|python_start|>", True)
                add(tok.encode_ordinary(text), True)
                special("<|python_end|>", True)
            else:
                special("<|output_start|>", False)
                add(tok.encode_ordinary(text), False)
                special("<|output_end|>", False)
        special("<|assistant_end|>", True)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The prompt for generating the assistant's reply: the conversation, which must end with a
    user message, followed by <|assistant_start|>."""
    if not messages or messages[-1].get("role") != "user":
        raise TokenizerError("render_for_completion needs a conversation whose last message is from the user")
    ids, _ = render_conversation(tok, messages)
    return ids + [tok.special_id("<|assistant_start|>")]


def _turns(messages: Sequence[dict]) -> list[tuple[str, object]]:
    """Validate roles and fold a leading system message into the first user message."""
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
        if not isinstance(system, str):
            raise TokenizerError("a system message's content must be a string")
        if not turns or turns[0][0] != "user" or not isinstance(turns[0][1], str):
            raise TokenizerError("a system message must be followed by a user message")
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise TokenizerError(f"message roles must alternate user, assistant, ... (after an optional "
                                 f"leading system message); turn {i} is {role!r}, expected {expected!r}")
    return turns


def _assistant_parts(content) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise TokenizerError("an assistant message's content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
            raise TokenizerError(f"assistant parts must be {{'type': 'text'|'python'|'python_output', "
                                 f"'text': str}}, got {part!r}")
        parts.append((kind, part["text"]))
    return parts


# ---------------------------------------------------------------------------------------------
# Parsing a reply


def stop_ids(tok: Tokenizer) -> set[int]:
    """The tokens that end a reply: <|assistant_end|>, or <|bos|> (a model that starts a new
    document has left the conversation)."""
    return {tok.special_id("<|assistant_end|>"), tok.special_id("<|bos|>")}


def reply_text(tok: Tokenizer, ids: list[int]) -> str:
    """A finished reply's text, without the token that closed it (special tokens inside it, such
    as a tool call's, are decoded as their names)."""
    return tok.decode(ids[:-1] if ids and ids[-1] in stop_ids(tok) else ids)


class ReplyText:
    """Turns one reply's tokens into the text a person should see, token by token.

    A UTF-8 character split across tokens is held back until it is whole. Special tokens are not
    shown: the stop token ends the reply, and a tool call `<|python_start|>23*17<|python_end|>
    <|output_start|>391<|output_end|>` reads `[23*17 = 391]`, set off from the words around it by
    a space (the chat format puts none there: "Let me compute that.[23*17 = 391] The answer…").
    `tokens` holds every token fed (as OpenAI's usage counts them); `finish_reason` is "stop"
    once the model closed its turn, else "length".
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.tokens: list[int] = []
        self.finish_reason = "length"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop_ids(tok)
        self._specials = set(tok.special_tokens.values())
        self._python_start, self._output_end = tok.special_id("<|python_start|>"), tok.special_id("<|output_end|>")
        self._marks = {self._python_start: "[", tok.special_id("<|python_end|>"): " = ", self._output_end: "]"}
        self._last = ""  # the last character shown
        self._after_tool = False  # a tool call just closed: a word that follows gets a space first

    def feed(self, token: int) -> str:
        """The text that `token` makes visible (often "", e.g. half a character)."""
        self.tokens.append(token)
        if token in self._stop:
            self.finish_reason = "stop"
            return self.flush()
        if token in self._specials:
            text = self._decoder.decode(b"", final=True)  # a character cut short by the special token
            before = (text or self._last)[-1:]
            if token == self._python_start and before and not before.isspace():
                text += " "
            text += self._marks.get(token, "")
        else:
            text = self._decoder.decode(self.tok.decode_bytes([token]))
            if self._after_tool and text:
                text = (" " if text[0].isalnum() else "") + text
        if text:
            self._after_tool = token == self._output_end
            self._last = text[-1]
        return text

    def flush(self) -> str:
        """Whatever is held back (an unfinished character shows as U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def reply_parts(tok: Tokenizer, tokens: list[int]) -> list[dict]:
    """The assistant message that a reply's tokens make. Calculator calls and their results become
    `python` / `python_output` parts, so that the next prompt shows the model its own tool use in
    the chat format it was trained on, not the `expr = result` text the user saw."""
    sid = tok.special_id
    opens = {sid("<|python_start|>"): "python", sid("<|output_start|>"): "python_output"}
    closes = {sid("<|python_end|>"), sid("<|output_end|>")}
    stop, specials = stop_ids(tok), set(tok.special_tokens.values())
    parts: list[dict] = []
    kind, run = "text", []

    def close_run() -> None:
        if run:
            parts.append({"type": kind, "text": tok.decode(run)})

    for token in tokens:
        if token in stop:
            break
        if token in opens or token in closes:
            close_run()
            kind, run = opens.get(token, "text"), []
        elif token not in specials:
            run.append(token)
    close_run()
    return parts
