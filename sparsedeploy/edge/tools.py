"""llama.cpp's command-line tools (llama-perplexity, llama-simple), built from the same
llama.cpp source that llama-cpp-python vendors, for this machine or cross-compiled for
aarch64, and run (under qemu-user when the architecture is not this machine's).

The source is the llama-cpp-python sdist from PyPI, so the tools and the Python engine are
one llama.cpp version. Everything lives under a cache directory and is reused.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from sparsedeploy.errors import TargetUnavailable
from sparsedeploy.ui import info

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TOOLS = ("llama-perplexity", "llama-simple")
# What a cross build for aarch64 needs from Debian: compilers and an emulator to run it.
CROSS = {"aarch64": {"prefix": "aarch64-linux-gnu", "qemu": "qemu-aarch64", "packages": "crossbuild-essential-arm64 qemu-user"}}


def tools_cache() -> Path:
    return Path(os.environ.get("SPARSEDEPLOY_TOOLS_CACHE", Path.home() / ".cache" / "sparsedeploy" / "llama.cpp-tools"))


def llama_cpp_source(cache: Path | None = None) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (downloaded once)."""
    cache = cache or tools_cache()
    source = cache / "src" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    downloads = cache / "sdist"
    downloads.mkdir(parents=True, exist_ok=True)
    info(f"Downloading the llama.cpp source ({LLAMA_CPP_PYTHON} sdist) ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                    "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", str(downloads)], check=True)
    archive = next(downloads.glob("llama_cpp_python-*.tar.gz"))
    staging = cache / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(staging, members=members, filter="data")
    vendored = next(staging.glob("llama_cpp_python-*/vendor/llama.cpp"))
    source.parent.mkdir(parents=True, exist_ok=True)
    vendored.rename(source)
    shutil.rmtree(staging, ignore_errors=True)
    return source


def text_file(text) -> Path:
    """A named text (``sparsedeploy.data.sources.TextSource``) as one file, for
    llama-perplexity's ``-f``; cached by its sha256."""
    from sparsedeploy.atomic import write_file_atomically

    path = tools_cache() / "data" / f"{text.sha256[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, text.text.encode())
    return path


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


@dataclass
class BuiltTools:
    arch: str
    directory: Path  # holds the executables
    seconds: float  # build time (0 when reused)

    def path(self, tool: str) -> Path:
        return self.directory / tool


def build_tools(arch: str | None = None, cache: Path | None = None, jobs: int | None = None) -> BuiltTools:
    """llama-perplexity and llama-simple for ``arch`` (this machine's by default), static,
    without OpenMP or curl. A cross build targets generic armv8-a (NEON), which every
    64-bit ARM board runs."""
    cache = cache or tools_cache()
    arch = arch or host_arch()
    # Static executables run on any Linux of their architecture (a device's glibc may be
    # older than this machine's); generic ISA (no -march=native) for the same reason.
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
             "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_NATIVE=OFF", "-DCMAKE_EXE_LINKER_FLAGS=-static"]
    if arch != host_arch():
        cross = CROSS.get(arch)
        if cross is None:
            raise TargetUnavailable(f"no cross build for {arch} here; known: {', '.join(CROSS)}")
        compiler = f"{cross['prefix']}-g++"
        if shutil.which(compiler) is None:
            raise TargetUnavailable(f"{compiler} is not installed; apt-get install {cross['packages']}")
        flags += ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={arch}",
                  f"-DCMAKE_C_COMPILER={cross['prefix']}-gcc", f"-DCMAKE_CXX_COMPILER={compiler}"]
    build_dir = cache / f"build-{arch}-{hashlib.sha256(' '.join([LLAMA_CPP_PYTHON, *flags]).encode()).hexdigest()[:8]}"
    binaries = build_dir / "bin"
    if all((binaries / tool).is_file() for tool in TOOLS):
        return BuiltTools(arch, binaries, 0.0)
    if shutil.which("cmake") is None:
        raise TargetUnavailable("cmake is not installed; apt-get install cmake")
    source = llama_cpp_source(cache)
    info(f"Building {', '.join(TOOLS)} for {arch} (several minutes the first time) ...")
    started = time.perf_counter()
    log = build_dir.with_suffix(".log")
    with log.open("w") as output:
        steps = [["cmake", "-S", str(source), "-B", str(build_dir), *flags],
                 ["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 1)]]
        for step in steps:
            if subprocess.run(step, stdout=output, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"building llama.cpp's tools for {arch} failed; see {log}")
    return BuiltTools(arch, binaries, time.perf_counter() - started)


def runner(tools: BuiltTools) -> list[str]:
    """The command prefix that runs these tools here: nothing natively, qemu-user otherwise."""
    if tools.arch == host_arch():
        return []
    cross = CROSS[tools.arch]
    if shutil.which(cross["qemu"]) is None:
        raise TargetUnavailable(f"{cross['qemu']} is not installed; apt-get install {cross['packages']}")
    return [cross["qemu"], "-L", f"/usr/{cross['prefix']}"]


# -- llama-perplexity ---------------------------------------------------------------


@dataclass
class PerplexityRun:
    ppl: float
    ppl_error: float | None
    kl_mean: float | None  # against the saved base logits, when compared
    top1_agreement: float | None
    prompt_tok_s: float | None  # llama.cpp's own timing of the prompt batches
    seconds: float
    log_tail: str


_FINAL_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)(?: \+/- ([0-9.]+))?")
_KLD_MEAN = re.compile(r"Mean\s+KLD:\s+([0-9.eE+-]+)")
_SAME_TOP = re.compile(r"Same top p:\s+([0-9.]+)")
_PROMPT_SPEED = re.compile(r"prompt eval time =.*?([0-9.]+) tokens per second")
_DECODE_SPEED = re.compile(r"decoded (\d+) tokens in ([0-9.]+) s, speed: ([0-9.]+) t/s")


def perplexity(tools: BuiltTools, model: Path, text: Path, context: int, chunks: int, threads: int,
               save_base: Path | None = None, compare_base: Path | None = None) -> PerplexityRun:
    """llama-perplexity on ``text`` (its own tokenization and protocol: ``chunks`` windows of
    ``context`` tokens, the second half of each scored). ``save_base`` writes the logits for
    a later ``compare_base`` run, which adds KL divergence and top-1 agreement against them."""
    command = [*runner(tools), str(tools.path("llama-perplexity")), "-m", str(model), "-c", str(context),
               "-b", str(context), "--chunks", str(chunks), "-t", str(threads),
               "-lv", "4"]  # the level at which it prints llama.cpp's own timings
    if compare_base is not None:
        command += ["--kl-divergence-base", str(compare_base), "--kl-divergence"]
    else:
        command += ["-f", str(text)]
        if save_base is not None:
            command += ["--kl-divergence-base", str(save_base)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"llama-perplexity ({tools.arch}) failed (exit {done.returncode}): {log.strip().splitlines()[-1:]}")
    speed = _PROMPT_SPEED.search(log)
    if compare_base is not None:
        compared = parse_kl_divergence(log)
        return PerplexityRun(compared["ppl"], None, compared["kl_mean"], compared["top1_agreement"],
                             float(speed[1]) if speed else None, seconds, log.strip()[-2000:])
    final = _FINAL_PPL.search(log)
    if final is None:
        raise RuntimeError(f"llama-perplexity ({tools.arch}) printed no perplexity: {log.strip()[-400:]}")
    return PerplexityRun(float(final[1]), float(final[2]) if final[2] else None, None, None,
                         float(speed[1]) if speed else None, seconds, log.strip()[-2000:])


# One row of the --kl-divergence table (running values over the chunks so far): chunk, PPL,
# ln(PPL ratio), KL divergence, delta-p RMS %, same top p %, each "value ± uncertainty".
_KLD_ROW = re.compile(r"^\s*\d+\s+([0-9.]+)\s*±\s*\S+\s+\S+\s*±\s*\S+\s+(-?[0-9.]+)\s*±\s*\S+\s+\S+\s*±\s*\S+\s*%"
                      r"\s+([0-9.]+)\s*±", re.MULTILINE)


def parse_kl_divergence(log: str) -> dict:
    """PPL, mean KL and top-1 agreement of a ``--kl-divergence`` run: from its summary, or
    (short runs print none) from the last row of its per-chunk table."""
    mean_ppl, kld, same_top = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log), _KLD_MEAN.search(log), _SAME_TOP.search(log)
    if mean_ppl and kld and same_top:
        return {"ppl": float(mean_ppl[1]), "kl_mean": float(kld[1]), "top1_agreement": float(same_top[1]) / 100}
    rows = _KLD_ROW.findall(log)
    if not rows:
        raise RuntimeError(f"llama-perplexity printed no KL divergence: {log.strip()[-400:]}")
    ppl, kl, top = rows[-1]
    return {"ppl": float(ppl), "kl_mean": float(kl), "top1_agreement": float(top) / 100}


@dataclass
class Generation:
    text: str  # the prompt and what followed it, greedy
    decode_tok_s: float | None  # llama-simple's own measure
    seconds: float


def generate(tools: BuiltTools, model: Path, prompt: str, tokens: int) -> Generation:
    """Greedy generation with llama-simple."""
    command = [*runner(tools), str(tools.path("llama-simple")), "-m", str(model), "-n", str(tokens), prompt]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-simple ({tools.arch}) failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    return parse_generation(done.stdout, done.stderr, time.perf_counter() - started)


def parse_generation(stdout: str, stderr: str, seconds: float) -> Generation:
    speed = _DECODE_SPEED.search(stderr)
    return Generation(stdout, float(speed[3]) if speed else None, seconds)


def parse_perplexity(log: str) -> dict:
    """What a llama-perplexity run printed: final PPL and llama.cpp's prompt speed."""
    final, speed = _FINAL_PPL.search(log), _PROMPT_SPEED.search(log)
    if final is None:
        raise RuntimeError(f"llama-perplexity printed no perplexity: {log.strip()[-400:]}")
    return {"ppl": float(final[1]), "ppl_error": float(final[2]) if final[2] else None,
            "prompt_tok_s": float(speed[1]) if speed else None}
