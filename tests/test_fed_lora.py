"""Federated LoRA fine-tuning of a pretrained checkpoint (``method=lora``): a tiny random GPT-2 saved by
``transformers`` with a BPE tokenizer trained here stands in for a hub checkpoint. Checks the config refusals, that
every model of a process shares one frozen base and only adapters travel, and that a short run trains."""
from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg
from safetensors.torch import load_file
from test_hf import VOCAB, _hf, _tokenizer
from torch.utils.data import DataLoader

from fedlowrank.config import ConfigError, federated_run_from_cfg
from fedlowrank.federated import lora_rules
from fedlowrank.federated.client import local_train, model_from_state, prepare_client
from fedlowrank.federated.methods import fed_method
from fedlowrank.federated.task import fed_data
from fedlowrank.lowrank.lora import LoRALinear
from fedlowrank.runtime.inprocess import InProcessGrid, make_strategy, run_rounds
from fedlowrank.training.loop import evaluate_classifier
from fedlowrank.training.optim import SGD

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    _hf("gpt2", d)
    _tokenizer(d)
    return d


@pytest.fixture(scope="module")
def ckpt_long(tmp_path_factory):
    """The same tiny GPT-2 with a 256-token context (instruction prompts are long)."""
    import transformers as T

    d = tmp_path_factory.mktemp("gpt2_long")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0)).save_pretrained(d)
    _tokenizer(d)
    return d


def lora_run(ckpt, play, *overrides):
    return federated_run_from_cfg(compose_cfg(
        "experiment=fed_lora", f"model.pretrained={ckpt}", f"data.path={play}", "out_dir=/tmp/x", "data.seq_len=16",
        "fed.num_clients=4", "fed.ranks=[8,4,2,2]", "fed.min_partition_size=2", *overrides))


@pytest.mark.parametrize("override,match", [
    ("model.pretrained=null", "model.pretrained"),
    ("strategy=slice", "strategy in"),
    ("fed.robust=median", "fed.robust"),
    ("fed.server_opt=adam", "fed.server_opt"),
    ("method.targets=[nothing_here]", "select no nn.Linear"),
    ("data.seq_len=65", "context of 64"),
    ("method.alpha=0", "method.alpha"),
    ("fed.partition=dirichlet", "trains on text"),
])
def test_refused_before_any_work(ckpt, play, override, match):
    with pytest.raises(ConfigError, match=match):
        lora_run(ckpt, play, override)


def test_strategy_of_adapters_needs_method_lora():
    with pytest.raises(ConfigError, match="needs method=lora"):
        federated_run_from_cfg(compose_cfg("mode=federated", "strategy=flexlora", "out_dir=/tmp/x"))


