"""What the loop trains on. A task turns an optimizer step number into a batch, a model
output into a summed loss, and a model into evaluation numbers. The loop knows nothing else.

Batches are a pure function of (seed, step): epoch e = step // steps_per_epoch uses the
permutation drawn from a generator seeded with (seed, e), and augmentation draws from a
generator seeded with (seed, step). Resuming at step s therefore continues with exactly the
batches an uninterrupted run would have seen, with no iterator state to save.

With W processes, ``batch(step, rank, W)`` builds only rank r's contiguous share of that batch
(:func:`share`): the random numbers of the whole batch (window offsets, masks, augmentation) are
drawn, which is cheap, and only the share's rows are read, corrupted and moved to the device.
"""

from __future__ import annotations

import itertools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from zerotune.data import Data
from zerotune.data.base import Split
from zerotune.data.lazy import LazyRows
from zerotune.errors import ZerotuneError
from zerotune.evaluate import metrics as M

EVAL_BATCH = 1024


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

    unit, units_per_example = "samples", 1

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
            from zerotune.data.augment import augment_batch

            g = torch.Generator().manual_seed(self.seed * 7_919 + step)
            x = augment_batch(x, self.augment, g, share(n, rank, world_size), n)  # drawn for all n rows
        return x, y

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed (not averaged) loss of a micro-batch; the loop divides by the batch size."""
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out.float(), y, reduction="sum", label_smoothing=self.label_smoothing)
        if self.loss_name == "bce":  # one-vs-rest over the classes
            target = F.one_hot(y, out.shape[-1]).float()
            return F.binary_cross_entropy_with_logits(out.float(), target, reduction="sum") / out.shape[-1]
        return F.mse_loss(out.float().reshape(y.shape), y.float(), reduction="sum")

    @property
    def has_val(self) -> bool:
        return self.data.val is not None and len(self.data.val) > 0

    def count(self, y: torch.Tensor) -> int:
        return len(y)

    def describe(self) -> str:
        workers = self.files.workers if self.files is not None else 0
        where = f" · read from disk by {workers} worker{'s' * (workers != 1)}" if self.files is not None else ""
        return f"{len(self.data.train):,} training examples · {self.steps_per_epoch} steps/epoch{where}"

    def model_meta(self) -> dict:
        return {"preprocess": self.data.preprocess.to_dict()}

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics for the report: the held-out test split."""
        test = self.data.test
        return self.evaluate(model, test) if test is not None and len(test) else {}

    def evaluate_val(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate(model, self.data.val)

    def extra_log(self, record: dict) -> dict:
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        outs = [model(x[i : i + EVAL_BATCH].to(self.device)).float() for i in range(0, len(x), EVAL_BATCH)]
        return torch.cat(outs) if outs else torch.empty(0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, predict=None) -> dict[str, float]:
        """Mean loss and the configured metrics on ``split`` (regression metrics in the data's units).

        ``predict(model, x)`` replaces :meth:`predict` (several processes each run a slice).
        """
        was_training = model.training
        model.eval()
        out = (predict or self.predict)(model, split.x)
        y = split.y.to(out.device)
        result = {"loss": float(self.loss(out, y)) / max(1, len(y))}
        if self.info.target == "classification":
            result |= M.classification_metrics(out, y, self.metric_names)
        else:
            pre = self.data.preprocess
            result |= M.regression_metrics(pre.y_inverse(out.reshape(y.shape)), pre.y_inverse(y), self.metric_names)
        model.train(was_training)
        return result


class LanguageModelTask:
    """Causal language modelling on memory-mapped token shards (``data.train: shards:DIR``).

    Batches are windows of ``block_size`` tokens drawn from the shards as a pure function of
    (seed, step) (random offsets or consecutive windows); y is x shifted by one token. The loss
    is the summed next-token cross-entropy; the loop divides it by the number of target tokens.
    """

    unit = "tokens"

    def __init__(self, shards_dir: str, *, batch_size: int, block_size: int, seed: int, sampling: str,
                 eval_batches: int, model_cfg=None, device: torch.device | str = "cpu") -> None:
        from zerotune.data.base import DataInfo
        from zerotune.data.shards import ShardDataset
        from zerotune.data.tokenizer import load_tokenizer

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
        self.model_cfg = model_cfg
        self._peak = None

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def has_val(self) -> bool:
        return self.val is not None and self.val.n_tokens > self.block_size

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows of step ``step`` (rank's share of them with ``world_size`` processes)."""
        rows = share(self.batch_size, rank, world_size)
        x, y = self.train.batch(step, self.batch_size, self.block_size, self.seed, self.sampling, rows=rows)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def count(self, y: torch.Tensor) -> int:
        return y.numel()

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), reduction="sum")  # (B·T, V) vs (B·T,)

    def evaluate_split(self, model: nn.Module, split) -> dict[str, float]:
        return self.eval_result(self.eval_sums(model, split))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, split, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss and target tokens over the evaluation batches rank, rank + W, ... of ``split``.

        Summed over the W ranks they are the one-process sums. Every rank runs the same number
        of forwards (FSDP gathers weights in each): a short share ends with one on a dummy window.
        """
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        for x, y in split.eval_batches(self.batch_size, self.block_size, self.eval_batches, rank=rank,
                                       world_size=world_size):
            out = model(x.to(self.device))
            total += float(self.loss(out, y.to(self.device)))
            tokens += y.numel()
        self._pad_forwards(model, split, rank, world_size)
        model.train(was_training)
        return torch.tensor([total, tokens], dtype=torch.float64)

    def eval_result(self, sums: torch.Tensor) -> dict[str, float]:
        return token_metrics(sums)

    def _pad_forwards(self, model: nn.Module, split, rank: int, world_size: int) -> None:
        n = split.n_eval_batches(self.batch_size, self.block_size, self.eval_batches)
        if rank >= n % world_size > 0:  # this rank had one batch fewer than rank 0
            model(torch.zeros(1, self.block_size, dtype=torch.long, device=self.device))

    def evaluate_val(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_split(model, self.val)

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        return self.evaluate_val(model) if self.has_val else {}

    def extra_log(self, record: dict) -> dict:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (see zerotune.train.mfu)."""
        if self.model_cfg is None or getattr(self.model_cfg, "arch", None) != "gpt":
            return {}
        from zerotune.models.gpt import flops_per_token
        from zerotune.train.mfu import peak_flops

        if self._peak is None:
            self._peak = peak_flops(self.device)
        achieved = record["tokens_per_sec"] * flops_per_token(self.model_cfg, self.block_size)
        return {"mfu": achieved / self._peak}

    def describe(self) -> str:
        val = f"{self.val.n_tokens:,}" if self.val is not None else "no"
        return f"{self.train.n_tokens:,} training tokens · {val} val tokens · block {self.block_size}"

    def model_meta(self) -> dict:
        return {}


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
        from zerotune.data.tokenizer import special_ids

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
        from zerotune.data.mlm import mask_tokens

        g = torch.Generator().manual_seed(seed)
        return mask_tokens(x, vocab_size=self.info.vocab_size, mask_id=self.mask_id, special_ids=self.special,
                           generator=g, rows=rows, n=n)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = share(self.batch_size, rank, world_size)
        x, _ = self.train.batch(step, self.batch_size, self.block_size, self.seed, self.sampling, rows=rows)
        inputs, labels = self._mask(x, self.seed * 1_000_003 + step, rows, self.batch_size)
        return inputs.to(self.device), labels.to(self.device)

    def count(self, y: torch.Tensor) -> int:
        return int((y != -100).sum())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, split, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Summed loss, masked tokens and correct predictions (see LanguageModelTask.eval_sums)."""
        was_training = model.training
        model.eval()
        total, tokens, correct = 0.0, 0, 0
        batches = split.eval_batches(self.batch_size, self.block_size, self.eval_batches, rank=rank,
                                     world_size=world_size)
        for j, (x, _) in enumerate(batches):
            inputs, labels = self._mask(x, 10_007 + rank + j * world_size)  # seeded by the batch's index
            out = model(inputs.to(self.device))
            labels = labels.to(self.device)
            total += float(self.loss(out, labels))
            chosen = labels != -100
            tokens += int(chosen.sum())
            correct += int((out.argmax(-1)[chosen] == labels[chosen]).sum())
        self._pad_forwards(model, split, rank, world_size)
        model.train(was_training)
        return torch.tensor([total, tokens, correct], dtype=torch.float64)

    def eval_result(self, sums: torch.Tensor) -> dict[str, float]:
        return token_metrics(sums, "accuracy")

    def extra_log(self, record: dict) -> dict:
        return {}
