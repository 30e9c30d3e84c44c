"""``twistd snetd`` as users run it: discovery, options, startup checks, shutdown."""

from __future__ import annotations

import errno
import inspect
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from snet_daemon import tap
from snet_daemon._proto import example_service_pb2 as pb
from snet_daemon._proto import example_service_pb2_grpc as pb_grpc
from snet_daemon.blockchain.build import build_chain
from snet_daemon.config import ConfigError, load_config
from snet_daemon.tap import Options, check_etcd_program, check_supported
from tests.conftest import make_channel
from tests.support.daemon import REPO, TWISTD, Daemon, daemon_env, run_twistd
from tests.support.ports import free_port
from tests.support.services import wait_for
from tests.support.upstream import Upstream


def _write(path: Path, config: dict[str, object]) -> Path:
    path.write_text(json.dumps(config))
    return path


def test_plugin_is_discoverable_from_a_regular_install(tmp_path: Path) -> None:
    """After a regular (non-editable) ``pip install``, twistd finds the snetd plugin."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "twisted" / "plugins" / "snetd_plugin.py").is_file()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    probe = (
        "import snet_daemon, sys;"
        "from twisted.plugin import getPlugins;"
        "from twisted.application.service import IServiceMaker;"
        "print(snet_daemon.__file__);"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    module_file, plugins = result.stdout.splitlines()[-2:]
    assert module_file.startswith(str(target))
    assert "'snetd'" in plugins


def test_twistd_help_lists_snetd(tmp_path: Path) -> None:
    """``twistd --help`` lists the snetd subcommand and ``twistd snetd --help`` its options."""
    result = run_twistd(["--help"], tmp_path)
    assert "snetd" in result.stdout
    result = run_twistd(["snetd", "--help"], tmp_path)
    assert "--config" in result.stdout
    assert "--check-config" in result.stdout


def test_check_config_prints_effective_config_masked(tmp_path: Path) -> None:
    """--check-config validates, prints the effective config with secrets masked, and exits 0."""
    config = _write(
        tmp_path / "c.json",
        {
            "blockchain_enabled": False,
            "private_key_for_metering": "11" * 32,
            "service_endpoint": "http://127.0.0.1:5005",
        },
    )
    result = run_twistd(["snetd", f"--config={config}", "--check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["service_endpoint"] == "http://127.0.0.1:5005"
    assert effective["private_key_for_metering"] == "***"
    assert "11" * 32 not in result.stdout
    assert "private_key_for_metering" in result.stderr  # not implemented yet: warned


def test_check_config_reports_errors_with_exit_1(tmp_path: Path) -> None:
    """An invalid config makes --check-config exit 1, naming the key and value."""
    config = _write(tmp_path / "c.json", {"max_message_size_in_mb": 0, "daemon_endpont": "x"})
    result = run_twistd(["snetd", f"--config={config}", "--check-config"], tmp_path)
    assert result.returncode == 1
    assert "max_message_size_in_mb" in result.stderr
    assert "daemon_endpoint" in result.stderr  # the suggestion for the typo


def _check_config(args: list[str]) -> tuple[int, str, str]:
    """``twistd snetd ARGS --check-config`` in process: exit status, stdout, stderr."""
    options = Options()
    options.stdout, options.stderr = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        options.parseOptions([*args, "--check-config"])
    assert isinstance(exit_info.value.code, int)
    return exit_info.value.code, options.stdout.getvalue(), options.stderr.getvalue()


SECRET = "s" * 48


@pytest.mark.parametrize(
    ("keys", "key"),
    [
        # A typo of "main": a custom network, which has no default endpoint.
        ({"blockchain_network_selected": "mainnet"}, "ethereum_json_rpc_http_endpoint"),
        ({"blockchain_provider_api_key": ""}, "blockchain_provider_api_key"),
        ({"ethereum_json_rpc_http_endpoint": "http://127.0.0.1:1", "registry_address_key": "0x1234"}, "0x1234"),
        (
            {"blockchain_network_selected": "private", "ethereum_json_rpc_http_endpoint": "http://127.0.0.1:1"},
            "registry_address_key' is required",
        ),
    ],
)
def test_check_config_refuses_what_startup_refuses(tmp_path: Path, keys: dict[str, object], key: str) -> None:
    """--check-config runs the chain checks startup runs: what the daemon would refuse, it reports (exit 1)."""
    config = _write(tmp_path / "c.json", {"token_secret_key": SECRET, **keys})
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_chain(load_config(str(config), environ={}).config.chain, Clock())
    status, stdout, stderr = _check_config([f"--config={config}"])
    assert status == 1, stdout
    assert key in stderr


def test_check_config_reports_chain_and_secret_problems_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Go's defaults (sepolia, no endpoint or key, Go's published secret): both problems in one report."""
    monkeypatch.chdir(tmp_path)
    status, _, stderr = _check_config(["--set", "daemon_endpoint=127.0.0.1:1"])
    assert status == 1
    assert "blockchain_provider_api_key" in stderr
    assert "published default" in stderr


