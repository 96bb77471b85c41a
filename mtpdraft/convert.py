"""Convert a GGUF file into a local Hugging Face-style directory, once.

The result (config.json, model.safetensors, tokenizer files) is what every loader
in mtpdraft reads, so a converted GGUF and a downloaded HF checkpoint look alike.
Dequantization and the GGUF->HF tensor naming come from transformers' own GGUF
support; we only write the result in a form that loads in seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `gguf_path` to fp32 safetensors plus tokenizer files in `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    # Write into a sibling temp dir and rename at the end: an interrupted
    # conversion never leaves a half-written model behind.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        cfg = dict(load_gguf_checkpoint(str(gguf_path))["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        # transformers maps GGUF names to HF names through a model instance;
        # one on the meta device costs nothing.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
        config.save_pretrained(tmp)
        tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"source": gguf_path.name})
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(tmp)
        (tmp / "mtpdraft_source.json").write_text(json.dumps({"gguf": gguf_path.name}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
