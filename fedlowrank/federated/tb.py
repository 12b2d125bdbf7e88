"""TensorBoard writers of a federated run: the server's run (``tb/``: round, global and per-layer rank
scalars) and one run per client (``tb/clients/<id>``) whose tags are shared (``client/train_loss``,
``client/rank_sum``, ``client/rank_ratio``), so every client overlays on one chart. At most ``max_open``
client writers stay open (least recently used closed first); a reopened client appends a new event file to
its own run directory, which TensorBoard reads as the same run."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

CLIENT_TAGS = ("train_loss", "rank_sum", "rank_ratio")


class RunWriters:
    """The server's SummaryWriter (``.server``) and per-client writers opened on demand."""

    def __init__(self, tb_dir: Path, max_open: int = 32) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir, self.max_open = Path(tb_dir), max_open
        self.server = SummaryWriter(str(self.dir))
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
