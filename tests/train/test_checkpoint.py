import errno
import json
import pickle

import pytest
import torch
from torch import nn

from zerotune import files
from zerotune.errors import RunFailed, ZerotuneError
from zerotune.train import checkpoint as ckpt


def weights():
    return {"w": torch.randn(3, 4), "b": torch.zeros(3)}


def test_round_trip(tmp_path):
    w = weights()
    state = {"loop": {"step": 5}, "rng": ckpt.rng_state(), "train": {"step": 5}}
    folder = ckpt.save_checkpoint(tmp_path, "step-000005", w, state)
    w2, s2 = ckpt.load_checkpoint(folder)
    torch.testing.assert_close(w2, w)
    assert s2["loop"]["step"] == 5
    assert json.loads((folder / "manifest.json").read_text())["step"] == 5


def test_keep_last_prunes_old_steps(tmp_path):
    for s in range(1, 5):
        ckpt.save_checkpoint(tmp_path, ckpt.step_name(s), weights(), {}, keep_last=2)
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, "step-000001", weights(), {})
    bad = ckpt.save_checkpoint(tmp_path, "step-000002", weights(), {})
    data = (bad / "weights.safetensors").read_bytes()
    (bad / "weights.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    with pytest.raises(ZerotuneError, match="checkpoint is damaged"):
        ckpt.load_checkpoint(bad)


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, "step-000001", weights(), {"v": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)

    monkeypatch.setattr(files, "save_file", full)
    with pytest.raises(RunFailed, match="step-000001: cannot write the checkpoint \\(No space left on device\\)"):
        ckpt.save_checkpoint(tmp_path, "step-000001", weights(), {"v": 2})
    with pytest.raises(RunFailed, match="model.safetensors: cannot write the file \\(No space left on device\\)"):
        files.save_weights(tmp_path / "model.safetensors", weights())
    assert ckpt.verify(good) is None
    assert ckpt.load_checkpoint(good)[1] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no temp leftovers


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_state_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = ckpt.save_checkpoint(tmp_path, "step-000001", weights(), {})
    with open(folder / "state.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = ckpt.sha256(folder / "state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ZerotuneError, match="cannot be loaded safely"):
        ckpt.load_checkpoint(folder)
    assert not (tmp_path / "PWNED").exists()


def test_tied_weights_save(tmp_path):
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    sd = {"emb.weight": emb.weight, "head.weight": head.weight}
    files.save_weights(tmp_path / "m.safetensors", sd)
    out = files.load_weights(tmp_path / "m.safetensors")
    torch.testing.assert_close(out["head.weight"], emb.weight.detach())


def test_bad_weights_file_and_shape_mismatch(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x00garbage")
    with pytest.raises(ZerotuneError, match="m.safetensors: not a readable safetensors file"):
        files.load_weights(p)
    model = nn.Linear(4, 3)
    with pytest.raises(ZerotuneError, match="tensor 'weight' has shape \\(2, 4\\), the model expects \\(3, 4\\)"):
        files.load_state_dict_checked(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(3)}, p)
    with pytest.raises(ZerotuneError, match="tensor 'bias' is missing"):
        files.load_state_dict_checked(model, {"weight": torch.zeros(3, 4)}, p)


def test_recover_a_save_killed_between_its_renames(tmp_path):
    step = ckpt.save_checkpoint(tmp_path, "step-000003", weights(), {"v": 3})
    best = ckpt.save_checkpoint(tmp_path, "best", weights(), {"v": "best"})
    best.rename(tmp_path / ".old-best-4242")  # killed after moving the old best aside
    (tmp_path / ".tmp-step-000006-4242").mkdir()  # ... and while writing the next step
    (tmp_path / ".tmp-step-000006-4242" / "weights.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path) == step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step-000003"]
    assert ckpt.load_checkpoint(best)[1] == {"v": "best"}


def test_recover_a_save_killed_after_its_renames(tmp_path):
    ckpt.save_checkpoint(tmp_path, "best", weights(), {"v": "old"})
    (tmp_path / "best").rename(tmp_path / ".old-best-7")
    ckpt.save_checkpoint(tmp_path, "best", weights(), {"v": "new"})  # the new one made it; the old one lingers
    ckpt.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert ckpt.load_checkpoint(tmp_path / "best")[1] == {"v": "new"}


@pytest.mark.parametrize("files", [["weights.safetensors", "state.pt"], {"state.pt": "0"},
                                   {"weights.safetensors": "0", "state.pt": "0", "../../etc/passwd": "0"},
                                   {"weights.safetensors": 1, "state.pt": "0"}])
def test_manifest_with_bad_entries_is_damaged(tmp_path, files):
    folder = ckpt.save_checkpoint(tmp_path, "step-000001", weights(), {})
    (folder / "manifest.json").write_text(json.dumps({"step": 1, "files": files}))
    assert ckpt.verify(folder) == "manifest.json is unreadable"
    with pytest.raises(ZerotuneError, match=r"step-000001: checkpoint is damaged: manifest.json is unreadable"):
        ckpt.load_checkpoint(folder)
