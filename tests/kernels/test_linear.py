"""``few_rows_linear``: ``F.linear`` over a few rows, computed with the weight on the left."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from accel.kernels import few_rows_linear
from accel.kernels.linear import FEW_ROWS, takes_few_rows


def weights(dtype, out=48, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, width, generator=g, dtype=dtype), torch.randn(out, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(24,), (1, 24), (1, 1, 24), (1, 5, 24), (2, 3, 24), (12, 24), (3, 5, 24),
                                   (FEW_ROWS, 24)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_it_equals_f_linear_up_to_rounding(shape, dtype, tol, with_bias):
    weight, bias = weights(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = few_rows_linear(x, weight, bias if with_bias else None)
    want = F.linear(x, weight, bias if with_bias else None)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_few_rows_take_the_weight_on_the_left_and_one_row_is_padded_to_two():
    """The product is the one named: bit-equal to ``weight @ x^T`` (a single row as one of two
    equal columns), not to ``F.linear``'s own path."""
    weight, bias = weights(torch.float32)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    assert torch.equal(few_rows_linear(x, weight), torch.mm(weight, x.t()).t())
    assert torch.equal(few_rows_linear(x, weight, bias), torch.mm(weight, x.t()).t() + bias)
    one = x[:1]
    assert torch.equal(few_rows_linear(one, weight), torch.mm(weight, one.repeat(2, 1).t())[:, :1].t())


def test_more_than_a_block_of_rows_is_padded_with_zero_rows_to_whole_blocks():
    """12 rows are computed as 16 (the last 4 zero) and cut back: bit-equal to that product; 16
    rows as themselves."""
    weight, bias = weights(torch.float32)
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(4))
    padded = torch.cat([x, torch.zeros(4, 24)])
    assert torch.equal(few_rows_linear(x, weight, bias), torch.mm(weight, padded.t())[:, :12].t() + bias)
    sixteen = torch.cat([x, x[:4]])
    assert torch.equal(few_rows_linear(sixteen, weight), torch.mm(weight, sixteen.t()).t())


def test_elsewhere_it_is_f_linear_itself():
    """More rows than ``FEW_ROWS``, half precision, or a weight of another dtype: ``F.linear``, bit
    for bit."""
    weight, bias = weights(torch.float32)
    many = torch.randn(FEW_ROWS + 1, 24, generator=torch.Generator().manual_seed(3))
    assert not takes_few_rows(many, weight)
    assert torch.equal(few_rows_linear(many, weight, bias), F.linear(many, weight, bias))
    for dtype in (torch.float16, torch.bfloat16):
        x, w = many[:3].to(dtype), weight.to(dtype)
        assert not takes_few_rows(x, w)
        assert torch.equal(few_rows_linear(x, w), F.linear(x, w))
    assert not takes_few_rows(many[:3].double(), weight)
    assert takes_few_rows(many[:3], weight) and takes_few_rows(many[:FEW_ROWS], weight)


def test_a_width_mismatch_is_refused_by_name():
    weight, _ = weights(torch.float32)
    with pytest.raises(ValueError, match="x's last dimension \\(23\\) must equal weight's input width \\(24\\)"):
        few_rows_linear(torch.randn(2, 23), weight)
