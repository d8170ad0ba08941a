"""Examples read on demand, for data that does not fit in memory (``data.in_memory``).

A :class:`LazyRows` stands where a split's ``x`` tensor (N, ...) would be and indexes like it:
``x[i:j]`` or ``x[index]`` reads those rows (image files decoded, or rows of a memory-mapped
array), applies the view's transforms in order (the normalisation) and returns a float32 tensor
on the view's device. :meth:`~LazyRows.subset`, :meth:`~LazyRows.map`, :meth:`~LazyRows.to` and
:meth:`~LazyRows.tensor_split` return new views and read nothing, so splitting, class filters
and normalisation stay lazy. Training reads the rows through a DataLoader (see
``zerotune.train.tasks.StepLoader``).

``auto`` keeps data in memory up to half of the memory available when it loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


def available_memory() -> int:
    """Bytes of memory available now (8 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def keep_in_memory(setting: str | bool, n_bytes: int) -> bool:
    """``data.in_memory``: true/false as set; ``auto`` keeps data up to half the available memory."""
    if setting == "auto":
        return n_bytes <= available_memory() // 2
    return bool(setting)


class LazyRows:
    """Rows ``rows`` (indices into a source) read on demand; subclasses say how (:meth:`read`).

    ``example_shape`` is one example's shape, e.g. (C, H, W) or (F,).
    """

    def __init__(self, rows: Sequence[int], example_shape: Sequence[int], transforms: tuple[Transform, ...] = (),
                 device: torch.device | str = "cpu") -> None:
        self.rows, self.example_shape = list(rows), tuple(example_shape)
        self.transforms, self.device = transforms, torch.device(device)

    def read(self, rows: list[int]) -> torch.Tensor:
        """float32 (len(rows), *example_shape) of source rows ``rows``, before the transforms."""
        raise NotImplementedError

    def view(self, rows: list[int], transforms: tuple[Transform, ...], device: torch.device) -> LazyRows:
        """The same source with other rows, transforms or device."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self.rows), *self.example_shape])

    @property
    def ndim(self) -> int:
        return 1 + len(self.example_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def is_floating_point(self) -> bool:
        return True

    def subset(self, index: torch.Tensor) -> LazyRows:
        """The rows at ``index`` (integer indices or a boolean mask), still unread."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return self.view([self.rows[i] for i in index.tolist()], self.transforms, self.device)

    def map(self, transform: Transform) -> LazyRows:
        """The same rows with ``transform`` applied (after any earlier one) whenever they are read."""
        return self.view(self.rows, (*self.transforms, transform), self.device)

    def to(self, device: torch.device | str) -> LazyRows:
        return self.view(self.rows, self.transforms, torch.device(device))

    def tensor_split(self, sections: int) -> list[LazyRows]:
        """``sections`` near-equal contiguous parts, as ``torch.tensor_split`` cuts a tensor."""
        return [self.subset(part) for part in torch.arange(len(self)).tensor_split(sections)]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            rows = self.rows[index]
        else:
            rows = [self.rows[i] for i in torch.as_tensor(index).cpu().reshape(-1).tolist()]
        x = self.read(rows) if rows else torch.empty((0, *self.example_shape))
        for transform in self.transforms:
            x = transform(x)
        return x.to(self.device)

    def stats(self, keep_dim: int, chunk: int = 256) -> tuple[list[float], list[float]]:
        """Mean and (unbiased) standard deviation of every slice along example dimension ``keep_dim``
        (e.g. 1 for image channels, -1 for tabular features) over all rows, read chunk by chunk in
        float64; the chunks' means and squared deviations are combined as in Chan et al. (1979)."""
        keep = keep_dim % (1 + len(self.example_shape))
        count, mean, m2 = 0, None, None
        for i in range(0, len(self), chunk):
            x = self.read(self.rows[i : i + chunk]).double().movedim(keep, 0).flatten(1)  # (K, n·...)
            n, chunk_mean = x.shape[1], x.mean(1)
            chunk_m2 = ((x - chunk_mean[:, None]) ** 2).sum(1)
            if mean is None:
                count, mean, m2 = n, chunk_mean, chunk_m2
                continue
            delta = chunk_mean - mean
            mean = mean + delta * n / (count + n)
            m2 = m2 + chunk_m2 + delta * delta * count * n / (count + n)
            count += n
        std = (m2 / max(1, count - 1)).sqrt().clamp_min(1e-6)
        return mean.tolist(), std.tolist()
