"""llama.cpp's command-line tools: parsing what they print, and (marked `arm`, run by
`make arm-check`, not by `make test`) the aarch64 build under qemu-user reproducing x86."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import save_tokenized_tiny

PERPLEXITY_LOG = """\
perplexity: calculating perplexity over 4 chunks, n_ctx=512, batch_size=512, n_seq=1
[1]17.3142,[2]22.9401,[3]24.1047,[4]25.3318,
Final estimate: PPL = 25.3318 +/- 1.20419
llama_perf_context_print:        load time =      84.13 ms
llama_perf_context_print: prompt eval time =    2131.88 ms /  2048 tokens (    1.04 ms per token,   960.65 tokens per second)
"""
SIMPLE_STDERR = """\
main: decoded 32 tokens in 0.41 s, speed: 78.05 t/s
llama_perf_context_print: prompt eval time =       9.32 ms /     6 tokens (    1.55 ms per token,   643.78 tokens per second)
"""


KLD_TABLE = """\
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1    47100.8769 ± 2440.8294      -0.00000 ±       -nan      0.00120 ±    0.00010     0.100 ±  0.010 %    100.000 ±  0.000 %
   2    47695.7295 ± 1543.3767       0.00100 ±    0.00100      0.00150 ±    0.00010     0.110 ±  0.010 %     98.437 ±  1.000 %
"""


def test_perplexity_and_generation_output_is_parsed():
    from sparsedeploy.edge.tools import parse_generation, parse_kl_divergence, parse_perplexity

    # A short --kl-divergence run prints only its per-chunk table: the last row counts.
    assert parse_kl_divergence(KLD_TABLE) == {"ppl": 47695.7295, "kl_mean": 0.0015, "top1_agreement": 0.98437}
    summary = KLD_TABLE + "Mean PPL(Q)                   :  25.154055 ±   7.422392\nMean    KLD:   0.000931 ±   0.000011\n" \
                          "Same top p: 99.125 ± 0.125 %\n"
    assert parse_kl_divergence(summary) == {"ppl": 25.154055, "kl_mean": 0.000931, "top1_agreement": 0.99125}

    parsed = parse_perplexity(PERPLEXITY_LOG)
    assert parsed == {"ppl": 25.3318, "ppl_error": 1.20419, "prompt_tok_s": 960.65}
    generation = parse_generation("The capital of France is Paris.", SIMPLE_STDERR, 0.5)
    assert generation.decode_tok_s == 78.05 and generation.text.startswith("The capital")
    with pytest.raises(RuntimeError, match="no perplexity"):
        parse_perplexity("llama_model_load: error loading model")


def test_host_tools_build_and_measure_a_gguf(tmp_path, default_checkpoint):
    """llama-perplexity built for this machine runs a converted tiny model, and saving the
    base logits then comparing a run with itself gives KL 0 and top-1 1."""
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.edge import tools
    from sparsedeploy.export.gguf import convert_checkpoint, quantize

    checkpoint = save_tokenized_tiny(tmp_path / "tiny", default_checkpoint)
    convert_checkpoint(checkpoint, tmp_path / "f32.gguf")
    quantize(tmp_path / "f32.gguf", tmp_path / "q8.gguf", "Q8_0", 2)
    native = tools.build_tools()
    text = tools.text_file(load_text("wikitext2"))
    first = tools.perplexity(native, tmp_path / "q8.gguf", text, 64, 2, 2, save_base=tmp_path / "base.kld")
    again = tools.perplexity(native, tmp_path / "q8.gguf", text, 64, 2, 2, compare_base=tmp_path / "base.kld")
    assert first.ppl > 1 and again.ppl == pytest.approx(first.ppl, rel=1e-4)
    assert again.kl_mean == pytest.approx(0.0, abs=1e-6) and again.top1_agreement == 1.0


@pytest.mark.arm
def test_aarch64_build_under_qemu_reproduces_x86(tmp_path, default_checkpoint):
    checkpoint = save_tokenized_tiny(tmp_path / "tiny", default_checkpoint)
    done = subprocess.run([sys.executable, "-m", "sparsedeploy.edge.arm_check", "--model", str(checkpoint),
                           "--types", "Q8_0", "--context", "64", "--chunks", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    (row,) = result["rows"]
    assert row["passed"] and abs(row["ppl_delta_pct"]) < 1.0 and row["kl_mean"] < 0.01
    assert "emulated" in result["aarch64"]["run"]
