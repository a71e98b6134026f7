"""deploy/: the NATS configs load in a real nats-server, the systemd units and sysusers/tmpfiles
files are well formed, and the neuron's sd_notify reaches a socket the way systemd's would.

The NATS configs are checked as they are in the repository: only the paths of the TLS files and
the JetStream store are rewritten to a throwaway CA and a temp dir, and passwords come from env
vars, as in production.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cortex.config import gateway as cortex_config
from cortex.devstack import natsserver
from neuron import config as neuron_config
from neuron.systemd import notify
from tests.conftest import Proc, nats_request

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NATS_DIR = DEPLOY / "nats"
UNITS = DEPLOY / "systemd"
CLUSTER_NODES = ("nats-1.conf", "nats-2.conf", "nats-3.conf")

# The env vars deploy/nats/accounts.conf reads its passwords from, with test values: one per role,
# and one per neuron node (its example nodes gpu-a and gpu-b).
NATS_PASSWORDS = {
    "NATS_GATEWAY_PASSWORD": "gateway-secret",
    "NATS_GPU_A_PASSWORD": "gpu-a-secret",
    "NATS_GPU_B_PASSWORD": "gpu-b-secret",
    "NATS_OPS_PASSWORD": "ops-secret",
    "NATS_SYS_PASSWORD": "sys-secret",
}


def nats_password(user: str) -> str:
    """A user's test password: accounts.conf names its variable NATS_<USER>_PASSWORD, `-` as `_`."""
    return NATS_PASSWORDS[f"NATS_{user.upper().replace('-', '_')}_PASSWORD"]


PROD_TLS_DIR = "/etc/nats/tls/"
PROD_STORE_DIR = "/var/lib/nats"


