"""Factorized-layer core shared by every method and mode."""
from .accounting import compression_summary, count_flops, count_params, size_mb, state_bytes
from .conform import conform_to_state
from .factorize import (FACTORIZERS, densify, factorize, frobenius_decay, lowrank_modules, matches_any, model_ranks, set_ranks,
                        set_submodule)
from .lora import LoRALinear, add_lora, lora_modules, merge_lora
from .layers import LowRankConv2d, LowRankLinear, LowRankMixin, rank_from_budget
from .shared_input import shared_input_linear
from .spectrum import (balanced_factors, explained_energy_ratios, explained_rank, explained_variance_rank, explained_variance_ratios,
                       factored_svd, factored_svdvals, refactorize_sum)

__all__ = [
    "FACTORIZERS", "conform_to_state", "LoRALinear", "add_lora", "lora_modules", "merge_lora", "LowRankConv2d", "LowRankLinear", "LowRankMixin", "balanced_factors", "compression_summary",
    "count_flops", "count_params", "densify", "explained_energy_ratios", "explained_rank", "explained_variance_rank", "explained_variance_ratios", "factored_svd", "factored_svdvals", "factorize",
    "frobenius_decay", "lowrank_modules", "matches_any", "set_submodule", "model_ranks", "rank_from_budget", "refactorize_sum", "set_ranks", "shared_input_linear",
    "size_mb", "state_bytes",
]
