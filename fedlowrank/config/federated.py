"""The federated run's config: ``fed`` (:class:`FedConfig`), ``data`` (:class:`DataConfig`) and the run that
ties them to the model, strategy and method (:class:`FederatedRun`). Each section validates itself; the
run checks only what crosses sections. Errors surface before any training."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedlowrank.data.vision import IMAGE_SPECS, VECTOR_SPECS
from fedlowrank.schema import ConfigError, check_top_level, to_dataclass

from .budgets import check_budget_count, check_budgets, client_budget
from .defences import ROBUST, check_defences, resolve_defences, resolve_lr
from .devices import DevicesConfig, population
from .fed_lora import INSTRUCTION_SPECS, LORA_ONLY, check_lora_run

# fedavg: dense baseline, budgets ignored; fedit..ffa: LoRA adapters only (method=lora, fedlowrank.config.fed_lora)
STRATEGIES = ("fedlmt", "slice", "product", "fedavg", "fedit", "hetlora", "flexlora", "flora", "ffa")
PARTITIONS = ("iid", "dirichlet", "natural")  # natural: one client per speaking role (text tasks)
TEXT_SPECS = ("shakespeare",)  # next-character prediction, LEAF style
FAULTS = ("nan", "shape", "crash", "scale", "budget", "weight", "metrics", "flip", "flip1.4", "flip5", "constant",
          "duplicate")
HUB_DATASETS = ("shakespeare", "femnist", "cifar10", "dolly")  # data.source=hub (dolly: datasets, the rest flwr)


@dataclass
class FedConfig:
    num_clients: int = 4
    rounds: int = 15
    rank_ratios: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    ranks: list[int] | None = None  # absolute ranks instead of ratios
    # rank: a ratio p gives rank ceil(p·min(m, n)) (FedLMT; at 1.0 the factors hold more than the dense layer);
    # params: rank floor(p·m·n/(m+n)), at most p times the dense layer's parameters (fedlowrank.config.budgets)
    budget_unit: str = "rank"
    local_epochs: int = 3
    local_steps: int | None = None
    batch_size: int = 32
    lr: Any = "auto"  # auto: by model.arch (cnn, vgg 0.02; vit 0.01; others 0.05; defences.py)
    momentum: float = 0.9
    weight_decay: float = 0.0
    frob_decay: float = 0.0
    # server optimizer on the aggregated change (fedlowrank.federated.server_opt): none | avgm | adam | yogi | adagrad
    server_opt: str = "none"
    server_lr: float | None = None  # null: Flower's default (avgm 1.0, adam 0.1, yogi 0.01, adagrad 0.1)
    server_momentum: float = 0.9  # avgm
    server_beta1: float = 0.9  # adam, yogi
    server_beta2: float = 0.99  # adam, yogi
    server_tau: float = 1e-3  # adam, yogi, adagrad
    prox_mu: float = 0.0  # FedProx (Li et al. 2020): each client adds prox_mu/2 ||w - w_downloaded||^2 to its loss
    fraction_train: float = 1.0
    dropout_prob: float = 0.0  # chance that a client crashes in a round (simulated failures)
    partition: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    client_holdout: float = 0.1  # image tasks: fraction of each client's partition held out for its own eval (0: none)
    timeout: float = 600.0
    poll_s: float = 0.1  # seconds between the server's pulls for replies (Flower's deployed Grid: a fixed 3 s)
    client_cpus: float = 1.0
    client_gpus: float = 0.0  # a fraction (e.g. 0.25) puts several clients on one GPU
    device: str = "auto"  # clients and server evaluation: auto (cuda if client_gpus > 0 and present) | cpu | cuda
    bf16: bool = False  # bf16 autocast for local training and evaluation
    batched_clients: bool = False  # fed.runtime=local: a round's clients of one budget train vectorized (batched.py)
    # superlink: Flower's simulation runtime (a private `flower-superlink --simulation` + `flwr run`); simulation: the
    # deprecated in-process flwr.simulation.run_simulation; local: the same apps in this process (runtime/local.py)
    runtime: str = "superlink"
    # auto: run inside a private user+network namespace where the kernel allows it (no other local process can
    # reach the SuperLink's or Ray's ports; fedlowrank.runtime.private_net), else warn; netns: require it; none: off
    isolation: str = "auto"
    ray_address: str | None = None  # an existing Ray cluster ("<head ip>:6379", fed.runtime=simulation)
    nested: bool = False  # ordered dropout: each local step trains a sampled budget <= the client's (slice/product)
    eval_budgets: bool = True  # also evaluate the global model truncated to each client budget
    bn_stats: str = "auto"  # evaluations' BatchNorm statistics: server (recomputed per view) | aggregate | auto
    checkpoint_every: int = 1
    eval_every: int = 1  # the global and the clients' held-out evaluation every k rounds (always rounds 0 and last)
    keep_checkpoints: int = 2  # complete per-round checkpoints kept under <out_dir>/checkpoints
    # "auto": continue from the newest complete round checkpoint in out_dir (a bad one stops the run, exit 2);
    # "auto_or_fresh": the same, but a refused checkpoint is moved aside and the run starts afresh
    resume: str | None = None
    # Defences against hostile clients (see fedlowrank.federated.robust)
    robust: str = "none"  # none | median | trimmed_mean (coordinate-wise; fedlmt, slice) | krum (fedavg, fedlmt)
    trim_ratio: float = 0.1  # fraction cut from each end for trimmed_mean
    krum_f: int = 1  # clients Krum assumes hostile
    clip_norm: float | None = None  # clip each client's change (update - what it downloaded) to this L2 norm
    # a number: scale a client's change until no tensor or slot group exceeds this multiple of the round's median
    # change (federated/clipping.py); null: off; auto, and screen exclude|loo|none|auto: config/defences.py
    clip_auto: Any = "auto"
    screen: str = "auto"
    screen_examples: int = 200
    screen_tolerance: float = 0.1
    screen_nats: float = 2.0
    screen_rollback: Any = "auto"  # exclude: undo up to this many rounds of an excluded client (auto: defences.py)
    screen_cusum: Any = "auto"  # exclude: a client's summed loss rises above this (nats); auto: defences.py
    max_weight: float = 1e6  # aggregation weight cap (weights are also capped at the known partition size)
    max_abs_value: float = 1e4  # replies with a larger tensor entry (or metric) are rejected
    # ... or with an entry above this multiple of the largest value of the tensor the client downloaded (of the
    # whole download where that tensor is all zeros); tensors it did not download (fresh adapters): max_abs_value
    max_abs_ratio: float = 100.0
    max_reply_mb: float = 256.0  # replies larger than this (from their metadata, before deserializing) are rejected
    max_failed_rounds: int = 3  # this many rounds in a row without a valid update stop the run (error)
    faults: list[str] = field(default_factory=list)  # fault injection: ["<client id>:<kind in FAULTS>", ...]
    devices: DevicesConfig = field(default_factory=DevicesConfig)  # device population, derived budgets, deadline

    def device_population(self):
        """Every client's DeviceProfile (None without a device model); drawn once per config."""
        key = repr(asdict(self.devices)), self.num_clients
        cached = getattr(self, "_population", None)
        if cached is None or cached[0] != key:
            cached = (key, population(self.devices, self.num_clients))
            object.__setattr__(self, "_population", cached)
        return cached[1]

    def validate(self) -> None:
        """Budgets and local training, then faults, checkpoints, defences and runtime, then devices."""
        self._check_training()
        self._check_run_options()
        self._check_devices()

    def _check_training(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"fed.num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise ConfigError(f"fed.rounds must be >= 1, got {self.rounds}")
        check_budgets(self)
        if self.local_epochs < 1 or (self.local_steps is not None and self.local_steps < 1):
            raise ConfigError("fed.local_epochs and fed.local_steps must be >= 1")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("fed.batch_size must be >= 1 and fed.lr > 0")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fed.fraction_train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.dropout_prob < 1.0:
            raise ConfigError(f"fed.dropout_prob must be in [0, 1), got {self.dropout_prob}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"fed.partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.partition == "dirichlet" and self.alpha <= 0:
            raise ConfigError(f"fed.alpha must be > 0, got {self.alpha}")
        if not (math.isfinite(self.lr) and math.isfinite(self.momentum)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"fed.lr must be finite and fed.momentum in [0, 1), got {self.lr}, {self.momentum}")
        if self.frob_decay < 0 or self.weight_decay < 0:
            raise ConfigError("fed.frob_decay and fed.weight_decay must be >= 0")
        if not 0.0 <= self.client_holdout <= 0.5:
            raise ConfigError(f"fed.client_holdout must be in [0, 0.5], got {self.client_holdout}")
        if self.min_partition_size < 0:
            raise ConfigError(f"fed.min_partition_size must be >= 0, got {self.min_partition_size}")

    def _check_run_options(self) -> None:
        faults = self.fault_map()
        if any(pid >= self.num_clients for pid in faults):
            raise ConfigError(f"fed.faults names client(s) {sorted(p for p in faults if p >= self.num_clients)} but "
                              f"fed.num_clients={self.num_clients} (ids 0..{self.num_clients - 1})")
        if min(self.checkpoint_every, self.eval_every, self.keep_checkpoints, self.max_failed_rounds) < 1:
            raise ConfigError("fed.checkpoint_every, fed.eval_every, fed.keep_checkpoints and fed.max_failed_rounds "
                              "must be >= 1")
        if self.resume not in (None, "auto", "auto_or_fresh"):
            raise ConfigError(f"fed.resume must be null, 'auto' or 'auto_or_fresh', got {self.resume!r}")
        check_defences(self)
        if not 0.0 <= self.trim_ratio < 0.5:
            raise ConfigError(f"fed.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"fed.clip_norm must be > 0 (or null), got {self.clip_norm}")
        if not (self.max_weight > 0 and self.max_abs_value > 0 and self.max_abs_ratio > 0 and self.timeout > 0
                and self.poll_s > 0 and self.max_reply_mb > 0):
            raise ConfigError("fed.max_weight, fed.max_abs_value, fed.max_abs_ratio, fed.max_reply_mb, fed.timeout and "
                              "fed.poll_s must be > 0")
        if self.runtime not in ("simulation", "superlink", "local"):
            raise ConfigError(f"fed.runtime must be superlink|simulation|local, got {self.runtime!r}")
        from fedlowrank.federated.server_opt import SERVER_OPTS

        if self.server_opt not in SERVER_OPTS:
            raise ConfigError(f"fed.server_opt must be one of {SERVER_OPTS}, got {self.server_opt!r}")
        if not (self.server_lr is None or self.server_lr > 0) or not self.server_tau > 0 \
                or not (0 <= self.server_momentum < 1 and 0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1):
            raise ConfigError("fed.server_lr and fed.server_tau must be > 0; fed.server_momentum, fed.server_beta1 "
                              "and fed.server_beta2 in [0, 1)")
        if not self.prox_mu >= 0:
            raise ConfigError(f"fed.prox_mu must be >= 0 (FedProx's proximal weight; 0: off), got {self.prox_mu}")
        if self.isolation not in ("auto", "netns", "none"):
            raise ConfigError(f"fed.isolation must be auto|netns|none, got {self.isolation!r}")
        if self.ray_address is not None and (self.runtime != "simulation" or self.isolation == "netns"):
            raise ConfigError("fed.ray_address needs fed.runtime=simulation (the default runtime's ClientApps on "
                              "a cluster's other nodes cannot read the run's config) and the host's network "
                              f"(fed.isolation=auto|none); got runtime={self.runtime}, isolation={self.isolation}")
        if self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError(f"fed.client_cpus must be > 0 (0 makes Ray wait forever), got {self.client_cpus}; "
                              f"fed.client_gpus >= 0, got {self.client_gpus}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"fed.device must be auto|cpu|cuda, got {self.device!r}")
    def _check_devices(self) -> None:
        try:
            self.devices.validate()
            self.device_population()  # a listed population must name every client
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e
        if self.devices.budget_from != "none" and self.ranks is not None:
            raise ConfigError("fed.devices.budget_from derives rank ratios: use fed.rank_ratios, not fed.ranks")

    def server_optimizer(self, product_space: bool):  # None for fed.server_opt=none
        from fedlowrank.federated.server_opt import ServerOptConfig, ServerOptimizer

        if self.server_opt == "none":
            return None
        return ServerOptimizer(ServerOptConfig(self.server_opt, self.server_lr, self.server_momentum,
                                               self.server_beta1, self.server_beta2, self.server_tau), product_space)

    def fault_map(self) -> dict[int, str]:
        out = {}  # client id -> fault kind
        for item in self.faults or []:
            pid, _, kind = str(item).partition(":")
            if not pid.strip().isdigit() or kind not in FAULTS:
                raise ConfigError(f"fed.faults entries must look like '<client id>:<{'|'.join(FAULTS)}>', got {item!r}")
            out[int(pid)] = kind
        return out

    def budget(self, partition_id: int) -> dict[str, float | int]:
        """Rank budget of a client (:func:`fedlowrank.config.budgets.client_budget`)."""
        return client_budget(self, partition_id)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = True
    seed: int = 0
    path: str | None = None  # text tasks: the text file (tinyshakespeare.txt format)
    seq_len: int = 80  # text tasks: characters per sample (LEAF: 80)
    test_fraction: float = 0.1  # text and Hub tasks: each client's held-out share of its examples
    # text tasks, evaluation: last (LEAF's protocol: the next character after each held-out window's seq_len-character
    # context) | all (every position of a held-out window, its context growing from 1 character to seq_len)
    eval_target: str = "last"
    tokenizer: str = "auto"  # text: auto (characters; a pretrained checkpoint's own tokenizer) | char | a tokenizer
    source: str = "local"  # local (embedded, file or torchvision) | hub (flwr-datasets FederatedDataset, online)
    # data=synthetic: FedProx's Synthetic(alpha, beta) (fedlowrank.data.synthetic); one client per generated user
    alpha: float = 1.0  # model heterogeneity
    beta: float = 1.0  # data heterogeneity
    iid: bool = False  # Synthetic-IID: one model and one input distribution for every client

    def validate(self) -> None:
        known = [*IMAGE_SPECS, *VECTOR_SPECS, *TEXT_SPECS, *INSTRUCTION_SPECS]
        if self.name not in known:
            raise ConfigError(f"data.name {self.name!r} is not a federated dataset: {known}")
        if self.name in VECTOR_SPECS and not (self.alpha >= 0 and self.beta >= 0 and 0 < self.test_fraction < 1):
            raise ConfigError(f"data.alpha and data.beta must be >= 0 and data.test_fraction in (0, 1), got "
                              f"{self.alpha}, {self.beta}, {self.test_fraction}")
        if self.source not in ("local", "hub"):
            raise ConfigError(f"data.source must be local or hub, got {self.source!r}")
        if self.source == "hub":
            if self.name not in HUB_DATASETS:
                raise ConfigError(f"data.source=hub serves {list(HUB_DATASETS)}, not {self.name!r}")
            if not 0.0 < self.test_fraction < 1.0:
                raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
            return
        if self.name == "femnist":
            raise ConfigError("femnist comes from the Hugging Face Hub: set data.source=hub (needs the internet once)")
        if self.name in TEXT_SPECS:
            from fedlowrank.data.fetch import shakespeare_path

            self.path = shakespeare_path(self.path)  # the default corpus is fetched (and verified) where missing
            if self.eval_target not in ("last", "all"):
                raise ConfigError(f"data.eval_target must be last (LEAF) or all, got {self.eval_target!r}")
            if self.seq_len < 2 or not 0.0 < self.test_fraction < 1.0:
                raise ConfigError(f"data.seq_len must be >= 2 and data.test_fraction in (0, 1), got {self.seq_len}, "
                                  f"{self.test_fraction}")


@dataclass
class FederatedRun:
    """Everything a federated run needs, validated."""

    fed: FedConfig
    data: DataConfig
    model: dict[str, Any]
    strategy: str
    out_dir: str
    seed: int = 0
    method: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Each section validates itself; then what crosses sections: strategy x method x options,
        the method's own schema, and data x model."""
        resolve_lr(self)
        self.fed.validate()
        self.data.validate()
        lora = self.method.get("name") == "lora" or self.strategy in LORA_ONLY
        resolve_defences(self, lora, TEXT_SPECS)
        if lora:
            return check_lora_run(self, TEXT_SPECS)  # a pretrained LLM with adapters: its own checks
        self._check_strategy()
        self._check_method()
        self._check_data_and_model()

    def _check_strategy(self) -> None:
        method = self.method.get("name", "none")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.strategy == "fedavg" and method != "none":
            raise ConfigError("strategy=fedavg is the dense FedAvg baseline; it takes no method")
        if self.strategy != "fedavg":  # the dense baseline ignores budgets
            check_budget_count(self.fed)
        if self.fed.nested and (self.strategy in ("fedlmt", "fedavg") or method != "none"):
            raise ConfigError("fed.nested (ordered dropout over budgets) needs strategy slice or product and "
                              "no method (fedlmt trains one common rank)")
        if self.fed.budget_unit == "params" and method in ("relora", "welore"):
            raise ConfigError(f"fed.budget_unit=params sizes factorized layers; method={method} sizes its own "
                              "(adapters, WeLore's ranks): use fed.budget_unit=rank")
        if self.fed.robust != "none" and (self.strategy == "product" or method == "relora"):
            raise ConfigError(f"fed.robust={self.fed.robust} needs strategy fedlmt or slice without ReLoRA (product "
                              "and adapter merges combine products, not coordinates); use fed.clip_norm there")
        if self.fed.robust == "krum" and (self.strategy == "slice" or method != "none"):
            raise ConfigError("fed.robust=krum compares whole models of one shape: strategy fedavg or fedlmt, no method")

    def _check_method(self) -> None:
        """The method section against its own schema (InRank federated: stage 1 only)."""
        from fedlowrank.methods.inrank import InRankConfig
        from fedlowrank.methods.relora import ReLoRAConfig
        from fedlowrank.methods.welore import WeLoreConfig

        name = self.method.get("name", "none")
        if name not in ("none", "relora", "welore", "inrank"):
            raise ConfigError(f"method {name!r} is not available in federated mode (none|relora|welore|inrank|lora)")
        ckpt = self.method.get("from_ckpt")
        if ckpt and not os.path.isfile(str(ckpt)):
            raise ConfigError(f"method.from_ckpt={ckpt!r} is not an existing file (a dense model.safetensors)")
        if name == "none":
            return
        cls = {"inrank": InRankConfig, "relora": ReLoRAConfig, "welore": WeLoreConfig}[name]
        mc = to_dataclass(cls, self.method, "method")
        try:
            if name == "inrank":
                mc.validate_federated()
            else:
                mc.for_steps(None) if name == "relora" else mc.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e
        if name != "inrank":
            self._check_targets(mc)

    def _check_data_and_model(self) -> None:
        for key in ("skip", "targets"):  # module-name regexes: a list of strings (or null)
            v = self.model.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ConfigError(f"model.{key} must be a list of module-name regexes, e.g. model.{key}=[head], "
                                  f"got {v!r}")
        text = self.data.name in TEXT_SPECS
        if self.data.name in VECTOR_SPECS and self.fed.partition != "natural":
            raise ConfigError(f"data={self.data.name} generates one client per user: use fed.partition=natural")
        if self.fed.partition == "natural" and not (text or self.data.name in ("femnist", *VECTOR_SPECS)):
            raise ConfigError(f"fed.partition=natural needs a dataset with natural client ids ({list(TEXT_SPECS)}), "
                              f"not {self.data.name!r}")
        if text and self.fed.partition == "dirichlet":
            raise ConfigError("fed.partition=dirichlet splits by class label; text tasks use natural or iid")
        from fedlowrank.models.build import TEXT_FAMILIES, dense_model, validate_vision_model

        try:
            if not text:
                validate_vision_model(self.model, self.data.name)
                return
            if self.model.get("family") not in TEXT_FAMILIES:
                raise ValueError(f"data={self.data.name} needs model=lstm or model=char_transformer "
                                 f"(model.family in {TEXT_FAMILIES}), got family {self.model.get('family')!r}")
            lm = dense_model(self.model, self.data.name, vocab_size=2)
            block = getattr(getattr(lm, "config", None), "block_size", None)
            if block is not None and block < self.data.seq_len:
                raise ValueError(f"model.block_size={block} is shorter than data.seq_len={self.data.seq_len}")
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def _check_targets(self, mc) -> None:
        """The method's target/skip regexes must select at least one nn.Linear of the model."""
        from fedlowrank.methods.welore import target_linears
        from fedlowrank.models.build import dense_model

        try:
            model = dense_model(self.model, self.data.name, vocab_size=2)  # names only: any vocabulary will do
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if not target_linears(model, mc.targets, mc.skip):
            raise ConfigError(f"method.targets={mc.targets} / method.skip={mc.skip} select no nn.Linear of "
                              f"model {self.model.get('arch')!r}")


def federated_run_from_cfg(cfg: DictConfig | dict) -> FederatedRun:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    check_top_level(cfg, {"seed", "out_dir", "model", "data", "strategy", "method", "fed", "run_mode"}, "federated")
    strategy = cfg.get("strategy", {}) or {}
    out_dir = cfg.get("out_dir") or os.path.join("outputs", "federated")
    run = FederatedRun(
        fed=to_dataclass(FedConfig, cfg.get("fed", {}), "fed"),
        data=to_dataclass(DataConfig, cfg.get("data", {}), "data"),
        model=OmegaConf.to_container(cfg.get("model", {}), resolve=True),  # type: ignore[arg-type]
        strategy=str(strategy.get("name", "slice")) if isinstance(strategy, (dict, DictConfig)) else str(strategy),
        out_dir=str(out_dir),
        seed=int(cfg.get("seed", 0)),
        method=OmegaConf.to_container(cfg.get("method", {}) or {}, resolve=True),  # type: ignore[arg-type]
    )
    run.validate()
    return run
