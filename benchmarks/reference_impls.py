"""The ORIGINAL public implementations of Wanda and SparseGPT, run on our exact protocol,
side by side with our own rows from results/prune_quality.json.

Protocol (the same as prune_quality.py): the default model (SmolLM2-135M-Instruct,
float32, CPU); calibration `canterbury`, 64 windows x 512 tokens, seed 0, made by our
`calibration_windows` and handed to their code through their own data-loader format
(a list of `(input_ids [1, 512], target)` pairs); evaluation by our `sparsedeploy eval`
(wikitext2, 40 windows x 1024 tokens) and the pattern measured by `sparsedeploy inspect`.

The pruning math is theirs, imported unmodified from checkouts of their repositories:

    git clone https://github.com/locuslab/wanda /tmp/wanda              # Sun et al. 2023
    git clone https://github.com/IST-DASLab/sparsegpt /tmp/sparsegpt    # Frantar & Alistarh 2023

(measured at wanda 8e8fc87 and sparsegpt 147d215). Wanda: `lib/prune.py:prune_wanda`
(per-output comparison group, no variant; 2:4 as prune_n=2, prune_m=4). SparseGPT:
`llama.py:llama_sequential` with `sparsegpt.py:SparseGPT.fasterprune` and the defaults
of their command line (percdamp 0.01, blocksize 128, not --true-sequential; 2:4 as
--prunen 2 --prunem 4, unstructured as --sparsity 0.5).

Their code targets transformers ~4.3x on a CUDA device; transformers here is 5.x on a
CPU. The few shims needed are in `install_shims` / `their_args`, each with a comment
saying what it does and why the pruning math is unchanged; `check_shims` verifies the
main one (every decoder layer, called the way their code calls it, gives the output the
model's own forward gives) before anything is pruned.

Each row prunes in a fresh child process; results accumulate in
results/reference_impls.json (a rerun skips measured rows unless --redo). Asserts nothing.

    .venv/bin/python benchmarks/reference_impls.py --wanda-src /tmp/wanda \\
        --sparsegpt-src /tmp/sparsegpt [--rows ROW ...] [--redo] [--list] [--table] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import EVALUATION, RESULTS_DIR, kept_name, sparsedeploy_json  # noqa: E402

RESULTS = RESULTS_DIR / "reference_impls.json"
OURS = RESULTS_DIR / "prune_quality.json"
NSAMPLES, SEQLEN, SEED = 64, 512, 0

# row -> (method, prune_n, prune_m, sparsity); our row of the same name without "original-".
ROWS: dict[str, tuple[str, int, int, float]] = {
    "original-wanda-2:4": ("wanda", 2, 4, 0.5),
    "original-sparsegpt-2:4": ("sparsegpt", 2, 4, 0.5),
    "original-wanda-50%": ("wanda", 0, 0, 0.5),
    "original-sparsegpt-50%": ("sparsegpt", 0, 0, 0.5),
    # The same windows fed in another order: only the summation order of the
    # calibration statistics changes. How far that alone moves the original's result
    # is the yardstick for the difference between theirs and ours.
    "original-wanda-2:4-order1": ("wanda", 2, 4, 0.5),
}
# row -> seed of the permutation of the calibration windows
PERMUTED = {"original-wanda-2:4-order1": 1}


def our_calibration(tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our calibration windows in their loaders' format: `(inp [1, seqlen], tar)` with
    tar = inp and every target but the last set to -100 (their get_c4/get_wikitext2).
    Only inp is ever read by their pruning code."""
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.data.windows import calibration_windows, tokenize

    windows = calibration_windows(tokenize(tokenizer, load_text("canterbury")), SEQLEN, NSAMPLES, SEED)
    loader = []
    for row in windows:
        inp = row.unsqueeze(0).clone()
        tar = inp.clone()
        tar[:, :-1] = -100
        loader.append((inp, tar))
    return loader


