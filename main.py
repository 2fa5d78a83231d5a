"""Run tcube-lightning: ``python main.py test --config configs/demo.yaml``."""

from tcube_lightning.cli.entry import main

if __name__ == "__main__":
    main()
