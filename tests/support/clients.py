"""The real SingularityNET clients, snet-sdk 6.0.0 and snet-cli 3.1.1, in subprocesses.

They pin older libraries than the daemon, so ``scripts/setup`` installs them
in ``.venv-clients``; every run gets a fresh ``HOME`` and an empty working
directory (both clients cache channels, protos and registry data under
``~/.snet``, and snet-sdk reads ``./.env``).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import textwrap
from pathlib import Path
from typing import Any

from tests.support.chain import Chain, TestAccount
from tests.support.daemon import REPO
from tests.support.ipfs import IpfsServer

CLIENTS = REPO / ".venv-clients" / "bin"
PYTHON = CLIENTS / "python"
SNET = CLIENTS / "snet"


def clients_available() -> bool:
    """Whether ``scripts/setup`` installed the clients."""
    return PYTHON.exists() and SNET.exists()


def proto_tarball() -> bytes:
    """The example service's .proto as a tar.gz (``service_api_source``)."""
    buffer = io.BytesIO()
    data = (REPO / "protos" / "example_service.proto").read_bytes()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("example_service.proto")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "HOME": str(home),
        "PATH": f"{CLIENTS}:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }
    env.update(extra or {})
    return env


def run_sdk(
    body: str,
    home: Path,
    chain: Chain,
    ipfs: IpfsServer,
    account: TestAccount,
    signer: TestAccount,
    timeout: float = 120,
) -> Any:
    """Run ``body`` (Python, with ``sdk`` an initialised SnetSDK) and return what it prints after ``RESULT``."""
    home.mkdir(parents=True, exist_ok=True)
    work = home / "cwd"
    work.mkdir(exist_ok=True)
    script = work / "scenario.py"
    script.write_text("import json\nfrom snet.sdk import SnetSDK\nsdk = SnetSDK()\n" + textwrap.dedent(body))
    env = _env(
        home,
        {
            "SNET_PRIVATE_KEY": account.private_key,
            "SNET_SIGNER_PRIVATE_KEY": signer.private_key,
            "SNET_ETH_RPC_ENDPOINT": chain.url,
            "SNET_IPFS_ENDPOINT": ipfs.multiaddr,
            "SNET_MPE_CONTRACT_ADDRESS": chain.mpe.address,
            "SNET_REGISTRY_CONTRACT_ADDRESS": chain.registry.address,
            "SNET_TOKEN_CONTRACT_ADDRESS": chain.token.address,
            "SNET_CONCURRENCY": "False",
            "SNET_FORCE_UPDATE": "True",
        },
    )
    result = subprocess.run(
        [str(PYTHON), str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"snet-sdk scenario failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


class Cli:
    """snet-cli with its own HOME, configured for the local chain."""

    def __init__(self, home: Path, chain: Chain, ipfs: IpfsServer) -> None:
        self.home = home
        self.chain = chain
        (home / ".snet").mkdir(parents=True, exist_ok=True)
        (home / "cwd").mkdir(exist_ok=True)
        (home / ".snet" / "config").write_text(
            textwrap.dedent(
                f"""\
                [network.local]
                default_eth_rpc_endpoint = {chain.url}
                default_gas_price = medium
                current_registry_at = {chain.registry.address}
                current_multipartyescrow_at = {chain.mpe.address}
                current_fetchtoken_at = {chain.token.address}
                current_singularitynettoken_at = {chain.token.address}

                [ipfs]
                default_ipfs_endpoint = {ipfs.multiaddr}

                [filecoin]
                filecoin_api_key =

                [session]
                network = local
                """
            )
        )

    def identity(self, name: str, account: TestAccount) -> None:
        """Create (and select) an unencrypted key identity."""
        self.run("identity", "create", name, "key", "--private-key", account.private_key, "--network", "local", "-de")
        self.run("identity", name)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SNET), *args],
            cwd=self.home / "cwd",
            env=_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
            input="",
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"snet {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result


__all__ = ["Cli", "clients_available", "proto_tarball", "run_sdk"]
