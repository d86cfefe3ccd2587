"""``python -m actadd`` is the ``actadd`` command."""

from actadd.cli import main

main()
