import sys

from fmnist_lightning.cli import main

sys.exit(main())
