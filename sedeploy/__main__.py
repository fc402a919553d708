"""``python -m sedeploy`` runs the command line (the same as the ``sedeploy`` script)."""
from sedeploy.cli import main

main()
