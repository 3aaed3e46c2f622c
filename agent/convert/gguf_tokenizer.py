"""Rebuild a ``tokenizers.Tokenizer`` from a GGUF's vocabulary, merges and special tokens.

:func:`build_tokenizer` is the one entry; :mod:`chainfed.agent.convert.gguf_import` calls it and
writes ``tokenizer.json`` / ``tokenizer_config.json`` from what it returns. Everything comes from
the GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``); nothing is fetched and
``transformers`` is not imported.

The result equals what ``transformers`` builds from the same file (``from_pretrained(folder,
gguf_file=name)``), so token ids match the ones the parity tests compare against:

* Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, ...) is supported;
  sentencepiece GGUFs (LLaMA 2, Mistral 7B) raise :class:`ModelLoadError`.
* A token spelled outside GPT-2's byte alphabet (rare) is respelled from its UTF-8 bytes.
* Tokens the file marks CONTROL become special added tokens, USER_DEFINED ones plain added
  tokens; the bos / eos / unk / pad tokens are special too.
* The pre-tokenizer is chosen from ``tokenizer.ggml.pre`` with the table transformers uses
  (``_PRE_TOKENIZER_SPLITS``); names not in it get the GPT-2 split. Known deviation, kept on
  purpose for parity: for ``smollm``, llama.cpp (and SmolLM2's original ``tokenizer.json``) split
  every digit off *before* the GPT-2 regex, transformers does not, so a whitespace run before a
  digit tokenises differently (``"\\n\\n1."``: transformers ``[198, 198, 33, 30]``, llama.cpp
  ``[1116, 33, 30]``). Changing that is a one-line entry in ``_PRE_TOKENIZER_SPLITS`` plus the
  parity test.
* BOS / EOS are added around each sequence as ``tokenizer.ggml.add_bos_token`` /
  ``add_eos_token`` say (transformers' ``update_post_processor``).

The metadata is read in a fixed order, so of several problems in one file the same one is
always reported; every error is a :class:`ModelLoadError` whose message starts with the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from chainfed.agent.errors import ModelLoadError

SUPPORTED_TOKENIZERS = ("gpt2",)
"""Values of ``tokenizer.ggml.model`` this importer rebuilds (``gpt2`` = byte-level BPE)."""

# llama.cpp token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre``, the subset of transformers'
# ``GGUF_PRE_TOKENIZER_SPLITS`` a llama-architecture file can name (a test checks they agree).
# A name not listed gets ByteLevel's own GPT-2 regex, as in transformers.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "midm-2.0": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}

# Special tokens by their tokenizer_config.json name, and the ``tokenizer.ggml.<key>_token_id``
# key that holds each one's id.
_SPECIAL_ID_KEYS = (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))


class GgufMetadata(Protocol):
    """The metadata accessors :func:`build_tokenizer` reads a GGUF through.

    ``gguf_import._GgufFile`` implements them; each raises :class:`ModelLoadError` naming
    ``path`` and the key when an entry is present but unreadable or of the wrong type.
    """

    path: Path

    def get(self, key: str, default: Any = None) -> Any: ...

    def get_int(self, key: str, default: int | None = None, *, minimum: int = 0) -> int | None: ...

    def get_str(self, key: str) -> str | None: ...

    def get_list(self, key: str, kind: type, *, required: bool = False) -> list | None: ...


def build_tokenizer(source: GgufMetadata) -> tuple[Tokenizer, dict[str, Any]]:
    """The byte-level BPE ``tokenizers.Tokenizer`` the GGUF describes, and the contents of
    its ``tokenizer_config.json``.

    Raises:
        ModelLoadError: the tokenizer is not byte-level BPE, or its vocabulary, token types,
            merges or special token ids are missing or inconsistent (message names the path).
    """
    vocabulary = _read_vocabulary(source)
    spelling = _bytes_to_unicode()
    vocab = _byte_level_vocab(vocabulary.tokens, spelling)
    tokenizer = Tokenizer(_bpe_model(source.path, vocab, vocabulary.merges))
    tokenizer.pre_tokenizer = _pre_tokenizer(source.get_str("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    specials = _special_tokens(source, vocabulary.tokens)
    _add_special_tokens(tokenizer, vocabulary, specials, alphabet=set(spelling.values()))
    _add_user_defined_tokens(tokenizer, vocabulary, vocab)

    add_bos = (
        bool(source.get("tokenizer.ggml.add_bos_token", False)) and specials["bos"] is not None
    )
    add_eos = (
        bool(source.get("tokenizer.ggml.add_eos_token", False)) and specials["eos"] is not None
    )
    tokenizer.post_processor = _template(tokenizer, specials, add_bos=add_bos, add_eos=add_eos)
    return tokenizer, _tokenizer_config(source, specials, add_bos=add_bos, add_eos=add_eos)


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class _Vocabulary:
    """The GGUF's tokens (index = id), their llama.cpp types (empty when the file has none,
    else one per token) and its merges (each a ``(left, right)`` pair)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[tuple[str, ...]]


