"""Fine-tuning: adapt a pretrained model to a task.

    freeze.py   freeze by name globs, train the last k blocks, train the head alone
    lora.py     low-rank adapters on any nn.Module's linear layers; merge/unmerge
    qlora.py    LoRA on a 4- or 8-bit quantized frozen base (bitsandbytes)
    adapt.py    the head a task needs and the trainable parameters a method chooses
    api.py      the finetune verb, and resume (a fine-tuning run continues as one)
"""
