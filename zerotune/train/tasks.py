"""What the loop trains on. A task turns an optimizer step number into a batch, a model
output into a summed loss, and a model into evaluation numbers. The loop knows nothing else:
every task has the members of :class:`Task`, and it evaluates any of its held-out splits the
same way, ``task.evaluate(model, task.split("val"), par)``.

    SupervisedTask              classification or regression on tensors (or files read per batch)
    LanguageModelTask           causal language modelling on token shards
    MaskedLanguageModelTask     BERT-style masked language modelling on token shards
    SFTTask                     instruction tuning on chat rows (answer tokens only)

:func:`make_task` builds the one a config asks for.

Batches are a pure function of (seed, step): epoch e = step // steps_per_epoch uses the
permutation drawn from a generator seeded with (seed, e), and augmentation draws from a
generator seeded with (seed, step). Resuming at step s therefore continues with exactly the
batches an uninterrupted run would have seen, with no iterator state to save.

With W processes, ``batch(step, rank, W)`` builds only rank r's contiguous share of that batch
(:func:`share`): the random numbers of the whole batch (window offsets, masks, augmentation) are
drawn, which is cheap, and only the share's rows are read, corrupted and moved to the device.
Evaluation is split the same way: a supervised task's outputs are gathered (``par.predict``), a
token task's sums of loss and tokens are all-reduced (``par.sum``), so every process gets the
one-process numbers.

Instruction tuning (:class:`SFTTask`; the chat format, labels and packing are in
:mod:`zerotune.data.chat`). The loss is the cross-entropy summed over the answer tokens,
divided by their number in the batch:

    L = − Σ_{t: y_t ≠ −100} log softmax(f(x)_t)[y_t] / |{t: y_t ≠ −100}|
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from zerotune.config import Config, SFTConfig
from zerotune.data.augment import augment_batch
from zerotune.data.base import Split
from zerotune.data.chat import IGNORE, SFTData, build_rows, split_chats
from zerotune.data.instructions import load_instructions
from zerotune.data.lazy import LazyRows
from zerotune.data.mlm import mask_tokens
from zerotune.data.shards import ShardDataset
from zerotune.data.splits import Data, load_data
from zerotune.data.tokenizer import load_tokenizer, special_ids
from zerotune.errors import ZerotuneError
from zerotune.evaluate import metrics as M
from zerotune.models.gpt import flops_per_token
from zerotune.spec import DataInfo
from zerotune.train.mfu import peak_flops
from zerotune.train.parallel import Parallel


class Task(Protocol):
    """What the loop, :class:`~zerotune.train.parallel.Parallel` and the report use of a task."""

    info: DataInfo  # what the model is built for; saved in model.json
    unit: str  # what throughput counts: "samples" or "tokens"
    units_per_example: int  # tokens per row of a batch (1 for samples)
    steps_per_epoch: int
    final_split: str  # the held-out split the report evaluates: "test" or "val"

    @property
    def tokenizer(self) -> Any: ...  # a tokenizers.Tokenizer for text, else None

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of optimizer step ``step``'s batch (x, y), on the task's device."""

    def count(self, y: torch.Tensor) -> int:
        """What the summed loss of ``y`` is divided by: examples, or target tokens."""

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss summed (not averaged) over a micro-batch."""

    def split(self, name: str) -> Any | None:
        """The held-out data called ``name`` (``val``, ``test``, ``train``), None when there is none."""

    def evaluate(self, model: nn.Module, data: Any, par: Parallel | None = None) -> dict[str, float]:
        """Mean loss (the training loss on ``data``) and the task's metrics, the same on every process."""

    def extra_log(self, record: dict[str, Any], cfg: Config) -> dict[str, float]:
        """Numbers added to each logged record (MFU, from the model ``cfg`` trains)."""

    def describe(self) -> str:
        """One line about the data, logged before training."""

    def model_meta(self) -> dict[str, Any]:
        """What model.json needs beyond the model config to use the model (normalisation, chat template)."""


