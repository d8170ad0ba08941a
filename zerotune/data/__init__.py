"""Data: specs → sources → splits → normalised tensors; tokenizers, token shards and chat data.

    base.py          the containers every source returns (Split, Source)
    sources.py       data specs ``KIND:ARG`` and their loaders (SOURCES)
    splits.py        train/val/test splits and the normalisation learnt on train (load_data)
    builtin.py, idx.py, cifar.py, tabular.py, images.py, lazy.py    the loaders and files read on demand
    text.py, tokenizer.py, shards.py, mlm.py                        text, tokenizers, token shards, masking
    chat.py, instructions.py                                        chat templates and instruction rows
    augment.py, download.py                                         image augmentation, downloads
"""
