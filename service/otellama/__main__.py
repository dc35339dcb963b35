"""``python -m otellama`` is the ``otellama`` command."""

from otellama.cli import main

raise SystemExit(main())
