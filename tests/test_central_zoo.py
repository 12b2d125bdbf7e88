"""The model zoo in central mode: every family trains and resumes exactly, the classifier batches cover each epoch
once, CIFAR's pipeline (offline, on arrays of CIFAR's shape), the low-rank switches (hybrid, init, Frobenius decay)
and the errors a wrong combination gets before any work."""
import copy

import numpy as np
import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.central.dist import load_checkpoint_meta, resolve_checkpoint
from fedlowrank.central.task import ClassifierTask
from fedlowrank.config import ConfigError
from fedlowrank.data import vision
from fedlowrank.data.vision import ImageData, augment_crop_flip
from fedlowrank.lowrank import count_flops, factorize, frobenius_decay, lowrank_modules, size_mb
from fedlowrank.models.vision import VisionConfig, build_vision_model

from fedlowrank.config.central import central_run_from_cfg
from helpers import FAST, compose_cfg


def central_run(out_dir, *overrides):
    """A validated tiny CPU run; text runs read at most 60,000 characters."""
    image = any(o in ("data=digits", "data=cifar10", "data=cifar100") for o in overrides)
    fast = [f for f in FAST if not (image and f.startswith("data."))]
    return central_run_from_cfg(compose_cfg("mode=central", *fast, f"out_dir={out_dir}", *overrides))

ZOO = [  # (overrides, metric): every family, small widths, dense and factorized
    (["model=mlp", "data=digits", "model.lowrank=fixed", "model.ratio=0.25"], "accuracy"),
    (["model=cnn", "data=digits", "model.lowrank=fixed", "model.ratio=0.2", "trainer.frob_decay=1e-3"], "accuracy"),
    (["model=vgg", "data=digits", "model.lowrank=fixed", "model.ratio=0.2", "model.dense_first=1"], "accuracy"),
    (["model=resnet", "data=digits", "model.lowrank=fixed", "model.ratio=0.2", "trainer.optimizer=sgd",
      "trainer.lr=0.05"], "accuracy"),
    (["model=vit", "data=digits", "model.lowrank=fixed", "model.rank=4", "model.init=random"], "accuracy"),
    (["model=lstm", "data=shakespeare", "data.path=null", "data.name=pydoc", "model.lowrank=fixed", "model.ratio=0.2",
      "model.dropout=0.1"], "ppl"),
    (["model=char_transformer", "data=pydoc", "model.dropout=0.1"], "ppl"),
]


def _resume_exactly(tmp_path, overrides, steps=6, stop=3):
    common = [*overrides, f"trainer.max_steps={steps}", "trainer.log_interval=1", f"trainer.eval_interval={steps}",
              "trainer.ckpt_interval=100"]
    full = launch(central_run(tmp_path / "full", *common))
    launch(central_run(tmp_path / "part", *common, f"trainer.stop_after={stop}"))
    resumed = launch(central_run(tmp_path / "part", *common, "trainer.resume=auto"))
    return full, resumed


@pytest.mark.parametrize("overrides,metric", ZOO, ids=[o[0] for o, _ in ZOO])
def test_every_zoo_family_trains_and_resumes_exactly(tmp_path, overrides, metric):
    full, resumed = _resume_exactly(tmp_path, overrides)
    assert [s for s, _ in resumed["losses"]] == list(range(1, 7))
    assert resumed["losses"] == full["losses"]  # bit for bit: batches, augmentation and dropout are replayed
    assert resumed["final_eval"] == full["final_eval"] and metric in full["final_eval"]
    assert 0.0 <= full["final_eval"]["accuracy"] <= 1.0
    unit = "samples" if "data=digits" in overrides else "tokens"
    assert full["unit"] == unit and resumed[f"{unit}_seen"] == full[f"{unit}_seen"] == 6 * 4 * (
        1 if unit == "samples" else 32)
    assert full["size_mb"] > 0 and full["forward_flops"] > 0 and full["compression"]["ratio"] < 1.0 or \
        "char_transformer" in overrides[0]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg11", "vgg16", "resnet18", "resnet101", "vit_cifar"])
def test_literature_architectures_train_and_resume_on_cifar_shaped_data(tmp_path, monkeypatch, arch):
    _fake_cifar(monkeypatch, n_train=16, n_test=8)
    full, resumed = _resume_exactly(tmp_path, [f"model={arch}", "data=cifar10", "model.lowrank=fixed",
                                               "model.ratio=0.2", "trainer.batch_size=2"], steps=2, stop=1)
    assert resumed["losses"] == full["losses"] and resumed["final_eval"] == full["final_eval"]