def _read_vocabulary(source: GgufMetadata) -> _Vocabulary:
    """Tokens, token types and merges, checked for a byte-level BPE of consistent lengths."""
    path = source.path
    kind = source.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r} "
            f"(supported: {', '.join(SUPPORTED_TOKENIZERS)} = byte-level BPE)"
        )
    tokens: list[str] = source.get_list("tokenizer.ggml.tokens", str, required=True)
    token_types: list[int] = source.get_list("tokenizer.ggml.token_type", int) or []
    if token_types and len(token_types) != len(tokens):
        raise ModelLoadError(
            f"{path}: {len(token_types)} token types for {len(tokens)} tokens in the vocabulary"
        )
    merge_lines: list[str] = source.get_list("tokenizer.ggml.merges", str, required=True)
    merges = [tuple(line.split(" ")) for line in merge_lines]
    if any(len(merge) != 2 for merge in merges):
        raise ModelLoadError(
            f"{path}: tokenizer.ggml.merges holds an entry that is not 'left right'"
        )
    return _Vocabulary(tokens=tokens, token_types=token_types, merges=merges)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_vocab(tokens: list[str], spelling: dict[int, str]) -> dict[str, int]:
    """Token -> id, every token spelled in the byte alphabet ``spelling`` maps to.

    A token outside the alphabet (rare) is respelled from its UTF-8 bytes, like transformers;
    of duplicate spellings the last id wins.
    """
    alphabet = set(spelling.values())
    return {
        token
        if set(token) <= alphabet
        else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }


# --------------------------------------------------------------------------- pipeline


def _bpe_model(path: Path, vocab: dict[str, int], merges: list[tuple[str, ...]]) -> BPE:
    """The BPE model over ``vocab`` and ``merges``: no dropout, no subword prefix or suffix,
    no unknown token (byte-level BPE spells every input)."""
    try:
        return BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    except Exception as error:  # tokenizers reports a merge of unknown tokens as a bare Exception
        raise ModelLoadError(
            f"{path}: the GGUF vocabulary and merges do not form a BPE tokenizer ({error})"
        ) from error


def _pre_tokenizer(name: str | None) -> pre_tokenizers.PreTokenizer:
    """ByteLevel after the split regex ``tokenizer.ggml.pre`` names; without a known name,
    ByteLevel with its own GPT-2 regex. No prefix space either way."""
    split = _PRE_TOKENIZER_SPLITS.get(name)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _template(
    tokenizer: Tokenizer, specials: dict[str, str | None], *, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence as the GGUF flags say (transformers' update_post_processor)."""
    bos, eos = specials["bos"], specials["eos"]
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = (
        f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1"
        f"{(' ' + eos + ':1') if add_eos else ''}"
    )
    special_tokens = []
    if add_bos:
        special_tokens.append((bos, tokenizer.token_to_id(bos)))
    if add_eos:
        special_tokens.append((eos, tokenizer.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


# --------------------------------------------------------------------------- added tokens


def _special_tokens(source: GgufMetadata, tokens: list[str]) -> dict[str, str | None]:
    """``bos`` / ``eos`` / ``unk`` / ``pad`` -> the token the GGUF names by id, or ``None``.

    An id outside the vocabulary is a :class:`ModelLoadError`.
    """
    specials: dict[str, str | None] = {}
    for name, key in _SPECIAL_ID_KEYS:
        token_id = source.get_int(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id >= len(tokens):
            raise ModelLoadError(
                f"{source.path}: {name} token id {token_id} outside the "
                f"{len(tokens)}-token vocabulary"
            )
        specials[name] = None if token_id is None else tokens[token_id]
    return specials


def _add_special_tokens(
    tokenizer: Tokenizer,
    vocabulary: _Vocabulary,
    specials: dict[str, str | None],
    *,
    alphabet: set[str],
) -> None:
    """Add the CONTROL tokens, then the named specials not among them, as special tokens.

    Special tokens are kept whole and skipped when decoding. A "control" token spelled outside
    the byte ``alphabet`` is a llama.cpp mislabel and is left alone, as transformers does.
    """
    control = [
        token
        for token, kind in zip(vocabulary.tokens, vocabulary.token_types, strict=False)
        if kind == _CONTROL and set(token) <= alphabet
    ]
    named = [token for token in specials.values() if token is not None and token not in control]
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in [*control, *named]]
    )


def _add_user_defined_tokens(
    tokenizer: Tokenizer, vocabulary: _Vocabulary, vocab: dict[str, int]
) -> None:
    """Add the USER_DEFINED tokens spelled as in ``vocab`` as plain (not special) tokens."""
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(vocabulary.tokens, vocabulary.token_types, strict=False)
        if kind == _USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)


# --------------------------------------------------------------------------- tokenizer_config


def _tokenizer_config(
    source: GgufMetadata, specials: dict[str, str | None], *, add_bos: bool, add_eos: bool
) -> dict[str, Any]:
    """tokenizer_config.json for ``PreTrainedTokenizerFast``: special token strings, the
    add_bos / add_eos flags, the context length and the chat template when the file has one."""
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials["bos"],
        "eos_token": specials["eos"],
        "unk_token": specials["unk"],
        "pad_token": specials["pad"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": source.get(f"{source.get('general.architecture')}.context_length"),
    }
    chat_template = source.get_str("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer_config
