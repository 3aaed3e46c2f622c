"""``ModelSpec``: the model facts the coordinator is configured from, as a JSON file."""

import json

import pytest

from chainfed.proto.model_spec import ModelSpec, ModelSpecError

SPEC = ModelSpec(6, "bert", "ab" * 16, {"q_proj": 384, "down_proj": 1536})


def test_written_spec_reads_back_equal(tmp_path):
    path = SPEC.write(tmp_path / "sub" / "spec.json")

    assert ModelSpec.read(path) == SPEC
    assert json.loads(path.read_text())["num_layers"] == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"num_layers": 6, "family": "bert"}', r"missing fields \['fingerprint'\]"),
        ('{"num_layers": 0, "family": "bert", "fingerprint": "x"}', "num_layers must be"),
        ('{"num_layers": 6, "family": "gpt2", "fingerprint": "x"}', "family must be"),
        ('{"num_layers": 6, "family": "bert", "fingerprint": "x", "extra": 1}', "unknown"),
        ('[6, "bert"]', "a JSON object"),
        ('{"num_layers": 6, "family": "bert", "fingerprint": "x", '
         '"lora_in_features": {"q_proj": -1}}', "lora_in_features"),
    ],
)  # fmt: skip
def test_a_malformed_spec_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "spec.json"
    path.write_text(content)

    with pytest.raises(ModelSpecError, match=message) as caught:
        ModelSpec.read(path)

    assert str(path) in str(caught.value)
