"""zerotune: develop neural networks and language models from scratch and fine-tune them.

Every command-line verb is a function here::

    run = zerotune.train("configs/digits_mlp.yaml", overrides=["train.epochs=5"])
    zerotune.resume(run)                     # continue any run (a fine-tuning run as one)
    zerotune.evaluate(run)                   # metrics dict, also RUN/eval.json
    zerotune.predict(run, "new.csv")         # predictions CSV
    zerotune.generate(run, ["The with statement"], max_new_tokens=50, seed=0)   # decoder runs
    zerotune.prune(run, amount=0.5)          # a new run RUN-pruned, metrics before/after
    zerotune.quantize(run)                   # a new run RUN-int8: int8 weights, dequantized on loading
    history = zerotune.fit(model, train=(x, y), val=(xv, yv), optimizer="adam", epochs=5)  # Keras-style

    model, tokenizer = zerotune.load("minilm")      # a run folder, a Hugging Face folder or minilm
    zerotune.inspect("configs/digits_mlp.yaml")     # layer table, parameters, FLOPs, memory (a dict)
    zerotune.train_tokenizer("builtin:pydoc", 2048, "runs/tok")            # -> runs/tok/tokenizer.json
    zerotune.prepare("builtin:pydoc", "runs/tok", "runs/pydoc-shards")     # token shards; the counts
    zerotune.serve("runs/gpt_sft", port=8000)        # the OpenAI API + chat page, until Ctrl-C
    zerotune.chat("runs/gpt_sft")                    # a conversation in the terminal
    zerotune.demo()                                  # the offline tour into runs/demo/

The verbs are imported on first use (``import zerotune`` itself loads nothing heavy). Their
errors name Python parameters (``overwrite=True``) where the command line's name its flags
(``--overwrite``). The names
``train``, ``finetune``, ``evaluate``, ``generate``, ``inspect``, ``load``, ``serve`` and ``demo`` stay bound to
the verbs even once the modules of the same name are imported: reach those as
``from zerotune.train import loop``.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import types

from zerotune.errors import ZerotuneError

__version__ = "0.1.0"

# verb -> (module, function)
VERBS = {
    "train": ("zerotune.train.api", "train"),
    "resume": ("zerotune.finetune.api", "resume"),
    "finetune": ("zerotune.finetune.api", "finetune"),
    "evaluate": ("zerotune.evaluate.api", "evaluate"),
    "predict": ("zerotune.evaluate.predict", "predict"),
    "generate": ("zerotune.generate", "generate_text"),
    "serve": ("zerotune.serve.api", "serve"),
    "chat": ("zerotune.serve.api", "chat"),
    "export": ("zerotune.interop.export", "export"),
    "prune": ("zerotune.compress.api", "prune"),
    "quantize": ("zerotune.compress.api", "quantize"),
    "load": ("zerotune.load", "load"),
    "fit": ("zerotune.train.fit", "fit"),
    "inspect": ("zerotune.inspect", "inspect"),
    "train_tokenizer": ("zerotune.data.tokenizer", "train_tokenizer"),
    "prepare": ("zerotune.data.shards", "prepare"),
    "demo": ("zerotune.demo", "demo"),
    "load_config": ("zerotune.config", "load_config"),
}

__all__ = list(VERBS)

# the advice in error messages, as the command line gives it → as a Python caller acts on it
PYTHON_WORDS = [
    (r"pass --overwrite\b", "pass overwrite=True"),
    (r"\(--overwrite replaces", "(overwrite=True replaces"),
    (r"or --out to choose another", "or out=... to choose another"),
    (r"choose another --out\b", "choose another out=..."),
    (r"^--out: ", "out: "),
    (r"^--from: ", "source: "),
]


def speak_python(message: str) -> str:
    """An error message with the command line's advice in Python's words (:data:`PYTHON_WORDS`)."""
    for flag, python in PYTHON_WORDS:
        message = re.sub(flag, python, message)
    return message


def _in_python_words(fn):
    """``fn`` whose ZerotuneError messages speak Python (same exception, same type)."""

    @functools.wraps(fn)
    def verb(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZerotuneError as e:
            e.args = (speak_python(str(e)),)
            raise

    return verb


def __getattr__(name: str):  # PEP 562: a verb's module is imported when the verb is first used
    if name not in VERBS:
        raise AttributeError(f"module 'zerotune' has no attribute {name!r}")
    module, attr = VERBS[name]
    value = _in_python_words(getattr(importlib.import_module(module), attr))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(VERBS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # importing zerotune.train (the package) must not replace zerotune.train (the verb)
        if name in VERBS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
