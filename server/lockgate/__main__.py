"""``python -m lockgate``: the same as the ``lockgate`` command."""

from lockgate.cli import main

raise SystemExit(main())
