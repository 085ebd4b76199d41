"""``python -m launch.train``: one rank of the training job (what the deepspeed launcher starts with
``--module launch.train``)."""

import sys

from launch.train import main

sys.exit(main())