def test_summary_counts_are_those_of_the_model_as_trained(tmp_path):
    run = central_run(tmp_path, "model=cnn", "data=digits", "model.lowrank=fixed", "model.ratio=0.2",
                      "trainer.max_steps=1", "trainer.eval_interval=1")
    res = launch(run)
    ref = build_vision_model(VisionConfig(arch="cnn", channels=[32, 64]))
    names = factorize(ref, ratio=0.2, skip=["features.0", "head"])
    assert sorted(res["ranks"]) == sorted(names)
    assert res["forward_flops"] == count_flops(ref.eval(), torch.zeros(1, 1, 8, 8))
    assert res["size_mb"] == pytest.approx(size_mb(ref)) and res["params"] == sum(p.numel() for p in ref.parameters())


def test_classifier_batches_cover_each_epoch_once_across_processes_and_micro_batches():
    n = 50
    data = ImageData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n), torch.zeros(1, 1, 1, 1),
                     torch.zeros(1, dtype=torch.long), n)
    tasks = {r: ClassifierTask(data, batch_size=3, seed=5, world=2, grad_accum=2) for r in range(2)}
    seen = [i for step in range(25) for micro in range(2) for r in range(2)
            for i in tasks[r].batch(step, r, micro)[1].tolist()]  # 25 steps x 12 samples = 6 epochs of 50
    for e in range(6):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n)), f"epoch {e} is not a permutation"
    assert seen[:n] != seen[n:2 * n]  # a fresh order each epoch
    again = ClassifierTask(data, batch_size=3, seed=5, world=2, grad_accum=2)
    assert torch.equal(again.batch(17, 1, 1)[1], tasks[1].batch(17, 1, 1)[1])  # a function of (step, rank, micro)


def test_crop_and_flip_is_a_padded_crop_of_each_image():
    x = torch.randn(6, 3, 5, 5)
    fill = (-1.0, -2.0, -3.0)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=2, fill=fill)
    for i in range(6):  # independent oracle: some offset and flip of the padded numpy image must match
        padded = np.stack([np.pad(x[i, c].numpy(), 2, constant_values=fill[c]) for c in range(3)])
        found = [(oy, ox, f) for oy in range(5) for ox in range(5) for f in (0, 1)
                 if np.array_equal((padded[:, oy:oy + 5, ox:ox + 5])[:, :, ::-1] if f else
                                   padded[:, oy:oy + 5, ox:ox + 5], out[i].numpy())]
        assert found, f"image {i} is not a crop of its padded self"
    x = torch.randn(400, 1, 1, 3)
    flipped = (augment_crop_flip(x, torch.Generator().manual_seed(1), pad=0) == x.flip(-1)).all(-1).view(-1)
    assert 150 < flipped.sum() < 250  # a flip with probability 1/2


def _fake_cifar(monkeypatch, n_train=64, n_test=32, classes=10):
    rng = np.random.default_rng(0)
    fake = (rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_train).tolist(),
            rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n_test).tolist())
    monkeypatch.setattr(vision, "cifar_arrays", lambda name, root, download: fake)


def test_cifar_pipeline_offline_on_arrays_of_cifars_shape(tmp_path, monkeypatch):
    _fake_cifar(monkeypatch, classes=100)
    run = central_run(tmp_path, "model=resnet", "data=cifar100", "trainer.max_steps=2", "trainer.eval_interval=2")
    assert run.data.augmented  # on by default for CIFAR
    res = launch(run)
    assert res["samples_seen"] == 8 and 0.0 <= res["final_eval"]["accuracy"] <= 1.0
    meta = load_checkpoint_meta(resolve_checkpoint(str(tmp_path / "checkpoints" / "last")))
    assert meta["model_config"] == {"family": "vision", "arch": "resnet", "channels": [32, 64, 128]}
    data = vision.load_image_data("cifar100")
    assert data.x_train.shape == (64, 3, 32, 32) and data.num_classes == 100
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1.0  # normalised per channel


def test_cifar_offline_without_files_is_a_clear_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR-10 is not available .* could not be downloaded"):
        launch(central_run(tmp_path, "model=cnn", "data=cifar10", f"data.root={tmp_path}", "data.download=false"))
    assert not (tmp_path / "checkpoints").exists()


def test_dense_first_keeps_exactly_the_first_k_factorizable_layers_dense():
    net = build_vision_model(VisionConfig(arch="vgg", channels=[8, 16, 32]))
    order = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    replaced = factorize(net, ratio=0.5, skip=["head"], dense_first=2)
    assert replaced == [n for n in order if n != "head"][2:]
    assert set(lowrank_modules(net)) == set(replaced)


