"""`provision BUNDLE --host USER@HOST`: put a GGUF bundle on an edge device over SSH and
check it there.

Safety first: the device's host key must already be in known_hosts (a mismatch or an
unknown host stops before anything is copied); the model goes to a temporary directory on
the device, its sha256 is verified there, and only then does a symlink swap (one rename)
make it current. A dropped connection or a full disk leaves the previous model in place.

On the device, in ``REMOTE_DIR`` (default ``~/sparsedeploy``):

    versions/<sha256[:16]>/model.gguf, report.json   one directory per model
    models/<NAME> -> ../versions/<sha256[:16]>       what is current (NAME: the bundle's)
    bin-<arch>/                                      llama.cpp tools we uploaded, if it had none
    data/<text>.txt                                  the evaluation text

The on-target check runs llama.cpp there: llama-perplexity on the profile's evaluation text
and llama-simple for decode speed, with the device's own llama.cpp binaries when it has
them, else static builds for its architecture uploaded from this machine. The same
llama-perplexity run on this machine gives the numbers the device must reproduce.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from sparsedeploy.errors import BadInput, TargetUnavailable
from sparsedeploy.ui import info

DEVICE_REPORTS = "device"  # bundle subdirectory for what provisioning brought back
FREE_SPACE_MARGIN = 1.05  # the model plus 5 %
CONNECT_TIMEOUT_S = 15
# The device must reproduce this machine's llama-perplexity within these bounds (different
# SIMD kernels round differently; emulation does not change the arithmetic).
PPL_REL_TOLERANCE = 0.01
PROMPT = "The capital of France is"


@dataclass
class ProvisionRequest:
    bundle: Path
    host: str  # USER@HOST
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None  # default ~/.ssh/known_hosts
    remote_dir: str = "sparsedeploy"  # relative to the login's home unless absolute
    chunks: int = 4  # llama-perplexity windows of the profile's seqlen on the device
    new_tokens: int = 64
    threads: int | None = None  # default: every core of the device
    on_progress: object = field(default=None, repr=False)  # (bytes sent, total) during uploads


def parse_host(spec: str) -> tuple[str, str]:
    user, at, host = spec.rpartition("@")
    if not at or not user or not host:
        raise BadInput(f"--host '{spec}' must be USER@HOST, e.g. pi@192.168.1.20")
    return user, host


# -- the connection -----------------------------------------------------------------


class Device:
    """One SSH connection to the device: commands and SFTP."""

    def __init__(self, request: ProvisionRequest):
        import paramiko

        self.user, self.host = parse_host(request.host)
        self.port = request.port
        known = (request.known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
        where = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        if not known.is_file():
            raise BadInput(f"no known_hosts file at {known}: add the device's host key first "
                           f"(ssh-keyscan -p {self.port} {self.host} >> {known}, after checking its fingerprint)")
        if request.identity is not None and not request.identity.expanduser().is_file():
            raise BadInput(f"--identity {request.identity} does not exist; pass the private key the device accepts")
        self.client = paramiko.SSHClient()
        self.client.load_host_keys(str(known))
        self.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            self.client.connect(
                self.host, port=self.port, username=self.user,
                key_filename=str(request.identity.expanduser()) if request.identity else None,
                look_for_keys=request.identity is None, allow_agent=request.identity is None,
                timeout=CONNECT_TIMEOUT_S, banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S,
            )
        except paramiko.BadHostKeyException:
            raise BadInput(f"the host key of {where} does not match {known}: nothing was copied. If the device was "
                           f"reinstalled, remove the old key (ssh-keygen -R '{where}') and add the new one after checking it") from None
        except paramiko.AuthenticationException:
            raise BadInput(f"{self.user}@{where} refused the key; pass --identity with a key in the device's "
                           "~/.ssh/authorized_keys") from None
        except paramiko.SSHException as error:
            if "not found in known_hosts" in str(error):
                raise BadInput(f"{where} is not in {known}: nothing was copied. Add its host key first "
                               f"(ssh-keyscan -p {self.port} {self.host} >> {known}, after checking its fingerprint)") from None
            raise TargetUnavailable(f"SSH to {where} failed: {error}") from None
        except (OSError, socket.timeout) as error:
            raise TargetUnavailable(f"cannot reach {where} ({error.__class__.__name__}: {error}); check the address, "
                                    "the port and that sshd runs on the device") from None
        self.sftp = self.client.open_sftp()

    def run(self, command: str, check: bool = True, timeout: float | None = None) -> tuple[int, str, str]:
        _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
        out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
        status = stdout.channel.recv_exit_status()
        if check and status != 0:
            raise RuntimeError(f"on {self.host}: `{command[:120]}` failed (exit {status}): {err.strip()[-300:]}")
        return status, out, err

    def close(self) -> None:
        self.client.close()


# -- what the device is -------------------------------------------------------------


def describe_device(device: Device) -> dict:
    _, arch, _ = device.run("uname -m")
    _, cores, _ = device.run("nproc", check=False)
    _, cpuinfo, _ = device.run("cat /proc/cpuinfo", check=False)
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware")), "unknown")
    _, found, _ = device.run("command -v llama-perplexity llama-simple", check=False)
    return {"host": device.host, "arch": arch.strip(), "cpu": cpu, "cores": int(cores.strip() or 1),
            "llama_cpp_binaries": [line.strip() for line in found.splitlines() if line.strip()]}


def free_bytes(device: Device, directory: str) -> int:
    _, out, _ = device.run(f"df -Pk {shlex.quote(directory)} | tail -1")
    return int(out.split()[3]) * 1024


# -- upload -------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def upload_verified(device: Device, files: dict[str, Path], destination: str, on_progress=None) -> None:
    """Upload ``files`` ({name: local path}) into ``destination`` on the device: into a
    temporary directory beside it, each file's sha256 checked there, then renamed into
    place. On any failure the temporary directory is removed and nothing changes."""
    parent = posixpath.dirname(destination)
    staging = posixpath.join(parent, f".incoming-{secrets.token_hex(4)}")
    needed = int(sum(path.stat().st_size for path in files.values()) * FREE_SPACE_MARGIN)
    device.run(f"mkdir -p {shlex.quote(parent)}")
    available = free_bytes(device, parent)
    if available < needed:
        raise BadInput(f"{device.host} has {available / 2**20:.1f} MiB free in {parent}, the upload needs "
                       f"{needed / 2**20:.1f} MiB: free space on the device; its current model is untouched")
    device.run(f"mkdir -p {shlex.quote(staging)}")
    try:
        for name, path in files.items():
            info(f"Uploading {name} ({path.stat().st_size / 2**20:.1f} MiB) to {device.host}:{staging} ...")
            device.sftp.put(str(path), posixpath.join(staging, name), callback=on_progress)
        expected = {name: sha256_of(path) for name, path in files.items()}
        _, out, _ = device.run(f"cd {shlex.quote(staging)} && sha256sum -- " + " ".join(shlex.quote(n) for n in files))
        found = {line.split(maxsplit=1)[1].lstrip("*").strip(): line.split()[0] for line in out.splitlines() if line.strip()}
        wrong = [name for name in files if found.get(name) != expected[name]]
        if wrong:
            raise RuntimeError(f"sha256 mismatch on {device.host} for {', '.join(wrong)} after upload")
        device.run(f"rm -rf {shlex.quote(destination)} && mv {shlex.quote(staging)} {shlex.quote(destination)}")
    except BaseException as error:
        try:
            device.run(f"rm -rf {shlex.quote(staging)}", check=False, timeout=30)
        except Exception:  # the connection is gone: a hidden .incoming directory is all that stays
            pass
        if isinstance(error, OSError) and ("space" in str(error).lower() or str(error) == "Failure"):
            raise BadInput(f"the upload to {device.host} failed ({error}); the device's disk is probably full: free "
                           "space there; its current model is untouched") from None
        if isinstance(error, (OSError, EOFError)) or error.__class__.__name__ == "SSHException":
            raise TargetUnavailable(f"the connection to {device.host} dropped during the upload ({error}); "
                                    "the device's current model is untouched: run provision again") from None
        raise


def make_current(device: Device, models_dir: str, name: str, version_dir: str) -> None:
    """Point models/NAME at the new version with one rename (atomic on POSIX)."""
    link, temporary = posixpath.join(models_dir, name), posixpath.join(models_dir, f".{name}.{secrets.token_hex(4)}")
    target = posixpath.relpath(version_dir, models_dir)
    device.run(f"mkdir -p {shlex.quote(models_dir)} && ln -s {shlex.quote(target)} {shlex.quote(temporary)} "
               f"&& mv -T {shlex.quote(temporary)} {shlex.quote(link)}")


# -- the whole job ------------------------------------------------------------------


def provision(request: ProvisionRequest) -> dict:
    from sparsedeploy.build import bundle as bundles
    from sparsedeploy.data.sources import load_text
    from sparsedeploy.edge import tools as llama_tools

    bundle = request.bundle.expanduser().resolve()
    bundles.verify_manifest(bundle)
    report = json.loads((bundle / bundles.REPORT_JSON).read_text())
    if report.get("backend") != "llamacpp":
        raise BadInput(f"'{bundle}' is a {report.get('target')} bundle; provision ships GGUF bundles: "
                       "build one with `sparsedeploy build --target gguf`")
    artifact = bundle / bundles.ARTIFACT_DIR / report["artifact"]["path"].split("/", 1)[1]
    model_sha = sha256_of(artifact)
    name = bundle.name
    quality = report["profile"]["check"]["quality"]
    text = load_text(quality.get("data", "wikitext2"))
    context = int(quality.get("seqlen", 1024))

    info(f"Connecting to {request.host} (port {request.port}) ...")
    device = Device(request)
    try:
        described = describe_device(device)
        info(f"Device: {described['arch']}, {described['cores']} cores, {described['cpu']}")
        home = device.sftp.normalize(".")
        root = request.remote_dir if request.remote_dir.startswith("/") else posixpath.join(home, request.remote_dir)
        version_dir = posixpath.join(root, "versions", model_sha[:16])
        # The previous model stays current until the new one is verified on the device.
        status, present, _ = device.run(f"sha256sum {shlex.quote(version_dir)}/model.gguf", check=False)
        if status != 0 or present.split()[:1] != [model_sha]:
            upload_verified(device, {"model.gguf": artifact, "report.json": bundle / bundles.REPORT_JSON}, version_dir,
                            request.on_progress)
        make_current(device, posixpath.join(root, "models"), name, version_dir)
        data_dir = posixpath.join(root, "data", text.sha256[:16])
        text_file = llama_tools.text_file(text)
        if device.run(f"test -f {shlex.quote(data_dir)}/text.txt", check=False)[0] != 0:
            upload_verified(device, {"text.txt": text_file}, data_dir)

        runtime = _device_tools(device, described, root)
        threads = request.threads or described["cores"]
        model_path = posixpath.join(root, "models", name, "model.gguf")
        info(f"Checking on {device.host}: llama-perplexity ({request.chunks} x {context} tokens), llama-simple ...")
        _, ppl_log, ppl_err = device.run(
            f"{runtime['perplexity']} -m {shlex.quote(model_path)} -f {shlex.quote(data_dir)}/text.txt -c {context} "
            f"-b {context} --chunks {request.chunks} -t {threads} -lv 4")
        on_device = llama_tools.parse_perplexity(ppl_log + ppl_err)
        _, gen_out, gen_err = device.run(f"{runtime['simple']} -m {shlex.quote(model_path)} -n {request.new_tokens} "
                                         f"{shlex.quote(PROMPT)}")
        generation = llama_tools.parse_generation(gen_out, gen_err, 0.0)
    finally:
        device.close()

    info("Running the same llama-perplexity here for comparison ...")
    here = llama_tools.perplexity(llama_tools.build_tools(), artifact, text_file, context, request.chunks, os.cpu_count() or 1)
    device_report = {
        "schema": "sparsedeploy.device-report/1",
        "device": described,
        "remote": {"root": root, "model": model_path, "sha256": model_sha, "current": posixpath.join(root, "models", name)},
        "runtime": runtime,
        "quality": {"protocol": {"tool": "llama-perplexity", "data": text.describe(), "context": context,
                                 "chunks": request.chunks, "scored": "second half of each window"},
                    "ppl_device": on_device["ppl"], "ppl_here": here.ppl,
                    "delta_pct": (on_device["ppl"] - here.ppl) / here.ppl * 100,
                    "reproduced": abs(on_device["ppl"] - here.ppl) <= PPL_REL_TOLERANCE * here.ppl},
        "latency": {"prompt_tok_s": on_device["prompt_tok_s"], "decode_tok_s": generation.decode_tok_s,
                    "threads": threads, "new_tokens": request.new_tokens,
                    "measured_by": "llama.cpp's own timers (llama-perplexity prompt batches, llama-simple decode)"},
        "generation": {"prompt": PROMPT, "text": generation.text.strip()},
    }
    _store_device_report(bundle, device.host, device_report)
    return device_report


def _device_tools(device: Device, described: dict, root: str) -> dict:
    """The device's llama.cpp binaries, else static ones for its architecture, uploaded."""
    from sparsedeploy.edge import tools as llama_tools

    found = {posixpath.basename(path): path for path in described["llama_cpp_binaries"]}
    if {"llama-perplexity", "llama-simple"} <= set(found):
        return {"source": "the device's llama.cpp", "perplexity": found["llama-perplexity"], "simple": found["llama-simple"]}
    arch = described["arch"]
    if arch != llama_tools.host_arch() and arch not in llama_tools.CROSS:
        raise TargetUnavailable(f"{device.host} ({arch}) has no llama.cpp binaries and there is no build for {arch} here; "
                                "install llama.cpp on the device (llama-perplexity and llama-simple on its PATH)")
    built = llama_tools.build_tools(arch)
    binaries = posixpath.join(root, f"bin-{arch}")
    status = device.run(" && ".join(f"test -x {shlex.quote(posixpath.join(binaries, tool))}" for tool in llama_tools.TOOLS),
                        check=False)[0]
    if status != 0:
        upload_verified(device, {tool: built.path(tool) for tool in llama_tools.TOOLS}, binaries)
        device.run(f"chmod +x {shlex.quote(binaries)}/*")
    return {"source": f"static llama.cpp tools for {arch} uploaded by sparsedeploy ({llama_tools.LLAMA_CPP_PYTHON})",
            "perplexity": posixpath.join(binaries, "llama-perplexity"), "simple": posixpath.join(binaries, "llama-simple")}


def _store_device_report(bundle: Path, host: str, report: dict) -> None:
    """device/HOST.json in the bundle, and the manifest rewritten to include it."""
    from sparsedeploy.atomic import write_file_atomically
    from sparsedeploy.build import bundle as bundles

    directory = bundle / DEVICE_REPORTS
    directory.mkdir(exist_ok=True)
    write_file_atomically(directory / f"{host.replace(':', '_')}.json", (json.dumps(report, indent=2) + "\n").encode())
    bundles.write_manifest(bundle)
