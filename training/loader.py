"""The data pipeline: which samples each step reads (StepBatchSampler), how a sample is made (ImageSamples:
decode + VAR transform, in DataLoader workers), how samples become a batch (collate_images), the loader
(make_loader) and the validation order (ValSampler).

Keys are (index, epoch) pairs. The data order is a pure function of the step: epoch e is the permutation
`torch.randperm(N, generator=torch.Generator().manual_seed(seed * 100_003 + e))`, consumed one global batch
per step (the tail shorter than a global batch is dropped), and micro-batch i of rank r is the slice
[(i * world + r) * m, (i * world + r + 1) * m) of the global batch, m = global_batch / (world * grad_accum).
So a resumed run continues at the right sample, 2 processes see the same global batches as 1, and a batch
does not depend on the number of workers (a sample's randomness is seeded by (seed, epoch, index)).

Unreadable images: with skip_corrupt the next readable item stands in and the file's one-line message is
returned with the sample (`collate_images` counts them in "skipped"); without it the error travels as data
to the main process, which raises a one-line ValueError naming the file (no worker traceback).
"""
from __future__ import annotations

import hashlib
import warnings

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from training.transforms import VARTransform, sample_generator


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


class StepBatchSampler(Sampler):
    """For each step in [start_step, total_steps), grad_accum micro-batches of (index, epoch) keys for `rank`."""

    def __init__(self, num_items: int, global_batch: int, grad_accum: int, world_size: int, rank: int, seed: int,
                 start_step: int, total_steps: int):
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"optim.batch_size {global_batch} must be divisible by processes x grad_accum "
                             f"= {world_size} x {grad_accum}")
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch ({global_batch})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_items, self.global_batch, self.grad_accum = num_items, global_batch, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.micro_batch = global_batch // (world_size * grad_accum)
        self.steps_per_epoch = num_items // global_batch
        self._perm_epoch, self._perm = None, None

    def epoch_pos(self, step: int) -> tuple[int, int]:
        """The data position after `step` completed steps: (epoch, items of it consumed). An epoch is only
        entered when its first batch is read, as the trainer's (epoch, pos) state always was."""
        if step <= 0:
            return 0, 0
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        return epoch, (in_epoch + 1) * self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
            self._perm_epoch = epoch
        return self._perm

    def global_keys(self, step: int) -> list[tuple[int, int]]:
        """The keys of the whole global batch of step `step` (0-based), over all ranks and micro-batches."""
        epoch, pos = self.epoch_pos(step)
        if pos + self.global_batch > self.num_items:
            epoch, pos = epoch + 1, 0
        return [(i, epoch) for i in self._permutation(epoch)[pos: pos + self.global_batch].tolist()]

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        keys, world, m = self.global_keys(step), self.world_size, self.micro_batch
        return [keys[(i * world + self.rank) * m: (i * world + self.rank + 1) * m] for i in range(self.grad_accum)]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.grad_accum


