"""TensorBatches yields exactly DataLoader's batches and leaves torch's global generator where DataLoader does."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedlowrank.training.batches import TensorBatches, batches


def _ds(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 4, generator=g), torch.randint(0, 10, (n,), generator=g))


def _epochs(loader, epochs: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(b) for _ in range(epochs) for b in loader]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n,bs", [(70, 32), (64, 32), (5, 32), (1, 1)])
def test_same_batches_and_generator_state_as_dataloader(shuffle, n, bs):
    ds = _ds(n)
    torch.manual_seed(123)
    ref = _epochs(DataLoader(ds, batch_size=bs, shuffle=shuffle), 3)
    after_ref = torch.randn(4)  # where DataLoader left the global generator
    torch.manual_seed(123)
    ours = _epochs(TensorBatches(ds, bs, shuffle), 3)
    after_ours = torch.randn(4)
    assert len(ours) == len(ref) == 3 * len(DataLoader(ds, batch_size=bs)) == 3 * len(TensorBatches(ds, bs))
    for a, b in zip(ours, ref):
        assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))
    assert torch.equal(after_ours, after_ref)


def test_shuffled_order_differs_between_epochs_and_seeds():
    ds = _ds(50)
    torch.manual_seed(0)
    e1, e2 = (torch.cat([b[1] for b in TensorBatches(ds, 8, True)]) for _ in range(2))
    torch.manual_seed(1)
    e3 = torch.cat([b[1] for b in TensorBatches(ds, 8, True)])
    assert not torch.equal(e1, e2) and not torch.equal(e1, e3)
    assert torch.equal(e1.sort().values, ds.tensors[1].sort().values)  # a permutation: every example once


def test_other_datasets_get_a_dataloader_and_bad_batch_size_is_refused():
    class Plain(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.tensor([i])

    assert isinstance(batches(Plain(), 2), DataLoader)
    assert isinstance(batches(_ds(3), 2), TensorBatches)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(_ds(3), 0)


@pytest.mark.parametrize("text", [False, True])
def test_per_example_sums_add_up_to_the_batch_sums(text):
    """example_sums (the clients' held-out evaluation, split by client) equals eval_sums over any grouping,
    IGNORE targets left out."""
    from fedlowrank.training.loop import IGNORE, eval_sums, example_sums

    g = torch.Generator().manual_seed(0)
    shape = (12, 5) if text else (12,)
    logits = torch.randn(*shape, 7, generator=g)
    y = torch.randint(0, 7, shape, generator=g)
    if text:
        y[:, :-1] = IGNORE  # LEAF: only each window's last character is scored
    per = example_sums(logits, y)
    assert per.shape == (12, 3) and per.dtype == torch.float64
    assert torch.allclose(per.sum(0), eval_sums(logits, y), rtol=1e-6)
    for i in range(12):  # each row is that example alone
        assert torch.allclose(per[i], eval_sums(logits[i:i + 1], y[i:i + 1]), rtol=1e-6)
