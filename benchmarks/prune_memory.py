"""Peak memory of layer-by-layer pruning as depth grows. Prints, per depth, the peak
resident memory above what the loaded model itself takes (the calibration working set):
it should stay flat when depth quadruples. Asserts nothing.

    .venv/bin/python benchmarks/prune_memory.py [--method sparsegpt] [--depths 4 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from sparsedeploy.prune.methods import SparsityTarget, get_method
from sparsedeploy.prune.patterns import parse_nm
from sparsedeploy.prune.run import PruneRequest, prune_model

depth, method = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=depth,
                     num_attention_heads=8, num_key_value_heads=4)
model = AutoModelForCausalLM.from_config(config).eval()
def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
loaded = rss_kib()
samples = torch.randint(0, 4096, (32, 256), generator=torch.Generator().manual_seed(0))
request = PruneRequest(checkpoint=None, output=None, method=get_method(method), target=SparsityTarget(pattern=parse_nm("2:4")))
prune_model(model, request, samples)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"depth": depth, "parameters": params, "model_mib": round(params * 4 / 2**20, 1),
                  "rss_after_load_mib": round(loaded / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
                  "peak_above_loaded_mib": round((peak - loaded) / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    rows = []
    for depth in args.depths:
        out = subprocess.run([sys.executable, "-c", CHILD, str(depth), args.method], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    results = Path(__file__).parent / "results" / "prune_memory.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({args.method: rows}, indent=2) + "\n")
    first, last = rows[0], rows[-1]
    print(f"{args.method}: depth x{last['depth'] / first['depth']:.0f} -> model x{last['model_mib'] / first['model_mib']:.2f}, "
          f"working set above the model x{last['peak_above_loaded_mib'] / max(first['peak_above_loaded_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
