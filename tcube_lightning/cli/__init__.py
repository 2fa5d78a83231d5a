"""The command line: LightningCLI's ``test`` and ``predict``, its parser and its config paths."""
