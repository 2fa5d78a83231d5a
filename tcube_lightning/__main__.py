from tcube_lightning.cli.app import main

main()
