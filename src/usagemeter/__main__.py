"""``python -m usagemeter``: the same as the ``usagemeter`` command."""

from usagemeter.cli import main

main()
