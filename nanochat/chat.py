"""`nanochat chat`: talk to a trained model in the terminal.

Interactive by default: each line typed is a user turn and the reply streams as it is written.
The model remembers nothing between calls, so every turn sends it the whole conversation; when
that no longer fits its context with room for a reply, the oldest exchanges are dropped (and the
user is told). Lines starting with `/` are commands (`/help`). With `-p PROMPT` it answers one
message and exits, printing nothing but the reply on stdout, for scripts and pipes.

The options are config.ChatCliConfig; each reply is sampled with one engine `Sampling` built from
them. The conversation is kept as chat-format messages (nanochat.chat_format): a reply's tokens
become an assistant message with its calculator calls as tool parts, rendered back into the next
prompt exactly as the model was trained to read them.
"""

from __future__ import annotations

import math
import secrets
import sys

from nanochat.chat_format import render_for_completion, reply_parts
from nanochat.config import ChatCliConfig, parse_config, valid_temperature
from nanochat.engine import Engine, Sampling, load_engine
from nanochat.errors import NanochatError
from nanochat.runtime import init_runtime

HELP = """commands:
  /clear     forget the conversation and start a new one
  /temp X    set the sampling temperature (0 = always the likeliest token); /temp alone shows it
  /help      this list
  /quit      leave (also Ctrl-D, or Ctrl-C at the prompt; Ctrl-C during a reply stops it)"""


def _notice(text: str) -> None:
    """Messages about the chat, not from the model: stderr, so a one-shot reply stays clean on stdout."""
    print(text, file=sys.stderr, flush=True)


class Chat:
    """One conversation with a model: its exchanges so far and the sampling settings."""

    def __init__(self, engine: Engine, cfg: ChatCliConfig):
        self.engine, self.cfg = engine, cfg
        self.temperature = cfg.temperature
        self.context = engine.context
        # Room kept for a reply when old exchanges must go: --max-tokens, but never more than half the
        # context, so that a large --max-tokens bounds replies without erasing the conversation.
        self.reserve = min(cfg.max_tokens, self.context // 2)
        self.exchanges: list[tuple[str, list[dict]]] = []  # (user message, assistant parts)
        self.replies = 0

    def _messages(self, user: str, exchanges: list[tuple[str, list[dict]]]) -> list[dict]:
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        for said, parts in exchanges:
            messages += [{"role": "user", "content": said}, {"role": "assistant", "content": parts}]
        return messages + [{"role": "user", "content": user}]

    def _prompt(self, user: str) -> tuple[list[int], int]:
        """The prompt for answering `user` and the reply's token budget (--max-tokens, or what is
        left of the context). Drops the fewest oldest exchanges that leave room for a reply; when
        the message does not fit even alone, nothing is dropped and the turn is refused."""
        tok = self.engine.tok
        for start in range(len(self.exchanges) + 1):
            prompt = render_for_completion(tok, self._messages(user, self.exchanges[start:]))
            if len(prompt) + self.reserve <= self.context:
                break
        budget = min(self.cfg.max_tokens, self.context - len(prompt))
        if budget < 1:
            raise NanochatError(f"that message makes a prompt of {len(prompt)} tokens, which leaves no room for a "
                                f"reply in the model's context of {self.context} tokens; send a shorter one")
        if start:
            del self.exchanges[:start]
            _notice(f"(the conversation no longer fits the model's {self.context}-token context: forgot the "
                    f"oldest {start} exchange{'s' if start > 1 else ''})")
        return prompt, budget

    def _seed(self) -> int:
        self.replies += 1
        return secrets.randbits(63) if self.cfg.seed is None else self.cfg.seed + self.replies - 1

    def reply(self, user: str) -> None:
        """Stream the model's answer to `user` to stdout; the exchange joins the conversation once
        the reply is complete (an interrupted one is forgotten)."""
        prompt, budget = self._prompt(user)
        sampling = Sampling(max_tokens=budget, temperature=self.temperature, top_k=self.cfg.top_k or None,
                            seed=self._seed())
        stream = self.engine.stream_text(prompt, sampling)
        for piece in stream:
            print(piece, end="", flush=True)
        print(flush=True)
        if stream.finish_reason == "length":
            why = "--max-tokens" if budget == self.cfg.max_tokens else "the model's context is full"
            _notice(f"(reply cut off at {budget} tokens: {why})")
        self.exchanges.append((user, reply_parts(self.engine.tok, stream.tokens)))

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.exchanges.clear()
            print("(conversation cleared)")
        elif name == "/temp":
            self._set_temperature(arg.strip())
        elif name == "/help":
            print(HELP)
        else:
            _notice(f"unknown command {name}; /help lists the commands")
        return True

    def _set_temperature(self, arg: str) -> None:
        if not arg:
            print(f"(temperature {self.temperature:g})")
            return
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if not valid_temperature(value):
            _notice(f"/temp needs a number ≥ 0, e.g. /temp 0.8 (got {arg!r}); the temperature stays "
                    f"{self.temperature:g}")
            return
        self.temperature = value
        print(f"(temperature {value:g})")


def interactive(chat: Chat, name: str) -> int:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass
    print(f"nanochat chat: {name} on {chat.engine.rt.device.type}, temperature {chat.temperature:g}. "
          "/help for commands, /quit or Ctrl-D to leave.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.reply(line)
        except NanochatError as e:
            _notice(str(e))
        except KeyboardInterrupt:
            _notice("\n(reply stopped; that exchange is forgotten)")


def cli(argv: list[str]) -> int:
    cfg = parse_config(ChatCliConfig, argv, prog="nanochat chat",
                       description="Talk to a trained model in the terminal, or answer one prompt with -p.")
    engine, name = load_engine(cfg.source, init_runtime(cfg.source.runtime.device, cfg.source.runtime.dtype))
    chat = Chat(engine, cfg)
    if not cfg.prompt:
        return interactive(chat, name)
    message = (sys.stdin.read() if cfg.prompt == "-" else cfg.prompt).strip()
    if not message:
        raise NanochatError("the prompt is empty")
    chat.reply(message)
    return 0
