from tcube_lightning.cli import main

main()
