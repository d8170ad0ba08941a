"""zerotune: develop neural networks and language models from scratch and fine-tune them.

Every command-line verb is a function here::

    run = zerotune.train("configs/digits_mlp.yaml", overrides=["train.epochs=5"])
    zerotune.evaluate(run)                   # metrics dict, also RUN/eval.json
    zerotune.predict(run, "new.csv")         # predictions CSV
    zerotune.generate(run, ["The with statement"], max_new_tokens=50, seed=0)   # decoder runs
    zerotune.prune(run, amount=0.5)          # a new run RUN-pruned, metrics before/after
    zerotune.quantize(run)                   # a new run RUN-int8: int8 weights, dequantized on loading
    history = zerotune.fit(model, train=(x, y), val=(xv, yv), optimizer="adam", epochs=5)  # Keras-style

    model, tokenizer = zerotune.load("minilm")      # a run folder, a Hugging Face folder or minilm

(The names ``train``, ``finetune``, ``evaluate`` and ``generate`` are bound to the verbs; their
subpackages stay importable as ``from zerotune.train import loop``.)
"""

from __future__ import annotations

__version__ = "0.1.0"

from zerotune.compress import prune, quantize  # noqa: E402
from zerotune.config import load_config  # noqa: E402
from zerotune.evaluate import evaluate, predict  # noqa: E402
from zerotune.finetune.api import finetune  # noqa: E402
from zerotune.generate import generate_text as generate  # noqa: E402
from zerotune.interop.export import export  # noqa: E402
from zerotune.interop.hf import load  # noqa: E402
from zerotune.train.api import resume, train  # noqa: E402
from zerotune.train.fit import fit  # noqa: E402

__all__ = ["train", "resume", "finetune", "evaluate", "predict", "generate", "export", "prune", "quantize", "load",
           "fit", "load_config"]
