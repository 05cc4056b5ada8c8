"""`provision` against a real OpenSSH server on 127.0.0.1 (started here with a generated
host key and user key), with a tiny GGUF bundle built by the real pipeline. The "device" is
this machine: provision uploads static llama.cpp tools for it and runs the check there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_json, save_tokenized_tiny, small_profile

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class Server:
    port: int
    identity: Path
    known_hosts: Path
    process: subprocess.Popen

    def args(self, remote: Path) -> list[str]:
        return ["--host", f"{os.environ.get('USER', 'root')}@127.0.0.1", "--port", str(self.port), "--identity",
                str(self.identity), "--known-hosts", str(self.known_hosts), "--remote-dir", str(remote)]

    def stop(self) -> None:
        """Kill sshd and every connection it forked (those run in sessions of their own)."""
        if self.process.poll() is None:
            for pid in [*descendants(self.process.pid), self.process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()


def descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [grandchild for child in map(int, found) for grandchild in [*descendants(child), child]]


def start_sshd(directory: Path) -> Server:
    assert Path(SSHD).is_file(), "openssh-server is missing: `make install` installs it"
    directory.mkdir(parents=True, exist_ok=True)
    host_key, user_key = keygen(directory / "host_key"), keygen(directory / "user_key")
    shutil.copy(user_key.with_suffix(".pub"), directory / "authorized_keys")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "Subsystem sftp internal-sftp", "LogLevel ERROR",
    ]) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None:
            raise AssertionError(f"sshd did not start: {process.stderr.read().decode()}")
        time.sleep(0.1)
    key_type, key = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key}\n")
    return Server(port, user_key, known_hosts, process)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, default_checkpoint):
    """Two gguf bundles of a tiny model (Q8_0 and F16: different files)."""
    root = tmp_path_factory.mktemp("provision")
    targets = root / "targets"
    targets.mkdir()
    (targets / "gguf.toml").write_text(small_profile("gguf"))
    env = {"SPARSEDEPLOY_TARGETS": str(targets), "SPARSEDEPLOY_BUILD_CACHE": str(root / "cache")}
    dense = save_tokenized_tiny(root / "dense", default_checkpoint)
    built = {}
    for precision, choice in (("int8", ["--quant", "int8"]), ("fp16", ["--gguf-type", "F16"])):
        built[precision] = root / f"tiny-gguf-{precision}"
        result = run_cli("build", "--target", "gguf", "--model", str(dense), *choice, "-o", str(built[precision]),
                         "--windows", "2", env=env)
        assert result.returncode in (0, 1), result.stderr
    return built


def current_version(remote: Path, bundle: Path) -> Path:
    return (remote / "models" / bundle.name).resolve()


def test_provision_end_to_end(server, bundles, tmp_path):
    remote = tmp_path / "device"
    report = run_cli_json("provision", str(bundles["int8"]), *server.args(remote))
    assert report["device"]["arch"] == os.uname().machine and report["device"]["cores"] >= 1
    installed = remote / "models" / bundles["int8"].name / "model.gguf"
    assert installed.read_bytes() == (bundles["int8"] / "artifact" / "model.gguf").read_bytes()
    from sparsedeploy.models.checkpoint import sha256_file

    assert report["remote"]["sha256"] == sha256_file(installed)
    assert report["runtime"]["source"].startswith("static llama.cpp tools")
    quality = report["quality"]
    assert quality["reproduced"] and quality["ppl_device"] > 1
    assert report["latency"]["prompt_tok_s"] > 0 and report["latency"]["decode_tok_s"] > 0
    assert report["generation"]["text"].startswith("The capital of France is")
    # The device report is part of the bundle now, and the bundle still verifies.
    stored = json.loads((bundles["int8"] / "device" / "127.0.0.1.json").read_text())
    assert stored["quality"] == quality
    from sparsedeploy.build.bundle import verify_manifest

    verify_manifest(bundles["int8"])
    # No temporary directory is left on the device.
    assert not list(remote.rglob(".incoming-*"))


def test_a_wrong_host_key_stops_before_anything_is_copied(server, bundles, tmp_path):
    impostor = keygen(tmp_path / "impostor")
    key_type, key = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {key_type} {key}\n")
    remote = tmp_path / "device"
    args = server.args(remote)
    args[args.index("--known-hosts") + 1] = str(known_hosts)
    result = run_cli("provision", str(bundles["int8"]), *args)
    assert result.returncode == 2, result.stderr
    assert "does not match" in result.stderr and "nothing was copied" in result.stderr
    assert not remote.exists()


def test_an_unknown_host_and_a_refused_key_exit_2(server, bundles, tmp_path):
    remote = tmp_path / "device"
    args = server.args(remote)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unknown = [*args]
    unknown[unknown.index("--known-hosts") + 1] = str(empty)
    result = run_cli("provision", str(bundles["int8"]), *unknown)
    assert result.returncode == 2 and "is not in" in result.stderr, result.stderr
    refused = [*args]
    refused[refused.index("--identity") + 1] = str(keygen(tmp_path / "stranger"))
    result = run_cli("provision", str(bundles["int8"]), *refused)
    assert result.returncode == 2 and "refused the key" in result.stderr, result.stderr
    assert not remote.exists()


def test_an_unreachable_host_exits_3(server, bundles, tmp_path):
    args = server.args(tmp_path / "device")
    args[args.index("--port") + 1] = str(free_port())
    result = run_cli("provision", str(bundles["int8"]), *args)
    assert result.returncode == 3, result.stderr
    assert "cannot reach" in result.stderr


def test_a_full_disk_on_the_device_installs_nothing(server, bundles, tmp_path):
    remote = tmp_path / "small-disk"
    remote.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(remote)], check=True)
    try:
        result = run_cli("provision", str(bundles["int8"]), *server.args(remote))
        assert result.returncode == 2, result.stderr
        assert "free space on the device" in result.stderr
        assert not (remote / "models").exists()
        assert not list(remote.rglob("*.gguf"))
    finally:
        subprocess.run(["umount", str(remote)], check=True)


def test_a_dropped_connection_leaves_the_previous_model_in_place(bundles, tmp_path):
    from sparsedeploy.edge.provision import ProvisionRequest, provision
    from sparsedeploy.errors import TargetUnavailable

    server = start_sshd(tmp_path / "sshd")
    remote = tmp_path / "device"
    try:
        request = dict(host=f"{os.environ.get('USER', 'root')}@127.0.0.1", port=server.port, identity=server.identity,
                       known_hosts=server.known_hosts, remote_dir=str(remote), chunks=1, new_tokens=4)
        first = ProvisionRequest(bundles["int8"], **request)
        provision(first)
        before = current_version(remote, bundles["int8"])

        def drop_midway(sent: int, total: int) -> None:
            if sent > total // 2:
                server.stop()  # the device vanishes mid-upload

        # The F16 bundle under the int8 bundle's name: a new model for the same slot.
        renamed = shutil.copytree(bundles["fp16"], tmp_path / bundles["int8"].name)
        with pytest.raises(TargetUnavailable, match="current model is untouched"):
            provision(ProvisionRequest(renamed, **request, on_progress=drop_midway))
        assert current_version(remote, bundles["int8"]) == before
        assert (before / "model.gguf").read_bytes() == (bundles["int8"] / "artifact" / "model.gguf").read_bytes()
    finally:
        server.stop()


def test_a_missing_bundle_or_a_host_without_user_exits_2(tmp_path):
    result = run_cli("provision", str(tmp_path / "missing"), "--host", "pi@127.0.0.1")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cli("provision", str(tmp_path), "--host", "no-user-here")
    assert result.returncode == 2
