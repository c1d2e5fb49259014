"""gRPC's core log level for our command lines: silent unless the user sets ``GRPC_VERBOSITY``.

gRPC's C core writes its own lines to stderr (``E1205 … add_port.cc:83] Failed to add port``)
ahead of the one line our refusal gives, and notices on a successful start. It reads
``GRPC_VERBOSITY`` once, when ``grpc`` is first imported, so the command lines import this
module before anything imports ``grpc``. A user who wants gRPC's lines sets the variable
(``GRPC_VERBOSITY=debug``); it is never overridden.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
