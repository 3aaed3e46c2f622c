"""Text to token tensors: rows of a ``SplitData`` to an ``EncodedSplit`` for a model.

Notation: N examples, T padded sequence length (T ≤ max_len).
``encode_classify`` → ``input_ids, attention_mask (N, T), labels (N,)``;
``encode_lm`` → ``input_ids, attention_mask, loss_mask (N, T)``. Padding is on the
right; every tensor is ``torch.long``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers
import torch

from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import EncodedSplit
from chainfed.agent.training.data import ClassifyExample, DataConfig, LMExample, template_fields


def _unpadded(tokenizer: tokenizers.Tokenizer, max_len: int | None) -> tokenizers.Tokenizer:
    """The tokenizer with our truncation and no padding; a copy when settings differ.

    Checkpoints ship tokenizers with padding / truncation switched on (all-MiniLM-L6-v2
    pads every encoding to 128), and the caller's tokenizer must not be mutated.
    """
    if tokenizer.padding is None and tokenizer.truncation is None and max_len is None:
        return tokenizer
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    if max_len is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=max_len, direction="right")
    return tok


def tokenizer_pad_id(tokenizer: tokenizers.Tokenizer) -> int | None:
    """The tokenizer's pad id: its padding setting, else a ``[PAD]`` / ``<pad>`` token."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _width(lengths: Sequence[int], max_len: int, pad_to_max_len: bool) -> int:
    return max_len if pad_to_max_len else max(lengths, default=0)


def encode_classify(
    examples: Sequence[ClassifyExample],
    tokenizer: tokenizers.Tokenizer,
    max_len: int,
    *,
    pad_id: int | None = None,
    pad_to_max_len: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise texts with the tokenizer's special tokens, truncate, pad on the right.

    Returns ``input_ids (N, T)``, ``attention_mask (N, T)`` (1 = real token, 0 = padding)
    and ``labels (N,)``, all ``torch.long``. ``T`` is the longest encoding (``max_len``
    with ``pad_to_max_len``); truncation keeps the special tokens (BERT: ``[CLS] … [SEP]``)
    and drops text tokens from the right. ``pad_id`` defaults to the tokenizer's
    (:func:`tokenizer_pad_id`; MiniLM ``[PAD]`` = 0).
    """
    specials = tokenizer.num_special_tokens_to_add(False)
    if max_len <= specials:
        raise ValueError(f"max_len {max_len} leaves no room next to {specials} special tokens")
    if pad_id is None:
        pad_id = tokenizer_pad_id(tokenizer)
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; pass pad_id")
    tok = _unpadded(tokenizer, max_len)
    encodings = tok.encode_batch([ex.text for ex in examples], add_special_tokens=True)
    rows = [enc.ids for enc in encodings]
    width = _width([len(r) for r in rows], max_len, pad_to_max_len)
    input_ids = _pad(rows, width, pad_id)  # (N, T)
    attention_mask = _pad([[1] * len(r) for r in rows], width, 0)  # (N, T)
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)  # (N,)
    return input_ids, attention_mask, labels


def encode_lm(
    examples: Sequence[LMExample],
    tokenizer: tokenizers.Tokenizer,
    max_len: int,
    pad_id: int,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_to_max_len: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise prompt → response pairs for causal-LM training, loss on the response only.

    Each row is ``[bos] + prompt + response + [eos]`` (``bos`` / ``eos`` only when their
    id is given), prompt and response tokenised separately without the tokenizer's own
    special tokens, then right-padded with ``pad_id``. Returns ``input_ids``,
    ``attention_mask`` and ``loss_mask``, each ``(N, T)`` ``torch.long``; ``loss_mask`` is
    1 exactly on response tokens (and the eos), 0 on bos, prompt and padding. The trainer
    shifts it with the labels: position t's logits predict token t+1, so the loss of
    token t+1 is kept when ``loss_mask[:, t+1] == 1``.

    Too long for ``max_len``: the prompt loses tokens from the **left** (its end, e.g.
    ``"Sentiment:"``, stays next to the response) so the response always fits whole; only
    a response that alone exceeds ``max_len`` (minus the bos) is cut on the right, the
    prompt then dropped entirely.
    """
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    budget = max_len - len(head)
    if budget < 1:
        raise ValueError(f"max_len {max_len} leaves no room for a response token")
    tok = _unpadded(tokenizer, None)
    prompts = tok.encode_batch([ex.prompt for ex in examples], add_special_tokens=False)
    responses = tok.encode_batch([ex.response for ex in examples], add_special_tokens=False)
    rows: list[list[int]] = []
    masks: list[list[int]] = []
    for p_enc, r_enc in zip(prompts, responses, strict=True):
        response = (r_enc.ids + tail)[:budget]
        keep = budget - len(response)  # prompt tokens that still fit
        prompt = p_enc.ids[max(0, len(p_enc.ids) - keep) :] if keep else []
        rows.append(head + prompt + response)
        masks.append([0] * (len(head) + len(prompt)) + [1] * len(response))
    width = _width([len(r) for r in rows], max_len, pad_to_max_len)
    input_ids = _pad(rows, width, pad_id)  # (N, T)
    attention_mask = _pad([[1] * len(r) for r in rows], width, 0)  # (N, T)
    loss_mask = _pad(masks, width, 0)  # (N, T)
    return input_ids, attention_mask, loss_mask


def encode_split(model: StreamingModel, examples: list, task: str, max_len: int) -> EncodedSplit:
    tokenizer = model.tokenizer()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if task == "classify":
        # padding positions are masked out; decoders without a pad token use the config's
        has_pad = tokenizer_pad_id(tokenizer) is not None
        ids, mask, labels = encode_classify(
            examples, tokenizer, max_len, pad_id=None if has_pad else pad
        )
        return EncodedSplit(ids, mask, labels)
    ids, mask, loss_mask = encode_lm(examples, tokenizer, max_len, pad)
    labels = torch.tensor([-1 if ex.label is None else ex.label for ex in examples])
    return EncodedSplit(ids, mask, labels, loss_mask)


def label_token_ids(
    model: StreamingModel, examples: list, labels: Sequence[str], data: DataConfig | None = None
) -> list[int]:
    """First token of each label's response: what LM accuracy ranks (must be distinct).

    A label's response is a row's that has the label. A label none of ``examples`` has
    (an agent's own shard under label skew may lack a class) takes ``data``'s response
    template rendered with the label's name, when that template reads no other field.
    """
    responses: dict[int, str] = {}
    for ex in examples:
        if ex.label is not None and ex.label not in responses:
            responses[ex.label] = ex.response
    template, field = (None, None) if data is None else (data.response_template, data.label_field)
    if template is not None and field is not None and template_fields(template) == [field]:
        for i, name in enumerate(labels):
            responses.setdefault(i, template.format_map({field: name}))
    missing = [name for i, name in enumerate(labels) if i not in responses]
    if missing:
        raise ChainFedError(
            f"labels {missing} never occur in the training rows, and the response template "
            "reads more than the label, so their answers are unknown"
        )
    tokenizer = model.tokenizer()
    ids = [
        tokenizer.encode(responses[i], add_special_tokens=False).ids[0] for i in range(len(labels))
    ]
    if len(set(ids)) != len(ids):
        raise ChainFedError(
            f"label words share their first token ({ids}); LM accuracy needs them distinct"
        )
    return ids
