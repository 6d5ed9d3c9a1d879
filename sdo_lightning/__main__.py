"""``python -m sdo_lightning ...`` runs the ``sdo`` command."""

from sdo_lightning.console import main

main()
