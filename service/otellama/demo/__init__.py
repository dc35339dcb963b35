"""``otellama demo`` (``tour``) and the demo stack's traffic generator (``traffic``)."""

from otellama.demo.tour import CONCURRENT, STEADY, run

__all__ = ["CONCURRENT", "STEADY", "run"]