def make_tls(directory: Path) -> Path:
    """A throwaway CA and one server certificate (serverAuth and clientAuth, as route TLS needs),
    named as deploy/nats expects them: ca.pem, server-cert.pem, server-key.pem."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=cortex test CA")
    run("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=nats")
    (directory / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:nats-1.internal, DNS:nats-2.internal, DNS:nats-3.internal\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
        "basicConstraints = CA:FALSE\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server-cert.pem",
    )
    return directory


def install_nats_configs(dest: Path, tls_dir: Path, store_dir: Path, rewrites: dict[str, str] | None = None) -> Path:
    """deploy/nats/*.conf copied to `dest` with the production paths (and any `rewrites`) replaced.

    Every rewrite must match somewhere, so a renamed path in deploy/nats fails here instead of
    silently checking a config that still points at /etc.
    """
    dest.mkdir(parents=True, exist_ok=True)
    replace = {PROD_TLS_DIR: f"{tls_dir}/", PROD_STORE_DIR: str(store_dir), **(rewrites or {})}
    texts = {path.name: path.read_text() for path in sorted(NATS_DIR.glob("*.conf"))}
    for old in replace:
        assert any(old in text for text in texts.values()), f"{old!r} is in no file of {NATS_DIR}"
    for name, text in texts.items():
        for old, new in replace.items():
            text = text.replace(old, new)
        (dest / name).write_text(text)
    return dest


def nats_config_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`nats-server -t`: parse and validate the config (TLS files included), then exit."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [natsserver.binary(), "-t", "-c", str(config)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls(tmp_path_factory.mktemp("tls"))


# --- NATS configs ----------------------------------------------------------------------------


def test_dev_nats_conf_is_valid() -> None:
    result = nats_config_check(ROOT / "nats.conf", {})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("node", CLUSTER_NODES)
def test_cluster_node_config_is_valid(node: str, tls_dir: Path, tmp_path: Path) -> None:
    configs = install_nats_configs(tmp_path / "etc", tls_dir, tmp_path / "store")
    result = nats_config_check(configs / node, NATS_PASSWORDS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration file" in (result.stdout + result.stderr) and "is valid" in (result.stdout + result.stderr)


def test_cluster_config_refuses_to_start_without_its_password_env_vars(tls_dir: Path, tmp_path: Path) -> None:
    configs = install_nats_configs(tmp_path / "etc", tls_dir, tmp_path / "store")
    partial = {k: v for k, v in NATS_PASSWORDS.items() if k != "NATS_GPU_B_PASSWORD"}
    result = nats_config_check(configs / "nats-1.conf", partial)
    assert result.returncode != 0
    assert "NATS_GPU_B_PASSWORD" in result.stdout + result.stderr


def test_every_cluster_node_has_its_own_server_name_and_routes_to_all_three() -> None:
    names = set()
    for node in CLUSTER_NODES:
        text = (NATS_DIR / node).read_text()
        names.update(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("server_name:"))
        assert "include ./cluster.conf" in text
    assert names == {"nats-1", "nats-2", "nats-3"}
    shared = (NATS_DIR / "cluster.conf").read_text()
    for n in (1, 2, 3):
        assert f"nats-route://nats-{n}.internal:6222" in shared
    assert "max_payload: 8MB" in shared and "max_payload: 8MB" in (ROOT / "nats.conf").read_text()


def test_example_configs_create_buckets_with_three_replicas() -> None:
    assert cortex_config.load(DEPLOY / "cortex.toml").nats.kv_replicas == 3
    assert neuron_config.load(DEPLOY / "neuron.toml").nats.kv_replicas == 3


# --- systemd units ---------------------------------------------------------------------------

HARDENING = (
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "LockPersonality",
    "CapabilityBoundingSet",
)


def read_unit(name: str) -> configparser.RawConfigParser:
    # systemd allows repeated keys (Wants=, SystemCallFilter=); the parser keeps the last.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize(
    ("unit", "user"), [("nats.service", "nats"), ("cortex.service", "cortex"), ("neuron.service", "neuron")]
)
def test_unit_runs_as_its_own_user_restarts_and_is_hardened(unit: str, user: str) -> None:
    parsed = read_unit(unit)
    service = parsed["Service"]
    assert service["User"] == user and service["Group"] == user
    assert service["Restart"] == "on-failure" and service["RestartSec"]
    assert int(service["LimitNOFILE"]) >= 65536
    unit_section = (UNITS / unit).read_text().split("[Service]")[0]
    assert "After=network-online.target" in unit_section and "Wants=network-online.target" in unit_section
    assert [key for key in HARDENING if key not in service] == []
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("unit", ["cortex.service", "neuron.service"])
def test_cortex_units_start_after_nats_and_run_their_configs(unit: str) -> None:
    text = (UNITS / unit).read_text()
    assert "After=nats.service" in text and "Wants=nats.service" in text
    program, config = ("cortex", "cortex.toml") if unit == "cortex.service" else ("neuron", "neuron.toml")
    assert read_unit(unit)["Service"]["ExecStart"].endswith(f"/{program} serve --config /etc/cortex/{config}")


def test_neuron_unit_notifies_readiness_reaches_gpus_and_allows_jit() -> None:
    service = read_unit("neuron.service")["Service"]
    assert service["Type"] == "notify"
    assert service["PrivateDevices"] == "no"
    assert set(service["SupplementaryGroups"].split()) == {"video", "render"}
    assert "MemoryDenyWriteExecute" not in service
    assert service["TimeoutStartSec"] and service["CacheDirectory"] == "cortex"


def test_nats_unit_uses_lame_duck_mode_to_stop() -> None:
    service = read_unit("nats.service")["Service"]
    assert service["KillSignal"] == "SIGUSR2"
    assert service["ExecStart"].endswith("nats-server -c /etc/nats/nats.conf")
    assert service["StateDirectory"] == "nats"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists; point it at one that does, change nothing else.
    programs = ("/usr/local/bin/nats-server", "/opt/cortex/bin/cortex", "/opt/cortex/bin/neuron")
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        for program in programs:
            text = text.replace(program, "/bin/true")
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(path) for path in tmp_path.glob("*.service"))
    assert len(units) == 3
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # Unknown keys and bad values are only warnings (exit 0): any output about our files is a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


# --- sysusers.d and tmpfiles.d ---------------------------------------------------------------


def config_lines(path: Path) -> list[list[str]]:
    import shlex

    return [shlex.split(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_sysusers_declares_the_three_users_and_gpu_groups() -> None:
    lines = config_lines(DEPLOY / "sysusers.d" / "cortex.conf")
    assert all(line[0] in {"u", "g", "m", "r"} for line in lines)
    users = {line[1]: line for line in lines if line[0] == "u"}
    assert set(users) == {"nats", "cortex", "neuron"}
    assert all(len(line) >= 4 and line[2] == "-" for line in users.values())  # system-assigned ids
    assert {(line[1], line[2]) for line in lines if line[0] == "m"} == {("neuron", "video"), ("neuron", "render")}


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or os.geteuid() != 0, reason="needs systemd-sysusers, run as root"
)
def test_sysusers_creates_them_in_a_scratch_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "sysusers.d" / "cortex.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert {"nats", "cortex", "neuron"} <= set(passwd)
    assert passwd["nats"][5] == "/var/lib/nats"
    groups = {line.split(":")[0]: line.split(":")[3] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    assert "neuron" in groups["video"].split(",") and "neuron" in groups["render"].split(",")


def test_tmpfiles_entries_are_well_formed() -> None:
    lines = config_lines(DEPLOY / "tmpfiles.d" / "cortex.conf")
    assert lines
    for kind, path, mode, user, group, *_ in lines:
        assert kind in {"d", "z"} and path.startswith("/etc/")
        assert len(mode) == 4 and int(mode, 8) & 0o007 in (0, 5)  # never writable by others
        assert user == "root" and group in {"root", "nats", "cortex", "neuron"}
    secrets = {path: mode for _, path, mode, *_ in lines if path.endswith((".env", "key.pem"))}
    assert secrets and all(int(mode, 8) & 0o007 == 0 for mode in secrets.values())


# --- sd_notify -------------------------------------------------------------------------------


def test_notify_sends_state_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cortex-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_a_socket_or_with_a_dead_one_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    notify("READY=1")  # must not raise: the daemon keeps running when systemd is not there


def test_neuron_tells_systemd_it_is_ready_then_that_it_stops(
    tmp_path: Path, spawn: Callable[..., Proc], nats_url: str, tiny_model_dir: Path
) -> None:
    """The daemon itself, under a NOTIFY_SOCKET as Type=notify gives it: READY=1 once it serves
    its default models, STOPPING=1 when SIGTERM starts the drain."""
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "test/tiny-llama"\nsource = "file:{tiny_model_dir}"\n')
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(90)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "NEURON_METRICS_LISTEN": ""}
        proc = spawn(
            "neuron-notify",
            "neuron.cli",
            "serve",
            "--nats",
            nats_url,
            "--node",
            "notify",
            "--models-config",
            str(models),
            "--model",
            "test/tiny-llama",
            env=env,
        )
        states = []
        while not states or states[-1] != "READY=1":
            states.append(sock.recv(4096).decode())
        assert set(states) <= {"STATUS=loading test/tiny-llama", "READY=1"}, proc.output()
        heartbeat = nats_request(nats_url, "cortex.node.notify.status")["heartbeat"]
        assert [(m["id"], m["state"]) for m in heartbeat["models"]] == [("test/tiny-llama", "ready")]
        proc.popen.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1", proc.output()
        assert proc.popen.wait(60) == 0