def share(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` rows cut ``world_size`` ways, as ``tensor_split``
    cuts them: the first n mod W parts have one row more."""
    q, extra = divmod(n, world_size)
    start = rank * q + min(rank, extra)
    return slice(start, start + q + (rank < extra))


def token_metrics(sums: torch.Tensor, accuracy: str | None = None) -> dict[str, float]:
    """Mean loss and perplexity from summed (loss, tokens[, correct]); with ``accuracy``, also
    correct / tokens under that name. Perplexity is capped at e⁵⁰."""
    total, tokens, *correct = sums.tolist()
    loss = total / max(1, tokens)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if accuracy is not None:
        result[accuracy] = correct[0] / max(1, tokens)
    return result


class EpochOrder:
    """The order in which ``n`` examples are visited: epoch e is a permutation drawn from a
    generator seeded with (seed, e), and optimizer step s takes rows [i·B, (i+1)·B) of its
    epoch's permutation (i = s mod steps_per_epoch; the last batch of an epoch may be short)."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """Example indices of optimizer step ``step`` (a pure function of seed and step)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g).to(self.device), epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


class FileBatches(torch.utils.data.Dataset):
    """Item s is process ``rank``'s share of optimizer step s's batch (x, y), decoded from files
    (a split whose x is a ``LazyRows``: image files or a memory-mapped array).

    A read error comes back as its message (a ``str``), so that the training process can raise it
    as one line instead of a worker's traceback.
    """

    def __init__(self, split: Split, order: EpochOrder, rank: int = 0, world_size: int = 1) -> None:
        self.split, self.order, self.rank, self.world_size = split, order, rank, world_size

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        index = self.order.indices(step)
        index = index[share(len(index), self.rank, self.world_size)]  # this process's rows only
        try:
            return self.split.x[index], self.split.y[index]
        except ZerotuneError as e:
            return str(e)


class StepLoader:
    """The batches of steps s, s+1, ... through a DataLoader: ``workers`` processes read the
    next steps' batches while the model trains on this one. Asking for a step out of order
    (resuming) starts a new pass at that step; the batches are the same either way."""

    def __init__(self, split: Split, batch_size: int, seed: int, workers: int, device: torch.device) -> None:
        self.order = EpochOrder(len(split), batch_size, seed)  # indices on the CPU, where files are read
        self.split = split.to("cpu")
        self.workers, self.device = workers, device
        self._next, self._it = None, None

    def get(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Process ``rank``'s share of step ``step``'s batch, on the device."""
        if (step, rank, world_size) != self._next:
            loader = torch.utils.data.DataLoader(
                FileBatches(self.split, self.order, rank, world_size), batch_size=None,
                sampler=itertools.count(step), num_workers=self.workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.workers else None,
                generator=torch.Generator())  # its own: the global RNG (dropout) stays as without a loader
            self._it = iter(loader)
        item = next(self._it)
        if isinstance(item, str):
            self._next = None
            raise ZerotuneError(item)
        self._next = (step + 1, rank, world_size)
        x, y = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def default_workers() -> int:
    """DataLoader processes when data.num_workers is unset: half the CPUs, at most 8."""
    return min(8, max(1, (os.cpu_count() or 2) // 2))


class SupervisedTask:
    """Classification or regression on tensors held on the device, batched by index; data that
    does not fit in memory (image files, a memory-mapped array) is read by a :class:`StepLoader`
    in the same order."""

    unit, units_per_example, final_split = "samples", 1, "test"

    def __init__(self, data: Data, *, batch_size: int, seed: int, loss: str, label_smoothing: float,
                 metrics: list[str], augment=None, device: torch.device | str = "cpu",
                 num_workers: int | None = None) -> None:
        self.data, self.info, self.device = data, data.info, torch.device(device)
        self.batch_size, self.seed = batch_size, seed
        default_loss = "cross_entropy" if self.info.target == "classification" else "mse"
        self.loss_name = default_loss if loss == "auto" else loss
        if self.info.target == "regression" and self.loss_name in ("cross_entropy", "bce"):
            raise ZerotuneError(f"train.loss: {self.loss_name} needs class labels, but the data is a regression set")
        if self.info.target == "classification" and self.loss_name == "mse":
            raise ZerotuneError("train.loss: mse needs numeric targets, but the data has class labels")
        self.label_smoothing = label_smoothing
        M.check_metric_names(metrics, self.info.target)
        self.metric_names = metrics
        self.augment = augment if augment is not None and augment.enabled else None
        if self.augment is not None and self.info.kind != "image":
            raise ZerotuneError("data.augment: augmentation is for image data")
        self.train = data.train.to(self.device)
        self.n = len(self.train)
        self.order = EpochOrder(self.n, batch_size, seed, self.device)
        self.steps_per_epoch = self.order.steps_per_epoch
        self.files = None
        if isinstance(self.train.x, LazyRows):
            workers = default_workers() if num_workers is None else num_workers
            self.files = StepLoader(data.train, batch_size, seed, workers, self.device)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of optimizer step ``step`` (rank's share of it with ``world_size`` processes)."""
        index = self.order.indices(step)
        n = len(index)
        if world_size > 1:
            index = index[share(n, rank, world_size)]
        if self.files is not None:
            x, y = self.files.get(step, rank, world_size)
        else:
            x, y = self.train.x[index], self.train.y[index]
        if self.augment is not None:
            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            x = augment_batch(x, self.augment, g, share(n, rank, world_size), n)  # drawn for all n rows
        return x, y

    def count(self, y: torch.Tensor) -> int:
        return len(y)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) loss of a micro-batch; the loop divides by the batch size."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out.float(), y, reduction="sum", label_smoothing=self.label_smoothing)
        if self.loss_name == "bce":  # one-vs-rest over the classes
            target = F.one_hot(y, out.shape[-1]).float()
            return F.binary_cross_entropy_with_logits(out.float(), target, reduction="sum") / out.shape[-1]
        return F.mse_loss(out.float().reshape(y.shape), y.float(), reduction="sum")

    def split(self, name: str) -> Split | None:
        chosen = {"train": self.data.train, "val": self.data.val, "test": self.data.test}[name]
        return chosen if chosen is not None and len(chosen) > 0 else None

    @torch.no_grad()
    def outputs(self, model: nn.Module, x: torch.Tensor, par: Parallel | None = None) -> torch.Tensor:
        """The model's outputs (N, ...) for all of ``x``, in eval mode (each process runs a slice)."""
        was_training = model.training
        model.eval()
        try:
            return (par or Parallel(device=self.device)).predict(model, x)
        finally:
            model.train(was_training)

    def score(self, out: torch.Tensor, y: torch.Tensor, metrics: list[str] | None = None) -> dict[str, float]:
        """Mean loss and ``metrics`` (default: train.metrics) of outputs ``out``; regression metrics in the
        data's units."""
        y = y.to(out.device)
        names = self.metric_names if metrics is None else metrics
        result = {"loss": float(self.loss(out, y)) / max(1, len(y))}
        if self.info.target == "classification":
            return result | M.classification_metrics(out, y, names)
        pre = self.data.preprocess
        return result | M.regression_metrics(pre.y_inverse(out.reshape(y.shape)), pre.y_inverse(y), names)

    def evaluate(self, model: nn.Module, data: Split, par: Parallel | None = None) -> dict[str, float]:
        return self.score(self.outputs(model, data.x, par), data.y)

    def extra_log(self, record: dict, cfg: Config) -> dict:
        return {}

    def describe(self) -> str:
        workers = self.files.workers if self.files is not None else 0
        where = f" · read from disk by {workers} worker{'s' * (workers != 1)}" if self.files is not None else ""
        return f"{len(self.data.train):,} training examples · {self.steps_per_epoch} steps/epoch{where}"

    def model_meta(self) -> dict:
        return {"preprocess": self.data.preprocess.to_dict()}


class TokenTask:
    """What the token tasks share: evaluation as sums of (loss, tokens, ...) over batches, dealt out
    to the processes and all-reduced (:meth:`eval_sums`), then turned into metrics by :meth:`metrics`."""

    unit, final_split = "tokens", "val"

    def evaluate(self, model: nn.Module, data: Any, par: Parallel | None = None) -> dict[str, float]:
        par = par or Parallel(device=self.device)
        was_training = model.training
        model.eval()
        try:
            sums = self.eval_sums(model, data, par.rank, par.world_size)
        finally:
            model.train(was_training)
        return self.metrics(par.sum(sums).cpu())

    def extra_log(self, record: dict, cfg: Config) -> dict:
        return {}

    def model_meta(self) -> dict:
        return {}


class LanguageModelTask(TokenTask):
    """Causal language modelling on memory-mapped token shards (``data.train: shards:DIR``).

    Batches are windows of ``block_size`` tokens drawn from the shards as a pure function of
    (seed, step) (random offsets or consecutive windows); y is x shifted by one token. The loss
    is the summed next-token cross-entropy; the loop divides it by the number of target tokens.
    """

    def __init__(self, shards_dir: str, *, batch_size: int, block_size: int, seed: int, sampling: str,
                 eval_batches: int, device: torch.device | str = "cpu") -> None:
        self.train = ShardDataset(shards_dir, "train")
        try:
            self.val = ShardDataset(shards_dir, "val")
        except ZerotuneError:
            self.val = None
        self.device = torch.device(device)
        self.batch_size, self.block_size, self.seed, self.sampling = batch_size, block_size, seed, sampling
        self.eval_batches = eval_batches
        self.units_per_example = block_size
        if self.train.n_tokens <= block_size:
            raise ZerotuneError(f"shards:{shards_dir}: {self.train.n_tokens} training tokens, fewer than one "
                                f"window of model.block_size={block_size}")
        # one "epoch" = as many windows as the train split holds without overlap
        self.steps_per_epoch = max(1, self.train.n_tokens // (block_size * batch_size))
        self._tokenizer = load_tokenizer(self.train.tokenizer_path) if self.train.tokenizer_path else None
        self.info = DataInfo("tokens", [block_size], target="causal_lm", vocab_size=self.train.vocab_size)
        self._peak = self._flops = None

    @property
    def tokenizer(self):
        return self._tokenizer

    def split(self, name: str) -> ShardDataset | None:
        chosen = {"train": self.train, "val": self.val}.get(name)
        return chosen if chosen is not None and chosen.n_tokens > self.block_size else None

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of step ``step`` (rank's share of them with ``world_size`` processes)."""
        rows = share(self.batch_size, rank, world_size)
        x, y = self.train.batch(step, self.batch_size, self.block_size, self.seed, self.sampling, rows=rows)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def count(self, y: torch.Tensor) -> int:
        return y.numel()

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="sum")  # (B·T, V) vs (B·T,)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, split: ShardDataset, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss and target tokens over the evaluation batches rank, rank + W, ... of ``split``.

        Summed over the W ranks they are the one-process sums. Every rank runs the same number
        of forwards (FSDP gathers weights in each): a short share ends with one on a dummy window.
        """
        total, tokens = 0.0, 0
        for x, y in split.eval_batches(self.batch_size, self.block_size, self.eval_batches, rank=rank,
                                       world_size=world_size):
            out = model(x.to(self.device))
            total += float(self.loss(out, y.to(self.device)))
            tokens += y.numel()
        self._pad_forwards(model, split, rank, world_size)
        return torch.tensor([total, tokens], dtype=torch.float64)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return token_metrics(sums)

    def _pad_forwards(self, model: nn.Module, split: ShardDataset, rank: int, world_size: int) -> None:
        n = split.n_eval_batches(self.batch_size, self.block_size, self.eval_batches)
        if rank >= n % world_size > 0:  # this rank had one batch fewer than rank 0
            model(torch.zeros(1, self.block_size, dtype=torch.long, device=self.device))

    def extra_log(self, record: dict, cfg: Config) -> dict:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (see zerotune.train.mfu)."""
        if cfg.model.arch != "gpt":
            return {}
        if self._peak is None:  # the model and the device stay the same for the whole run
            self._peak, self._flops = peak_flops(self.device), flops_per_token(cfg.model, self.block_size)
        return {"mfu": record["tokens_per_sec"] * self._flops / self._peak}

    def describe(self) -> str:
        val = f"{self.val.n_tokens:,}" if self.val is not None else "no"
        return f"{self.train.n_tokens:,} training tokens · {val} val tokens · block {self.block_size}"


class MaskedLanguageModelTask(LanguageModelTask):
    """BERT-style masked language modelling on token shards (``task: masked_lm``).

    Each window of ``block_size`` tokens is corrupted with the BERT rule (15 % of the
    non-special tokens chosen; of those 80 % → mask token, 10 % → a random token, 10 % kept;
    ``zerotune.data.mlm.mask_tokens``) from a generator seeded with (seed, step), so batches stay
    a pure function of the step. The loss is the summed cross-entropy on the chosen tokens only;
    the loop divides it by their number. Validation masks with a fixed seed, so every evaluation
    scores the same corrupted windows.
    """

    def __init__(self, shards_dir: str, **kwargs) -> None:
        super().__init__(shards_dir, **kwargs)
        self.info.target = "masked_lm"
        ids = special_ids(self.tokenizer) if self.tokenizer is not None else {}
        if ids.get("mask") is None:
            raise ZerotuneError(f"shards:{shards_dir}: the tokenizer has no mask token (<|mask|> or [MASK]); "
                                "train one with `zerotune tokenizer train`")
        self.mask_id = ids["mask"]
        self.special = [i for k, i in ids.items() if i is not None and k != "unk"]

    def _mask(self, x: torch.Tensor, seed: int, rows: slice = slice(None),
              n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return mask_tokens(x, vocab_size=self.info.vocab_size, mask_id=self.mask_id, special_ids=self.special,
                           generator=g, rows=rows, n=n)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = share(self.batch_size, rank, world_size)
        x, _ = self.train.batch(step, self.batch_size, self.block_size, self.seed, self.sampling, rows=rows)
        inputs, labels = self._mask(x, self.seed * 1_000_003 + step, rows, self.batch_size)
        return inputs.to(self.device), labels.to(self.device)

    def count(self, y: torch.Tensor) -> int:
        return int((y != IGNORE).sum())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, split: ShardDataset, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss, masked tokens and correct predictions (see LanguageModelTask.eval_sums)."""
        total, tokens, correct = 0.0, 0, 0
        batches = split.eval_batches(self.batch_size, self.block_size, self.eval_batches, rank=rank,
                                     world_size=world_size)
        for j, (x, _) in enumerate(batches):
            inputs, labels = self._mask(x, 10_007 + rank + j * world_size)  # seeded by the batch's index
            out = model(inputs.to(self.device))
            labels = labels.to(self.device)
            total += float(self.loss(out, labels))
            chosen = labels != IGNORE
            tokens += int(chosen.sum())
            correct += int((out.argmax(-1)[chosen] == labels[chosen]).sum())
        self._pad_forwards(model, split, rank, world_size)
        return torch.tensor([total, tokens, correct], dtype=torch.float64)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return token_metrics(sums, "accuracy")

    def extra_log(self, record: dict, cfg: Config) -> dict:
        return {}


class SFTTask(TokenTask):
    """Instruction tuning on chat rows (see the module docstring and :mod:`zerotune.data.chat`).

    Batches are a pure function of (seed, step), like every zerotune task: epoch e uses the row
    permutation drawn from a generator seeded with (seed, e).
    """

    def __init__(self, train: SFTData, val: SFTData | None, *, tokenizer, template, max_length: int,
                 packing: bool, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.train, self.val = train, val
        self.template, self.max_length, self.packing = template, max_length, packing
        self.batch_size, self.seed = batch_size, seed
        self._tokenizer = tokenizer
        self.n = len(train)
        self.order = EpochOrder(self.n, batch_size, seed, self.device)
        self.steps_per_epoch = self.order.steps_per_epoch
        # throughput counts real positions, not padding
        self.units_per_example = max(1, round(float(train.lengths.float().mean())))
        pad = special_ids(tokenizer)["pad"]
        self.info = DataInfo("tokens", [max_length], target="causal_lm", vocab_size=tokenizer.get_vocab_size(),
                             pad_id=pad)
        self._x, self._y, self._len = train.x.to(self.device), train.y.to(self.device), train.lengths.to(self.device)

    @property
    def tokenizer(self):
        return self._tokenizer

    def split(self, name: str) -> SFTData | None:
        chosen = {"train": self.train, "val": self.val}.get(name)
        return chosen if chosen is not None and len(chosen) > 0 else None

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of optimizer step ``step`` (rank's share of them), cut to the longest row in the batch."""
        index = self.order.indices(step)
        width = int(self._len[index].max())
        if world_size > 1:
            index = index[share(len(index), rank, world_size)]
        return self._x[index, :width], self._y[index, :width]  # (B, T), (B, T)

    def count(self, y: torch.Tensor) -> int:
        return int((y != IGNORE).sum())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                               reduction="sum")  # (B·T, V) vs (B·T,)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, data: SFTData, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss, answer tokens and correct next-token predictions over the batches rank,
        rank + W, ... of ``data``; summed over the W ranks they are the one-process sums. Every
        rank runs the same number of forwards (FSDP): a short share ends with a dummy one."""
        total, tokens, correct = 0.0, 0, 0
        starts = range(0, len(data), self.batch_size)
        for i in starts[rank::world_size]:
            width = int(data.lengths[i : i + self.batch_size].max())
            x = data.x[i : i + self.batch_size, :width].to(self.device)  # (B, T)
            y = data.y[i : i + self.batch_size, :width].to(self.device)  # (B, T)
            out = model(x)  # (B, T, V)
            total += float(self.loss(out, y))
            keep = y != IGNORE
            tokens += int(keep.sum())
            correct += int((out.argmax(-1) == y)[keep].sum())
        if len(starts[rank::world_size]) < len(starts[0::world_size]):  # one batch fewer than rank 0
            model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        return torch.tensor([total, tokens, correct], dtype=torch.float64)

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return token_metrics(sums, "token_accuracy")

    def describe(self) -> str:
        val = f"{self.val.examples:,}" if self.val is not None else "no"
        dropped = self.train.dropped + (self.val.dropped if self.val is not None else 0)
        packed = f" packed into {self.n:,} rows" if self.packing else ""
        note = f" · {dropped} dropped (no answer token within max_length)" if dropped else ""
        return (f"{self.train.examples:,} training examples{packed} · {val} val examples · "
                f"max_length {self.max_length}{note}")

    def model_meta(self) -> dict:
        return {"chat_template": self.template.model_dump(mode="json")}


# ---------------------------------------------------------------- building the task a config asks for


def make_task(cfg: Config, device: torch.device | str, tokenizer=None) -> Task:
    """Load the data and build the task ``cfg.task`` names (``tokenizer``: the model's, for sft)."""
    if cfg.task in ("classification", "regression"):
        return supervised_task(cfg, load_data(cfg.data, cfg.task, cfg.seed), device)
    if cfg.task in ("causal_lm", "masked_lm"):
        return shard_task(cfg, device)
    if cfg.task == "sft":
        return make_sft_task(cfg, tokenizer, device)
    raise ZerotuneError(f"task {cfg.task!r} is not available")


def supervised_task(cfg: Config, data: Data, device: torch.device | str) -> SupervisedTask:
    """The classification or regression task on ``data`` with the config's loss, metrics and batching."""
    return SupervisedTask(data, batch_size=cfg.train.batch_size, seed=cfg.seed, loss=cfg.train.loss,
                          label_smoothing=cfg.train.label_smoothing, metrics=cfg.train.metrics,
                          augment=cfg.data.augment, device=device, num_workers=cfg.data.num_workers)


def shard_task(cfg: Config, device: torch.device | str, *, folder: str | None = None, sampling: str | None = None,
               eval_batches: int | None = None) -> LanguageModelTask:
    """The causal_lm or masked_lm task over token shards: ``folder``, else data.train's ``shards:DIR``.

    Windows are ``model.block_size`` tokens for a decoder trained from scratch, ``min(data.max_length,
    model.block_size)`` for a fine-tuned one (a config with a ``finetune`` section: the block size is
    the SOURCE's, often longer than the data needs) and ``min(data.max_length, model.max_position)``
    for a masked-LM encoder; ``sampling``/``eval_batches`` default to the config's ``data`` section.
    """
    if folder is None:
        kind, _, folder = cfg.data.train.partition(":")
        if kind != "shards":
            raise ZerotuneError(f"data.train: task {cfg.task} reads token shards, got {cfg.data.train!r}; "
                                "make them with `zerotune prepare` and set data.train=shards:DIR")
    if cfg.task == "masked_lm":
        if cfg.model.arch != "bert":
            raise ZerotuneError(f"model.arch: task masked_lm trains an encoder (bert), got {cfg.model.arch!r}")
        make, block = MaskedLanguageModelTask, min(cfg.data.max_length, cfg.model.max_position)
    else:
        block = getattr(cfg.model, "block_size", None)
        if block is None:
            raise ZerotuneError(f"model.arch: task causal_lm needs a decoder (gpt), got {cfg.model.arch!r}")
        if cfg.finetune is not None:
            block = min(cfg.data.max_length, block)
        make = LanguageModelTask
    return make(folder, batch_size=cfg.train.batch_size, block_size=block, seed=cfg.seed,
                sampling=sampling or cfg.data.sampling, eval_batches=eval_batches or cfg.data.eval_batches,
                device=device)


def make_sft_task(cfg: Config, tokenizer, device: torch.device | str = "cpu", sft: SFTConfig | None = None) -> SFTTask:
    """Build the instruction-tuning task from a :class:`zerotune.config.Config`.

    Reads ``cfg.data.train`` (instruction spec), ``cfg.data.val`` (a second spec) or else
    ``cfg.data.val_split``, ``cfg.seed``, ``cfg.train.batch_size``; ``sft`` defaults to ``cfg.sft``
    when the config has that section, else :class:`SFTConfig` defaults. ``max_length`` defaults to
    ``cfg.model.block_size`` and may not exceed it.

    Raises:
        ZerotuneError: bad data (file and line named), a max_length over the model's block size,
            a tokenizer without a pad id and no vocabulary.
    """
    sft = sft or cfg.sft or SFTConfig()
    block = getattr(cfg.model, "block_size", None)
    max_length = sft.max_length or block or 512
    if block is not None and max_length > block:
        raise ZerotuneError(f"sft.max_length: {max_length} is longer than model.block_size {block}")
    if tokenizer is None:
        raise ZerotuneError("data.tokenizer: instruction tuning needs a tokenizer (set data.tokenizer)")
    pad = special_ids(tokenizer)["pad"]
    pad = 0 if pad is None else pad
    chats = load_instructions(cfg.data.train)
    if cfg.data.val:
        train_chats, val_chats = chats, load_instructions(cfg.data.val)
    else:
        train_chats, val_chats = split_chats(chats, cfg.data.val_split, cfg.seed)
    train = build_rows(train_chats, tokenizer, sft.template, max_length, sft.packing, pad)
    # validation rows are never packed, so val loss does not depend on the packing choice
    val = build_rows(val_chats, tokenizer, sft.template, max_length, False, pad) if val_chats else None
    return SFTTask(train, val, tokenizer=tokenizer, template=sft.template, max_length=max_length,
                   packing=sft.packing, batch_size=cfg.train.batch_size, seed=cfg.seed, device=device)


def resolve_vocab(cfg: Config, info: DataInfo) -> Config:
    """A decoder/encoder whose ``model.vocab_size`` is unset takes the tokenizer's; a smaller one is an error."""
    if not hasattr(cfg.model, "vocab_size") or info.vocab_size is None:
        return cfg
    if cfg.model.vocab_size is None:
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": info.vocab_size})})
    if cfg.model.vocab_size < info.vocab_size:
        raise ZerotuneError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                            f"({info.vocab_size}); leave it unset to take the tokenizer's")
    return cfg
