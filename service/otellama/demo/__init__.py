"""``otellama demo`` and the demo stack's traffic: a realistic workload against the emulator and the proxy.

- ``workload``: the one definition both use: models, prompts, client names, the fault, how many at once.
- ``tour``: ``otellama demo``, the workload through the official ``ollama`` client, then what otellama saw.
- ``traffic``: ``python -m otellama.demo.traffic``, the same workload as an endless weighted mix over HTTP.

It may import anything of otellama, operator tools included (report, charts, terminal): it is never on the
server's import path, and nothing but the ``otellama`` command (``cli``) and the tests imports it.
"""

from otellama.demo.tour import run
from otellama.demo.workload import CONCURRENT, STEADY

__all__ = ["CONCURRENT", "STEADY", "run"]
