"""The ``snetd`` twistd plugin: ``twistd snetd --config=snetd.config.json``.

Only a ServiceMaker: importing this file (which twistd does for every
plugin on every run) must stay cheap and must not import a reactor.
"""

from twisted.application.service import ServiceMaker

snetd = ServiceMaker(
    "SingularityNET daemon",
    "snet_daemon.tap",
    "gRPC / gRPC-Web proxy for AI services with SingularityNET payments",
    "snetd",
)