class ValSampler(Sampler):
    """The held-out items in order, keys (index, 0), in batches of `batch_size` (the last may be shorter),
    at most `max_batches` of them (0: all). With world_size > 1, rank r takes batches r, r + world, ...;
    `weights` holds each of its batches' item count, so weighting the per-batch means by it gives the exact
    overall mean. With `pad`, every rank gets the same number of batches (FSDP runs a collective in every
    forward): a rank short of one repeats batch 0 with weight 0."""

    def __init__(self, num_items: int, batch_size: int, max_batches: int = 0, world_size: int = 1, rank: int = 0,
                 pad: bool = False):
        if batch_size < 1:
            raise ValueError(f"validation batch size must be >= 1, got {batch_size}")
        n_batches = -(-num_items // batch_size)
        n_batches = min(n_batches, max_batches) if max_batches > 0 else n_batches
        every = [[(i, 0) for i in range(b * batch_size, min(num_items, (b + 1) * batch_size))] for b in range(n_batches)]
        end = -(-n_batches // world_size) * world_size if pad else n_batches
        mine = range(rank, end, world_size)
        self.batches = [every[b] if b < n_batches else every[0] for b in mine]
        self.weights = [len(every[b]) if b < n_batches else 0 for b in mine]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class ImageSamples(Dataset):
    """key (index, epoch) -> (img (3, S, S) float in [-1, 1] or None, label int, bad tuple of one-line messages).

    `dataset` must offer `load_raw(i) -> (uint8 (H, W, C), label)` raising ValueError for an unreadable
    item (training/data.py). img is None when the item failed without skip_corrupt: its message is
    `bad[-1]`, and `collate_images` raises it in the main process."""

    def __init__(self, dataset, transform: VARTransform, seed: int, train: bool = True, skip_corrupt: bool = False):
        if not callable(getattr(dataset, "load_raw", None)):
            raise TypeError(f"{type(dataset).__name__} has no load_raw(i) -> (uint8 pixels, label); the data pipeline "
                            f"needs one (see training/data.py)")
        self.dataset, self.transform, self.seed, self.train, self.skip_corrupt = dataset, transform, seed, train, skip_corrupt
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        """The items and every setting that changes the pixels (for token caches)."""
        return hashlib.sha256(f"{self.dataset.fingerprint()}:{self.transform.fingerprint(self.train)}".encode()).hexdigest()

    def __getitem__(self, key):
        index, epoch = (key, 0) if isinstance(key, int) else key
        n, bad = len(self.dataset), []
        for attempt in range(n):  # as ImageFolder: a bad item is replaced by the next readable one
            try:
                raw, label = self.dataset.load_raw((index + attempt) % n)
            except ValueError as err:
                bad.append(_one_line(err))
                if not self.skip_corrupt:
                    return None, -1, tuple(bad)
                continue
            # seeded by the requested item, not the stand-in: the same key always gives the same pixels
            g = sample_generator(self.seed, epoch, index) if self.transform.is_random(self.train) else None
            return self.transform(raw, g, self.train), int(label), tuple(bad)
        return None, -1, (*bad[-1:], f"no readable image among the {n} items of the data set; check data.root")


def collate_images(samples) -> dict:
    """-> {"images": (B, 3, S, S) float, "labels": (B,) long, "skipped": int, "skipped_files": [messages]}.

    A failed sample raises its one-line ValueError here in the main process; in a worker the batch carries
    {"error": message} instead, raised by `raise_if_failed` when the main process receives it (make_loader
    does that), so the user sees one line, not a worker traceback."""
    failed = [bad[-1] for img, _, bad in samples if img is None]
    if failed:
        if get_worker_info() is None:
            raise ValueError(failed[0])
        return {"error": failed[0]}
    return {"images": torch.stack([img for img, _, _ in samples]),
            "labels": torch.tensor([label for _, label, _ in samples], dtype=torch.long),
            "skipped": sum(len(bad) for _, _, bad in samples),
            "skipped_files": [msg for _, _, bad in samples for msg in bad]}


def raise_if_failed(batch):
    """The batch, or the one-line ValueError a worker's collate_images put in it."""
    if isinstance(batch, dict) and "error" in batch:
        raise ValueError(batch["error"])
    return batch


class SkipCounter:
    """The main process's tally of skipped unreadable images (data.skip_corrupt): `total` counts every
    substitution (a bad file read again in a later epoch counts again); each file is warned about once."""

    def __init__(self):
        self.total, self.seen = 0, set()

    def update(self, batch) -> int:
        """Count the batch's skipped items, warn about files not seen before; -> the batch's count."""
        if not isinstance(batch, dict):
            return 0
        n = int(batch.get("skipped", 0))
        self.total += n
        for msg in batch.get("skipped_files", []):
            if msg not in self.seen:
                self.seen.add(msg)
                warnings.warn(f"skipping unreadable image ({len(self.seen)} file(s) skipped so far): {msg}", stacklevel=2)
        return n


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode one image at a time; N workers x all cores would oversubscribe


class CheckedDataLoader(DataLoader):
    """A DataLoader whose batches pass `raise_if_failed` in the main process."""

    def __iter__(self):
        for batch in super().__iter__():
            yield raise_if_failed(batch)


def make_loader(samples_dataset, batch_sampler, collate_fn=collate_images, num_workers: int = 0,
                persistent_workers: bool = True, prefetch_factor: int = 2, pin_memory: bool = False,
                seed: int = 0) -> DataLoader:
    """The DataLoader over `batch_sampler`'s key lists. It draws its worker base seed from a private
    generator: a plain DataLoader draws it from torch's global RNG on every iter(), which would shift the
    training's own random stream (dropout, condition dropout) relative to a run without a loader."""
    kwargs = {}
    if num_workers > 0:
        kwargs = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init)
    return CheckedDataLoader(samples_dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                             pin_memory=pin_memory and torch.accelerator.is_available(),
                             generator=torch.Generator().manual_seed(seed), **kwargs)
