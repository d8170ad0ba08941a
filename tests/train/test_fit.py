import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerotune import files
from zerotune.errors import RunFailed, ZerotuneError
from zerotune.train import checkpoint as ckpt
from zerotune.train.fit import evaluate_model, fit


def blobs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 4 dimensions (float32 x, int64 y)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.array([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]], dtype=np.float32)
    x = centres[y] + rng.normal(size=(n, 4)).astype(np.float32)
    return x.astype(np.float32), y


def small_net(seed: int = 0, n_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, n_out))


def test_learns_a_separable_problem():
    x, y = blobs()
    model = small_net()
    h = fit(model, (x[:300], y[:300]), val=(x[300:], y[300:]), epochs=4, lr=1e-2, metrics=["accuracy", "f1"],
            verbose=0)
    assert h.epoch == [0, 1, 2, 3]
    assert {"loss", "val_loss", "val_accuracy", "val_f1"} <= set(h.history)
    assert all(len(v) == 4 for v in h.history.values())
    assert h.history["loss"][-1] < 0.5 * h.history["loss"][0]
    assert h.history["val_accuracy"][-1] >= 0.95
    assert h.params["steps"] == 10  # ceil(300 / 32)
    assert model.training  # the mode the model came in with


def test_same_weights_and_losses_as_a_hand_written_loop():
    """fit must equal the plain PyTorch loop with the same init, optimizer and batch order.

    The batch order is the task's documented permutation: randperm(N) from a generator seeded
    with seed·1000003 + epoch. The only arithmetic difference is the loss reduction (fit sums
    per micro-batch and divides by the batch size; the hand loop takes the mean), a float32
    rounding difference of at most about 1e-7 relative per step; over 30 Adam steps that stays
    far below atol=1e-6 (in practice the weights come out bit-identical).
    """
    x, y = blobs(300, seed=1)
    model = small_net(seed=3)
    ref = copy.deepcopy(model)
    h = fit(model, (x, y), epochs=3, batch_size=32, lr=1e-2, seed=5, verbose=0)

    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    epoch_losses = []
    for epoch in range(3):
        perm = torch.randperm(300, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch))
        losses = []
        for i in range(0, 300, 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            loss = F.cross_entropy(ref(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(h.history["loss"]), torch.tensor(epoch_losses), atol=1e-6, rtol=1e-5)


def test_regression_and_evaluate_model_match_hand_math():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5], dtype=np.float32) + 0.3).astype(np.float32)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    h = fit(model, (x, y), val=(x[:64], y[:64]), loss="mean_squared_error", metrics=["mae", "r2"], epochs=15,
            lr=5e-2, verbose=0)
    assert h.history["val_loss"][-1] < 0.05 * h.history["val_loss"][0]
    got = evaluate_model(model, x, y, loss="mse", metrics=["mae", "r2"])
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).squeeze(-1)
    want_mse = F.mse_loss(pred, torch.from_numpy(y)).item()
    want_mae = (pred - torch.from_numpy(y)).abs().mean().item()
    torch.testing.assert_close(got["loss"], want_mse, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["mae"], want_mae, atol=1e-6, rtol=1e-5)
    assert got["r2"] > 0.99


def test_evaluate_model_classification_matches_hand_math():
    x, y = blobs(200, seed=4)
    model = small_net(seed=1).eval()
    got = evaluate_model(model, torch.from_numpy(x), torch.from_numpy(y), metrics=["accuracy"])
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    want_loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    want_acc = (logits.argmax(-1) == torch.from_numpy(y)).float().mean().item()
    torch.testing.assert_close(got["loss"], want_loss, atol=1e-6, rtol=1e-5)
    assert got["accuracy"] == pytest.approx(want_acc, abs=1e-7)
    assert not model.training


def test_early_stopping_stops_and_restores_the_best_epoch():
    x, y = blobs()
    model = small_net()
    # accuracy infers mode "max"; nothing can gain 0.5 after the first epoch, so it stops after 1 + patience
    h = fit(model, (x[:300], y[:300]), val=(x[300:], y[300:]), epochs=20, lr=1e-2, verbose=0,
            early_stopping={"metric": "val_accuracy", "patience": 2, "min_delta": 0.5})
    assert h.stopped_early and h.epoch == [0, 1, 2] and h.best_epoch == 0
    restored = evaluate_model(model, x[300:], y[300:])
    assert restored["loss"] == pytest.approx(h.history["val_loss"][0], rel=1e-6)


