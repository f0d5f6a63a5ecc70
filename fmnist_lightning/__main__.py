from fmnist_lightning.cli import main

main()
