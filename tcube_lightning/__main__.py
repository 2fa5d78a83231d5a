from tcube_lightning.cli.entry import main

main()
