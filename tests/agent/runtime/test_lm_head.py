"""``StreamedLMHead`` against the whole head: the vocabulary read in slices must give the
loss and gradients ``F.cross_entropy`` gives over full logits, and ``LMObjective`` built on
it must score like the direct formula.

Prepare: a tiny random llama checkpoint (d=32, V=1000, tied and untied), a head whose
slice is a few rows, so the vocabulary spans many slices and a partial last one.
Execute: cross-entropy, its gradient, label-word logits; an ``LMObjective`` score.
Assert: agreement with the held head to 1e-5; rows read per slice, never the whole head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.lm_head import StreamedLMHead
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.objectives import Batch, LMObjective

D, VOCAB = 32, 1000


def llama_config(tied: bool) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": D,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    }


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tmp_path_factory) -> StreamingModel:
    folder = tmp_path_factory.mktemp("lm_head")
    return StreamingModel(write_random_checkpoint(llama_config(request.param), folder / "m"))


def small_slices(model: StreamingModel) -> StreamedLMHead:
    """The model's streamed head with 96-row slices: 11 slices, the last one 40 rows."""
    head = model.streamed_lm_head()
    head.rows_per_slice = 96
    return head


def test_cross_entropy_and_gradient_match_the_whole_head(model: StreamingModel) -> None:
    full = model.load_lm_head()
    head = small_slices(model)
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(7, D, generator=generator) * 3
    targets = torch.tensor([0, 95, 96, 500, 959, 960, 999])  # slice edges and the last row

    h_full = h.clone().requires_grad_(True)
    expected = F.cross_entropy(full(h_full), targets, reduction="none")
    weights = torch.arange(1.0, 8.0)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), h_full)

    h_streamed = h.clone().requires_grad_(True)
    got = head.cross_entropy(h_streamed, targets)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), h_streamed)

    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_reads_slices_never_the_whole_head(model: StreamingModel, monkeypatch) -> None:
    head = small_slices(model)
    read = []
    original = model.checkpoint.load_rows

    def recording(name, start, stop, **kwargs):
        read.append(stop - start)
        return original(name, start, stop, **kwargs)

    monkeypatch.setattr(model.checkpoint, "load_rows", recording)
    h = torch.randn(3, D, requires_grad=True)
    head.cross_entropy(h, torch.tensor([1, 2, 3])).sum().backward()
    assert max(read) == 96
    assert sum(read) == 2 * VOCAB  # every row once in forward, once in backward


def test_token_logits_are_the_full_logits_of_those_tokens(model: StreamingModel) -> None:
    h = torch.randn(4, D)
    tokens = torch.tensor([5, 999, 0])
    expected = model.load_lm_head()(h)[:, tokens]
    torch.testing.assert_close(small_slices(model).token_logits(h, tokens), expected)


def test_objective_scores_like_the_direct_formula(model: StreamingModel) -> None:
    full = model.load_lm_head()
    objective = LMObjective(small_slices(model), [11, 22, 33])
    generator = torch.Generator().manual_seed(1)
    B, T = 3, 6
    h = torch.randn(B, T, D, generator=generator)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=generator)
    loss_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask[0, 4] = 1  # one response token
    loss_mask[1, 3:5] = 1  # two
    loss_mask[2, 2:6] = 1  # four
    batch = Batch(input_ids, torch.ones(B, T, dtype=torch.long), torch.tensor([0, 2, 1]), loss_mask)

    loss, correct, count = objective.score(h, batch)

    logits = full(h)  # (B, T, V)
    expected_loss, expected_correct = 0.0, 0
    for i in range(B):
        positions = loss_mask[i, 1:].nonzero().flatten()
        expected_loss += float(F.cross_entropy(logits[i, positions], input_ids[i, positions + 1]))
        first = int(positions[0])
        ranked = int(logits[i, first, [11, 22, 33]].argmax())
        expected_correct += int(ranked == int(batch.labels[i]))
    assert count == B
    assert correct == expected_correct
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    carries = loss_mask[:, 1:].bool()  # position p predicts token p+1
    expected_mean = F.cross_entropy(logits[:, :-1][carries], input_ids[:, 1:][carries])
    assert float(objective.loss(h, batch)) == pytest.approx(float(expected_mean), rel=1e-5)


def test_encoder_has_no_streamed_head(tmp_path) -> None:
    config = {
        "model_type": "bert",
        "hidden_size": D,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 50,
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
    }
    model = StreamingModel(write_random_checkpoint(config, tmp_path / "bert"))
    with pytest.raises(ModelLoadError, match="encoder and has no LM head"):
        model.streamed_lm_head()
