"""Convert a GGUF file into a local Hugging Face-style directory, once.

The result (config.json, model.safetensors, tokenizer files) is what every loader
in mtpdraft reads, so a converted GGUF and a downloaded HF checkpoint look alike.
Dequantization and the GGUF->HF tensor naming come from transformers' own GGUF
support; we only write the result in a form that loads in seconds. Beside it,
quant.safetensors keeps the file's own quantized blocks (rearranged for the
kernels, bit for bit) under the same names: the default `--dtype auto` runs those.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


# 2: quant.safetensors beside the dense weights; 3: its chunk-order layout; 4: panels of 16 rows
# (earlier conversions are redone once)
CONVERT_VERSION = 4


def is_current(out_dir: str | Path) -> bool:
    """True if `out_dir` holds a conversion made by this version of convert_gguf."""
    try:
        src = json.loads((Path(out_dir) / "mtpdraft_source.json").read_text())
    except (OSError, ValueError):
        return False
    return src.get("version") == CONVERT_VERSION and (Path(out_dir) / "config.json").is_file()


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
        quant = extract_quantized(gguf_path, skeleton, cfg, tensors)
        if quant:
            from .models import QUANT_FILE, save_quant

            save_quant(tmp / QUANT_FILE, quant)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(tmp)
        (tmp / "mtpdraft_source.json").write_text(json.dumps({"gguf": gguf_path.name, "version": CONVERT_VERSION}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def extract_quantized(gguf_path: Path, skeleton, config: dict, dense: dict[str, torch.Tensor]) -> dict:
    """The GGUF's quantized matrices as kernels.QWeight records under their HF names.

    transformers' own name map and tensor processor give each tensor's HF name and
    row order (Llama's q/k rows are permuted in GGUF files); every tensor is checked to
    dequantize to exactly the dense tensor transformers produced, else it is left out
    (it then runs from the dense weights)."""
    import warnings

    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    from .kernels import QWeight
    from .kernels.quant import dequantize, repack_gguf, supported

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    out, skipped = {}, []
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if len(t.shape) != 2 or t.name not in names:
            continue
        k, rows = int(t.shape[0]), int(t.shape[1])
        name = names[t.name]
        if not supported(qtype, rows, k) or name not in dense:
            if qtype not in ("F32", "F16", "BF16"):
                skipped.append(f"{t.name} ({qtype})")
            continue
        order = processor.process(weights=np.arange(rows, dtype=np.float64)[:, None], name=t.name,
                                  tensor_key_mapping=names, parsed_parameters={"tensors": {}, "config": config})
        perm = None if order is None or order.weights is None else np.asarray(order.weights)[:, 0].astype(np.int64)
        if perm is None or sorted(perm.tolist()) != list(range(rows)):
            skipped.append(f"{t.name} (row order)")
            continue
        rec = repack_gguf(np.asarray(t.data).reshape(rows, -1)[perm], qtype, rows, k)
        if not np.array_equal(dequantize(rec, qtype, k), dense[name].numpy()):
            skipped.append(f"{t.name} (values)")
            continue
        out[name] = QWeight([torch.from_numpy(np.ascontiguousarray(rec))], [qtype], k)
    if skipped:
        warnings.warn(f"{gguf_path.name}: kept dense (not quantized): {', '.join(skipped[:8])}"
                      f"{'...' if len(skipped) > 8 else ''}", RuntimeWarning, stacklevel=2)
    return out