def install_shims(model) -> None:
    """The minimum to run their transformers-4.3x / CUDA code on transformers 5 / CPU."""
    # 1. `model.seqlen`: their own loaders (wanda get_llm, sparsegpt get_llama) set this
    #    attribute; it only sizes their buffers of layer inputs [nsamples, seqlen, hidden]
    #    and tells their loader how long a window is. 512 = our calibration windows.
    model.seqlen = SEQLEN
    # 2. `model.hf_device_map`: accelerate sets it when a model is loaded with
    #    device_map="auto"; wanda reads it to move tensors between GPUs. Empty means one
    #    device: every tensor stays on the device argument (the CPU). No math involved.
    model.hf_device_map = {}
    # 3. Rotary position embeddings. Since transformers 4.48 LlamaModel computes the RoPE
    #    (cos, sin) once and hands them to every decoder layer as `position_embeddings`;
    #    a decoder layer called without them fails. Their code calls each layer with
    #    only `attention_mask` (sparsegpt) or `attention_mask, position_ids` (wanda),
    #    which in 4.3x made the attention compute cos/sin itself from position_ids,
    #    defaulting to 0..seqlen-1. This pre-hook computes exactly that, with the model's
    #    own rotary module, for the position_ids given (else 0..seqlen-1), when the caller
    #    passed none; calls that do pass them (the model's own forward) are untouched.
    #    It touches no weight and no statistic: it restores the layer function their
    #    code was written against (check_shims verifies the outputs match).
    rotary = model.model.rotary_emb

    def add_position_embeddings(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs["position_embeddings"] = rotary(hidden, position_ids=position_ids)
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(add_position_embeddings, with_kwargs=True)
    # (No shim needed for the layer's return value: transformers 5 returns the hidden
    #  states tensor [1, seqlen, hidden] instead of a tuple, and their `layer(...)[0]`
    #  then takes batch element 0, [seqlen, hidden] -- what the tuple's [0][0] was --
    #  which is exactly what they store into outs[j]. The causal mask: with the sdpa
    #  attention transformers 5 passes attention_mask=None and sdpa applies the causal
    #  mask itself; their code captures and passes back whatever the model passed.)

    # 4. torch.cuda.synchronize(): fasterprune calls it once to time itself; on a
    #    CPU-only torch it raises. A device barrier only: a no-op here.
    torch.cuda.synchronize = lambda *args, **kwargs: None


def check_shims(model, loader, method: str) -> float:
    """Call every decoder layer the way their code does (hidden, attention_mask=<what
    the model passed>, plus position_ids for wanda) on the inputs the model's own forward
    gives it, and compare with that forward's outputs. Returns the max abs difference."""
    captured = []

    def record(module, args, kwargs, output):
        captured.append((args[0] if args else kwargs["hidden_states"], kwargs.get("attention_mask"),
                         kwargs.get("position_ids"), output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(loader[0][0], use_cache=False)
    for handle in handles:
        handle.remove()
    worst = 0.0
    with torch.no_grad():
        for layer, (inp, mask, position_ids, out) in zip(model.model.layers, captured):
            kwargs = {"attention_mask": mask}
            if method == "wanda":
                kwargs["position_ids"] = position_ids
            theirs = layer(inp[0].unsqueeze(0), **kwargs)[0]
            worst = max(worst, float((theirs - out[0]).abs().max()))
    return worst


def their_args(method: str, prune_n: int, prune_m: int, sparsity: float) -> argparse.Namespace:
    """What their command lines would parse (their defaults, our sample count/seed)."""
    if method == "wanda":
        # main.py: --sparsity_ratio 0.5 --sparsity_type {unstructured,2:4}; no --use_variant.
        return argparse.Namespace(nsamples=NSAMPLES, seed=SEED, sparsity_ratio=sparsity, use_variant=False,
                                  sparsity_type="unstructured" if prune_n == 0 else f"{prune_n}:{prune_m}")
    # llama.py's argparse defaults, with --sparsity 0.5 or --prunen 2 --prunem 4.
    return argparse.Namespace(nsamples=NSAMPLES, seed=SEED, percdamp=0.01, blocksize=128,
                              sparsity=sparsity if prune_n == 0 else 0.0, prunen=prune_n, prunem=prune_m,
                              gmp=False, wbits=16, minlayer=-1, maxlayer=1000, prune_only="", invert=False,
                              true_sequential=False, log_wandb=False)


def prune_child(row: str, wanda_src: Path, sparsegpt_src: Path, output: Path) -> dict:
    """One row in this (fresh) process: load, prune with their code, save."""
    from sparsedeploy.models.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    method, prune_n, prune_m, sparsity = ROWS[row]
    checkpoint = resolve_checkpoint("default")
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    loader = our_calibration(tokenizer)
    if row in PERMUTED:
        order = torch.randperm(len(loader), generator=torch.Generator().manual_seed(PERMUTED[row])).tolist()
        loader = [loader[i] for i in order]
    install_shims(model)
    shim_error = check_shims(model, loader, method)
    device = torch.device("cpu")
    torch.manual_seed(SEED)  # what both their mains do first (nothing here draws from it)
    started = time.perf_counter()
    if method == "wanda":
        sys.path.insert(0, str(wanda_src))
        import lib.prune as wanda_prune  # their package: wanda/lib

        # 5. Their get_loaders("c4", ...) downloads C4; it is replaced by a function that
        #    returns our windows in the same format (the calibration data is part of our
        #    protocol, the math is not).
        def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
            assert nsamples == NSAMPLES and seqlen == SEQLEN, (nsamples, seqlen)
            return loader, None

        wanda_prune.get_loaders = get_loaders
        wanda_prune.prune_wanda(their_args(method, prune_n, prune_m, sparsity), model, tokenizer, device,
                                prune_n=prune_n, prune_m=prune_m)
        source = "locuslab/wanda lib/prune.py:prune_wanda"
    else:
        sys.path.insert(0, str(sparsegpt_src))
        import llama as sparsegpt_llama  # their llama.py (imports their sparsegpt.py)
        import sparsegpt as sparsegpt_core

        # 6. llama.py reads its options from a module global `args` that its __main__
        #    sets from argparse: we set the same Namespace (their defaults).
        sparsegpt_llama.args = their_args(method, prune_n, prune_m, sparsity)
        # 7. Threads: fasterprune's column loop is thousands of tiny ops; on this shared
        #    2-core CPU two intra-op threads make it ~20x slower (the same reason our
        #    sparsegpt.py runs its loop on one thread). Run each fasterprune call on one
        #    thread; the thread count changes no operation, only how it is scheduled.
        original = sparsegpt_core.SparseGPT.fasterprune

        def fasterprune_one_thread(self, *args, **kwargs):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.set_num_threads(threads)

        sparsegpt_core.SparseGPT.fasterprune = fasterprune_one_thread
        sparsegpt_llama.llama_sequential(model, loader, device)
        source = "IST-DASLab/sparsegpt llama.py:llama_sequential"
    prune_s = time.perf_counter() - started
    for layer in model.model.layers:  # drop the pre-hooks before saving (they hold no state anyway)
        layer._forward_pre_hooks.clear()
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return {"prune_s": round(prune_s, 1), "shim_check_max_abs_diff": shim_error, "source": source,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(row: str, wanda_src: Path, sparsegpt_src: Path, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "pruned"
        child = subprocess.run([sys.executable, __file__, "--wanda-src", str(wanda_src), "--sparsegpt-src",
                                str(sparsegpt_src), "--child", row, "--child-out", str(output)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"{row}: pruning failed: {child.stderr.strip()[-1500:]}")
        pruned = json.loads(child.stdout.strip().splitlines()[-1])
        if keep is not None:
            shutil.copytree(output, keep / kept_name(row), dirs_exist_ok=True)
        inspected, _ = sparsedeploy_json("inspect", str(output))
        evaluated, eval_s = sparsedeploy_json("eval", str(output), *EVALUATION)
    layers = inspected["layers"]
    return {
        "ppl": evaluated["ppl"],
        "sparsity": inspected["total_sparsity"],
        "nm_compliance": {name: min(layer["nm_compliance"][name] for layer in layers) for name in ("2:4", "4:8")},
        "parameters": inspected["parameters"],
        "prune_s": pruned["prune_s"],
        "prune_peak_rss_mib": pruned["peak_rss_mib"],
        "eval_s": round(eval_s, 1),
        "shim_check_max_abs_diff": pruned["shim_check_max_abs_diff"],
        "source": pruned["source"],
        "settings": vars(their_args(*ROWS[row])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wanda-src", type=Path, help="checkout of github.com/locuslab/wanda")
    parser.add_argument("--sparsegpt-src", type=Path, help="checkout of github.com/IST-DASLab/sparsegpt")
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true", help="only print the table of what is measured")
    parser.add_argument("--keep", type=Path, help="also keep each pruned checkpoint under this directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        print("\n".join(ROWS))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.table:
        print_table(results)
        return
    for name, path, marker in (("--wanda-src", args.wanda_src, "lib/prune.py"),
                               ("--sparsegpt-src", args.sparsegpt_src, "llama.py")):
        if path is None or not (path / marker).is_file():
            raise SystemExit(f"{name} must be a checkout containing {marker} (see the docstring for git clone)")
    if args.child:
        print(json.dumps(prune_child(args.child, args.wanda_src.resolve(), args.sparsegpt_src.resolve(), args.child_out)))
        return
    for row in args.rows:
        if row not in ROWS:
            raise SystemExit(f"unknown row '{row}'; --list shows them")
        if row in results and not args.redo:
            continue
        print(f"measuring {row} ...", file=sys.stderr, flush=True)
        try:
            results[row] = measure(row, args.wanda_src.resolve(), args.sparsegpt_src.resolve(), args.keep)
        except RuntimeError as error:
            print(str(error), file=sys.stderr)
            continue
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{row}: ppl {results[row]['ppl']:.2f}", file=sys.stderr, flush=True)
    print_table(results)


def print_table(results: dict) -> None:
    ours = json.loads(OURS.read_text()) if OURS.is_file() else {}
    print("| row | ours ppl | original ppl | ours sparsity | original sparsity | ours 2:4 | original 2:4 "
          "| ours prune s | original prune s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        if row not in results:
            continue
        theirs, mine = results[row], ours.get(row.removeprefix("original-"), {}) if row not in PERMUTED else {}

        def cell(r, key, fmt):
            return format(r[key], fmt) if key in r else ""

        print(f"| {row.removeprefix('original-')} | {cell(mine, 'ppl', '.2f')} | {theirs['ppl']:.2f} "
              f"| {cell(mine, 'sparsity', '.2%')} | {theirs['sparsity']:.2%} "
              f"| {mine.get('nm_compliance', {}).get('2:4', float('nan')):.3f} | {theirs['nm_compliance']['2:4']:.3f} "
              f"| {mine.get('prune_s', '')} | {theirs['prune_s']} |")


if __name__ == "__main__":
    main()
