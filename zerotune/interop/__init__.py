"""Other formats in and out.

    hf_files.py     a Hugging Face folder's config.json and weights (safetensors, shards, .bin)
    hf_bert.py      BERT-family folders in and out
    hf_decoder.py   GPT-2 / Llama / Mistral / Qwen2 folders in and out
    hf.py           a Hugging Face folder or builtin name (minilm) → model and tokenizer
    onnx_export.py  ONNX graphs that take raw inputs
    export.py       the export verb (hf, safetensors, onnx)
"""
