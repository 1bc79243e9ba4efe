"""What the Trainer (training/trainer.py) drives: the job interface, with defaults for in-memory data."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class KeyDataset(Dataset):
    """The loader dataset of in-memory jobs: a key (index, epoch) stands for itself; `fetch` does the work."""

    def __getitem__(self, key):
        return key


class TrainJob:
    """What the Trainer drives. Subclasses set `self.model` and implement num_items, loss (and usually
    after_step, sample_grid, export), plus either `fetch(indices, device)` (in-memory data: the defaults
    below route the loader through it) or the loader trio: `loader_dataset()` (key (index, epoch) -> one
    sample, run in DataLoader workers), `collate(samples)` (-> a CPU batch) and `prepare_batch(batch,
    device)` (-> what `loss` takes). Validation: `val_dataset()` (None: no held-out split) with the same
    key / collate contract and `val_metrics(batch)`. Jobs with auxiliary networks (a GAN discriminator)
    override the extra_* methods."""

    model: torch.nn.Module
    tokens_per_item: int = 0  # for the tokens/s column of the logs (0: not a token model)

    def extra_models(self) -> list[torch.nn.Module]:
        return []

    def extra_optimizers(self, optim_cfg) -> list:
        return []

    def set_prepared(self, models) -> None:
        self.model = models[0]

    def all_models(self) -> list[torch.nn.Module]:
        return [self.model] + self.extra_models()

    def resume_settings(self) -> dict:
        """The job's own settings a resumed run must keep, as JSON (the run's settings and the models' configs
        are compared by the Trainer)."""
        return {}

    def loader_dataset(self) -> Dataset:
        return KeyDataset()

    def loader_num_workers(self) -> int:
        """DataLoader workers worth starting for the training loader (none for in-memory data)."""
        return 0

    def collate(self, samples: list) -> list[int]:
        return [index for index, _epoch in samples]

    def prepare_batch(self, batch, device: torch.device):
        return self.fetch(batch, device)

    def val_dataset(self) -> Dataset | None:
        return None

    def val_metrics(self, batch) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no validation metrics")
