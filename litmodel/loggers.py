"""Metric loggers used by ``litmodel.fabric.Fabric.log_dict``: CSV and TensorBoard.

Both create their files lazily on the first call, so constructing a logger on every rank is
harmless: ``Fabric`` only forwards metrics from global rank 0.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from litmodel.atomic import atomic_file

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger"]


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"can only log scalar tensors, got shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


class Logger:
    """Base class: ``log_metrics(metrics, step)``, ``log_hyperparams(params)``, ``finalize()``."""

    @property
    def log_dir(self) -> Path:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        path = self.log_dir / "hparams.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(dict(params), indent=2, default=str) + "\n")

    def finalize(self) -> None:
        pass


class CSVLogger(Logger):
    """Appends one row per ``log_metrics`` call to ``<root_dir>/<name>/metrics.csv``.

    The first column is ``step``. When a call brings a key the file has no column for, the file is
    rewritten (atomically) with the widened header; earlier rows get empty cells. An existing
    ``metrics.csv`` (a resumed run) is appended to.
    """

    def __init__(self, root_dir: str | os.PathLike, name: str = "logs") -> None:
        self.root_dir = Path(root_dir)
        self.name = name
        self._columns: list[str] | None = None

    @property
    def log_dir(self) -> Path:
        return self.root_dir / self.name

    @property
    def metrics_file(self) -> Path:
        return self.log_dir / "metrics.csv"

    def _read_columns(self) -> list[str]:
        if self.metrics_file.exists() and self.metrics_file.stat().st_size > 0:
            with open(self.metrics_file, newline="") as f:
                return next(csv.reader(f), ["step"])
        return ["step"]

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {k: _to_number(v) for k, v in metrics.items()}
        if step is not None:
            row["step"] = int(step)
        if self._columns is None:
            self._columns = self._read_columns()
        new = [k for k in row if k not in self._columns]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if new or not self.metrics_file.exists():
            self._columns = self._columns + new
            old_rows: list[dict] = []
            if self.metrics_file.exists():
                with open(self.metrics_file, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            with atomic_file(self.metrics_file) as tmp:
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self._columns, restval="")
                    writer.writeheader()
                    writer.writerows(old_rows)
        with open(self.metrics_file, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, restval="").writerow(row)


class TensorBoardLogger(Logger):
    """Writes scalars with ``torch.utils.tensorboard.SummaryWriter`` into ``<root_dir>/<name>``."""

    def __init__(self, root_dir: str | os.PathLike, name: str = "tensorboard") -> None:
        self.root_dir = Path(root_dir)
        self.name = name
        self._writer = None

    @property
    def log_dir(self) -> Path:
        return self.root_dir / self.name

    @property
    def experiment(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            value = _to_number(value)
            if isinstance(value, (int, float)):
                self.experiment.add_scalar(key, value, global_step=step)
        self.experiment.flush()

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        super().log_hyperparams(params)
        self.experiment.add_text("hparams", json.dumps(dict(params), indent=2, default=str))

    def finalize(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_writer"] = None
        return state
