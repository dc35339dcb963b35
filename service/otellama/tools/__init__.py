"""Operator tools: reading the JSONL log back (``report``, ``charts``, ``replay``) and drawing for the
terminal (``terminal``).

Never imported by the server: ``otellama serve`` loads nothing from here. May import everything below it
(:mod:`otellama.observe`, :mod:`otellama.sinks`, :mod:`otellama.settings`, :mod:`otellama.exchange`).
"""
