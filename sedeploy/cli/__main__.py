"""``python -m sedeploy.cli`` runs the command line, as ``python -m sedeploy`` and the ``sedeploy`` script do."""
from sedeploy.cli import main

main()
