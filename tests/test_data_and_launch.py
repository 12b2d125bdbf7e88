"""Data loading errors, partitions, torchrun launch and central TensorBoard logs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlowrank.central import launch
from fedlowrank.data.partition import partition_indices
from fedlowrank.data.text import ByteTokenizer, get_batch, load_text_data
from fedlowrank.data.vision import load_cifar10_data, load_digits_data
from helpers import central_run

ROOT = Path(__file__).resolve().parents[1]


def test_cifar_missing_offline_gives_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="CIFAR-10 is not available.*data=digits"):
        load_cifar10_data(tmp_path, download=False)


def test_hub_data_and_bpe_fail_clearly_offline():
    code = (
        "from fedlowrank.data.text import load_text_data\n"
        "from fedlowrank.schema import ConfigError\n"
        "for kw in (dict(name='wikitext103', tokenizer='byte', cache_dir=None), dict(name='pydoc', tokenizer='gpt2')):\n"
        "    try:\n        load_text_data(**kw)\n    except (RuntimeError, ConfigError) as e:\n        print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300).stdout
    errs = [line for line in out.splitlines() if line.startswith("ERR")]
    assert len(errs) == 2, out
    assert "data=pydoc" in errs[0] and "data.tokenizer=byte" in errs[1]


def test_text_data_and_batches_are_deterministic():
    data = load_text_data("pydoc")
    assert data.vocab_size == 256 and len(data.train) > 300_000 and len(data.val) > 30_000
    x1, y1 = get_batch(data.train, 4, 16, seed=0, step=7)
    x2, _ = get_batch(data.train, 4, 16, seed=0, step=7)
    x3, _ = get_batch(data.train, 4, 16, seed=0, step=8)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3) and torch.equal(x1[:, 1:], y1[:, :-1])
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("naïve λ")) == "naïve λ"


def test_iid_and_dirichlet_partitions():
    y = load_digits_data().y_train
    iid = partition_indices(y, "iid", 5)
    allidx = np.concatenate(iid)
    assert len(allidx) == len(y) and len(set(allidx.tolist())) == len(y)  # disjoint cover
    skew = partition_indices(y, "dirichlet", 5, alpha=0.1, min_size=5)
    dists = np.stack([np.bincount(y[torch.as_tensor(p)].numpy(), minlength=10) / len(p) for p in skew])
    iid_d = np.stack([np.bincount(y[torch.as_tensor(p)].numpy(), minlength=10) / len(p) for p in iid])
    assert dists.max(1).mean() > iid_d.max(1).mean() + 0.15  # label skew


def test_digits_read_without_sklearn_equal_sklearns_loader():
    """The digits read from scikit-learn's CSV are exactly ``load_digits`` (images and labels, same order)."""
    from sklearn.datasets import load_digits

    from fedlowrank.data.vision import digits_arrays

    images, target = digits_arrays()
    d = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, d.images) and np.array_equal(target, d.target)


@pytest.mark.parametrize("n_items,n_parts", [(1437, 4), (1437, 100), (1000, 10), (7, 7), (5, 1)])
def test_iid_partitions_equal_flowers_iid_partitioner(n_items, n_parts):
    """Computed here, the IID shards equal flwr-datasets' IidPartitioner on the same index column; more partitions
    than examples is an error for both."""
    from datasets import Dataset

    from fedlowrank.data.partition import make_partitioner

    ours = partition_indices(torch.zeros(n_items, dtype=torch.long), "iid", n_parts)
    part = make_partitioner("iid", n_parts)
    part.dataset = Dataset.from_dict({"idx": np.arange(n_items), "label": np.zeros(n_items, dtype=int)})
    theirs = [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(n_parts)]
    assert len(ours) == n_parts and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="IID partitions"):
        partition_indices(torch.zeros(n_items, dtype=torch.long), "iid", n_items + 1)
    part = make_partitioner("iid", n_items + 1)
    part.dataset = Dataset.from_dict({"idx": np.arange(n_items), "label": np.zeros(n_items, dtype=int)})
    with pytest.raises(IndexError):
        [part.load_partition(i) for i in range(n_items + 1)]


