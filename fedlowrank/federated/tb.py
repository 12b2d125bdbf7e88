"""TensorBoard writers of a federated run: the server's run (``tb/``: round, global and per-layer rank
scalars, and a custom-scalars layout overlaying every budget's accuracy on one chart) and one run per client
(``tb/clients/<id>``) whose tags are shared (``client/train_loss``,
``client/rank_sum``, ``client/rank_ratio``), so every client overlays on one chart. At most ``max_open``
client writers stay open (least recently used closed first); a reopened client appends a new event file to
its own run directory, which TensorBoard reads as the same run."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

CLIENT_TAGS = ("train_loss", "rank_sum", "rank_ratio")
# TensorBoard's CUSTOM SCALARS tab (tags are regular expressions): the global model's and every budget's test
# accuracy overlaid on one chart, and the clients' held-out accuracy as a mean with its p10-p90 margin
BUDGET_ACCURACY = r"^global/(global|ratio[0-9.]+|rank[0-9]+)_accuracy$"
LAYOUT = {"federated": {
    "accuracy per budget (test set)": ["Multiline", [BUDGET_ACCURACY]],
    "clients on their own held-out data": ["Margin", ["global/clients_mean_accuracy", "global/clients_p10_accuracy",
                                                      "global/clients_p90_accuracy"]],
    "train loss and bytes per round": ["Multiline", [r"^round/(train_loss|upload_bytes|download_bytes)$"]],
}}


class RunWriters:
    """The server's SummaryWriter (``.server``) and per-client writers opened on demand."""

    def __init__(self, tb_dir: Path, max_open: int = 32) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir, self.max_open = Path(tb_dir), max_open
        self.server = SummaryWriter(str(self.dir))
        self.server.add_custom_scalars(LAYOUT)  # the CUSTOM SCALARS tab: every budget's accuracy on one chart
        self._clients: OrderedDict[int, object] = OrderedDict()

    def client(self, pid: int):
        """The writer of client ``pid`` (``tb/clients/<pid>``)."""
        from torch.utils.tensorboard import SummaryWriter

        if pid in self._clients:
            self._clients.move_to_end(pid)
            return self._clients[pid]
        if len(self._clients) >= self.max_open:
            _, oldest = self._clients.popitem(last=False)
            oldest.close()  # type: ignore[attr-defined]
        w = self._clients[pid] = SummaryWriter(str(self.dir / "clients" / str(pid)))
        return w

    def log_clients(self, per_client: list[dict], step: int) -> None:
        """Each client's shared-tag scalars at ``step``."""
        for c in per_client:
            w = self.client(int(c["pid"]))
            for key in CLIENT_TAGS:
                if key in c:
                    w.add_scalar(f"client/{key}", c[key], step)  # type: ignore[attr-defined]
            w.flush()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.server.close()
        for w in self._clients.values():
            w.close()  # type: ignore[attr-defined]
        self._clients.clear()
