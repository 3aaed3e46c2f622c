"""Update digests: what they distinguish (``tests/coordinator/test_round_digests.py``:
that every aggregated round records them)."""

import torch

from chainfed.proto.update_digest import update_digest


def test_digest_ignores_mapping_order_but_not_content():
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.ones(2)}
    reordered = {"y": torch.ones(2), "x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert update_digest(a) == update_digest(reordered)

    one_ulp = dict(a, y=torch.nextafter(torch.ones(2), torch.full((2,), 2.0)))
    reshaped = dict(a, x=a["x"].reshape(3, 2))
    other_dtype = dict(a, y=torch.ones(2, dtype=torch.float64))
    renamed = {"x": a["x"], "z": a["y"]}
    moved = {"xy": torch.zeros(0), "x.": a["x"], "y": a["y"]}
    digests = {update_digest(t) for t in (a, one_ulp, reshaped, other_dtype, renamed, moved, {})}
    assert len(digests) == 7


def test_digest_of_bfloat16_and_non_contiguous_tensors():
    t = torch.randn(4, 5)
    assert update_digest({"w": t.t()}) == update_digest({"w": t.t().contiguous()})
    b = t.to(torch.bfloat16)
    assert update_digest({"w": b}) != update_digest({"w": b.float()})
    assert update_digest({"w": b}) == update_digest({"w": b.clone()})
