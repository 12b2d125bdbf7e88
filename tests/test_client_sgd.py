"""The federated clients' SGD (``training.optim.SGD``) against ``torch.optim.SGD``: the same parameters bit for
bit, step after step, and a client's round that never imports torch._dynamo."""
from __future__ import annotations

import copy

import pytest
import torch
from test_layering import _loaded_after

from fedlowrank.training.optim import SGD


def _models(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.5, 3e-3)])
def test_the_same_parameters_as_torch_sgd_bit_for_bit(momentum, weight_decay):
    """Six steps, a frozen-out layer in steps 2-3 (no gradient: neither the parameter nor its buffer moves) and
    ``zero_grad`` both ways; catches a dampened or Nesterov momentum, decay added after momentum, a buffer
    started at zero, or a step applied to a parameter without gradient."""
    ours_m, ref_m = _models(0)
    ours = SGD(list(ours_m.parameters()), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD(ref_m.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(4, 7, generator=g), torch.randint(2, (4,), generator=g)
        for model, opt in ((ours_m, ours), (ref_m, ref)):
            opt.zero_grad(set_to_none=step % 2 == 0)
            skip = model[3] if step in (2, 3) else None  # the last layer gets no gradient in these steps
            h = model[2](model[1](model[0](x)))
            out = h @ model[3].weight.detach().T if skip is not None else model[3](h)
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
        for (n, p), q in zip(ours_m.named_parameters(), ref_m.parameters()):
            assert torch.equal(p, q), (step, n)


@pytest.mark.timeout(120)
def test_a_clients_imports_and_optimizer_load_neither_torch_dynamo_nor_triton():
    """A federated client's optimizer is built and stepped without loading torch._dynamo (1.2-1.6 s a process
    with torch.optim), and the client's modules import no triton (0.2 s, via torch.utils.flop_counter); either
    comes back as soon as ``local_optimizer`` returns a torch optimizer or the FLOP counter is imported eagerly."""
    code = ("import torch\nimport clients.client_app\nfrom fedlowrank.federated.methods import FedMethod\n"
            "class R:\n    class fed:\n        lr, momentum, weight_decay = 0.1, 0.9, 1e-4\n"
            "p = torch.nn.Parameter(torch.ones(3))\nopt = FedMethod(R()).local_optimizer([p])\n"
            "p.sum().backward(); opt.step(); opt.zero_grad()")
    assert _loaded_after(code, "[m for m in ('torch._dynamo', 'triton') if m in sys.modules]") == "[]"
