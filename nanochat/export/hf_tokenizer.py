"""Our tokenizer as a Hugging Face fast tokenizer (`tokenizer.json`), with ids equal to ours, and
the chat format as a Jinja `chat_template` that renders what `chat_format.render_for_completion`
gives.

Byte-level BPE in the `tokenizers` library's terms:
  pre-tokenizer  our split pattern (a `Split` in "isolated" mode, in Oniguruma's syntax), then the byte-level alphabet
                 (each byte shown as one printable character, GPT-2's convention) without its own
                 regex;
  model          BPE with our vocabulary (token bytes in that alphabet -> our id) and the merges in
                 rank order. We store ranks, not merges, so each merge is recovered: the two tokens
                 that BPE with only the lower ranks makes of a token's bytes. `ignore_merges` takes
                 a piece that is itself a token whole, as our encoder (and tiktoken) does;
  specials       our special tokens as added tokens (never split, never normalised).
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from transformers import PreTrainedTokenizerFast

from nanochat.errors import NanochatError
from nanochat.tokenizer import Tokenizer

# The chat format (chat_format.render_conversation) as Jinja: a leading system message is folded into
# the first user message after a blank line; an assistant message is a string or a list of parts.
CHAT_TEMPLATE = (
    "<|bos|>"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{ ns.system + message['content'] }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


# An atom (a \p{..} class, an escape, a [...] class, one character) followed by a possessive counted
# repeat {m,n}+ / {m}+.
_POSSESSIVE_COUNT = re.compile(r"(\\[pP]\{[^}]*\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\()\[\]{}|])(\{\d+(?:,\d*)?\})\+")


def oniguruma_pattern(pattern: str) -> str:
    r"""Our split pattern (Rust fancy-regex syntax) for the tokenizers library, which compiles it with
    Oniguruma. The one difference that matters: Oniguruma reads `{m,n}+` as "{m,n}, once or more",
    not as possessive, so `\p{N}{1,3}+` would take any run of digits; an atomic group `(?>...)`
    means what the possessive meant."""
    converted = _POSSESSIVE_COUNT.sub(r"(?>\1\2)", pattern)
    if re.search(r"\)\{\d+(?:,\d*)?\}\+", converted):
        raise NanochatError(f"split pattern {pattern!r} has a possessive counted repeat of a group, which this "
                            "export does not translate")
    return converted


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    others (controls, space, soft hyphen …) for the code points from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


def _bpe_parts(piece: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """BPE of `piece` with only the ranks below `below`: merge the adjacent pair whose joined bytes
    have the lowest rank until none is left."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, where = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts


def merges(tok: Tokenizer) -> list[tuple[bytes, bytes]]:
    """The merges that build every multi-byte token, in rank order."""
    ranks = tok.mergeable_ranks
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise NanochatError(f"tokenizer {tok.name!r} has no token for byte(s) {missing[:8]}: a byte-level "
                            "BPE export needs all 256")
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise NanochatError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens; "
                                "this vocabulary cannot be written as BPE merges")
        out.append((parts[0], parts[1]))
    return out


def to_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A fast tokenizer whose ids equal `tok`'s (special tokens included) with our chat template."""
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in tok.mergeable_ranks.items()}
    model = models.BPE(vocab=vocab, merges=[(text(a), text(b)) for a, b in merges(tok)], ignore_merges=True)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(oniguruma_pattern(tok.pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, token_id in specials:  # added tokens take the next free ids; ours are fixed
        if hf.token_to_id(name) != token_id:
            raise NanochatError(f"special token {name} would get id {hf.token_to_id(name)} in the export, not "
                                f"{token_id}: the tokenizer's ids are not contiguous")
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|assistant_end|>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast
