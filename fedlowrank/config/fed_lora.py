"""Federated LoRA fine-tuning of a pretrained LLM (``method=lora``): the method's schema and the checks that cross
sections (strategy, model, data, fed options). Everything is checked before any data or weight is loaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedlowrank.schema import ConfigError, to_dataclass

from .budgets import check_budget_count

if TYPE_CHECKING:
    from .federated import FederatedRun

LORA_RULES = ("fedit", "hetlora", "flexlora", "flora", "ffa", "product")  # fedlowrank.federated.lora_rules
LORA_ONLY = ("fedit", "hetlora", "flexlora", "flora", "ffa")  # strategies that exist only for method=lora
INSTRUCTION_SPECS = ("dolly",)  # instruction data in the Dolly-15k layout (fedlowrank.data.instructions)


@dataclass
class FedLoRAConfig:
    """``method=lora`` in federated mode: every client trains LoRA adapters (rank from its budget) on the frozen
    pretrained model; adapters are the only payload."""

    name: str = "lora"
    alpha: float = 16.0  # scale alpha / r of each client's adapter (r: its own rank)
    scaling: str = "rank"  # rank: s = alpha / r (LoRA) | fixed: s = alpha whatever r (FLoRA's code: alpha = 2r, s = 2)
    targets: list[str] = field(default_factory=lambda: [r"attn\.", r"mlp\."])  # nn.Linear names (regex search)
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    dropout: float = 0.0  # on the adapter's input (LoRA dropout)
    init_seed: int | None = None  # the global A's random init (ffa: the shared frozen A); null: the run's seed
    # the clients' local optimizer, new each round: sgd (fed.lr, fed.momentum) | adamw (fed.lr, fed.weight_decay;
    # what FlexLoRA's, FLoRA's and FlowerTune's clients use)
    optimizer: str = "adamw"
    # strategy=hetlora, rank self-pruning (HetLoRA): each client adds prune_lambda · ||(α/r)·B_tail·A_tail||_F, the
    # slots above floor(prune_gamma · r), to its loss; when that tail's norm ends a round lower than it started, the
    # client sends its adapter cut to those slots and keeps the smaller rank. 0: off
    prune_lambda: float = 0.01
    prune_gamma: float = 0.9

    def validate(self) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"method.alpha must be > 0, got {self.alpha}")
        if self.scaling not in ("rank", "fixed"):
            raise ConfigError(f"method.scaling must be rank (s = alpha/r) or fixed (s = alpha), got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"method.dropout must be in [0, 1), got {self.dropout}")
        if not (self.prune_lambda >= 0 and 0 < self.prune_gamma < 1):
            raise ConfigError(f"method.prune_lambda must be >= 0 and method.prune_gamma in (0, 1), got "
                              f"{self.prune_lambda}, {self.prune_gamma}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"method.optimizer must be sgd or adamw, got {self.optimizer!r}")


def check_lora_run(run: FederatedRun, text_specs: tuple[str, ...]) -> None:
    """``method=lora`` with a LoRA rule, a pretrained GPT-2/LLaMA, a text task, and no option that needs
    factorized layers or coordinates."""
    name, f = run.method.get("name", "none"), run.fed
    if run.strategy not in LORA_RULES:
        raise ConfigError(f"method=lora aggregates adapters with strategy in {LORA_RULES}, not {run.strategy!r}")
    if name != "lora":
        raise ConfigError(f"strategy={run.strategy} aggregates LoRA adapters: it needs method=lora (and "
                          "model.pretrained)")
    mc = to_dataclass(FedLoRAConfig, run.method, "method")
    mc.validate()
    check_budget_count(f)
    refused = {"fed.nested": f.nested, "fed.robust": f.robust != "none", "fed.server_opt": f.server_opt != "none",
               "fed.batched_clients": f.batched_clients, "fed.budget_unit=params": f.budget_unit != "rank",
               "fed.screen": f.screen != "none", "fed.frob_decay": f.frob_decay != 0, "fed.prox_mu": f.prox_mu != 0}
    bad = [k for k, on in refused.items() if on]
    if bad:
        raise ConfigError(f"method=lora does not support {', '.join(bad)} (they act on factorized layers or "
                          "coordinates of the whole model)")
    _check_model_and_data(run, mc, text_specs)


def _check_model_and_data(run: FederatedRun, mc: FedLoRAConfig, text_specs: tuple[str, ...]) -> None:
    """A pretrained checkpoint this project can represent, a text task tokenized by its tokenizer, windows that
    fit its context, and targets that select some of its linears."""
    from fedlowrank.models.hf import resolve
    from fedlowrank.models.hf_config import model_config

    src = run.model.get("pretrained")
    if not src or run.model.get("family") != "lm":
        raise ConfigError("method=lora fine-tunes a pretrained LLM: use model=gpt2 or model=llama with "
                          "model.pretrained=<checkpoint directory or hub id>")
    if run.data.name in INSTRUCTION_SPECS:
        _check_instructions(run)
    elif run.data.name not in text_specs or run.fed.partition == "dirichlet":
        raise ConfigError(f"method=lora trains on text: data.name in {[*text_specs, *INSTRUCTION_SPECS]} (the roles: "
                          f"fed.partition natural or iid), not {run.data.name!r} / {run.fed.partition!r}")
    d = resolve(str(src))
    arch, cfg = model_config(d)
    if arch != run.model.get("arch"):
        raise ConfigError(f"model.pretrained={src!r} is a {arch} checkpoint; use model={arch}")
    block = getattr(cfg, "block_size", None) or getattr(cfg, "max_seq_len", None)
    if block is not None and run.data.seq_len > block:
        raise ConfigError(f"data.seq_len={run.data.seq_len} exceeds the checkpoint's context of {block} tokens")
    vocab = text_vocab(run)
    if vocab > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab} tokens, more than the checkpoint's vocab_size "
                          f"{cfg.vocab_size}; use the checkpoint's own (data.tokenizer=auto)")
    _check_targets(arch, cfg, mc)


def _check_instructions(run: FederatedRun) -> None:
    d = run.data
    if d.source == "local":
        from fedlowrank.data.instructions import read_jsonl

        read_jsonl(d.path or "")  # every record checked now, before any work
    if d.seq_len < 2 or not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"data.seq_len must be >= 2 and data.test_fraction in (0, 1), got {d.seq_len}, "
                          f"{d.test_fraction}")


def _check_targets(arch: str, cfg, mc: FedLoRAConfig) -> None:
    import torch
    from torch import nn

    from fedlowrank.lowrank.factorize import matches_any
    from fedlowrank.models.gpt2 import GPT2
    from fedlowrank.models.llama import Llama

    with torch.device("meta"):  # names only: no memory
        model = GPT2(cfg) if arch == "gpt2" else Llama(cfg)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and matches_any(n, mc.targets)
             and not matches_any(n, mc.skip)]
    if not names:
        raise ConfigError(f"method.targets={mc.targets} / method.skip={mc.skip} select no nn.Linear of the {arch} "
                          "checkpoint")


def text_tokenizer(run: FederatedRun) -> str | None:
    """The tokenizer a text task is encoded with: None for characters (models trained from scratch), else a
    ``tokenizers`` spec: ``data.tokenizer``, or with ``auto`` the pretrained checkpoint's own tokenizer.json."""
    spec = run.data.tokenizer
    if spec == "char" or (spec == "auto" and not run.model.get("pretrained")):
        return None
    if spec != "auto":
        return spec
    from fedlowrank.models.hf import resolve

    path = resolve(str(run.model["pretrained"])) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"model.pretrained={run.model['pretrained']!r} has no tokenizer.json; give "
                          "data.tokenizer=<tokenizer.json or hub name>")
    return str(path)


def text_vocab(run: FederatedRun) -> int:
    from fedlowrank.data.text import make_tokenizer

    spec = text_tokenizer(run)
    return 0 if spec is None else make_tokenizer(spec).vocab_size
