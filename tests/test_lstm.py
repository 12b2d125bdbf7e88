"""The factorizable LSTM cell: equal to ``torch.nn.LSTM`` given the same weights, and its two recurrent modes
(two thin GEMMs per step, or U·V merged once per forward) give the same outputs and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from fedlowrank.lowrank import factorize
from fedlowrank.models.lstm import RECURRENT_MODES, LSTMCellLinear


def test_dense_cell_matches_torch_lstm():
    torch.manual_seed(0)
    cell, ref = LSTMCellLinear(5, 7), torch.nn.LSTM(5, 7, batch_first=True)
    with torch.no_grad():  # PyTorch's gate order is (i, f, g, o), as the cell's chunks
        cell.W_ih.weight.copy_(ref.weight_ih_l0)
        cell.W_ih.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
        cell.W_hh.weight.copy_(ref.weight_hh_l0)
    x = torch.randn(3, 11, 5)
    torch.testing.assert_close(cell(x), ref(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden", [6, 16])
def test_recurrent_modes_agree_in_outputs_and_gradients(hidden):
    torch.manual_seed(1)
    cell = LSTMCellLinear(4, hidden)
    factorize(cell, ratio=0.5, targets=["W_hh"])
    x = torch.randn(2, 9, 4)
    outs, grads = [], []
    for mode in RECURRENT_MODES:
        c = copy.deepcopy(cell)
        c.recurrent = mode
        y = c(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [c.W_hh.U, c.W_hh.V, c.W_ih.weight]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    dense = copy.deepcopy(cell)
    dense.W_hh = cell.W_hh.merge()  # the factorized cell computes the dense cell of W_hh = U V
    torch.testing.assert_close(dense(x), outs[0], rtol=1e-5, atol=1e-6)
