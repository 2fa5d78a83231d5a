"""The command lines of test_ddp.py, run one after the other in one launch of the processes (argv[1]: a JSON list of
argument lists). Lightning starts the other process once, and each process runs every command: starting the
processes is most of what such a run costs."""

import json
import sys

from tcube_lightning.cli.app import main

for args in json.loads(sys.argv[1]):
    main(args)