def test_spectral_init_is_balanced_svd_of_the_dense_init_and_random_is_not():
    torch.manual_seed(0)
    dense = torch.nn.Linear(40, 30)
    w = dense.weight.detach().clone()
    spectral, rand = torch.nn.Sequential(copy.deepcopy(dense)), torch.nn.Sequential(copy.deepcopy(dense))
    factorize(spectral, rank=5)
    factorize(rand, rank=5, init="random")
    ls, lr = spectral[0], rand[0]
    best = torch.linalg.svdvals(w)[5:].square().sum()
    assert (ls.U @ ls.V - w).square().sum().item() == pytest.approx(best.item(), rel=1e-4)  # Eckart-Young optimum
    assert torch.allclose(ls.U.T @ ls.U, ls.V @ ls.V.T, atol=1e-5)  # balanced
    assert (lr.U @ lr.V - w).square().sum() > 2 * best
    assert lr.U.std().item() == pytest.approx((1 / 5) ** 0.5, rel=0.3)


def test_frobenius_decay_adds_its_gradient_once_per_step_under_grad_accumulation(tmp_path):
    base = ["model=mlp", "data=digits", "model.lowrank=fixed", "model.rank=3", "trainer.optimizer=sgd",
            "trainer.momentum=0", "trainer.weight_decay=0", "trainer.grad_clip=0", "trainer.max_steps=1",
            "trainer.warmup_steps=0", "trainer.grad_accum=2", "trainer.lr=0.1", "trainer.eval_interval=1"]
    from fedlowrank.central.dist import init_dist
    from fedlowrank.central.trainer import Trainer
    from fedlowrank.data.vision import load_digits_data

    lam, trained = 0.05, {}
    for fd in (0.0, lam):
        run = central_run(tmp_path / str(fd), *base, f"trainer.frob_decay={fd}")
        tr = Trainer(run, init_dist(None, "cpu"), load_digits_data())
        start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        lr = tr.hook.lr(tr, 0)
        tr.train_step()
        trained[fd] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    layer = sorted(n[:-2] for n in start if n.endswith(".U"))[0]
    U, V = start[f"{layer}.U"], start[f"{layer}.V"]
    grad_u = 2 * U @ V @ V.T  # d/dU ||U V||_F^2, by hand
    diff = trained[0.0][f"{layer}.U"] - trained[lam][f"{layer}.U"]
    assert torch.allclose(diff, lr * lam * grad_u, atol=1e-6)
    assert frobenius_decay(torch.nn.Sequential()).item() == 0.0


@pytest.mark.parametrize("overrides,match", [
    (["model=cnn", "data=pydoc"], "vision models take image data"),
    (["model=gpt2", "data=digits"], "holds images"),
    (["model=cnn", "data=digits", "method.name=relora"], "acts on the language models"),
    (["model=lstm", "data=digits"], "does not train on data=digits"),
    (["model=cnn", "data=digits", "trainer.dist=fsdp"], "zoo models use trainer.dist=ddp"),
    (["model=cnn", "data=digits", "trainer.frob_decay=0.1"], "frob_decay acts on factorized layers"),
    (["model=cnn", "data=digits", "model.lowrank=inrank"], "model.lowrank must be none|fixed"),
    (["model=vit", "data=digits", "model.patch_size=3"], "divisible"),
    (["model=cnn", "data=digits", "model.init=svd"], "model.init must be"),
    (["model=cnn", "data=digits", "+model.widths=[3]"], "unknown key"),
    (["model=cnn", "data=digits", "+data.augment=true"], "does not suit 8x8 digits"),
    (["model=cnn", "data=digits", "trainer.optimizer=lion"], "trainer.optimizer must be"),
])
def test_wrong_combinations_are_named_before_any_work(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        central_run(tmp_path, *overrides)


@pytest.mark.slow
def test_two_ddp_processes_train_a_classifier_on_disjoint_batches_with_identical_replicas(tmp_path):
    res = launch(central_run(tmp_path, "model=cnn", "data=digits", "model.lowrank=fixed", "model.ratio=0.25",
                             "trainer.devices=2", "trainer.max_steps=4", "trainer.eval_interval=4"))
    assert res["replica_max_diff"] == 0.0 and res["samples_seen"] == 4 * 4 * 2
    one = ClassifierTask(vision.load_digits_data(), batch_size=4, seed=0, world=2, grad_accum=1)
    assert not set(one.indices(0, 0, 0).tolist()) & set(one.indices(0, 1, 0).tolist())