def test_out_writes_a_run_folder(tmp_path):
    x, y = blobs(200)
    model = small_net()
    h = fit(model, (x[:160], y[:160]), val=(x[160:], y[160:]), epochs=2, verbose=0, out=tmp_path / "run")
    assert h.run == tmp_path / "run"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10] and all("val_accuracy" in r for r in rows)
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["history"]["val_loss"] == h.history["val_loss"]
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000010"
    for k, v in files.load_weights(tmp_path / "run" / "model.safetensors").items():
        assert torch.equal(v, model.state_dict()[k])
    with pytest.raises(ZerotuneError, match="run folder already exists"):
        fit(small_net(), (x, y), epochs=1, verbose=0, out=tmp_path / "run")


def test_uint8_inputs_and_tensors_are_accepted():
    x, y = blobs(64)
    pixels = np.clip(x * 10 + 100, 0, 255).astype(np.uint8)
    h = fit(small_net(), (torch.from_numpy(pixels), torch.from_numpy(y)), epochs=1, verbose=0)
    assert len(h.history["loss"]) == 1


class Poisoned(nn.Module):
    """A small net whose forward call number ``at`` gives a NaN loss or a NaN gradient (finite loss)."""

    def __init__(self, at: int, where: str) -> None:
        super().__init__()
        self.net, self.at, self.where, self.calls = small_net(), at, where, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)  # (B, 3)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.at:
                if self.where == "loss":
                    return out * float("nan")
                w = self.net[2].bias
                return out + 0 * torch.sqrt(w - w)  # value unchanged; d sqrt(0) = inf, times 0 = NaN
        return out


@pytest.mark.parametrize(("where", "what"), [("loss", "loss"), ("grad", "gradient norm")])
def test_nonfinite_loss_or_gradient_is_caught_at_its_step(where, what):
    x, y = blobs(200)
    model = Poisoned(at=4, where=where)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RunFailed, match=rf"^step 4: the {what} is not finite"):
        fit(model, (x, y), epochs=1, verbose=0)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # the bad update was not applied
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # steps 0-3 were


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": ([[1.0, 2.0]], [0, 1])}, r"^fit: train: x has 1 rows but y has shape \(2,\)"),
        ({"train": ("x", [0])}, r"^fit: train x: expected a numpy array or a torch tensor, got str"),
        ({"train": (np.zeros((4, 4), np.float32),)}, r"^fit: train: expected a pair \(x, y\)"),
        ({"train": (np.zeros((4, 4), np.float32), np.array([0, -1, 0, 1]))}, r"^fit: train: class ids must be ≥ 0"),
        ({"train": (np.zeros((4, 4), np.float32), np.array([0, 1, 5, 1]))},
         r"^fit: y holds class ids up to 5, but the model outputs only 3 values"),
        ({"train": (np.zeros((4, 5), np.float32), np.array([0, 1, 2, 1]))}, r"^fit: the model does not accept x of"),
        ({"train": (np.zeros((4, 4), np.float32), np.zeros(4, np.float32))},
         r"^fit: loss: cross_entropy needs class labels"),
        ({"val": (np.zeros((2, 3), np.float32), np.array([0, 1]))},
         r"^fit: val: examples have shape \[3\], but the train examples have \[4\]"),
        ({"optimizer": "adagrad"}, r"^fit: optimizer: expected one of"),
        ({"lr": -1.0}, r"^fit: lr: "),
        ({"epochs": 0}, r"^fit: epochs: "),
        ({"metrics": ["bogus"]}, r"^fit: metrics: unknown metric 'bogus'"),
        ({"early_stopping": 3}, r"^fit: early_stopping needs validation data"),
        ({"early_stopping": {"patience": 0}, "val": "same"}, r"^fit: early_stopping: patience: "),
        ({"early_stopping": "yes"}, r"^fit: early_stopping: expected a patience"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    x, y = blobs(40)
    args = {"train": (x, y), "epochs": 1, "verbose": 0} | kwargs
    if args.get("val") == "same":
        args["val"] = (x, y)
    with pytest.raises(ZerotuneError, match=message):
        fit(small_net(), **args)


def test_evaluate_model_bad_input_names_the_function():
    x, y = blobs(20)
    with pytest.raises(ZerotuneError, match=r"^evaluate_model: x, y: x has 20 rows but y has shape \(19,\)"):
        evaluate_model(small_net(), x, y[:19])
    with pytest.raises(ZerotuneError, match=r"^evaluate_model: metrics: unknown metric 'r2' for classification"):
        evaluate_model(small_net(), x, y, metrics=["r2"])