def test_torchrun_launch_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "main.py", "experiment=gpt2_inrank", "trainer.device=cpu", f"out_dir={tmp_path}", "trainer.max_steps=12",
           "method.stage1_steps=8", "method.check_interval=4", "method.init_rank=1", "method.buffer=1",
           "trainer.progress=false", "trainer.block_size=32", "trainer.batch_size=4", "data.max_chars=50000",
           f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["step"] == 12 and s["replica_max_diff"] == 0.0 and s["stage"] == 2


def test_central_tensorboard_has_loss_ppl_rank_and_throughput(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch(central_run(tmp_path, "experiment=gpt2_inrank", "trainer.max_steps=10", "trainer.log_interval=2",
                       "trainer.eval_interval=5", "method.stage1_steps=6", "method.check_interval=3"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ("train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "eval/loss", "eval/ppl", "model/params"):
        assert t in tags, sorted(tags)
    assert any(t.startswith("rank/h.0.mlp.c_fc") for t in tags)  # the MLP is factorized (as InRank's reference)
    assert [e.step for e in acc.Scalars("eval/ppl")] == [5, 10]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_textfile_with_held_out_eval_file_and_full_eval(tmp_path):
    from fedlowrank.central.dist import init_dist
    from fedlowrank.central.trainer import Trainer
    import torch.nn.functional as F

    train = _write(tmp_path / "train.txt", "the quick brown fox jumps over the lazy dog. " * 200)
    held = _write(tmp_path / "eval.txt", "pack my box with five dozen liquor jugs! " * 7)
    data = load_text_data("textfile", train_path=train, eval_path=held)
    assert data.train.tolist() == list(Path(train).read_bytes())  # all of the train file trains
    assert data.val.tolist() == list(Path(held).read_bytes())  # the eval file is the eval split
    run = central_run(tmp_path / "out", "mode=central", "data=textfile", f"data.train_path={train}", f"data.eval_path={held}",
                      "trainer.eval_full=true", "trainer.max_steps=2")
    tr = Trainer(run, init_dist(None, "cpu"), data)
    ev = tr.evaluate()
    # independent: every non-overlapping 32-token window of the eval file, token-weighted mean
    n, B, losses = len(data.val), 32, []
    with torch.no_grad():
        tr.model.eval()
        for s in range(0, n - B, B):
            x, y = data.val[s: s + B][None], data.val[s + 1: s + 1 + B][None]
            losses.append(F.cross_entropy(tr.model(x)[0], y[0], reduction="sum").item())
    assert len(losses) == (n - 1) // B and ev["loss"] == pytest.approx(sum(losses) / (len(losses) * B), rel=1e-5)
    res = launch(run)
    assert res["final_eval"]["step"] == 2


def test_textfile_errors_name_the_file_and_split(tmp_path):
    from fedlowrank.config import ConfigError

    train = _write(tmp_path / "train.txt", "enough text to train on. " * 50)
    short = _write(tmp_path / "short.txt", "too short")
    with pytest.raises(ConfigError, match="data.train_path"):
        central_run(tmp_path / "o", "mode=central", "data=textfile")
    with pytest.raises(ConfigError, match="data.eval_path=.*nope.txt.*not a file"):
        central_run(tmp_path / "o", "mode=central", "data=textfile", f"data.train_path={train}", f"data.eval_path={tmp_path}/nope.txt")
    run = central_run(tmp_path / "o", "mode=central", "data=textfile", f"data.train_path={train}", f"data.eval_path={short}")
    with pytest.raises(ValueError, match=r"eval split of data=textfile .*train.txt.*9 tokens"):
        launch(run)
    assert not (tmp_path / "o" / "checkpoints").exists()  # rejected before any training