def test_models_share_one_frozen_base_and_only_adapters_travel(ckpt, play):
    run = lora_run(ckpt, play, "strategy=fedit")
    method = fed_method(run)
    g = method.initial_state()
    assert g and all(k.endswith((".adapter.U", ".adapter.V")) for k in g)  # the global state: adapters only
    assert all(float(g[k].abs().max()) == 0 for k in g if k.endswith(".U"))  # B = 0: starts at the base
    big, small = (method.view(g, run.fed.budget(i)) for i in (0, 2))
    m1, m2 = model_from_state(run, big), model_from_state(run, small)
    w1, w2 = m1.h[0].attn.c_attn.base.weight, m2.h[0].attn.c_attn.base.weight
    assert w1.data_ptr() == w2.data_ptr() and not w1.requires_grad  # one base tensor, frozen
    assert m1.h[0].attn.c_attn.rank == 8 and m2.h[0].attn.c_attn.rank == 2
    assert {n for n, p in m1.named_parameters() if p.requires_grad} == {
        f"{p}.adapter.{s}" for p in lora_rules.adapter_prefixes(g) for s in "UV"}
    assert isinstance(method.local_optimizer([torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    sgd = fed_method(lora_run(ckpt, play, "method.optimizer=sgd")).local_optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert type(sgd) is SGD and sgd.param_groups[0]["lr"] == run.fed.lr
    reply, metrics = local_train(run, 2, 4, small, 1)
    assert {k: tuple(v.shape) for k, v in reply.items()} == method.expected(small, run.fed.budget(2))
    assert any(not torch.equal(reply[k], small[k]) for k in reply)  # it trained
    saved = load_file(str(ckpt / "model.safetensors"))  # the base is untouched by training
    ours = model_from_state(run, small).h[0].attn.c_attn.base.weight
    torch.testing.assert_close(ours, saved["transformer.h.0.attn.c_attn.weight"].T, rtol=0, atol=0)


def test_ffa_clients_keep_the_shared_a_and_send_b_only(ckpt, play):
    run = lora_run(ckpt, play, "strategy=ffa")
    method = fed_method(run)
    view = method.view(method.initial_state(), run.fed.budget(1))
    reply, _ = local_train(run, 1, 4, view, 1)
    assert reply and all(k.endswith(".adapter.U") for k in reply)
    model = prepare_client(run, 1, 4, view, 1)[0]  # the model a client trains
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert adapters and all(not m.adapter.V.requires_grad and m.adapter.U.requires_grad for m in adapters)


@pytest.mark.parametrize("rule", ["fedit", "hetlora", "flexlora", "flora", "ffa", "product"])
def test_a_short_run_lowers_the_held_out_loss(ckpt, play, rule):
    run = lora_run(ckpt, play, f"strategy={rule}", "fed.lr=0.02", "fed.clip_auto=null")
    strategy, grid = make_strategy(run), InProcessGrid(run)
    test = DataLoader(fed_data(run).test, batch_size=256)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"]
    run_rounds(strategy, grid, 3)
    after = evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"]
    assert set(strategy.global_state) == set(fed_method(run).initial_state())  # still adapters only
    assert after < before - 0.05


def test_fixed_scaling_gives_every_clients_adapter_scale_alpha(ckpt, play):
    """``method.scaling=fixed method.alpha=2`` (FLoRA's code: lora_alpha = 2r): every adapter a client trains scales
    by 2 whatever its rank (FLoRA's fresh adapters too), and a short run still lowers the held-out loss."""
    run = lora_run(ckpt, play, "strategy=flora", "method.scaling=fixed", "method.alpha=2", "fed.lr=0.02",
                   "fed.clip_auto=null")
    method, strategy = fed_method(run), make_strategy(run)
    test = DataLoader(fed_data(run).test, batch_size=256)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"]
    run_rounds(strategy, InProcessGrid(run), 2)
    for pid in (0, 2):  # ranks 8 and 2
        model = model_from_state(run, method.view(strategy.global_state, run.fed.budget(pid)))
        method.prepare_client(model, run.fed.budget(pid))
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert layers and {m.rank for m in layers} == {run.fed.ranks[pid]}
        assert all(float(m.scale()) == 2.0 for m in layers)
    assert evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"] < before - 0.05
    with pytest.raises(ConfigError, match="method.scaling"):
        lora_run(ckpt, play, "method.scaling=sqrt")


@pytest.mark.parametrize("rule", ["flexlora", "flora"])
def test_export_merges_the_global_adapter_and_transformers_gives_the_same_logits(ckpt, play, tmp_path, rule):
    """``python -m fedlowrank.export <run> <dir>``: the checkpoint's base with the run's global adapter merged, as a
    directory transformers loads, with logits within 1e-5 of the run's own model (base + adapters)."""
    import transformers as T
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from fedlowrank.export import main as export_main

    over = [f"strategy={rule}", "fed.lr=0.02", f"out_dir={tmp_path}"]
    cfg = compose_cfg("experiment=fed_lora", f"model.pretrained={ckpt}", f"data.path={play}", "data.seq_len=16",
                      "fed.num_clients=4", "fed.ranks=[8,4,2,2]", "fed.min_partition_size=2", *over)
    run = federated_run_from_cfg(cfg)
    strategy = make_strategy(run)
    run_rounds(strategy, InProcessGrid(run), 2)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    save_file({k: v.contiguous() for k, v in strategy.global_state.items()}, str(tmp_path / "checkpoints" / "last.safetensors"))
    assert export_main([str(tmp_path), str(tmp_path / "hf")]) == 0
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = model_from_state(run, strategy.global_state).eval()
    idx = fed_data(run).test.tensors[0][:4]
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
        moved = (hf(idx).logits - T.AutoModelForCausalLM.from_pretrained(ckpt)(idx).logits).abs().max().item()
    assert diff <= 1e-5 and moved > 1e-3  # the same model, and not just the base
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    bad = {k: v[:, :1].contiguous() for k, v in strategy.global_state.items()}  # another run's adapters: refused
    save_file(bad, str(tmp_path / "checkpoints" / "last.safetensors"))
    assert export_main([str(tmp_path), str(tmp_path / "hf2")]) == 2


def _dolly(path, n=160, seed=0):
    """A JSONL file in the Dolly-15k layout: four categories, each answering with its own words."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    words = {"open_qa": ["the", "king", "is", "old"], "classification": ["yes", "no", "maybe"],
             "summarization": ["in", "short", "the", "play", "ends"], "creative_writing": ["moon", "sea", "night"]}
    with open(path, "w") as f:
        for i in range(n):
            cat = list(words)[i % 4] if i % 7 else "open_qa"
            rec = {"instruction": f"Question {i}: " + " ".join(rng.choice(words[cat], 4)),
                   "context": "" if i % 3 else "Some context here.",
                   "response": " ".join(rng.choice(words[cat], 8 + i % 5)), "category": cat}
            f.write(json.dumps(rec) + "\n")
    return path


def test_instruction_examples_score_the_response_tokens_only(ckpt_long, tmp_path):
    from fedlowrank.data import instructions as ins
    from fedlowrank.data.text import make_tokenizer

    recs = ins.read_jsonl(_dolly(tmp_path / "d.jsonl", n=12))
    tok = make_tokenizer(str(ckpt_long / "tokenizer.json"))
    data = ins.encode(recs, tok, eos=7, seq_len=250, test_fraction=0.25, seed=0)
    assert len(data.x) == len(recs)
    for i, r in enumerate(recs):  # independent: the response's own tokens, then end-of-text, and nothing else
        y = data.y[i]
        assert y[y != -100].tolist() == tok.encode(r["response"]) + [7]
        full = tok.encode(ins.prompt(r)) + tok.encode(r["response"]) + [7]
        assert data.x[i][: len(full) - 1].tolist() == full[:-1]  # x: the whole sequence, then padding
    short = ins.encode(recs, tok, eos=7, seq_len=160, test_fraction=0.25, seed=0)  # prompts with a context: > 160
    assert len(short.x) == sum(1 for r in recs if len(tok.encode(ins.prompt(r))) < 160)
    assert data.categories == sorted({r["category"] for r in recs})
    with pytest.raises(ConfigError, match=":2: a record needs"):
        (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "context": "", "response": "b", "category": "c"}\n'
                                            '{"instruction": "a", "response": "b", "category": "c"}\n')
        ins.read_jsonl(tmp_path / "bad.jsonl")


def test_dolly_clients_by_category_and_by_dirichlet_and_a_run_trains(ckpt_long, tmp_path):
    path = _dolly(tmp_path / "d.jsonl")
    base = ["data=dolly", f"data.path={path}", "data.seq_len=160", "fed.num_clients=4", "fed.ranks=[8,4,4,2]",
            "fed.min_partition_size=2"]
    run = federated_run_from_cfg(compose_cfg("experiment=fed_lora", f"model.pretrained={ckpt_long}", "out_dir=/tmp/x",
                                             *base, "fed.lr=0.02"))
    fd = fed_data(run)
    from fedlowrank.data import instructions as ins

    cats = ins.encode(ins.read_jsonl(path), __import__("fedlowrank.data.text", fromlist=["x"]).make_tokenizer(
        str(ckpt_long / "tokenizer.json")), None, 160, 0.1, 0).category
    for tr, he in zip(fd.train_parts, fd.heldout_parts):  # one category per client, held-out disjoint
        assert len(set(cats[tr]) | set(cats[he])) == 1 and not set(tr) & set(he)
    strategy, grid = make_strategy(run), InProcessGrid(run)
    test = DataLoader(fd.test, batch_size=256)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"]
    run_rounds(strategy, grid, 3)
    assert evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"] < before - 0.1
    mix = federated_run_from_cfg(compose_cfg("experiment=fed_lora", f"model.pretrained={ckpt_long}", "out_dir=/tmp/x",
                                             *base, "fed.partition=dirichlet", "fed.alpha=0.3"))
    parts = fed_data(mix).train_parts
    assert sum(len(p) for p in parts) + sum(len(h) for h in fed_data(mix).heldout_parts) == len(cats)


def test_dolly_from_the_hub_offline_is_one_clear_error(ckpt_long, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set on the loaded modules
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = federated_run_from_cfg(compose_cfg("experiment=fed_lora", f"model.pretrained={ckpt_long}", "out_dir=/tmp/x",
                                             "data=dolly", "data.source=hub", "fed.num_clients=2", "fed.ranks=[4,2]"))
    with pytest.raises(ConfigError, match="databricks-dolly-15k from the Hugging Face Hub"):
        fed_data(run)


def test_perplexity_is_the_global_adapters_on_each_clients_own_held_out_windows(ckpt, play):
    """metrics.json's per-client perplexity: exp of the global model's (not a budget's cut) mean token loss on that
    client's held-out windows, computed here independently; split by clients that trained and that never did."""
    import math

    from torch.utils.data import TensorDataset

    from fedlowrank.federated.report import personalized_eval

    run = lora_run(ckpt, play, "strategy=flexlora", "fed.lr=0.02")
    strategy, fd = make_strategy(run), fed_data(run)
    run_rounds(strategy, InProcessGrid(run), 2)
    res = personalized_eval(run, fed_method(run), strategy.global_state, fd, trained={0, 1})
    model = model_from_state(run, strategy.global_state)
    for row in res["clients"]:
        idx = torch.as_tensor(fd.heldout_parts[row["pid"]])
        held = DataLoader(TensorDataset(fd.x[idx], fd.y_eval[idx]), batch_size=7)
        assert row["perplexity"] == pytest.approx(math.exp(evaluate_classifier(model, held)["loss"]), rel=1e-5)
    assert res["perplexity"]["trained"]["clients"] == 2 and res["perplexity"]["never_trained"]["clients"] == 2
    worst = max(r["perplexity"] for r in res["clients"] if r["pid"] > 1)
    assert res["perplexity"]["never_trained"]["worst"] == pytest.approx(worst)
    every = sorted(r["perplexity"] for r in res["clients"])  # 4 clients: numpy's linear percentile by hand
    assert res["perplexity"]["all"]["p10"] == pytest.approx(every[0] + 0.3 * (every[1] - every[0]))
    assert res["perplexity"]["all"]["p90"] == pytest.approx(every[2] + 0.7 * (every[3] - every[2]))


def test_hetlora_clients_prune_their_rank_when_the_tail_shrinks(ckpt, play):
    """HetLoRA's self-pruning: the tail penalty λ·‖(α/r)·B_tail·A_tail‖_F is in the local loss; a client whose tail
    norm ends the round lower sends its adapter cut to floor(γ·r) slots, which the server accepts (by the shapes it
    declares, before deserializing) and keeps as the client's rank; any other rank is still rejected."""
    import numpy as np

    run = lora_run(ckpt, play, "strategy=hetlora", "fed.lr=0.02", "method.prune_lambda=5.0", "method.prune_gamma=0.5")
    method = fed_method(run)
    g = method.initial_state()
    g = {k: (v + 0.05 * torch.randn_like(v) if k.endswith(".U") else v) for k, v in g.items()}  # a tail to shrink
    view = method.view(g, run.fed.budget(0))
    model = model_from_state(run, view)
    want = 0.0
    for m in model.modules():  # the tail norm, independently: the dense product of the slots above r' = 4
        if isinstance(m, LoRALinear):
            B, A = m.adapter.U.detach().double().numpy(), m.adapter.V.detach().double().numpy()
            want += 16.0 / 8 * np.linalg.norm(B[:, 4:] @ A[4:])
    assert float(method.tail_norm(model).detach()) == pytest.approx(want, rel=1e-5)
    reply, _ = local_train(run, 0, 4, view, 1)  # a strong penalty: the tail shrinks, the reply is pruned
    assert {tuple(v.shape) for k, v in reply.items() if k.endswith(".U")} == {(v.shape[0], 4) for k, v in view.items()
                                                                              if k.endswith(".U")}
    assert method.match_expected(method.expected(view, {"rank": 8}),
                                 {k: tuple(v.shape) for k, v in reply.items()}) != method.expected(view, {"rank": 8})
    assert method.next_budget({"rank": 8}, reply) == {"rank": 4}
    strategy, grid = make_strategy(run), InProcessGrid(run)
    run_rounds(strategy, grid, 4)
    assert not strategy.rejections
    pruned = {strategy.partition[n]: b["rank"] for n, b in strategy.budgets.items()
              if b["rank"] < run.fed.budget(strategy.partition[n])["rank"]}
    assert pruned  # some clients kept a pruned rank, and their later replies at it were accepted
    assert all(r >= 1 for r in pruned.values())
    odd = {k: s for k, s in method.expected(view, {"rank": 8}).items()}
    assert method.match_expected(odd, {k: (s[0], 3) if k.endswith(".U") else (3, s[1]) for k, s in odd.items()}) == odd


def test_adapters_of_another_rank_are_rejected_and_pruned_budgets_survive_a_resume(ckpt, play):
    run = lora_run(ckpt, play, "strategy=hetlora", "fed.faults=[1:budget]")
    strategy = make_strategy(run)
    run_rounds(strategy, InProcessGrid(run), 2)
    assert strategy.rejections == [(1, 1), (2, 1)]  # twice the rank it was sent: refused every round, by shape
    het, flex = fed_method(run), fed_method(lora_run(ckpt, play, "strategy=flexlora"))
    assert het.keeps_budget({"rank": 8}, {"rank": 4}) and not het.keeps_budget({"rank": 8}, {"rank": 16})
    assert not het.keeps_budget({"rank": 8}, {"ratio": 0.1}) and not flex.keeps_budget({"rank": 8}, {"rank": 4})


def test_evaluation_passes_hold_a_bounded_number_of_logits(ckpt, play):
    """A GPT-2 vocabulary over long windows would make 1024-example evaluation chunks gigabytes of logits; the
    chunk shrinks so that one pass holds at most task.LOGITS_PER_PASS logits, and small tasks keep their cap."""
    from fedlowrank.federated.task import LOGITS_PER_PASS, eval_batch

    run = lora_run(ckpt, play)
    fd = fed_data(run)
    n, width = eval_batch(run, fd, 1024), VOCAB  # the checkpoint's output layer
    assert n * fd.x.shape[1] * width <= LOGITS_PER_PASS < (n + 1) * fd.x.shape[1] * width or n == 1024
    big = type(fd)(fd.x[:2].repeat(1, 4), fd.y[:2].repeat(1, 4), [], None, fd.test, 50257)
    assert eval_batch(run, big, 1024) * big.x.shape[1] * 50257 <= LOGITS_PER_PASS
    assert eval_batch(run, big, 1024) >= 1


def test_evaluation_counts_the_checkpoints_outputs_not_the_tokenizers(play, tmp_path, monkeypatch):
    """A checkpoint whose output layer (4,096 tokens) is wider than its tokenizer (300 ids): the held-out
    evaluation's passes are sized by the logits the model really produces (sized by the tokenizer, each pass
    held 13x the bound: a random GPT-2-small config with a small BPE took 3 GB per pass)."""
    import transformers as T

    from fedlowrank.federated import task
    from fedlowrank.federated.report import personalized_eval

    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=4096, n_positions=64, n_embd=32, n_layer=2, n_head=4)
                      ).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    run = lora_run(tmp_path, play)
    fd = fed_data(run)
    limit = 3 * fd.x.shape[1] * 4096  # three windows' logits a pass
    monkeypatch.setattr(task, "LOGITS_PER_PASS", limit)
    method = fed_method(run)
    seen = []
    real = task.build_model

    def observed(r):
        m = real(r)
        m.lm_head.register_forward_hook(lambda mod, i, out: seen.append(out.numel()))
        return m

    monkeypatch.setattr(task, "build_model", observed)
    monkeypatch.setattr("fedlowrank.federated.lora.build_model", observed)
    assert personalized_eval(run, method, method.initial_state(), fd) is not None
    assert seen and max(seen) <= limit and max(seen) * 2 > limit  # bounded, and not needlessly small
    assert task.eval_batch(run, fd, 256) == 3


def test_a_llama_checkpoint_fine_tunes_federated(play, tmp_path):
    """model=llama: the same path for a tiny LLaMA (grouped-query attention) saved by transformers: adapters on its
    q/k/v/o and MLP projections, a short run lowers the held-out loss."""
    import transformers as T

    d = tmp_path / "llama"
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64)).save_pretrained(d)
    _tokenizer(d)
    run = lora_run(d, play, "model=llama", "strategy=flexlora", "fed.lr=0.02")
    g = fed_method(run).initial_state()
    assert any(".attn.k_proj." in k for k in g) and any(".mlp." in k for k in g)
    strategy, fd = make_strategy(run), fed_data(run)
    test = DataLoader(fd.test, batch_size=64)
    before = evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"]
    run_rounds(strategy, InProcessGrid(run), 3)
    assert evaluate_classifier(model_from_state(run, strategy.global_state), test)["loss"] < before - 0.05
