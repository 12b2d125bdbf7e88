"""TensorBoard writers of a federated run: the server's run (``tb/``: round, global and per-layer rank
scalars, and a custom-scalars layout overlaying every budget's accuracy on one chart) and one run per client
(``tb/clients/<id>``) whose tags are shared (``client/train_loss``,
``client/rank_sum``, ``client/rank_ratio``), so every client overlays on one chart. A client's records are
appended to its own event file and the file closed again at once (no writer thread and no open file per
client, so thousands of clients cost nothing between their rounds)."""
from __future__ import annotations

import os
import socket
import time
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


class ClientLog:
    """Scalars of one client, appended synchronously to ``<dir>/events.out.tfevents.<time>.<host>.<pid>.client``
    (TensorBoard's record format; the file starts with the version event, as SummaryWriter's do)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir, self.path = run_dir, None

    def _append(self, events: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        if self.path is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.client"
            self.path = self.dir / name
            events = [Event(wall_time=time.time(), file_version="brain.Event:2"), *events]
        with open(self.path, "ab") as f:
            w = RecordWriter(f)
            for e in events:
                w.write(e.SerializeToString())

    def add_scalars_at(self, values: dict[str, float], step: int) -> None:
        """Every ``tag: value`` of ``values`` at ``step``, in one append."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        now = time.time()
        self._append([Event(wall_time=now, step=int(step), summary=Summary(value=[
            Summary.Value(tag=tag, simple_value=float(v))])) for tag, v in values.items()])

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_scalars_at({tag: value}, step)

    def flush(self) -> None:
        """Nothing buffered: every call wrote its records."""


class RunWriters:
    """The server's SummaryWriter (``.server``) and one :class:`ClientLog` per client."""

    def __init__(self, tb_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(tb_dir)
        self.server = SummaryWriter(str(self.dir))
        self.server.add_custom_scalars(LAYOUT)  # the CUSTOM SCALARS tab: every budget's accuracy on one chart
        self._clients: dict[int, ClientLog] = {}

    def client(self, pid: int) -> ClientLog:
        """The log of client ``pid`` (``tb/clients/<pid>``)."""
        if pid not in self._clients:
            self._clients[pid] = ClientLog(self.dir / "clients" / str(pid))
        return self._clients[pid]

    def log_clients(self, per_client: list[dict], step: int) -> None:
        """Each client's shared-tag scalars at ``step``."""
        for c in per_client:
            vals = {f"client/{key}": c[key] for key in CLIENT_TAGS if key in c}
            if vals:
                self.client(int(c["pid"])).add_scalars_at(vals, step)

    def close(self) -> None:
        self.server.close()
        self._clients.clear()