def test_check_config_accepts_a_resolvable_chain(tmp_path: Path) -> None:
    """A known network with an API key resolves without any network access: valid."""
    config = _write(tmp_path / "c.json", {"token_secret_key": SECRET, "blockchain_provider_api_key": "k" * 32})
    status, stdout, stderr = _check_config([f"--config={config}"])
    assert status == 0, stderr
    assert json.loads(stdout)["blockchain_network_selected"] == "sepolia"


def test_check_config_reports_a_missing_etcd_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Payments on an embedded etcd need the etcd program: --check-config (the unit's ExecStartPre) fails
    when the embedded etcd will run whatever the metadata says, and warns when it runs only if the
    organisation metadata, not read yet, names no etcd endpoints.  Startup runs the same check."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no etcd program here
    chain: dict[str, object] = {"token_secret_key": SECRET, "blockchain_provider_api_key": "k" * 32}
    # The section without `enabled` enables the server (Go's quirk).
    server: dict[str, object] = {"payment_channel_storage_server": {"id": "storage-1"}}
    status, _, stderr = _check_config([f"--config={_write(tmp_path / 'server.json', {**chain, **server})}"])
    assert status == 1
    assert "payment_channel_storage_server.enabled is true, so snetd runs an etcd server of its own" in stderr
    assert "the 'etcd' program was not found: install it (Debian/Ubuntu: apt-get install etcd-server)" in stderr

    status, stdout, stderr = _check_config([f"--config={_write(tmp_path / 'default.json', chain)}"])
    assert status == 0, stderr
    assert json.loads(stdout)["payment_channel_storage_type"] == "etcd"
    assert "snetd: warning: payment_channel_storage_type is 'etcd' and payment_channel_storage_client" in stderr
    assert "unless the organisation metadata names etcd endpoints, but the 'etcd' program was not found" in stderr

    external: dict[str, object] = {"payment_channel_storage_client": {"endpoints": ["http://10.0.0.5:2379"]}}
    unpaid: dict[str, object] = {"blockchain_enabled": False, **server}
    memory: dict[str, object] = {**chain, **server, "payment_channel_storage_type": "memory"}
    for name, keys in (("external", {**chain, **external}), ("unpaid", unpaid), ("memory", memory)):
        status, _, stderr = _check_config([f"--config={_write(tmp_path / f'{name}.json', keys)}"])
        assert (status, stderr) == (0, ""), name


def test_check_etcd_program_finds_the_program(tmp_path: Path) -> None:
    """The check looks for the program the storage runs: found, nothing to say; missing, a ConfigError on
    payment_channel_storage_server.enabled, or a warning when the metadata decides."""
    enabled = load_config(None, environ={}, overrides={"payment_channel_storage_server.enabled": "true"}).config
    assert check_etcd_program(enabled, program=sys.executable) == ()
    with pytest.raises(ConfigError) as info:
        check_etcd_program(enabled, program=str(tmp_path / "etcd"))
    assert info.value.path == "payment_channel_storage_server.enabled"
    default = load_config(None, environ={}).config
    (warning,) = check_etcd_program(default, program=str(tmp_path / "etcd"))
    assert "unless the organisation metadata names etcd endpoints" in warning


ADDRESS = "0x3Bb9b2499c283cec176e7C707Ecb495B7a961ebf"


@pytest.mark.parametrize(
    ("keys", "path", "words"),
    [
        ({"ssl_cert": "/etc/cert.pem", "ssl_key": "/etc/key.pem"}, "ssl_cert", ("TLS", "plaintext", "remove")),
        ({"auto_ssl_domain": "daemon.example.org"}, "auto_ssl_domain", ("Let's Encrypt", "remove")),
        (
            {"allowed_user_flag": True, "allowed_user_addresses": [ADDRESS]},
            "allowed_user_flag",
            ("every caller", "remove"),
        ),
    ],
)
def test_unimplemented_security_keys_stop_startup(
    tmp_path: Path, keys: dict[str, object], path: str, words: tuple[str, ...]
) -> None:
    """TLS and the caller allow-list are refused, not just warned about: ignoring them would serve
    plaintext, or every caller, where the operator asked for less."""
    config = _write(tmp_path / "c.json", {"blockchain_enabled": False, **keys})
    with pytest.raises(ConfigError) as info:
        check_supported(load_config(str(config), environ={}).config)
    assert info.value.path == path
    assert "not implemented yet" in str(info.value)
    for word in words:
        assert word in str(info.value)
    status, _, stderr = _check_config([f"--config={config}"])
    assert status == 1
    assert "not implemented yet" in stderr


def test_security_keys_at_their_defaults_are_accepted() -> None:
    """A Go ``init-full`` file restates ssl_cert "", auto_ssl_cache_dir ".certs", allowed_user_flag false: fine."""
    full = REPO / "tests" / "data" / "config" / "snetd.config.full.json"
    check_supported(load_config(str(full), environ={}).config)
    check_supported(load_config(None, environ={}, overrides={"auto_ssl_cache_dir": "/var/cache/certs"}).config)


def test_example_configurations_ask_for_nothing_refused() -> None:
    """The production examples in etc/ pass check_supported (no TLS keys until TLS exists)."""
    for name in ("snetd.config.example.json", "snetd.config.example.yaml", "snetd.demo.json"):
        check_supported(load_config(str(REPO / "etc" / name), environ={}).config)


def test_default_config_file_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config, ./snetd.config.json is read (as Go's serve does) and --check-config says so."""
    _write(tmp_path / "snetd.config.json", {"blockchain_enabled": False, "daemon_endpoint": "127.0.0.1:9999"})
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = _check_config([])
    assert status == 0, stderr
    assert json.loads(stdout)["daemon_endpoint"] == "127.0.0.1:9999"
    assert f"no --config given: using {tmp_path / 'snetd.config.json'}" in stderr


def test_explicit_config_beats_the_working_directory_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over ./snetd.config.json, without a note."""
    _write(tmp_path / "snetd.config.json", {"blockchain_enabled": False, "daemon_endpoint": "127.0.0.1:9999"})
    other = _write(tmp_path / "other.json", {"blockchain_enabled": False, "daemon_endpoint": "127.0.0.1:9998"})
    monkeypatch.chdir(tmp_path)
    status, stdout, stderr = _check_config([f"--config={other}"])
    assert status == 0, stderr
    assert json.loads(stdout)["daemon_endpoint"] == "127.0.0.1:9998"
    assert "no --config given" not in stderr


def test_daemon_starts_from_the_working_directory_file(upstream: Upstream, tmp_path: Path) -> None:
    """``twistd -n snetd`` with no --config serves with ./snetd.config.json and logs that it used it."""
    with Daemon(tmp_path, {"service_endpoint": upstream.endpoint}, default_config_file=True) as daemon:
        channel = make_channel(daemon.address)
        try:
            assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value == 5
        finally:
            channel.close()
        assert "no --config given: using" in daemon.log_path.read_text()


@pytest.mark.parametrize(
    ("args", "blockchain", "passthrough"),
    [
        (["--passthrough"], True, True),
        (["--passthrough=false"], True, False),
        (["--passthrough=0", "--passthrough"], True, True),  # the last one wins
        (["--blockchain=false"], False, False),
        (["-b=false", "--passthrough=true"], False, True),
        (["--blockchain", "--blockchain=False"], False, False),
        (["-b"], True, False),
        ([], True, False),
    ],
)
def test_go_bool_flags_alone_or_with_a_value(
    tmp_path: Path, args: list[str], blockchain: bool, passthrough: bool
) -> None:
    """--blockchain/-b and --passthrough work bare (true) or with =value, as Go's bool flags do."""
    config = _write(
        tmp_path / "c.json",
        {"passthrough_enabled": False, "token_secret_key": SECRET, "blockchain_provider_api_key": "k" * 32},
    )
    status, stdout, stderr = _check_config([f"--config={config}", *args])
    assert status == 0, stderr
    effective = json.loads(stdout)
    assert (effective["blockchain_enabled"], effective["passthrough_enabled"]) == (blockchain, passthrough)


def test_go_bool_flag_value_must_be_attached(tmp_path: Path) -> None:
    """``--passthrough false`` is not a value (pflag agrees): the stray word is a usage error, not ignored."""
    config = _write(tmp_path / "c.json", {"blockchain_enabled": False})
    options = Options()
    with pytest.raises(usage.UsageError):
        options.parseOptions([f"--config={config}", "--passthrough", "false", "--check-config"])


def test_go_bool_flag_bad_value_is_a_configuration_error(tmp_path: Path) -> None:
    """``--passthrough=maybe`` is refused, naming the key."""
    config = _write(tmp_path / "c.json", {"blockchain_enabled": False})
    status, _, stderr = _check_config([f"--config={config}", "--passthrough=maybe"])
    assert status == 1
    assert "passthrough_enabled" in stderr
    assert "'maybe'" in stderr


def test_go_bool_flags_through_twistd(tmp_path: Path) -> None:
    """The same through twistd's own command line, which hands snetd its arguments."""
    config = _write(tmp_path / "c.json", {"passthrough_enabled": False})
    result = run_twistd(["snetd", f"--config={config}", "--passthrough", "-b=false", "--check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert (effective["blockchain_enabled"], effective["passthrough_enabled"]) == (False, True)


def test_bad_config_stops_startup_before_binding(tmp_path: Path) -> None:
    """A validation error exits non-zero before any port is bound."""
    port = free_port()
    config = _write(
        tmp_path / "c.json",
        {"daemon_endpoint": f"127.0.0.1:{port}", "blockchain_enabled": False, "service_timeout": "soon"},
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "snetd", f"--config={config}"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "service_timeout" in stderr
    assert "soon" in stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # still free


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("big.json", '{"blockchain_enabled": false, "ipfs_timeout": 1' + "0" * 5000 + "}", "4300 digits"),
        ("big.yaml", "blockchain_enabled: false\nipfs_timeout: 1" + "0" * 5000 + "\n", "4300 digits"),
        ("deep.json", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 200 levels"),
        ("self.yaml", "blockchain_enabled: false\nlog: &a {formatter: *a}\n", "a value contains itself"),
    ],
)
def test_unreadable_config_file_is_one_error_without_traceback(
    tmp_path: Path, name: str, text: str, fragment: str
) -> None:
    """A file that parses but cannot become configuration: exit 1 and a message naming the file."""
    config = tmp_path / name
    config.write_text(text)
    result = run_twistd(["snetd", f"--config={config}", "--check-config"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"snetd: configuration error: cannot read configuration file '{config}': "), line
    assert fragment in line


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    """Precedence: --set over SNET_* over the file."""
    config = _write(
        tmp_path / "c.json", {"blockchain_enabled": False, "service_timeout": "1s", "log": {"level": "info"}}
    )
    result = run_twistd(
        ["snetd", f"--config={config}", "--set", "service_timeout=3s", "--check-config"],
        tmp_path,
        env={"SNET_SERVICE_TIMEOUT": "2s", "SNET_LOG__LEVEL": "debug"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["service_timeout"] == "3s"
    assert effective["log"]["level"] == "debug"


def test_go_defaults_need_an_rpc_endpoint(tmp_path: Path) -> None:
    """With Go's defaults (blockchain on, sepolia) and no RPC endpoint or key, startup fails clearly."""
    result = run_twistd(["-n", "--pidfile=", "snetd", "--set", "daemon_endpoint=127.0.0.1:1"], tmp_path)
    assert result.returncode == 1
    assert "ethereum_json_rpc_http_endpoint" in result.stderr
    assert "blockchain_provider_api_key" in result.stderr


def test_forced_other_reactor_is_refused(tmp_path: Path) -> None:
    """If the user forces a non-asyncio reactor, snetd exits with a clear message."""
    config = _write(tmp_path / "c.json", {"blockchain_enabled": False})
    result = run_twistd(["--reactor=poll", "-n", "--pidfile=", "snetd", f"--config={config}"], tmp_path)
    assert result.returncode == 1
    assert "asyncio reactor" in result.stderr


def test_runs_on_the_asyncio_reactor_and_logs_warnings(upstream: Upstream, tmp_path: Path) -> None:
    """Plain ``twistd -n snetd`` runs on the asyncio reactor and logs unimplemented keys once each."""
    config = {"service_endpoint": upstream.endpoint, "rate_limit_per_minute": 60}
    with Daemon(tmp_path, config) as daemon:
        log = daemon.log_path.read_text()
    assert "AsyncioSelectorReactor" in log
    assert log.count("'rate_limit_per_minute' is recognised but not implemented yet") == 1


def test_log_level_and_json_format(upstream: Upstream, tmp_path: Path) -> None:
    """log.level filters events and log.formatter.type json writes one plain JSON object per line."""
    config = {
        "service_endpoint": upstream.endpoint,
        "log": {"level": "warn", "formatter": {"type": "json"}},
        "rate_limit_per_minute": 9,
    }
    with Daemon(tmp_path, config) as daemon:
        # Split on newlines only, as JSON-lines readers do (str.splitlines also splits on \x1e).
        lines = [line for line in daemon.log_path.read_text().split("\n") if line.strip()]
    events = [json.loads(line) for line in lines]
    assert events, "no log output"
    assert all(event["level"] in ("warn", "error", "critical") for event in events)
    assert any("rate_limit_per_minute" in event["msg"] for event in events)


def test_log_lines_to_the_journal_carry_their_priority(upstream: Upstream, tmp_path: Path) -> None:
    """When $JOURNAL_STREAM names the daemon's stdout (systemd with the journal), each line starts
    with its syslog priority, which journald files it under; otherwise lines are left as they are."""
    daemon = Daemon(tmp_path, {"service_endpoint": upstream.endpoint, "rate_limit_per_minute": 9})
    daemon.log_path.touch()
    status = daemon.log_path.stat()
    daemon.env = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    with daemon:
        lines = daemon.log_path.read_text().splitlines()
    assert lines
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
    assert any(line.startswith("<4>") and "rate_limit_per_minute" in line for line in lines)
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)


def _wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until ``text`` is in the file at ``path``, while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert process.poll() is None, f"snetd exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout}s"
        time.sleep(0.05)


def test_sigusr1_rotates_the_log_file(upstream: Upstream, tmp_path: Path) -> None:
    """With --logfile, SIGUSR1 rotates the file (twistd's signal for it) instead of killing snetd."""
    config = _write(
        tmp_path / "c.json",
        {
            "daemon_endpoint": f"127.0.0.1:{free_port()}",
            "blockchain_enabled": False,
            "service_endpoint": upstream.endpoint,
        },
    )
    logfile = tmp_path / "snetd.log"
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "snetd", f"--config={config}"],
        cwd=tmp_path,
        env=daemon_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_line(logfile, "listening on", process)
        process.send_signal(signal.SIGUSR1)
        rotated = tmp_path / "snetd.log.1"
        deadline = time.monotonic() + 10
        while not rotated.exists():
            assert process.poll() is None, f"snetd died of SIGUSR1 (exit {process.returncode})"
            assert time.monotonic() < deadline, "SIGUSR1 did not rotate the log file"
            time.sleep(0.05)
        assert "listening on" in rotated.read_text()
        process.send_signal(signal.SIGHUP)  # something to log after the rotation
        _wait_for_line(logfile, "SIGHUP: nothing to reload", process)
        assert "listening on" not in logfile.read_text()
    finally:
        process.terminate()
        process.wait(20)


def test_a_daemon_cannot_log_to_stdout(tmp_path: Path) -> None:
    """--logfile=- without -n is refused before daemonizing, as twistd does, instead of detaching
    and logging to /dev/null."""
    config = _write(tmp_path / "c.json", {"daemon_endpoint": f"127.0.0.1:{free_port()}", "blockchain_enabled": False})
    pidfile = tmp_path / "snetd.pid"
    try:
        result = run_twistd(["--logfile=-", f"--pidfile={pidfile}", "snetd", f"--config={config}"], tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.strip().splitlines()[-1:] == [
            "snetd: a daemon cannot log to stdout (--logfile=-): add -n (--nodaemon) to stay in the foreground, "
            "or give --logfile=FILE"
        ]
        assert not pidfile.exists()
    finally:
        time.sleep(0.5)  # a daemon that did start writes its pid file after forking
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_port_in_use_fails_startup(tmp_path: Path) -> None:
    """A daemon_endpoint that cannot be bound: one clear line, exit 1, no traceback, never "listening"."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _write(
            tmp_path / "c.json",
            {
                "daemon_endpoint": f"127.0.0.1:{port}",
                "blockchain_enabled": False,
                "payment_channel_storage_type": "memory",
            },
        )
        result = run_twistd(["-n", "--pidfile=", "snetd", f"--config={config}"], tmp_path)
    _assert_startup_failed(result, f"snetd: cannot listen on 127.0.0.1:{port}: Address already in use")


def _assert_startup_failed(result: subprocess.CompletedProcess[str], line: str) -> None:
    """Startup stopped as it should: exit 1, ``line`` last on stderr, no traceback, never "listening"."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert result.stderr.strip().splitlines()[-1:] == [line]
    assert "Traceback" not in output
    assert "listening on" not in output


def test_port_in_use_fails_startup_when_daemonizing(tmp_path: Path) -> None:
    """Without -n the port is bound before twistd forks: the same line on the terminal, exit 1, no pid file."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _write(tmp_path / "c.json", {"daemon_endpoint": f"127.0.0.1:{port}", "blockchain_enabled": False})
        pidfile = tmp_path / "snetd.pid"
        result = run_twistd([f"--pidfile={pidfile}", "snetd", f"--config={config}"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"snetd: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not pidfile.exists()


def test_log_file_that_cannot_be_opened_fails_startup(tmp_path: Path) -> None:
    """A --logfile in a missing directory: one clear line, exit 1, no traceback, never "listening"."""
    config = _write(tmp_path / "c.json", {"daemon_endpoint": f"127.0.0.1:{free_port()}", "blockchain_enabled": False})
    logfile = tmp_path / "missing" / "snetd.log"
    result = run_twistd(["-n", "--pidfile=", f"--logfile={logfile}", "snetd", f"--config={config}"], tmp_path)
    _assert_startup_failed(result, f"snetd: cannot open the log file {logfile}: No such file or directory")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_empty_host_serves_ipv4_and_ipv6_clients(upstream: Upstream, tmp_path: Path) -> None:
    """daemon_endpoint ":PORT" means every interface of both families, as Go's ":8080" does."""
    daemon = Daemon(tmp_path, {"service_endpoint": upstream.endpoint})
    daemon.config["daemon_endpoint"] = f":{daemon.port}"
    daemon.config_path.write_text(json.dumps(daemon.config))
    with daemon:  # ready once /heartbeat answers on 127.0.0.1
        for address in (f"127.0.0.1:{daemon.port}", f"[::1]:{daemon.port}"):
            if address.startswith("[") and not _has_ipv6_loopback():
                pytest.skip("this machine has no IPv6 loopback")
            channel = make_channel(address)
            try:
                assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value == 5, address
            finally:
                channel.close()


def test_empty_host_falls_back_to_ipv4_without_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where IPv6 sockets cannot be made, ":PORT" listens on 0.0.0.0 rather than failing."""
    real = tap._listening_socket

    def without_ipv6(family: int, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real(family, *args, **kwargs)

    monkeypatch.setattr(tap, "_listening_socket", without_ipv6)
    announced: list[str] = []
    port = tap._PublicPort(cast(Any, None), "", 0, cast(Any, None), announced.append)
    port.bind()
    try:
        [address] = announced
        assert address.startswith(":")
        with socket.create_connection(("127.0.0.1", int(address[1:])), timeout=5):
            pass
    finally:
        port.stopService()


def test_port_zero_logs_the_port_it_got(upstream: Upstream, tmp_path: Path) -> None:
    """The "listening" line is logged once bound, with the real port (daemon_endpoint port 0 picks one)."""
    config = _write(
        tmp_path / "c.json",
        {"daemon_endpoint": "127.0.0.1:0", "blockchain_enabled": False, "service_endpoint": upstream.endpoint},
    )
    log = tmp_path / "snetd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "snetd", f"--config={config}"],
            cwd=tmp_path,
            env=daemon_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while (match := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(match.group(1))
        assert port != 0
        channel = make_channel(f"127.0.0.1:{port}")
        try:
            assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value == 5
        finally:
            channel.close()
    finally:
        proc.terminate()
        proc.wait(20)


def test_sigterm_lets_running_calls_finish(upstream: Upstream, tmp_path: Path) -> None:
    """On SIGTERM the daemon stops accepting, lets running calls finish, then shuts down cleanly."""
    daemon = Daemon(tmp_path, {"service_endpoint": upstream.endpoint}).start()
    channel = make_channel(daemon.address)
    try:
        future = pb_grpc.EchoStub(channel).Unary.future(pb.EchoRequest(payload=b"late", delay_ms=1500), timeout=20)
        time.sleep(0.4)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert future.result().payload == b"late"
        # twistd ends a clean SIGTERM shutdown by re-raising the signal, so
        # the exit status is -SIGTERM (systemd counts that as a clean stop).
        assert daemon.process.wait(20) == -signal.SIGTERM
        assert "Server Shut Down." in daemon.log_path.read_text()
        with pytest.raises(grpc.RpcError):
            pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=1, b=1), timeout=2)
    finally:
        daemon.stop()
        channel.close()


def test_sighup_does_not_stop_an_unpaid_daemon(upstream: Upstream, tmp_path: Path) -> None:
    """SIGHUP to a daemon with nothing to reload (no blockchain, no metadata) is logged and survived.

    Its default action would end the process at once, without draining, and
    systemd counts that as a clean exit (Restart=on-failure does not help).
    """
    with Daemon(tmp_path, {"service_endpoint": upstream.endpoint}) as daemon:
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: nothing to reload" not in daemon.log_path.read_text():
            assert daemon.process.poll() is None, f"snetd died of SIGHUP:\n{daemon.log_tail()}"
            assert time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.05)
        channel = make_channel(daemon.address)
        try:
            assert pb_grpc.CalculatorStub(channel).add(pb.Numbers(a=2, b=3), timeout=10).value == 5
        finally:
            channel.close()
        assert daemon.process.poll() is None


def test_systemd_unit_installs_from_the_source_tree_like_readme() -> None:
    """etc/snetd.service tells to install the way README does (from the source tree: the package
    is not on PyPI), and runs the twistd of that install with the same config for both commands."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unit = (REPO / "etc" / "snetd.service").read_text(encoding="utf-8")
    install = re.search(r"^(python3 -m venv /opt/snetd && /opt/snetd/bin/pip install \.)\s", readme, re.MULTILINE)
    assert install is not None, "README no longer shows the install command"
    assert f"#   {install.group(1)}\n" in unit
    assert "pip install snet-daemon" not in unit
    commands = dict(re.findall(r"^(ExecStart|ExecStartPre)=(.*)$", unit, re.MULTILINE))
    config = "--config=/etc/snetd/snetd.config.json"
    assert commands["ExecStart"] == f"/opt/snetd/bin/twistd -n --pidfile= snetd {config}"
    assert commands["ExecStartPre"] == f"/opt/snetd/bin/twistd snetd {config} --check-config"


def _systemd_unit() -> dict[str, dict[str, str]]:
    """etc/snetd.service as ``{section: {key: value}}``."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in (REPO / "etc" / "snetd.service").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def _default(callable_: Any, parameter: str) -> float:
    """The default value of ``parameter`` of ``callable_`` (a timeout)."""
    value = inspect.signature(callable_).parameters[parameter].default
    assert isinstance(value, int | float)
    return float(value)


def test_systemd_unit_lets_running_calls_drain_on_stop() -> None:
    """etc/snetd.service signals twistd alone on stop (KillMode=mixed): the daemon stops the service's
    executables and the embedded etcd itself, after the drain.  And it gives the stop more time than
    the longest it can take, computed from the code's timeouts (the unit's comment lists them)."""
    from snet_daemon.frontend.gateway import Gateway
    from snet_daemon.payments import stack
    from snet_daemon.storage.embedded import EmbeddedEtcd
    from snet_daemon.storage.lease import LeaseKeeper
    from snet_daemon.tap import SHUTDOWN_GRACE

    service = _systemd_unit()["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    worst = (
        SHUTDOWN_GRACE  # running calls finish
        + _default(Gateway.drain, "settle")  # calls ended after the grace are refunded
        + stack._SETTLE  # background refunds land
        + _default(LeaseKeeper, "revoke_timeout")  # the storage lease is revoked
        + 2 * _default(EmbeddedEtcd, "stop_timeout")  # etcd's supervisor stops, then etcd: SIGTERM to SIGKILL
    )
    assert worst == 40, "update the TimeoutStopSec comment in etc/snetd.service"
    assert float(service["TimeoutStopSec"]) >= 1.25 * worst


def test_systemd_unit_gives_up_on_a_daemon_that_keeps_failing() -> None:
    """A bad configuration fails every start: etc/snetd.service stops restarting it once StartLimitBurst
    starts fall within StartLimitIntervalSec ([Unit] keys).  systemd's default (5 in 10 s) is never
    reached with RestartSec=5, so the daemon was restarted forever."""
    unit = _systemd_unit()
    interval, burst = float(unit["Unit"]["StartLimitIntervalSec"]), int(unit["Unit"]["StartLimitBurst"])
    restart_every = float(unit["Service"]["RestartSec"])
    assert unit["Service"]["Restart"] == "on-failure"
    assert burst * restart_every < interval / 2  # reached even when each failing start takes a few seconds
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(unit["Service"])


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    """systemd-analyze verify has nothing to say about etc/snetd.service: systemd only warns about an
    unknown key, a key in the wrong section or a bad value, and then ignores it."""
    unit = tmp_path / "snetd.service"
    unit.write_text(
        (REPO / "etc" / "snetd.service").read_text(encoding="utf-8").replace("/opt/snetd/bin/twistd", TWISTD)
    )
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_systemctl_reload_sends_sighup(upstream: Upstream, tmp_path: Path) -> None:
    """etc/snetd.service makes `systemctl reload snetd` work (without ExecReload= it fails, and
    reload-or-restart restarts, dropping running calls): its command, run as systemd would, reloads
    the daemon, which keeps running.  README tells operators about it."""
    command = _systemd_unit()["Service"]["ExecReload"]
    assert "systemctl reload snetd" in (REPO / "README.md").read_text(encoding="utf-8")
    with Daemon(tmp_path, {"service_endpoint": upstream.endpoint}) as daemon:
        assert daemon.process is not None
        subprocess.run(shlex.split(command.replace("$MAINPID", str(daemon.process.pid))), check=True, timeout=10)
        assert wait_for(lambda: "SIGHUP: nothing to reload" in daemon.log_path.read_text(), 10), daemon.log_tail()
        assert daemon.process.poll() is None


def test_startup_heap_is_frozen_out_of_full_collections() -> None:
    """What ``twistd snetd`` does once the reactor runs: full collections skip the startup heap."""
    import gc

    from snet_daemon.tap import freeze_startup_heap

    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # this test process imported Twisted, grpc, web3...
        assert len(gc.get_objects()) < frozen / 10  # what a full collection still walks
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_sighup_during_the_drain_does_not_stop_the_daemon(upstream: Upstream, tmp_path: Path) -> None:
    """SIGHUP after SIGTERM (systemctl reload during a stop, a terminal closing) must not cut the
    drain short: the running call completes and the daemon exits on its own."""
    daemon = Daemon(tmp_path, {"service_endpoint": upstream.endpoint}).start()
    process = daemon.process
    assert process is not None
    outcome: dict[str, object] = {}

    def slow_call() -> None:
        with make_channel(daemon.address) as channel:
            try:
                pb_grpc.EchoStub(channel).Unary(pb.EchoRequest(payload=b"x", delay_ms=3000), timeout=20)
                outcome["ok"] = True
            except Exception as exc:
                outcome["error"] = exc

    try:
        worker = threading.Thread(target=slow_call)
        worker.start()
        time.sleep(1.0)  # the call is running at the service
        process.send_signal(signal.SIGTERM)  # graceful stop: drains running calls (up to 10 s)
        time.sleep(0.5)
        process.send_signal(signal.SIGHUP)  # e.g. `systemctl reload`, or the terminal closing
        worker.join(20)
        code = process.wait(20)
    finally:
        daemon.stop()
    assert code != -signal.SIGHUP, f"killed by SIGHUP during the drain; call outcome: {outcome}\n{daemon.log_tail(8)}"
    assert outcome.get("ok"), outcome
